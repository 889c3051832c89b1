"""Meshes come from jax.make_mesh (one slice) or create_hybrid_device_mesh
(several slices joined over DCN), with the right shape, names and axis types.

On 8 emulated CPU devices there is one slice, so the multislice layout is
checked on fake devices that carry a `slice_index` (as TPU devices do), and
the hybrid call itself by recording the ICI / DCN shapes it is given.
"""

import dataclasses

import jax
import pytest

from gemjax.config import load_config
from gemjax.errors import ConfigError
from gemjax.parallel import mesh as mesh_lib
from gemjax.parallel import sharding as shd
from gemjax.train.loop import build_mesh

AXES = shd.MESH_AXES


@dataclasses.dataclass(frozen=True)
class FakeDevice:
  """What create_hybrid_device_mesh reads of a device (a CPU kind, so each
  slice is laid out in list order, as on the emulated CPUs)."""
  id: int
  slice_index: int
  process_index: int = 0
  platform: str = 'cpu'
  device_kind: str = 'cpu'


def _sizes(**kw):
  return {a: kw.get(a, 1) for a in AXES}


@pytest.mark.parametrize('overrides, expected', [
    ([], _sizes(data=8)),
    (['mesh.fsdp=2', 'mesh.tensor=2'], _sizes(data=2, fsdp=2, tensor=2)),
    (['mesh.data=1', 'mesh.fsdp=2', 'mesh.context=4', 'model.attention=ring'],
     _sizes(fsdp=2, context=4)),
    # mesh.<axis> is the size within a slice; dcn_<axis> multiplies it.
    (['mesh.data=2', 'mesh.fsdp=2', 'mesh.dcn_data=2'], _sizes(data=4, fsdp=2)),
    (['mesh.data=-1', 'mesh.fsdp=2', 'mesh.dcn_fsdp=2'], _sizes(data=2, fsdp=4)),
    (['mesh.fsdp=2', 'mesh.dcn_data=2', 'mesh.dcn_fsdp=2'], _sizes(fsdp=4, data=2)),
])
def test_build_mesh_shape_names_and_auto_axis_types(overrides, expected):
  mesh = build_mesh(load_config(None, overrides))
  assert mesh.axis_names == AXES
  assert dict(mesh.shape) == expected
  assert mesh.axis_types == (jax.sharding.AxisType.Auto,) * len(AXES)
  assert sorted(d.id for d in mesh.devices.flat) == [d.id for d in jax.devices()]


def test_one_slice_goes_through_jax_make_mesh(monkeypatch):
  calls = []
  real = jax.make_mesh
  monkeypatch.setattr(jax, 'make_mesh', lambda *a, **kw: calls.append((a, kw)) or real(*a, **kw))
  monkeypatch.setattr(shd.mesh_utils, 'create_hybrid_device_mesh',
                      lambda *a, **kw: pytest.fail('hybrid mesh built for one slice'))
  build_mesh(load_config(None, ['mesh.fsdp=2', 'mesh.tensor=2']))
  (shape, names), kw = calls[0]
  assert shape == (2, 2, 1, 1, 2) and names == AXES


@pytest.mark.parametrize('overrides, ici, dcn', [
    (['mesh.data=2', 'mesh.fsdp=2', 'mesh.dcn_data=2'], (2, 2, 1, 1, 1), (2, 1, 1, 1, 1)),
    (['mesh.data=1', 'mesh.fsdp=-1', 'mesh.dcn_fsdp=2', 'mesh.tensor=2'],
     (1, 2, 1, 1, 2), (1, 2, 1, 1, 1)),
])
def test_dcn_sizes_take_the_hybrid_path_with_separate_ici_and_dcn_shapes(
    monkeypatch, overrides, ici, dcn):
  calls = []
  real = shd.mesh_utils.create_hybrid_device_mesh
  def spy(mesh_shape, dcn_mesh_shape, devices, **kw):
    calls.append((tuple(mesh_shape), tuple(dcn_mesh_shape), len(devices)))
    return real(mesh_shape, dcn_mesh_shape, devices, **kw)
  monkeypatch.setattr(shd.mesh_utils, 'create_hybrid_device_mesh', spy)
  mesh = build_mesh(load_config(None, overrides))
  assert calls == [(ici, dcn, 8)]
  assert tuple(mesh.devices.shape) == tuple(i * d for i, d in zip(ici, dcn))


