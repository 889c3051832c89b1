"""train.run_dir=gs://bucket/run: metrics, TensorBoard, checkpoints and
profiles go to the bucket through the path library (etils.epath / Orbax),
never to a local folder named 'gs:'. The bucket is a fake (tests/fake_gcs.py):
no network.
"""

import glob
import json
import os
import struct

import pytest
from tensorboardX.proto import event_pb2

import fake_gcs
from gemjax.config import load_config
from gemjax.errors import ConfigError
from gemjax.train import checkpoint as ckpt_lib
from gemjax.train import storage
from gemjax.train.loop import Trainer
from gemjax.train.metrics import MetricWriter

TINY = ['model.d_model=32', 'model.num_layers=2', 'model.num_heads=4',
        'model.num_kv_heads=2', 'model.head_dim=8', 'model.mlp_dim=64',
        'model.vocab_size=256', 'train.batch_size=8', 'train.seq_len=32',
        'train.log_every=1', 'train.progress_bar=false', 'optimizer.warmup_steps=2',
        'checkpoint.every=2', 'train.peak_flops=1e9']


@pytest.fixture
def bucket(tmp_path, monkeypatch):
  """(local folder holding gs://bucket, working directory of the test)."""
  root = fake_gcs.install(monkeypatch, tmp_path / 'gcs')
  cwd = tmp_path / 'cwd'
  cwd.mkdir()
  monkeypatch.chdir(cwd)
  yield os.path.join(root, 'bucket'), cwd
  monkeypatch.undo()
  fake_gcs.uninstall()


def _scalars(event_file) -> dict[str, list[int]]:
  """tag -> steps, read from a TensorBoard event file (TFRecord framing)."""
  out: dict[str, list[int]] = {}
  data = open(event_file, 'rb').read()
  pos = 0
  while pos < len(data):
    (n,) = struct.unpack('Q', data[pos:pos + 8])
    event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + n])
    pos += 12 + n + 4
    for v in event.summary.value:
      out.setdefault(v.tag, []).append(event.step)
  return out


def _train(cfg):
  trainer = Trainer.create(cfg)
  code = trainer.run()
  trainer.checkpointer.close()
  return trainer, code


@pytest.mark.slow
def test_gs_run_dir_puts_metrics_tensorboard_checkpoints_profile_in_the_bucket_and_resumes(
    bucket):
  store, cwd = bucket
  run = 'gs://bucket/runs/tiny'
  _, code = _train(load_config(None, TINY + [f'train.run_dir={run}', 'train.steps=2',
                                              'train.profile_steps=[1,2]']))
  assert code == 0
  trainer, code = _train(load_config(None, TINY + [f'train.run_dir={run}', 'train.steps=4',
                                                   'checkpoint.keep=1']))
  assert code == 0 and trainer.start_step == 2     # resumed from the bucket
  got = os.path.join(store, 'runs', 'tiny')
  rows = [json.loads(l) for l in open(os.path.join(got, 'metrics.jsonl'))]
  assert [r['step'] for r in rows] == [1, 2, 3, 4]   # the second run appended
  events = sorted(glob.glob(os.path.join(got, 'tensorboard', 'events.out.tfevents.*')))
  assert len(events) == 2 and _scalars(events[-1])['train/loss'] == [3, 4]
  # Orbax in its GCS mode (commit files, not renames); arrays through TensorStore;
  # keep=1 deleted step 2 from the bucket.
  assert [d for d in os.listdir(got) if d.isdigit()] == ['4']
  assert os.path.exists(os.path.join(got, '4', 'commit_success.txt'))
  assert glob.glob(os.path.join(got, '4', 'state', 'ocdbt.process_0', 'd', '*'))
  assert glob.glob(os.path.join(got, 'profile', 'plugins', 'profile', '*', '*.xplane.pb'))
  assert os.listdir(cwd) == []                        # no local 'gs:' folder
  assert ckpt_lib.resolve_step_dir(run) == storage.run_path(f'{run}/4')


def test_metric_writer_on_gs_stages_locally_and_uploads_whole_files(bucket):
  store, cwd = bucket
  writer = MetricWriter('gs://bucket/m', tensorboard=True, sync_every_s=3600)
  writer.write(1, {'loss': 2.0})                      # the first write uploads
  writer.write(2, {'loss': 1.5})                      # throttled: not yet
  uploaded = os.path.join(store, 'm', 'metrics.jsonl')
  assert [json.loads(l)['step'] for l in open(uploaded)] == [1]
  staging = writer.staged.local
  writer.close()                                      # uploads and cleans up
  assert [json.loads(l)['step'] for l in open(uploaded)] == [1, 2]
  (event,) = glob.glob(os.path.join(store, 'm', 'tensorboard', '*'))
  assert _scalars(event)['train/loss'] == [1, 2]
  assert not os.path.exists(staging) and os.listdir(cwd) == []


def test_local_run_dir_is_written_in_place(tmp_path):
  run = tmp_path / 'run'
  writer = MetricWriter(str(run), tensorboard=True)
  writer.write(1, {'loss': 2.0})
  assert writer.staged.local == str(run)
  assert [json.loads(l)['step'] for l in open(run / 'metrics.jsonl')] == [1]
  writer.close()
  (event,) = glob.glob(str(run / 'tensorboard' / '*'))
  assert _scalars(event)['train/loss'] == [1]


def test_a_bucket_url_without_its_library_names_the_package(monkeypatch, tmp_path):
  import fsspec
  def missing(protocol):
    raise ImportError('Please install gcsfs to access Google Storage')
  monkeypatch.setattr(fsspec, 'get_filesystem_class', missing)
  monkeypatch.setattr(storage, '_tensorflow_installed', lambda: False)
  monkeypatch.chdir(tmp_path)
  with pytest.raises(ConfigError, match=r"'gs://b/run' is a gs:// URL, but no library to "
                                        r"open it is installed: needs gcsfs \(pip install "
                                        r"'gemjax\[gcs\]'\)"):
    ckpt_lib.Checkpointer('gs://b/run', every=1, keep=1)
  with pytest.raises(ConfigError, match=r"URL scheme ftp:// is not supported"):
    MetricWriter('ftp://host/run')
  assert os.listdir(tmp_path) == []
