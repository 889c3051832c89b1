"""Builds the bundled multimodal sample corpus under data/sample/ (committed).

    python scripts/build_sample_corpus.py [--out data/sample] [--seed 0]

Needs espeak-ng (Debian package) for speech, the Debian packages
asterisk-core-sounds-en-g722 and saytime for recorded human speech, PyAV for
mp4 and G.722, scikit-learn and scikit-image for the images. Only this script
needs them: the corpus it writes is committed, so training and CI read the
ArrayRecord shards and never run a synthesiser or install a package.

Every source item lives in exactly one split: digit images by index in
scikit-learn's `load_digits` (the rows are grouped by writer), speech by voice
(an espeak-ng language + voice variant; speed and pitch vary per clip inside
a voice), photographs by photo, text by documentation topic. Tasks (the answer
segment has predict=True):

  image_digit    [image] "Which digit is this?" -> "7"
  speech_digit   [audio] "Which digit was spoken?" -> "7"
  same_digit     [image][audio] "Is the spoken digit the digit shown?" -> yes|no
  video_digits   [video: 3-5 digit images, 1 fps] "Which digits, in order?" -> "3 1 4"
  photo_caption  [image: 64x64 photo crop] "Describe the photo." -> caption
  text_lm        [text: Python documentation] (every token predicted)
  draw_digit     "Draw the digit 7." -> [image] (the image is predicted)
  draw_name      "Draw a digit, then name it." -> [image] "7" (both predicted)
  speech_digit_human  like speech_digit, test split only: real recordings of
                 two people (Debian packages, HUMAN_SPEAKERS), never trained on

The two draw tasks are derived from the written image_digit shards (same
images, same order), so they can be added to an existing corpus without
rebuilding the rest (no espeak-ng needed):

    python scripts/build_sample_corpus.py --only-draw-tasks

Likewise the real speech, from the installed packages (or a folder where
`dpkg-deb -x` unpacked them, --package-root):

    apt-get install asterisk-core-sounds-en-g722 saytime
    python scripts/build_sample_corpus.py --only-human-speech

Imports gemjax.data.records; the optional dependencies only in here.
"""

from __future__ import annotations

import argparse
import codecs
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import wave

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..'))
from gemjax.data import records  # noqa: E402

DIGIT_WORDS = ('zero', 'one', 'two', 'three', 'four', 'five', 'six', 'seven',
               'eight', 'nine')
SPLITS = ('train', 'validation', 'test')
SAMPLE_RATE = 16000
DIGIT_SIZE = 28
PHOTO_SIZE = 64

# espeak-ng voices: language x variant. A voice lives in exactly one split.
LANGUAGES = ('en-us', 'en-gb', 'en-gb-scotland', 'en-gb-x-rp', 'en-029',
             'en-us-nyc', 'en-gb-x-gbclan', 'en-gb-x-gbcwmd')
VARIANTS = ('m1', 'm2', 'm3', 'm4', 'm5', 'm6', 'm7', 'f1', 'f2', 'f3', 'f4',
            'f5', 'klatt', 'klatt2', 'klatt3')
VOICES_PER_SPLIT = {'train': 40, 'validation': 10, 'test': 10}