def test_slices_sit_on_the_dcn_axes_whatever_the_device_order():
  # Two slices of four, listed slice 1 first: the DCN part of an axis is the
  # outer one, so each slice is a contiguous block of the mesh.
  devices = [FakeDevice(i, slice_index=1 - i // 4) for i in range(8)]
  grid = shd.device_grid((2, 2, 1, 1, 1), (1, 2, 1, 1, 1), devices)   # dcn_fsdp=2
  assert grid.shape == (2, 4, 1, 1, 1)
  assert {d.slice_index for d in grid[:, :2].flat} == {0}
  assert {d.slice_index for d in grid[:, 2:].flat} == {1}
  grid = shd.device_grid((2, 2, 1, 1, 1), (2, 1, 1, 1, 1), devices)   # dcn_data=2
  assert grid.shape == (4, 2, 1, 1, 1)
  assert {d.slice_index for d in grid[:2].flat} == {0}
  assert {d.slice_index for d in grid[2:].flat} == {1}


def test_one_process_without_slices_emulates_them_in_device_order():
  fakes = [FakeDevice(i, slice_index=i // 4) for i in range(8)]
  emulated = shd.device_grid((2, 2, 1, 1, 1), (1, 2, 1, 1, 1), jax.devices())
  faked = shd.device_grid((2, 2, 1, 1, 1), (1, 2, 1, 1, 1), fakes)
  assert [d.id for d in emulated.flat] == [d.id for d in faked.flat] == [0, 1, 4, 5, 2, 3, 6, 7]


@pytest.mark.parametrize('overrides, message', [
    (['mesh.dcn_data=0'], r'mesh.dcn_data=0 is invalid: the number of slices'),
    (['mesh.dcn_fsdp=-1'], r'mesh.dcn_fsdp=-1 is invalid: the number of slices'),
    (['mesh.data=-1', 'mesh.dcn_data=3'], r'x dcn_data=3 \(product 3\) do not divide the 8 devices'),
    (['mesh.data=2', 'mesh.dcn_data=2'], r'product of the axes .* x dcn_data=2 is 4, but there are 8'),
    # fsdp spans the slices too: the model width splits over all 4.
    (['mesh.data=2', 'mesh.fsdp=2', 'mesh.dcn_fsdp=2', 'model.d_model=66'],
     r'model.d_model=66 is invalid: must be divisible by mesh.fsdp\*dcn_fsdp=4'),
])
def test_invalid_dcn_sizes_name_the_key(overrides, message):
  with pytest.raises(ConfigError, match=message):
    mesh_lib.validate_mesh(load_config(None, overrides), num_devices=8)


def test_dcn_sizes_that_do_not_match_the_slices_are_refused():
  two_slices = [FakeDevice(i, slice_index=i // 4) for i in range(8)]
  with pytest.raises(ConfigError, match=r'form 2 slices \(slice_index\), but the DCN sizes '
                                        r'\(mesh.dcn_\*\) multiply to 4; make their product 2'):
    shd.device_grid((2, 1, 1, 1, 1), (4, 1, 1, 1, 1), two_slices)
  with pytest.raises(ConfigError, match=r'form 2 slices .* no DCN axis: set mesh.dcn_data'):
    shd.make_mesh(_sizes(data=8), devices=two_slices)
  uneven = [FakeDevice(i, slice_index=int(i >= 3)) for i in range(8)]
  with pytest.raises(ConfigError, match=r'must hold 4 devices .* they hold \{0: 3, 1: 5\}'):
    shd.device_grid((4, 1, 1, 1, 1), (2, 1, 1, 1, 1), uneven)


def test_target_platform_is_the_mesh_devices_platform_inside_and_outside_jit():
  """What platform kernels and the ragged exchange choose by: the ambient
  mesh's devices (a TPU topology compiled on this CPU host says 'tpu'), else
  the default backend; CUDA and ROCm read 'gpu'."""
  from jax._src.mesh import AbstractDevice
  assert shd.target_platform() == jax.default_backend() == 'cpu'
  mesh = shd.make_mesh({a: 1 for a in AXES} | {'data': 2}, devices=jax.devices()[:2])
  with shd.use_mesh(mesh):
    assert shd.target_platform() == 'cpu'
  seen = []
  for platform, want in (('tpu', 'tpu'), ('cuda', 'gpu'), ('rocm', 'gpu'), ('cpu', 'cpu')):
    target = jax.sharding.AbstractMesh(
        (2, 1, 1, 1, 1), AXES, axis_types=(jax.sharding.AxisType.Auto,) * 5,
        abstract_device=AbstractDevice(device_kind='x', num_cores=None, platform=platform))
    with jax.sharding.use_abstract_mesh(target):
      assert shd.target_platform() == want, platform
      jax.jit(lambda x: seen.append(shd.target_platform()) or x)(1.0)   # at trace time
  assert seen == ['tpu', 'gpu', 'gpu', 'cpu']
  # A mesh without devices (aot.abstract_check's) falls back to the backend.
  bare = jax.sharding.AbstractMesh((2, 1, 1, 1, 1), AXES,
                                   axis_types=(jax.sharding.AxisType.Auto,) * 5)
  with jax.sharding.use_abstract_mesh(bare):
    assert shd.target_platform() == 'cpu'
