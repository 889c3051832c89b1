"""Every parameter and batch key keeps its path, shape and PartitionSpec.

The golden files under tests/golden/sharding/ record what each preset's
parameters and batch get on its intended (abstract) mesh; see
gemjax/train/golden.py.
"""

import difflib
import os

import pytest

from gemjax.train import golden


@pytest.mark.parametrize('name', golden.PRESETS)
def test_preset_sharding_matches_golden_file(name):
  path = golden.golden_path(name)
  assert os.path.exists(path), f'{path} is missing; run `{golden.UPDATE_COMMAND}`'
  with open(path) as f:
    want = f.read()
  got = golden.render(name)
  if got != want:
    rel = os.path.relpath(path, golden.ROOT)
    diff = ''.join(difflib.unified_diff(want.splitlines(keepends=True),
                                        got.splitlines(keepends=True),
                                        fromfile=rel, tofile=f'render({name!r})'))
    pytest.fail(f'sharding of preset {name!r} changed:\n{diff}\n'
                f'If the change is intended, run `{golden.UPDATE_COMMAND}` and '
                'commit the updated files.', pytrace=False)