# (name, loader, caption, licence). Photos are split by name below.
PHOTOS = (
    ('astronaut', 'skimage', 'an astronaut smiling in front of a flag', 'public domain (NASA)'),
    ('camera', 'skimage', 'a man with a camera on a tripod', 'CC0 (Lav Varshney)'),
    ('coffee', 'skimage', 'a cup of coffee on a saucer', 'CC0 (Rachel Michetti)'),
    ('chelsea', 'skimage', 'a tabby cat', 'CC0 (Stefan van der Walt)'),
    ('coins', 'skimage', 'old coins on a gray background', 'no known copyright restrictions (Brooklyn Museum)'),
    ('rocket', 'skimage', 'a rocket lifting off', 'public domain (SpaceX)'),
    ('hubble_deep_field', 'skimage', 'galaxies in deep space', 'public domain (NASA)'),
    ('retina', 'skimage', 'a photograph of a human retina', 'CC0 (Mikael Haggstrom)'),
    ('horse', 'skimage', 'a black silhouette of a horse', 'CC0 (Andreas Preuss)'),
    ('brick', 'skimage', 'a brick wall', 'CC0 (CC0Textures)'),
    ('cell', 'skimage', 'a cell seen through a microscope', 'CC0'),
    ('immunohistochemistry', 'skimage', 'stained tissue under a microscope', 'no known copyright restrictions (CMMI)'),
    ('china', 'sklearn', 'a temple in china', 'CC BY 2.0 (danielbuechele, via scikit-learn)'),
    ('flower', 'sklearn', 'a pink flower', 'CC BY 2.0 (vultilion, via scikit-learn)'),
    ('grass', 'skimage', 'a patch of grass', 'CC0 (linolafett)'),
    ('clock', 'skimage', 'a blurred wall clock', 'public domain (Stefan van der Walt)'),
    ('gravel', 'skimage', 'gravel on the ground', 'CC0 (CC0Textures)'),
    ('text', 'skimage', 'printed letters and shapes', 'public domain (Wikipedia)'),
)
PHOTO_SPLIT = {'grass': 'validation', 'clock': 'validation', 'gravel': 'test',
               'text': 'test'}
PHOTO_CROPS = {'train': 8, 'validation': 4, 'test': 4}

COUNTS = {  # records per task and split
    'same_digit': {'train': 200, 'validation': 80, 'test': 80},
    'video_digits': {'train': 300, 'validation': 60, 'test': 60},
}


def png_bytes(image: np.ndarray) -> bytes:
  from PIL import Image
  buf = io.BytesIO()
  Image.fromarray(image).save(buf, format='PNG', optimize=True)
  return buf.getvalue()


def jpeg_bytes(image: np.ndarray, quality: int = 85) -> bytes:
  from PIL import Image
  buf = io.BytesIO()
  Image.fromarray(image).save(buf, format='JPEG', quality=quality)
  return buf.getvalue()


# ------------------------------------------------------------------- digits


def digit_images() -> tuple[np.ndarray, np.ndarray]:
  """scikit-learn's 1797 8x8 digits (0..16) upscaled to 28x28 uint8."""
  from PIL import Image
  from sklearn.datasets import load_digits

  digits = load_digits()
  images_Nx8x8 = digits.images
  out = np.zeros((len(images_Nx8x8), DIGIT_SIZE, DIGIT_SIZE), np.uint8)
  for i, im in enumerate(images_Nx8x8):
    small = Image.fromarray((im * (255 / 16)).astype(np.uint8))
    # 8 -> 24 bicubic, then a 2-pixel border like MNIST's.
    big = np.asarray(small.resize((24, 24), Image.BICUBIC))
    out[i, 2:26, 2:26] = big
  return out, digits.target.astype(np.int64)


def digit_split_indices(n: int) -> dict[str, np.ndarray]:
  # load_digits rows come grouped by writer: contiguous index ranges keep a
  # writer's digits (mostly) in one split.
  n_train, n_val = int(n * 0.8), int(n * 0.1)
  return {'train': np.arange(0, n_train),
          'validation': np.arange(n_train, n_train + n_val),
          'test': np.arange(n_train + n_val, n)}


# ------------------------------------------------------------------- speech


def synth(word: str, voice: str, speed: int, pitch: int, bits: int) -> bytes:
  """espeak-ng -> 16 kHz mono WAV, silence trimmed."""
  import soxr

  raw = subprocess.run(['espeak-ng', '-v', voice, '-s', str(speed), '-p',
                        str(pitch), '--stdout', word], capture_output=True,
                       check=True).stdout
  with wave.open(io.BytesIO(raw)) as w:
    rate = w.getframerate()
    x = np.frombuffer(w.readframes(w.getnframes()), np.int16).astype(np.float32) / 32768
  return clip_wav(soxr.resample(x, rate, SAMPLE_RATE), bits)


