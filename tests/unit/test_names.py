"""The config's names and the tables that implement them agree.

config.py holds the config language (it imports no model or data code); the
kernel table, the data sources and the ring layouts are keyed by the same
names, checked here so that a new kernel or source cannot be added to one
side only.
"""

import subprocess
import sys

import pytest

from gemjax import config
from gemjax.data import registry as sources
from gemjax.model import attention
from gemjax.parallel import layouts


def test_attention_kinds_are_the_kernel_table_plus_infini():
  assert set(config.ATTENTION_KINDS) == set(attention.KERNELS) | {'infini'}


def test_data_sources_and_layouts_match_the_config_names():
  assert set(config.DATA_SOURCES) == set(sources.SOURCES)
  assert tuple(config.CONTEXT_LAYOUTS) == tuple(layouts.LAYOUTS)


def test_registering_a_source_twice_is_an_error():
  with pytest.raises(ValueError, match="'synthetic' is already registered"):
    sources.register_source('synthetic')(lambda *a: None)


def test_loading_a_preset_imports_no_model_data_or_jax():
  code = ('import sys, gemjax.config as c; c.load_config("configs/nano.yaml"); '
          'bad = [m for m in sys.modules if m.split(".")[0] in ("jax", "flax", "numpy", '
          '"grain", "optax") or m.startswith(("gemjax.model", "gemjax.data", "gemjax.kernels"))]; '
          'print(bad); sys.exit(1 if bad else 0)')
  out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True)
  assert out.returncode == 0, out.stdout + out.stderr
