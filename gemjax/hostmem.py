"""Transparent huge pages for XLA:CPU's per-step buffers (Linux, glibc >= 2.35).

XLA:CPU allocates the temporary buffer of a compiled program on every call
and frees it after: 206 MB per nano train step. glibc serves allocations this
large with a fresh mmap, so each step page-faults the whole buffer in again,
4 KiB at a time: ~50,000 minor faults and ~100 ms of kernel time per step on
2 cores (BENCHMARKS.md, "Huge pages"). With the glibc tunable
`glibc.malloc.hugetlb=1`, malloc marks its mappings MADV_HUGEPAGE and the
kernel backs them with 2 MiB pages where transparent huge pages are enabled
('always' or 'madvise'): the faults drop to a few hundred per step.

Tunables are read when a process starts, so the entry points (train.py,
eval.py, `python -m gemjax.train`, `python -m gemjax.inference`) call `reexec_with_huge_pages()` before
importing jax: it sets the tunable and replaces the process with a fresh copy
of itself, once. Nothing changes numerically. Opt out with
`GEMJAX_HUGE_PAGES=0`; an explicit `glibc.malloc.hugetlb` in GLIBC_TUNABLES
is left as it is.

Standard library only (this module runs before anything heavy is imported).
"""

from __future__ import annotations

import os
import platform
import sys

TUNABLE = 'glibc.malloc.hugetlb'
OPT_OUT = 'GEMJAX_HUGE_PAGES'
_THP = '/sys/kernel/mm/transparent_hugepage/enabled'


def _glibc_at_least(major: int, minor: int) -> bool:
  lib, version = platform.libc_ver()
  if lib != 'glibc' or not version:
    return False
  try:
    got = tuple(int(p) for p in version.split('.')[:2])
  except ValueError:
    return False
  return got >= (major, minor)


def _thp_mode(path: str = _THP) -> str:
  """The selected mode ('always', 'madvise' or 'never'); 'never' if unknown."""
  try:
    with open(path) as f:
      text = f.read()
  except OSError:
    return 'never'
  start, end = text.find('['), text.find(']')
  return text[start + 1:end] if 0 <= start < end else 'never'


def huge_pages_wanted(environ=os.environ, thp_path: str = _THP) -> bool:
  """True when this process should be restarted with the tunable set."""
  if environ.get(OPT_OUT, '1') == '0':
    return False
  if TUNABLE in environ.get('GLIBC_TUNABLES', ''):
    return False          # set already: by us (after the restart) or by the user
  if sys.platform != 'linux' or not _glibc_at_least(2, 35):
    return False
  return _thp_mode(thp_path) in ('always', 'madvise')


def tunables_with_huge_pages(current: str) -> str:
  """GLIBC_TUNABLES with `glibc.malloc.hugetlb=1` added to what was there."""
  return f'{current}:{TUNABLE}=1' if current else f'{TUNABLE}=1'


def reexec_with_huge_pages() -> None:
  """Restarts this process (same interpreter, same arguments) with the
  tunable set, when `huge_pages_wanted()`; returns otherwise. Call it first
  thing in a `__main__` entry point, never from library code."""
  if not huge_pages_wanted():
    return
  os.environ['GLIBC_TUNABLES'] = tunables_with_huge_pages(os.environ.get('GLIBC_TUNABLES', ''))
  argv = list(getattr(sys, 'orig_argv', [])) or [sys.executable, *sys.argv]
  sys.stdout.flush()
  sys.stderr.flush()
  try:
    os.execv(sys.executable, argv)
  except OSError:
    return   # cannot restart: run on with normal pages