def clip_wav(y: np.ndarray, bits: int) -> bytes:
  """16 kHz float samples -> WAV bytes: silence trimmed, peak at 0.9."""
  loud = np.nonzero(np.abs(y) > 0.01)[0]
  if loud.size:
    y = y[max(loud[0] - 160, 0):loud[-1] + 320]  # keep 10 ms before, 20 ms after
  y = np.clip(y / max(np.abs(y).max(), 1e-3) * 0.9, -1, 1)
  buf = io.BytesIO()
  with wave.open(buf, 'wb') as w:
    w.setnchannels(1)
    w.setframerate(SAMPLE_RATE)
    if bits == 8:  # WAV 8-bit PCM is unsigned
      w.setsampwidth(1)
      w.writeframes(np.round(y * 127 + 128).astype(np.uint8).tobytes())
    else:
      w.setsampwidth(2)
      w.writeframes(np.round(y * 32767).astype('<i2').tobytes())
  return buf.getvalue()


def voice_splits(rng: np.random.Generator) -> dict[str, list[str]]:
  voices = [f'{lang}+{var}' for lang in LANGUAGES for var in VARIANTS]
  order = rng.permutation(len(voices))
  out, start = {}, 0
  for split in SPLITS:
    n = VOICES_PER_SPLIT[split]
    out[split] = [voices[i] for i in order[start:start + n]]
    start += n
  return out


def speech_clips(voices: list[str], rng: np.random.Generator, bits: int) -> list[dict]:
  clips = []
  for voice in voices:
    for digit, word in enumerate(DIGIT_WORDS):
      speed = int(rng.integers(140, 240))
      pitch = int(rng.integers(20, 80))
      clips.append({'digit': digit, 'voice': voice, 'speed': speed, 'pitch': pitch,
                    'wav': synth(word, voice, speed, pitch, bits)})
  return clips


# ------------------------------------------------------------------- real speech

# Recorded human voices saying the digit words, as shipped in Debian packages
# (speaker, package, file of digit d under the package root, codec, licence).
# Only two freely licensed speakers are installable here, so they are a test
# set only: speech_digit_human, the model never hears these voices in training.
HUMAN_SPEAKERS = (
    ('allison-smith', 'asterisk-core-sounds-en-g722',
     'usr/share/asterisk/sounds/en_US_f_Allison/digits/{digit}.g722', 'g722',
     'CC-BY-SA-3.0, recorded by Allison Smith (Asterisk core sounds, Digium)'),
    ('david-dawson', 'saytime', 'usr/share/saytime/{digit}.au', 'ulaw8k',
     'GPL, recorded by David C Dawson (saytime sound files)'),
)
HUMAN_TASK = 'speech_digit_human'
HUMAN_SPLIT = 'test'


def read_human_clip(path: str, codec: str) -> tuple[np.ndarray, int]:
  """(mono float32 samples, rate) of one packaged recording."""
  if codec == 'g722':  # G.722 wideband: 16 kHz, speech up to 7 kHz
    import av
    with av.open(path, format='g722') as container:
      frames = list(container.decode(audio=0))
    rate = frames[0].sample_rate
    x = np.concatenate([f.to_ndarray().reshape(-1) for f in frames])
    return x.astype(np.float32) / 32768, rate
  if codec == 'ulaw8k':  # saytime's .au files are headerless 8 kHz mu-law
    import soundfile
    x, rate = soundfile.read(path, format='RAW', subtype='ULAW', samplerate=8000,
                             channels=1, dtype='float32')
    return x, rate
  raise ValueError(f'unknown codec {codec!r}')


def human_clip(path: str, codec: str, bits: int) -> bytes:
  """A recording -> the corpus's WAV (16 kHz mono, trimmed, peak 0.9), like
  synth(); normalised first so the silence threshold is relative to the voice."""
  import soxr

  x, rate = read_human_clip(path, codec)
  if rate != SAMPLE_RATE:
    x = soxr.resample(x, rate, SAMPLE_RATE)
  return clip_wav(x / max(np.abs(x).max(), 1e-3) * 0.9, bits)


