"""Run directories that may be local folders or bucket URLs (gs://, s3://).

`train.run_dir=gs://bucket/run` keeps everything a run writes in the bucket;
no local folder named `gs:` appears. Checkpoints: Orbax takes the URL itself
(its files through `etils.epath`, its arrays through TensorStore's own GCS
driver). Metrics (metrics.jsonl), TensorBoard event files and profiler
traces go through `etils.epath` here, which reads and writes gs:// with gcsfs
(the `gcs` extra: `pip install 'gemjax[gcs]'`), or with TensorFlow's gfile when
TensorFlow is installed.

Object stores cannot append to an object, and an object being written is
invisible until it is closed. So the files a run grows are written to a local
staging folder and copied whole to the run directory (`StagedDir.sync`): the
JSONL and the event files at the first log step, at most every `every_s`
seconds after, and at the end; a profiler trace once it stops. A local run
directory is written in place, exactly as before.

Imports etils, fsspec (for the install check) and `gemjax.errors` only.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import shutil
import tempfile
import time
from typing import Sequence

from etils import epath

from gemjax.errors import ConfigError

# URL schemes etils.epath knows, and the package that gives fsspec each one.
_SCHEMES = {'gs': ('gcs', "gcsfs (pip install 'gemjax[gcs]')"),
            's3': ('s3', 's3fs (pip install s3fs)'),
            'az': ('az', 'adlfs (pip install adlfs)'),
            'hf': ('hf', 'huggingface_hub (pip install huggingface_hub)')}


def is_remote(path: str | os.PathLike) -> bool:
  """Whether `path` is a URL (gs://bucket/...) rather than a local path."""
  return '://' in os.fspath(path)


def check_remote(path: str | os.PathLike) -> None:
  """A ConfigError naming the path and the package to install when no
  library can open its URL scheme; nothing for a local path."""
  path = os.fspath(path)
  if not is_remote(path):
    return
  scheme = path.split('://', 1)[0]
  if scheme not in _SCHEMES:
    raise ConfigError(f'{path!r}: URL scheme {scheme}:// is not supported; use a '
                      f'local path or one of {", ".join(s + "://" for s in _SCHEMES)}')
  if scheme == 'gs' and _tensorflow_installed():
    return   # epath uses tf.io.gfile for gs:// when TensorFlow is installed
  protocol, package = _SCHEMES[scheme]
  try:
    import fsspec
    fsspec.get_filesystem_class(protocol)
  except (ImportError, ValueError) as e:
    raise ConfigError(f'{path!r} is a {scheme}:// URL, but no library to open it is '
                      f'installed: needs {package} ({e})') from e


def _tensorflow_installed() -> bool:
  return importlib.util.find_spec('tensorflow') is not None


def run_path(path: str | os.PathLike) -> epath.Path:
  """`path` as an epath.Path: a local path made absolute, a URL as it is
  (after `check_remote`)."""
  path = os.fspath(path)
  if is_remote(path):
    check_remote(path)
    return epath.Path(path)
  return epath.Path(os.path.abspath(path))


class StagedDir:
  """A local folder that stands for the directory `path`.

  `local` is `path` itself when `path` is local (`sync` and `close` do
  nothing). For a URL, `local` is a temporary folder: the files named in
  `pull` are first copied from `path` (a metrics.jsonl a resumed run appends
  to); `sync` copies every new or changed file back, whole, at most every
  `every_s` seconds (always with `force=True`), and `close` syncs and removes
  the folder. Only the process that owns the files should sync them.
  """

  def __init__(self, path: str | os.PathLike, *, pull: Sequence[str] = (),
               every_s: float = 30.0):
    self.path = run_path(path)
    self.remote = is_remote(path)
    self.every_s = every_s
    self._sent: dict[str, tuple[int, int]] = {}
    self._last_sync = -float('inf')
    if not self.remote:
      self.local = str(self.path)
      os.makedirs(self.local, exist_ok=True)
      return
    self.local = tempfile.mkdtemp(prefix='gemjax-staged-')
    for name in pull:
      src = self.path / name
      if src.exists():
        dst = pathlib.Path(self.local, name)
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_bytes(src.read_bytes())
        self._sent[name] = _signature(dst)

  def sync(self, *, force: bool = False) -> None:
    if not self.remote or (not force and time.monotonic() - self._last_sync < self.every_s):
      return
    root = pathlib.Path(self.local)
    for f in sorted(p for p in root.rglob('*') if p.is_file()):
      rel = f.relative_to(root).as_posix()
      sig = _signature(f)
      if self._sent.get(rel) != sig:
        # An object store has no folders to create: writing the object is enough.
        (self.path / rel).write_bytes(f.read_bytes())
        self._sent[rel] = sig
    self._last_sync = time.monotonic()

  def close(self) -> None:
    if self.remote and os.path.isdir(self.local):
      self.sync(force=True)
      shutil.rmtree(self.local, ignore_errors=True)


def _signature(f: pathlib.Path) -> tuple[int, int]:
  st = f.stat()
  return st.st_size, st.st_mtime_ns
