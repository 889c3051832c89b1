"""Every test sees 8 emulated CPU devices (set before jax is imported)."""

import os
import sys

# Shared helpers (tests/support.py) import as `support` from every subfolder.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8').strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import jax  # noqa: E402

jax.config.update('jax_default_matmul_precision', 'highest')