def package_version(package: str) -> str | None:
  try:
    return subprocess.run(['dpkg-query', '-W', '-f', '${Version}', package],
                          capture_output=True, text=True, check=True).stdout or None
  except (OSError, subprocess.CalledProcessError):
    return None


def require_human_speech(root: str) -> None:
  """Exits with the apt-get line to run when a package's recordings are missing."""
  missing = sorted({pkg for _, pkg, pattern, _, _ in HUMAN_SPEAKERS
                    for d in range(10)
                    if not os.path.isfile(os.path.join(root, pattern.format(digit=d)))})
  if missing:
    sys.exit(f'real speech needs the recordings in Debian packages {", ".join(missing)} '
             f'(not found under {root}): apt-get install {" ".join(missing)}')


def human_speech_records(root: str, bits: int) -> tuple[list[dict], list[dict]]:
  """(records, speakers): each speaker says 'zero' .. 'nine' once (the
  packages' 'oh' takes are left out: the synthetic voices only say 'zero')."""
  require_human_speech(root)
  recs, speakers = [], []
  for speaker, package, pattern, codec, licence in HUMAN_SPEAKERS:
    installed = os.path.abspath(root) == '/'  # else unpacked: dpkg does not know
    speakers.append({'speaker': speaker, 'package': package,
                     'version': package_version(package) if installed else None,
                     'licence': licence})
    for digit in range(10):
      rel = pattern.format(digit=digit)
      recs.append(rec(
          f'{HUMAN_SPLIT}/{HUMAN_TASK}/{speaker}/{digit}', HUMAN_TASK,
          [{'kind': 'audio', 'data': human_clip(os.path.join(root, rel), codec, bits),
            'format': 'wav', 'predict': False},
           seg_text('Which digit was spoken?'), seg_text(str(digit), True)],
          {'digit': digit, 'speaker': speaker, 'human': True,
           'source': f'{package}:/{rel}', 'licence': licence}))
  return recs, speakers


def build_human_speech(out: str, root: str, bits: int) -> dict:
  """Writes {HUMAN_SPLIT}/speech_digit_human from the installed packages and
  records it in manifest.json under 'human_speech' (kept out of 'splits',
  which lists the synthetic corpus); nothing else is touched."""
  recs, speakers = human_speech_records(root, bits)
  paths, counts = records.write_shards(recs, os.path.join(out, HUMAN_SPLIT, HUMAN_TASK), 1)
  size = sum(os.path.getsize(p) for p in paths)
  manifest = {'format_version': records.FORMAT_VERSION, 'splits': {}}
  if os.path.exists(os.path.join(out, 'manifest.json')):
    with open(os.path.join(out, 'manifest.json')) as f:
      manifest = json.load(f)
  manifest['human_speech'] = {
      'task': HUMAN_TASK, 'split': HUMAN_SPLIT, 'records': sum(counts), 'bytes': size,
      'files': [os.path.relpath(p, out) for p in paths], 'speakers': speakers}
  with open(os.path.join(out, 'manifest.json'), 'w') as f:
    json.dump(manifest, f, indent=1)
  print(f'{HUMAN_SPLIT:10s} {HUMAN_TASK:14s} {sum(counts):5d} records {size / 1e6:6.2f} MB')
  return manifest


# ------------------------------------------------------------------- video


def mp4_bytes(frames_Fx28x28: np.ndarray, fps: int = 1) -> bytes:
  """Gray frames -> MP4: gemjax's own encoder, shared with the videos that
  training composes on the fly (gemjax/data/compose.py)."""
  from gemjax.tokenizers.video import encode_mp4
  return encode_mp4(frames_Fx28x28, fps)


# ------------------------------------------------------------------- photos, text


def load_photo(name: str, loader: str) -> np.ndarray:
  if loader == 'sklearn':
    from sklearn.datasets import load_sample_image
    return load_sample_image(f'{name}.jpg')
  import skimage.data
  image = getattr(skimage.data, name)()
  if image.dtype == bool:
    image = image.astype(np.uint8) * 255
  if image.ndim == 2:
    image = np.repeat(image[..., None], 3, axis=-1)
  return image[..., :3].astype(np.uint8)


