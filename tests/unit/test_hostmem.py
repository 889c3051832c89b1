"""gemjax/hostmem.py: when the entry points restart with glibc's huge-page
tunable, and that the restart happens once, keeps the arguments and reaches
the new process."""

import os
import pathlib
import platform
import subprocess
import sys
import textwrap

import pytest

from gemjax import hostmem

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _thp(tmp_path, text):
  p = tmp_path / 'enabled'
  p.write_text(text)
  return str(p)


def _glibc_ok():
  return sys.platform == 'linux' and hostmem._glibc_at_least(2, 35)


def test_thp_mode_reads_the_bracketed_choice(tmp_path):
  assert hostmem._thp_mode(_thp(tmp_path, 'always [madvise] never\n')) == 'madvise'
  assert hostmem._thp_mode(_thp(tmp_path, '[always] madvise never\n')) == 'always'
  assert hostmem._thp_mode(_thp(tmp_path, 'always madvise [never]\n')) == 'never'
  assert hostmem._thp_mode(str(tmp_path / 'missing')) == 'never'
  assert hostmem._thp_mode(_thp(tmp_path, 'garbage')) == 'never'


@pytest.mark.skipif(not _glibc_ok(), reason='needs Linux with glibc >= 2.35')
def test_wanted_only_with_huge_pages_on_and_no_tunable_or_opt_out(tmp_path):
  madvise = _thp(tmp_path, 'always [madvise] never\n')
  assert hostmem.huge_pages_wanted({}, madvise)
  assert hostmem.huge_pages_wanted({'GLIBC_TUNABLES': 'glibc.malloc.trim_threshold=1'}, madvise)
  assert not hostmem.huge_pages_wanted({'GLIBC_TUNABLES': 'glibc.malloc.hugetlb=0'}, madvise)
  assert not hostmem.huge_pages_wanted({'GEMJAX_HUGE_PAGES': '0'}, madvise)
  assert not hostmem.huge_pages_wanted({}, _thp(tmp_path, 'always madvise [never]\n'))


def test_other_tunables_are_kept():
  assert hostmem.tunables_with_huge_pages('') == 'glibc.malloc.hugetlb=1'
  assert (hostmem.tunables_with_huge_pages('glibc.malloc.trim_threshold=1')
          == 'glibc.malloc.trim_threshold=1:glibc.malloc.hugetlb=1')


@pytest.mark.skipif(not _glibc_ok() or hostmem._thp_mode() not in ('always', 'madvise'),
                    reason='needs glibc >= 2.35 and transparent huge pages')
def test_entry_point_restarts_once_with_its_arguments(tmp_path):
  script = tmp_path / 'entry.py'
  script.write_text(textwrap.dedent('''
      import os, sys
      print('start', flush=True)
      from gemjax.hostmem import reexec_with_huge_pages
      reexec_with_huge_pages()
      print('tunables', os.environ.get('GLIBC_TUNABLES'))
      print('argv', sys.argv[1:])
  '''))
  env = {k: v for k, v in os.environ.items() if k not in ('GLIBC_TUNABLES', 'GEMJAX_HUGE_PAGES')}
  env['PYTHONPATH'] = os.pathsep.join([str(ROOT), env.get('PYTHONPATH', '')])
  out = subprocess.run([sys.executable, '-u', str(script), 'a', 'b=1'], env=env,
                       capture_output=True, text=True, check=True).stdout.splitlines()
  assert out == ['start', 'start', 'tunables glibc.malloc.hugetlb=1', "argv ['a', 'b=1']"]
  env['GEMJAX_HUGE_PAGES'] = '0'
  out = subprocess.run([sys.executable, str(script)], env=env, capture_output=True,
                       text=True, check=True).stdout.splitlines()
  assert out == ['start', 'tunables None', 'argv []']


def test_not_on_other_platforms(monkeypatch, tmp_path):
  monkeypatch.setattr(platform, 'libc_ver', lambda: ('', ''))
  assert not hostmem.huge_pages_wanted({}, _thp(tmp_path, '[always] madvise never'))
