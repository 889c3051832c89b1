"""The real-speech test set of the sample corpus (speech_digit_human): digit
words recorded by people, from Debian packages (scripts/build_sample_corpus.py,
HUMAN_SPEAKERS). The records are well formed, their voices are never trained
on, and eval scores them as a row of their own exactly like speech_digit.
Reads the committed shards only: the packages are needed to rebuild them, not
to test them."""

import collections
import hashlib
import io
import json
import os
import types
import wave

import jax
import numpy as np

from gemjax.batch import TEXT
from gemjax.config import load_config
from gemjax.data import records, sources
from gemjax.data.registry import sequence_builder
from gemjax.train import evaluation

ROOT = os.path.join(os.path.dirname(__file__), '..', '..')
SAMPLE = os.path.join(ROOT, 'data', 'sample')
TASK = 'speech_digit_human'
PROMPT = 'Which digit was spoken?'


def _records(split: str, task: str) -> list[dict]:
  src = sources.ArrayRecordSource(os.path.join(SAMPLE, split, f'{task}-*'))
  return [records.decode_record(src[i]['record'], src[i]['where']) for i in range(len(src))]


def _audio(rec: dict) -> bytes:
  return next(s['data'] for s in rec['segments'] if s['kind'] == 'audio')


def _nano():
  cfg = load_config(os.path.join(ROOT, 'configs', 'nano.yaml'))
  # Paths in the preset are relative to the repository root.
  specs = [d for d in cfg.data.eval_datasets if d.path.split('/')[-1].split('-')[0]
           in ('speech_digit', TASK)]
  return cfg, [types.SimpleNamespace(path=os.path.join(ROOT, d.path), kind=d.kind)
               for d in specs]


def test_human_records_are_valid_and_each_speaker_says_every_digit_once():
  recs = _records('test', TASK)
  manifest = json.load(open(os.path.join(SAMPLE, 'manifest.json')))['human_speech']
  assert manifest['task'] == TASK and manifest['records'] == len(recs) == 20
  for f in manifest['files']:
    assert os.path.exists(os.path.join(SAMPLE, f))
  said = collections.Counter()
  for r in recs:
    records.validate_record(r, r['id'])
    assert r['task'] == TASK and r['meta']['human'] is True
    audio, prompt, answer = r['segments']
    assert audio['kind'] == 'audio' and audio['format'] == 'wav' and not audio['predict']
    assert prompt == {'kind': 'text', 'text': PROMPT, 'predict': False}
    assert answer == {'kind': 'text', 'text': str(r['meta']['digit']), 'predict': True}
    # Attribution travels with each record: the package it came from and its licence.
    package = r['meta']['source'].split(':')[0]
    speaker = {s['speaker']: s for s in manifest['speakers']}[r['meta']['speaker']]
    assert package == speaker['package'] and r['meta']['licence'] == speaker['licence']
    said[r['meta']['speaker'], r['meta']['digit']] += 1
  speakers = {s for s, _ in said}
  assert len(speakers) >= 2
  assert said == collections.Counter({(s, d): 1 for s in speakers for d in range(10)})


def test_human_audio_is_the_corpus_wav_format_and_fits_the_nano_budgets():
  cfg, _ = _nano()
  builder = sequence_builder(cfg)
  for r in _records('test', TASK):
    with wave.open(io.BytesIO(_audio(r))) as w:
      # Same format as the synthetic clips (manifest 'audio': 16 kHz mono 8-bit).
      assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (16000, 1, 1)
      x = (np.frombuffer(w.readframes(w.getnframes()), np.uint8) - 128.0) / 127
    assert 0.2 < len(x) / 16000 < 1.5, r['id']       # one word, silence trimmed
    assert 0.8 < np.abs(x).max() <= 1.0, r['id']     # peak-normalised like synth()
    ex = builder.build(r, r['id'])
    assert len(ex['tokens']) <= cfg.train.seq_len
    assert 0 < len(ex['audio_patches']) <= cfg.data.audio_patches


def test_human_voices_are_never_in_the_training_or_validation_data():
  human = {hashlib.sha256(_audio(r)).digest() for r in _records('test', TASK)}
  for split in ('train', 'validation'):
    assert not os.path.exists(os.path.join(SAMPLE, split, f'{TASK}-00000-of-00001.array_record'))
    heard = {hashlib.sha256(_audio(r)).digest()
             for task in ('speech_digit', 'same_digit') for r in _records(split, task)}
    assert not human & heard, split
  # The synthetic voices are espeak-ng voices, the human ones named speakers.
  synthetic = json.load(open(os.path.join(SAMPLE, 'manifest.json')))['voices']
  names = {r['meta']['speaker'] for r in _records('test', TASK)}
  assert not names & {v for vs in synthetic.values() for v in vs}


def test_nano_eval_scores_human_speech_as_its_own_row_like_speech_digit():
  cfg, specs = _nano()
  # The synthetic pattern does not pick up the human shard: two separate rows.
  assert [os.path.basename(s.path) for s in specs] == ['speech_digit-*', f'{TASK}-*']
  assert len(sources.resolve_shards(specs[0].path)) == 1
  builder = sequence_builder(cfg)
  examples = collections.defaultdict(list)
  for task, where, rec in evaluation.iter_task_records(specs):
    examples[task].append((rec['meta']['digit'], builder.build(rec, where)))
  assert set(examples) == {'speech_digit', TASK} and len(examples[TASK]) == 20

  # The scored answer is the digit, tokenized as for a synthetic record of
  # the same digit, after the same prompt.
  def answer(ex):
    return ex['targets'][ex['loss_weights'] > 0]
  def text(ex):
    return ex['tokens'][ex['modality'] == TEXT]
  synthetic = {d: ex for d, ex in examples['speech_digit']}
  for digit, ex in examples[TASK]:
    np.testing.assert_array_equal(answer(ex), answer(synthetic[digit]))
    np.testing.assert_array_equal(text(ex), text(synthetic[digit]))

  # Teacher-forced scoring (eval.py's TaskScorer) with stand-in forwards: one
  # that predicts every target scores 100%, one that is wrong on the answer 0%.
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ('data',))
  budgets = {'image': cfg.data.image_patches, 'audio': cfg.data.audio_patches,
             'video': cfg.data.video_patches}
  vocab = cfg.model.vocab_size
  for shift, want in ((0, 1.0), (1, 0.0)):
    scorer = evaluation.TaskScorer(builder, types.SimpleNamespace(graphdef=None), mesh,
                                   seq_len=cfg.train.seq_len, budgets=budgets, batch_size=8)
    scorer.forward = lambda params, batch, shift=shift: evaluation.answer_stats(
        jax.nn.one_hot((batch['targets'] + shift) % vocab, vocab), batch)
    for task in ('speech_digit', TASK):
      exs = [ex for _, ex in examples[task]]
      for i in range(0, len(exs), 8):
        chunk = exs[i:i + 8]
        scorer.score(None, [task] * len(chunk), scorer.collate(chunk))
    results = scorer.results()
    assert results[TASK]['records'] == 20
    assert results[TASK]['exact_match'] == results['speech_digit']['exact_match'] == want