def photo_crops(image: np.ndarray, n: int, rng: np.random.Generator) -> list[np.ndarray]:
  from PIL import Image
  H, W = image.shape[:2]
  crops = []
  for _ in range(n):
    side = int(rng.uniform(0.5, 1.0) * min(H, W))
    y, x = int(rng.integers(0, H - side + 1)), int(rng.integers(0, W - side + 1))
    crop = Image.fromarray(image[y:y + side, x:x + side]).resize(
        (PHOTO_SIZE, PHOTO_SIZE), Image.LANCZOS)
    crops.append(np.asarray(crop))
  return crops


def text_chunks(max_chars: int = 1200) -> list[tuple[str, str]]:
  """(topic, chunk) from Python's own documentation (pydoc_data, PSF licence)
  and the Zen of Python."""
  import contextlib
  import pydoc_data.topics
  with contextlib.redirect_stdout(io.StringIO()):  # `import this` prints the Zen
    import this

  docs = dict(pydoc_data.topics.topics)
  docs['zen-of-python'] = codecs.decode(this.s, 'rot13')
  chunks = []
  for topic in sorted(docs):
    paragraphs = [p.strip() for p in docs[topic].split('\n\n') if p.strip()]
    current = ''
    for p in paragraphs:
      if current and len(current) + len(p) + 2 > max_chars:
        chunks.append((topic, current))
        current = ''
      current = f'{current}\n\n{p}' if current else p[:max_chars * 2]
    if current:
      chunks.append((topic, current))
  return chunks


def text_splits(chunks: list[tuple[str, str]], held_out: float = 0.05) -> dict[str, str]:
  """topic -> split: topics in a fixed hash order go to validation, then test,
  until each holds `held_out` of the chunks; the rest train."""
  per_topic: dict[str, int] = {}
  for topic, _ in chunks:
    per_topic[topic] = per_topic.get(topic, 0) + 1
  order = sorted(per_topic, key=lambda t: hashlib.sha256(t.encode()).hexdigest())
  out, filled = {}, {'validation': 0, 'test': 0}
  for topic in order:
    for split in ('validation', 'test'):
      if filled[split] < held_out * len(chunks):
        out[topic] = split
        filled[split] += per_topic[topic]
        break
    else:
      out[topic] = 'train'
  return out


# ------------------------------------------------------------------- records


def rec(rid: str, task: str, segments: list[dict], meta: dict) -> dict:
  return {'id': rid, 'task': task, 'segments': segments, 'meta': meta}


def seg_image(data: bytes, fmt: str = 'png') -> dict:
  return {'kind': 'image', 'data': data, 'format': fmt, 'predict': False}


def seg_text(text: str, predict: bool = False) -> dict:
  return {'kind': 'text', 'text': text, 'predict': predict}


