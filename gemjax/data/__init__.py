"""Data: record format, sources, sequence builder, Grain pipeline, packing.

    records.py    the versioned on-disk record (msgpack in ArrayRecord shards)
    sources.py    random-access sources: ArrayRecord, TFDS, folder, JSONL
    sequence.py   record -> one interleaved example (tokens, positions, patches)
    condition.py  condition dropout for classifier-free guidance (drop_condition)
    packing.py    examples -> fixed-length rows [T] -> batches
    pipeline.py   the Grain pipeline: shuffle, repeat, shard, decode, mix, pack

The batch contract itself is `gemjax.batch` (above data/ and model/).

The training loop needs only `make_train_iterator` / `make_eval_iterator`
(re-exported here lazily, so importing a light module of this package does
not import Grain). `python -m gemjax.data write ...` writes shards.
"""

_LAZY = {
    'DataSettings': 'pipeline',
    'make_train_iterator': 'pipeline', 'make_eval_iterator': 'pipeline',
    'PipelineIterator': 'pipeline',
    'drop_condition': 'condition',
}


def __getattr__(name):
  if name in _LAZY:
    import importlib
    module = importlib.import_module(f'gemjax.data.{_LAZY[name]}')
    return getattr(module, name)
  raise AttributeError(f'module gemjax.data has no attribute {name!r}')
