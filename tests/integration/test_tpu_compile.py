"""Real AOT compiles of the train step for a TPU topology, on this CPU host.

Needs libtpu: in the venv (`pip install 'gemjax[tpu]'`), or the copy that
`make setup` puts in .venv/libtpu for this test (a separate folder, so that
ordinary CPU runs do not load the TPU runtime). Skipped only where neither
exists.
"""

import importlib.util
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LIBTPU_DIR = os.path.join(ROOT, '.venv', 'libtpu')


def _env():
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  env.pop('XLA_FLAGS', None)
  if importlib.util.find_spec('libtpu') is None:
    if not os.path.isdir(os.path.join(LIBTPU_DIR, 'libtpu')):
      pytest.skip('libtpu is not installed (make setup puts it in .venv/libtpu)')
    env['PYTHONPATH'] = os.pathsep.join(p for p in (LIBTPU_DIR, env.get('PYTHONPATH')) if p)
  return env


def _aot(*args, config='configs/nano.yaml', mesh=('mesh.data=2', 'mesh.fsdp=2')):
  return subprocess.run([sys.executable, '-m', 'gemjax.train.aot', config,
                         '--topology', 'v5p:2x2x1', *mesh,
                         'model.loss_chunk=64', *args], cwd=ROOT, env=_env(),
                        capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_nano_compiles_for_a_v5p_slice_and_a_too_small_chip_exits_3():
  out = _aot()
  assert out.returncode == 0, out.stderr[-3000:]
  assert 'v5p:2x2x1 (4 x TPU v5' in out.stdout and ': fits.' in out.stdout
  assert 'HBM 89.16 GiB' in out.stdout and 'temporaries' in out.stdout
  tight = _aot('--hbm-gib', '0.001')
  assert tight.returncode == 3, tight.stderr[-3000:]
  assert 'DOES NOT FIT' in tight.stdout and 'model.loss_chunk' in tight.stderr


@pytest.mark.slow
def test_nano_compiles_for_two_slices_joined_over_dcn():
  # Multislice: 2 x v5p:2x2x1, the data axis spanning the slices
  # (create_hybrid_device_mesh, as the trainer builds it).
  out = _aot('--slices', '2', 'mesh.dcn_data=2')
  assert out.returncode == 0, out.stderr[-3000:]
  assert "2 x v5p:2x2x1 (8 x TPU v5" in out.stdout and "'data': 4" in out.stdout
  assert ': fits.' in out.stdout
  bad = _aot('--slices', '2')            # no DCN axis for the second slice
  assert bad.returncode != 0 and 'mesh.dcn_data' in bad.stderr and 'multiply to 2' in bad.stderr


@pytest.mark.slow
def test_platform_kernels_compile_for_tpu_not_their_cpu_fallbacks():
  """Compiling for a TPU topology on this CPU host, the platform choices follow
  the mesh's devices (`sharding.target_platform`), not the host's backend:
  'splash' becomes Pallas TPU kernels inside the sharded step (the layer
  scan's body calls forward, dq and dkv: 3; was 0, the blockwise fallback), and
  dropless MoE on an expert axis the real ragged-all-to-all (was the CPU
  emulation's dense all_to_all). Compiled by XLA:TPU, not run."""
  out = _aot('model.attention=splash', 'model.head_dim=128')
  assert out.returncode == 0, out.stderr[-3000:]
  assert 'Pallas kernel calls: 3.' in out.stdout, out.stdout
  moe = _aot('model.moe.path=dropless', config='configs/nano-moe.yaml',
             mesh=('mesh.data=1', 'mesh.fsdp=1', 'mesh.expert=4'))
  assert moe.returncode == 0, moe.stderr[-3000:]
  assert re.search(r'ragged-all-to-all ops: [1-9]', moe.stdout), moe.stdout
