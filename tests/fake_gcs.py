"""A fake Google Cloud Storage for tests: gs://BUCKET/PATH is ROOT/BUCKET/PATH.

Not a test module. `install(monkeypatch, root)` points every library through
which gemjax reaches a bucket at the same local folder, with no network:

- etils.epath (metrics, TensorBoard, profiles, Orbax's own small files) opens
  gs:// with fsspec's 'gcs' protocol (gcsfs in real life): registered here as
  a DirFileSystem over `root` that creates parent folders, as objects need none;
- Orbax writes arrays with TensorStore's own GCS driver: its kvstore spec for
  a gs:// path becomes a 'file' kvstore under `root`;
- Orbax asks the GCS API whether a bucket has a hierarchical namespace: no.

The two Orbax hooks are private (`orbax.checkpoint._src.path.gcs_utils`); if a
new Orbax moves them, this is the one place to follow it.
"""

import os

from etils.epath import backend as epath_backend
from etils.epath import gpath
from fsspec.implementations.dirfs import DirFileSystem
from fsspec.implementations.local import LocalFileSystem
from fsspec.registry import _registry as fsspec_registry
from orbax.checkpoint._src.path import gcs_utils


def _split(url: str) -> tuple[str, str]:
  bucket, _, path = str(url).removeprefix('gs://').partition('/')
  return bucket, path


def install(monkeypatch, root) -> str:
  """Fakes gs:// under `root` for the rest of the test; returns `root`."""
  root = str(root)
  os.makedirs(root, exist_ok=True)

  class FakeGCSFileSystem(DirFileSystem):
    protocol = ('gs', 'gcs')
    cachable = False   # one instance per test: each has its own root

    def __init__(self, *args, **kwargs):
      del args, kwargs   # gcsfs options such as finalize_on_close
      super().__init__(path=root, fs=LocalFileSystem(auto_mkdir=True))

  for protocol in ('gs', 'gcs'):
    monkeypatch.setitem(fsspec_registry, protocol, FakeGCSFileSystem)
  # epath caches one filesystem per protocol, and prefers TensorFlow's gfile
  # for gs:// when TensorFlow is installed.
  epath_backend.fsspec_backend._get_filesystem.cache_clear()
  monkeypatch.setattr(gpath, '_is_tf_installed', lambda: False)
  monkeypatch.setattr(gcs_utils, 'get_kvstore_for_gcs', lambda url: {
      'driver': 'file', 'path': os.path.join(root, *_split(url))})
  monkeypatch.setattr(gcs_utils, 'is_hierarchical_namespace_enabled', lambda path: False)
  return root


def uninstall() -> None:
  """Drops epath's cached fake filesystem (call after the monkeypatch undo)."""
  epath_backend.fsspec_backend._get_filesystem.cache_clear()