def build(out: str, seed: int, bits: int) -> dict:
  rng = np.random.default_rng(seed)
  images, labels = digit_images()
  pngs = [png_bytes(im) for im in images]
  split_idx = digit_split_indices(len(images))
  voices = voice_splits(rng)
  chunks = text_chunks()
  topic_split = text_splits(chunks)
  tasks: dict[str, dict[str, list[dict]]] = {s: {} for s in SPLITS}
  for split in SPLITS:
    idx = split_idx[split]
    t = tasks[split]
    t['image_digit'] = [
        rec(f'{split}/image_digit/{i}', 'image_digit',
            [seg_image(pngs[i]), seg_text('Which digit is this?'),
             seg_text(str(labels[i]), True)],
            {'digit': int(labels[i]), 'source': f'sklearn.load_digits[{i}]'})
        for i in idx]
    print(f'{split}: synthesising {len(voices[split]) * 10} clips', flush=True)
    clips = speech_clips(voices[split], rng, bits)
    clip_meta = lambda c: {'digit': c['digit'], 'voice': c['voice'],
                           'speed': c['speed'], 'pitch': c['pitch']}
    t['speech_digit'] = [
        rec(f'{split}/speech_digit/{j}', 'speech_digit',
            [{'kind': 'audio', 'data': c['wav'], 'format': 'wav', 'predict': False},
             seg_text('Which digit was spoken?'), seg_text(str(c['digit']), True)],
            clip_meta(c))
        for j, c in enumerate(clips)]
    by_digit = {d: [i for i in idx if labels[i] == d] for d in range(10)}
    same = []
    n_same = COUNTS['same_digit'][split]
    for j in range(n_same):
      clip = clips[int(rng.integers(len(clips)))]
      is_same = j % 2 == 0  # exactly balanced
      digit = clip['digit'] if is_same else int(
          (clip['digit'] + rng.integers(1, 10)) % 10)
      i = int(rng.choice(by_digit[digit]))
      same.append(rec(
          f'{split}/same_digit/{j}', 'same_digit',
          [seg_image(pngs[i]),
           {'kind': 'audio', 'data': clip['wav'], 'format': 'wav', 'predict': False},
           seg_text('Is the spoken digit the digit shown?'),
           seg_text('yes' if is_same else 'no', True)],
          {'image_digit': int(labels[i]), 'spoken_digit': clip['digit'],
           'same': is_same, 'voice': clip['voice'], 'image_index': i}))
    rng.shuffle(same)
    t['same_digit'] = same
    videos = []
    for j in range(COUNTS['video_digits'][split]):
      n_frames = int(rng.integers(3, 6))
      chosen = rng.choice(idx, size=n_frames, replace=False)
      answer = ' '.join(str(labels[i]) for i in chosen)
      videos.append(rec(
          f'{split}/video_digits/{j}', 'video_digits',
          [{'kind': 'video', 'data': mp4_bytes(images[chosen]), 'format': 'mp4',
            'predict': False},
           seg_text('Which digits appear, in order?'), seg_text(answer, True)],
          {'digits': [int(labels[i]) for i in chosen], 'fps': 1,
           'image_indices': [int(i) for i in chosen]}))
    t['video_digits'] = videos
    photos = []
    for name, loader, caption, _ in PHOTOS:
      if PHOTO_SPLIT.get(name, 'train') != split:
        continue
      for k, crop in enumerate(photo_crops(load_photo(name, loader),
                                           PHOTO_CROPS[split], rng)):
        photos.append(rec(f'{split}/photo_caption/{name}/{k}', 'photo_caption',
                          [seg_image(jpeg_bytes(crop), 'jpeg'),
                           seg_text('Describe the photo.'), seg_text(caption, True)],
                          {'photo': name}))
    t['photo_caption'] = photos
    t['text_lm'] = [rec(f'{split}/text_lm/{j}', 'text_lm', [seg_text(text, True)],
                        {'topic': topic})
                    for j, (topic, text) in enumerate(
                        (tp, tx) for tp, tx in chunks if topic_split[tp] == split)]

  if os.path.isdir(out):
    for split in SPLITS:
      shutil.rmtree(os.path.join(out, split), ignore_errors=True)
  manifest = {'format_version': records.FORMAT_VERSION, 'seed': seed,
              'audio': f'WAV {SAMPLE_RATE} Hz mono {bits}-bit PCM',
              'voices': voices, 'splits': {}}
  for split in SPLITS:
    manifest['splits'][split] = {}
    for task, recs in sorted(tasks[split].items()):
      order = rng.permutation(len(recs))  # shards hold a shuffled order
      paths, counts = records.write_shards([recs[i] for i in order],
                                           os.path.join(out, split, task), 1)
      size = sum(os.path.getsize(p) for p in paths)
      manifest['splits'][split][task] = {'records': sum(counts), 'bytes': size,
                                         'files': [os.path.relpath(p, out) for p in paths]}
      print(f'{split:10s} {task:14s} {sum(counts):5d} records {size / 1e6:6.2f} MB')
  with open(os.path.join(out, 'manifest.json'), 'w') as f:
    json.dump(manifest, f, indent=1)
  return manifest


