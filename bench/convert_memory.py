"""Host memory of `gemjax.convert import` / `export` on a sharded checkpoint.

    python bench/convert_memory.py                 # ~0.6 GB Llama-shaped model, 4 shards
    python bench/convert_memory.py --d-model 2048 --layers 8

Writes a random Llama-shaped float32 checkpoint as several safetensors shards
with an index (numpy + safetensors only: no torch, no transformers), then runs
the import and the export each in a fresh process and reports its peak
resident memory (ru_maxrss) above the same process's baseline after
importing gemjax and jax. The claim checked: the model is held in host
memory about once (not twice) while converting.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CHILD = r'''
import os, resource, sys, time
sys.path.insert(0, {root!r})
import jax, numpy  # noqa
from gemjax import convert
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t = time.time()
if {cmd!r} == 'import':
  convert.import_hf({src!r}, {dst!r})
else:
  convert.export_hf({src!r}, {dst!r}, max_shard_gb=0.15)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(base * 1024, peak * 1024, time.time() - t)
'''


def write_model(directory: str, d: int, layers: int, vocab: int, ffn: int, shards: int) -> int:
  from safetensors.numpy import save_file
  rng = np.random.default_rng(0)
  heads, kv, k = d // 64, max(1, d // 256), 64
  tensors = {'model.embed_tokens.weight': (vocab, d), 'lm_head.weight': (vocab, d),
             'model.norm.weight': (d,)}
  for i in range(layers):
    p = f'model.layers.{i}.'
    tensors.update({p + 'self_attn.q_proj.weight': (heads * k, d),
                    p + 'self_attn.k_proj.weight': (kv * k, d),
                    p + 'self_attn.v_proj.weight': (kv * k, d),
                    p + 'self_attn.o_proj.weight': (d, heads * k),
                    p + 'mlp.gate_proj.weight': (ffn, d), p + 'mlp.up_proj.weight': (ffn, d),
                    p + 'mlp.down_proj.weight': (d, ffn),
                    p + 'input_layernorm.weight': (d,),
                    p + 'post_attention_layernorm.weight': (d,)})
  names = list(tensors)
  per = -(-len(names) // shards)
  weight_map, total = {}, 0
  os.makedirs(directory, exist_ok=True)
  for s in range(shards):
    part = names[s * per:(s + 1) * per]
    fname = f'model-{s + 1:05d}-of-{shards:05d}.safetensors'
    arrays = {n: (rng.standard_normal(tensors[n], dtype=np.float32) * 0.02) for n in part}
    total += sum(a.nbytes for a in arrays.values())
    save_file(arrays, os.path.join(directory, fname))
    weight_map.update({n: fname for n in part})
    del arrays
  with open(os.path.join(directory, 'model.safetensors.index.json'), 'w') as f:
    json.dump({'metadata': {}, 'weight_map': weight_map}, f)
  with open(os.path.join(directory, 'config.json'), 'w') as f:
    json.dump({'model_type': 'llama', 'architectures': ['LlamaForCausalLM'],
               'vocab_size': vocab, 'hidden_size': d, 'intermediate_size': ffn,
               'num_hidden_layers': layers, 'num_attention_heads': heads,
               'num_key_value_heads': kv, 'head_dim': k, 'rms_norm_eps': 1e-5,
               'tie_word_embeddings': False, 'hidden_act': 'silu',
               'rope_theta': 10000.0}, f)
  return total


def measure(cmd: str, src: str, dst: str) -> tuple[int, int, float]:
  code = CHILD.format(root=ROOT, cmd=cmd, src=src, dst=dst)
  env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS='')
  out = subprocess.run([sys.executable, '-c', code], env=env, capture_output=True, text=True,
                       check=True).stdout.split()
  return int(out[-3]), int(out[-2]), float(out[-1])


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument('--d-model', type=int, default=1024)
  ap.add_argument('--layers', type=int, default=8)
  ap.add_argument('--vocab', type=int, default=32000)
  ap.add_argument('--ffn', type=int, default=2816)
  ap.add_argument('--shards', type=int, default=4)
  args = ap.parse_args()
  with tempfile.TemporaryDirectory() as tmp:
    hf, gj, back = (os.path.join(tmp, n) for n in ('hf', 'gj', 'back'))
    size = write_model(hf, args.d_model, args.layers, args.vocab, args.ffn, args.shards)
    gib = 2 ** 30
    print(f'model: {size / gib:.3f} GiB float32 in {args.shards} shards '
          f'(d_model {args.d_model}, {args.layers} layers, vocab {args.vocab})')
    for cmd, src, dst in (('import', hf, gj), ('export', gj, back)):
      base, peak, secs = measure(cmd, src, dst)
      extra = peak - base
      print(f'{cmd}: peak RSS {peak / gib:.3f} GiB, baseline {base / gib:.3f} GiB, '
            f'above baseline {extra / gib:.3f} GiB = {extra / size:.2f} x the model, {secs:.1f} s')


if __name__ == '__main__':
  main()