DRAW_TASKS = ('draw_digit', 'draw_name')


def draw_records(split: str, image_digit: list[dict]) -> dict[str, list[dict]]:
  """draw_digit and draw_name records, one of each per image_digit record (in
  its order): the digit image becomes the predicted output."""
  out = {task: [] for task in DRAW_TASKS}
  for j, r in enumerate(image_digit):
    image = next(s for s in r['segments'] if s['kind'] == 'image')
    drawn = {'kind': 'image', 'data': image['data'],
             'format': image.get('format', 'png'), 'predict': True}
    digit = int(r['meta']['digit'])
    meta = {'digit': digit, 'image_digit_id': r['id']}
    if 'source' in r['meta']:
      meta['source'] = r['meta']['source']
    out['draw_digit'].append(rec(f'{split}/draw_digit/{j}', 'draw_digit',
                                 [seg_text(f'Draw the digit {digit}.'), drawn], meta))
    out['draw_name'].append(rec(f'{split}/draw_name/{j}', 'draw_name',
                                [seg_text('Draw a digit, then name it.'), drawn,
                                 seg_text(str(digit), True)], meta))
  return out


def build_draw_tasks(out: str) -> dict:
  """Writes the draw tasks of every split from its image_digit shards and
  adds them to manifest.json; nothing else is touched."""
  from gemjax.data import sources
  with open(os.path.join(out, 'manifest.json')) as f:
    manifest = json.load(f)
  for split in SPLITS:
    src = sources.open_source('array_record', os.path.join(out, split, 'image_digit-*'))
    image_digit = [records.decode_record(src[i]['record'], src[i]['where'])
                   for i in range(len(src))]
    for task, recs in draw_records(split, image_digit).items():
      paths, counts = records.write_shards(recs, os.path.join(out, split, task), 1)
      size = sum(os.path.getsize(p) for p in paths)
      manifest['splits'][split][task] = {'records': sum(counts), 'bytes': size,
                                         'files': [os.path.relpath(p, out) for p in paths]}
      print(f'{split:10s} {task:14s} {sum(counts):5d} records {size / 1e6:6.2f} MB')
    manifest['splits'][split] = dict(sorted(manifest['splits'][split].items()))
  with open(os.path.join(out, 'manifest.json'), 'w') as f:
    json.dump(manifest, f, indent=1)
  return manifest


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--out', default=os.path.join(
      os.path.dirname(__file__), '..', 'data', 'sample'))
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--audio-bits', type=int, choices=(8, 16), default=8)
  parser.add_argument('--only-draw-tasks', action='store_true',
                      help='only (re)write draw_digit and draw_name from the existing '
                      'image_digit shards')
  parser.add_argument('--only-human-speech', action='store_true',
                      help=f'only (re)write {HUMAN_SPLIT}/{HUMAN_TASK} from the '
                      'installed Debian packages of recorded speech')
  parser.add_argument('--package-root', default='/',
                      help='where the speech packages are installed (or unpacked '
                      'with dpkg-deb -x)')
  args = parser.parse_args(argv)
  out = os.path.normpath(args.out)
  if args.only_draw_tasks:
    manifest = build_draw_tasks(out)
  elif args.only_human_speech:
    manifest = build_human_speech(out, args.package_root, args.audio_bits)
  else:
    if shutil.which('espeak-ng') is None:
      sys.exit('espeak-ng is needed to synthesise speech: apt-get install espeak-ng')
    require_human_speech(args.package_root)  # before minutes of synthesis
    build(out, args.seed, args.audio_bits)
    # After the rest, from the written shards: the other tasks' random draws
    # (and so their bytes) do not depend on the draw tasks or the real speech.
    build_draw_tasks(out)
    manifest = build_human_speech(out, args.package_root, args.audio_bits)
  total = sum(t['bytes'] for s in manifest['splits'].values() for t in s.values())
  total += manifest.get('human_speech', {}).get('bytes', 0)
  print(f'total {total / 1e6:.2f} MB in {out}')


if __name__ == '__main__':
  main()
