"""KV-cache decoding: prefill and cached decode vs recomputation, and vs Hugging Face.

    python bench/decode.py              # nano + reference, B = 1 and 16, 256 + 256 tokens
    python bench/decode.py --quick      # nano, B = 1, 64 + 64 tokens (a smoke run)
    python bench/decode.py --skip-hf    # without the transformers comparison

Part 1, per model and batch size B (prompt P tokens, N new, max_len P + N):
  * prefill tokens/s: B x P / time of the jitted `Sampler.prefill`;
  * generate tokens/s: B x N / time of `Sampler.generate` (prefill + the
    jitted `lax.while_loop` of greedy steps, end to end);
  * cached decode tokens/s: B x (N - 1) / (generate time - prefill time),
    the while loop's steps alone;
  * cached step ms: one `Sampler.step` (host loop, jitted step + jitted
    argmax per token) averaged over 32 steps (a step attends over all
    max_len slots, masked, so its cost does not depend on the fill level);
  * recompute: without a cache every new token costs one full forward pass
    over the whole sequence so far. Measured as a jitted forward over B rows
    of exactly `max_len` real tokens (the last token's cost; with a static
    `max_len` buffer, as in `decode.recompute_tokens`, every token costs
    this) and of P tokens (the cheapest token of the run, so the most
    favourable case for recomputation); each returns the greedy next token
    only, like one iteration of `recompute_tokens`. `recompute_tokens` itself
    (`--recompute-check` tokens, jitted, max_len buffer) is timed as a cross-check.
  The ratio to report is cached decode tokens/s / recompute tokens/s at max_len.

Part 2 (optional, needs `transformers` + torch): the same model with
`model.qk_norm=false` (Llama has no QK-norm) copied into a
`transformers.LlamaForCausalLM` of the same shape (RMSNorm weight = 1 + scale,
rotate-half RoPE, GQA head h -> KV head h // (H/G), same theta and eps), greedy
tokens compared position by position, then greedy `model.generate` vs
`Sampler.generate` on the same prompts, timed alternately. HF is timed with
each of `--hf-threads` torch threads (default 2 and 1); gemjax runs XLA:CPU's
default thread pool (all cores). OMP_WAIT_POLICY defaults to PASSIVE here: on
a shared, oversubscribed 2-core machine torch's spinning OpenMP threads made
2-thread HF decoding 4-70x slower (32-491 ms per token on nano) than with
PASSIVE; XLA:CPU does not use OpenMP, so this only helps the HF side.

All timings: best of `--reps` rounds after a warm-up (compile) call; within
a round every measurement of a case runs back to back, so the ratios come from
the same load on this shared machine.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import sys
import time

# Must be set before torch (OpenMP) loads; see the module docstring.
os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# The reference shape of bench/train_step.py (its model overrides; the train.*
# ones do not matter here).
REFERENCE = ['model.attention=blockwise', 'model.attention_block=128',
             'model.d_model=256', 'model.num_layers=4', 'model.num_heads=4',
             'model.num_kv_heads=4', 'model.head_dim=64', 'model.mlp_dim=1024',
             'model.vocab_size=8192', 'model.tie_embeddings=false',
             'model.param_dtype=float32', 'model.compute_dtype=float32']
CASES = {
    'nano': ('configs/nano.yaml', []),
    'reference': (None, REFERENCE),
}


def build(case: str, extra=()):
  from flax import nnx
  from gemjax.config import load_config
  from gemjax.model.spec import decoder_spec
  path, overrides = CASES[case]
  cfg = load_config(os.path.join(ROOT, path) if path else None, list(overrides) + list(extra))
  return cfg, decoder_spec(cfg.model).build(nnx.Rngs(0))


def text_batch(tokens):
  """The prompt batch of the batch contract for [B, T] int token ids, all real."""
  import numpy as np
  B, T = tokens.shape
  pos = np.broadcast_to(np.arange(T, dtype=np.int32)[None, :, None], (B, T, 3)).copy()
  return {'tokens': tokens.astype(np.int32), 'positions': pos,
          'segment_ids': np.ones((B, T), np.int32), 'block_ids': np.zeros((B, T), np.int32),
          'modality': np.zeros((B, T), np.int8)}


def ready(x):
  import jax
  return jax.block_until_ready(x)


def timed(fn):
  t0 = time.perf_counter()
  out = ready(fn())
  return time.perf_counter() - t0, out


@functools.lru_cache(maxsize=None)
def _next_token_fn():
  """One recompute step: full forward over the batch, greedy token after each row."""
  import jax
  import jax.numpy as jnp
  from flax import nnx
  from gemjax.inference import decode

  @functools.partial(jax.jit, static_argnums=0)
  def fn(graphdef, params, batch):
    logits, _, _ = nnx.merge(graphdef, params)(batch)
    state = decode.prompt_state(batch)
    return jnp.argmax(decode.last_logits(logits, batch, state), axis=-1)
  return fn


@functools.lru_cache(maxsize=None)
def _recompute_fn(n: int):
  import jax
  from flax import nnx
  from gemjax.inference import decode

  @functools.partial(jax.jit, static_argnums=0)
  def fn(graphdef, params, batch):
    return decode.recompute_tokens(nnx.merge(graphdef, params), batch, max_new_tokens=n)
  return fn


# --------------------------------------------------------------------- part 1
def bench_cache(case: str, B: int, P: int, N: int, reps: int, recompute_check: int) -> dict:
  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx
  from gemjax.inference import decode

  cfg, model = build(case)
  V = cfg.model.vocab_size
  L = P + N
  graphdef, params = nnx.split(model)
  sampler = decode.Sampler(graphdef=graphdef, params=params)
  rng = np.random.default_rng(1)
  full = rng.integers(0, V, size=(B, L)).astype(np.int32)
  prompt = text_batch(full[:, :P])
  at_max = text_batch(full)                  # all L tokens real: the last token's forward
  at_prompt = text_batch(full[:, :P])        # P tokens: the first token's forward
  buf = text_batch(full)                     # recompute_tokens' buffer: P real, rest padding
  buf['segment_ids'][:, P:] = 0
  nxt = _next_token_fn()
  argmax = jax.jit(lambda x: jnp.argmax(x, axis=-1).astype(jnp.int32))
  R = recompute_check

  def run_steps():
    """Host loop of single steps after the prompt; seconds per step (32 steps).

    Every step attends over all max_len slots (masked), so its cost does not
    depend on how full the cache is: 32 steps right after the prompt cost what
    32 steps before max_len do, without running the other N - 33.
    """
    logits, cache, st = sampler.prefill(prompt, L)
    n = min(32, N - 1)
    logits, cache, st = sampler.step(argmax(logits), st, cache)    # the first one
    ready(logits)
    t0 = time.perf_counter()
    for _ in range(n):
      logits, cache, st = sampler.step(argmax(logits), st, cache)
    ready(logits)
    return (time.perf_counter() - t0) / n

  # Warm-up: every function compiled once.
  c0 = time.perf_counter()
  ready(sampler.prefill(prompt, L))
  gen = ready(sampler.generate(prompt, max_new_tokens=N, max_len=L))
  run_steps()
  ready(nxt(graphdef, params, at_max))
  ready(nxt(graphdef, params, at_prompt))
  if R:
    ready(_recompute_fn(R)(graphdef, params, buf))
  compile_s = time.perf_counter() - c0
  assert int(np.asarray(gen.lengths_B).min()) == N

  t = {k: [] for k in ('prefill', 'generate', 'step', 'fwd_max', 'fwd_prompt', 'recompute')}
  for _ in range(reps):
    t['prefill'].append(timed(lambda: sampler.prefill(prompt, L))[0])
    t['generate'].append(timed(lambda: sampler.generate(prompt, max_new_tokens=N, max_len=L))[0])
    t['step'].append(run_steps())
    t['fwd_max'].append(timed(lambda: nxt(graphdef, params, at_max))[0])
    t['fwd_prompt'].append(timed(lambda: nxt(graphdef, params, at_prompt))[0])
    if R:
      t['recompute'].append(timed(lambda: _recompute_fn(R)(graphdef, params, buf))[0] / R)
  best = {k: min(v) if v else float('nan') for k, v in t.items()}
  decode_s = best['generate'] - best['prefill']
  r = dict(case=case, B=B, P=P, N=N, compile_s=compile_s,
           prefill_tok_s=B * P / best['prefill'],
           generate_tok_s=B * N / best['generate'],
           decode_tok_s=B * (N - 1) / decode_s,
           step_ms=best['step'] * 1e3,
           step_tok_s=B / best['step'],
           fwd_max_ms=best['fwd_max'] * 1e3,
           recompute_max_tok_s=B / best['fwd_max'],
           fwd_prompt_ms=best['fwd_prompt'] * 1e3,
           recompute_prompt_tok_s=B / best['fwd_prompt'],
           recompute_tokens_ms=best['recompute'] * 1e3,
           times={k: [round(x, 5) for x in v] for k, v in t.items()})
  r['speedup_max'] = r['decode_tok_s'] / r['recompute_max_tok_s']
  r['speedup_prompt'] = r['decode_tok_s'] / r['recompute_prompt_tok_s']
  r['step_speedup_max'] = r['fwd_max_ms'] / r['step_ms']
  return r


# --------------------------------------------------------------------- part 2
def to_llama(model, m):
  """A transformers LlamaForCausalLM with `model`'s weights (f32, eval mode)."""
  import numpy as np
  import torch
  import transformers
  D, H, G, K, F, V, L = (m.d_model, m.num_heads, m.num_kv_heads, m.head_dim, m.mlp_dim,
                         m.vocab_size, m.num_layers)
  assert m.local_layers == 0 and not m.qk_norm and m.moe.num_experts == 0
  modality = np.asarray(model.inputs.modality_MxD[...])
  assert not modality.any(), 'the per-modality embedding must be zero (it is at init)'
  hf_cfg = transformers.LlamaConfig(
      vocab_size=V, hidden_size=D, intermediate_size=F, num_hidden_layers=L,
      num_attention_heads=H, num_key_value_heads=G, head_dim=K, hidden_act='silu',
      max_position_embeddings=max(4096, 2 * D), rms_norm_eps=m.norm_eps,
      rope_parameters={'rope_type': 'default', 'rope_theta': float(m.rope_base)},
      tie_word_embeddings=m.tie_embeddings, attention_bias=False, mlp_bias=False,
      bos_token_id=None, eos_token_id=None, pad_token_id=0)
  torch.manual_seed(0)
  hf = transformers.LlamaForCausalLM(hf_cfg).to(torch.float32).eval()
  a = lambda x: np.asarray(x[...], np.float32)
  blk = model.layers.blocks[0]       # every parameter stacked over layers
  wq, wk, wv, wo = a(blk.attn.wq_DxHxK), a(blk.attn.wk_DxGxK), a(blk.attn.wv_DxGxK), a(blk.attn.wo_HxKxD)
  an, mn = a(blk.attn_norm.scale), a(blk.mlp_norm.scale)
  wg, wu, wd = a(blk.mlp.w_gate_DxF), a(blk.mlp.w_up_DxF), a(blk.mlp.w_down_FxD)
  emb = a(model.embedding_VxD)
  sd = {'model.embed_tokens.weight': emb, 'model.norm.weight': 1.0 + a(model.final_norm.scale),
        'lm_head.weight': emb if m.tie_embeddings else a(model.head_DxV).T}
  for i in range(L):
    p = f'model.layers.{i}.'
    sd[p + 'self_attn.q_proj.weight'] = wq[i].reshape(D, H * K).T
    sd[p + 'self_attn.k_proj.weight'] = wk[i].reshape(D, G * K).T
    sd[p + 'self_attn.v_proj.weight'] = wv[i].reshape(D, G * K).T
    sd[p + 'self_attn.o_proj.weight'] = wo[i].reshape(H * K, D).T
    sd[p + 'input_layernorm.weight'] = 1.0 + an[i]     # gemjax scales by (1 + w)
    sd[p + 'post_attention_layernorm.weight'] = 1.0 + mn[i]
    sd[p + 'mlp.gate_proj.weight'] = wg[i].T
    sd[p + 'mlp.up_proj.weight'] = wu[i].T
    sd[p + 'mlp.down_proj.weight'] = wd[i].T
  want = hf.state_dict()
  assert set(sd) >= set(want), sorted(set(want) - set(sd))
  with torch.no_grad():
    for k, v in want.items():
      assert tuple(v.shape) == sd[k].shape, (k, tuple(v.shape), sd[k].shape)
      v.copy_(torch.from_numpy(np.array(sd[k], np.float32, copy=True)))
  if m.tie_embeddings:
    assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()
  return hf


def bench_hf(case: str, B: int, P: int, N: int, reps: int, threads: list[int]) -> dict:
  import numpy as np
  import torch
  from flax import nnx
  from gemjax.inference import decode

  cfg, model = build(case, ['model.qk_norm=false'])
  hf = to_llama(model, cfg.model)
  L = P + N
  rng = np.random.default_rng(2)
  ids = rng.integers(0, cfg.model.vocab_size, size=(B, P)).astype(np.int32)
  prompt = text_batch(ids)
  graphdef, params = nnx.split(model)
  sampler = decode.Sampler(graphdef=graphdef, params=params)
  input_ids = torch.from_numpy(ids.astype(np.int64))
  mask = torch.ones_like(input_ids)

  def hf_generate(n, num_threads):
    torch.set_num_threads(num_threads)
    with torch.inference_mode():
      return hf.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=n,
                         min_new_tokens=n, do_sample=False, num_beams=1, use_cache=True,
                         pad_token_id=0, eos_token_id=None)

  # Logits after the prompt: the two models agree before any token is chosen.
  torch.set_num_threads(threads[0])
  with torch.inference_mode():
    hf_last = hf(input_ids=input_ids, attention_mask=mask).logits[:, -1].numpy()
  gj_last = np.asarray(sampler.prefill(prompt, L)[0])
  logit_diff = float(np.abs(hf_last - gj_last).max())
  logit_scale = float(np.abs(gj_last).max())

  c0 = time.perf_counter()
  gen = ready(sampler.generate(prompt, max_new_tokens=N, max_len=L))
  compile_s = time.perf_counter() - c0
  for th in threads:
    hf_generate(4, th)      # warm-up (no compilation in eager torch)
  ours = np.asarray(gen.tokens_BxN)
  t_gj, t_hf = [], {th: [] for th in threads}
  theirs = {}
  for _ in range(reps):
    t_gj.append(timed(lambda: sampler.generate(prompt, max_new_tokens=N, max_len=L))[0])
    for th in threads:
      t0 = time.perf_counter()
      out = hf_generate(N, th)
      t_hf[th].append(time.perf_counter() - t0)
      theirs[th] = out[:, P:].numpy()
  torch.set_num_threads(threads[0])
  first = theirs[threads[0]]
  assert first.shape == (B, N), first.shape
  same = ours == first
  # Length of the identical prefix per row (a flipped token changes all after it).
  prefix = np.where(same.all(1), N, np.argmin(same, axis=1))
  r = dict(case=case, B=B, P=P, N=N, gemjax_tok_s=B * N / min(t_gj), gemjax_s=min(t_gj),
           compile_s=compile_s, threads=threads,
           hf_tok_s={th: B * N / min(t) for th, t in t_hf.items()},
           hf_threads_agree=all((v == first).all() for v in theirs.values()),
           rows_equal=int(same.all(1).sum()), positions_equal=int(same.sum()),
           positions=int(same.size), prefix_min=int(prefix.min()),
           prefix_median=float(np.median(prefix)), logit_maxdiff=logit_diff,
           logit_maxabs=logit_scale, times=dict(gemjax=t_gj, hf=t_hf))
  r['ratio'] = {th: r['gemjax_tok_s'] / v for th, v in r['hf_tok_s'].items()}
  return r


# --------------------------------------------------------------------- output
def fmt(x, nd=0):
  return f'{x:,.{nd}f}'


def print_tables(env, cache_rows, hf_rows, hf_note):
  print()
  print(f"jax {env['jax']} ({env['backend']}, {env['cpus']} CPU cores visible), "
        f"torch {env.get('torch', '-')} (threads: {env.get('torch_threads', '-')}), "
        f"transformers {env.get('transformers', '-')}, OMP_WAIT_POLICY={env['omp_wait_policy']}; "
        f"best of {env['reps']} rounds (HF part: {env['hf_reps']})")
  if cache_rows:
    print()
    print('| model | B | prompt + new | prefill tok/s | generate tok/s (end to end) | '
          'cached decode tok/s | cached step ms (host loop) | full forward ms @ max_len | '
          'recompute tok/s @ max_len | cached / recompute @ max_len | '
          'recompute tok/s @ prompt | cached / recompute @ prompt | '
          'recompute_tokens ms/token | warm-up s (compile + 1 run) |')
    print('|---|---|---|---|---|---|---|---|---|---|---|---|---|---|')
    for r in cache_rows:
      print(f"| {r['case']} | {r['B']} | {r['P']} + {r['N']} | {fmt(r['prefill_tok_s'])} | "
            f"{fmt(r['generate_tok_s'])} | {fmt(r['decode_tok_s'])} | {r['step_ms']:.2f} | "
            f"{r['fwd_max_ms']:.1f} | {fmt(r['recompute_max_tok_s'], 1)} | "
            f"**{r['speedup_max']:.1f}x** | {fmt(r['recompute_prompt_tok_s'], 1)} | "
            f"{r['speedup_prompt']:.1f}x | {r['recompute_tokens_ms']:.1f} | {r['compile_s']:.1f} |")
  print()
  if hf_rows:
    ths = hf_rows[0]['threads']
    print('| model (qk_norm off) | B | prompt + new | gemjax generate tok/s | ' +
          ' | '.join(f'HF generate tok/s ({t} thr)' for t in ths) + ' | ' +
          ' | '.join(f'gemjax / HF ({t} thr)' for t in ths) +
          ' | greedy tokens equal | rows fully equal | identical prefix min / median | '
          'prompt logits max abs diff |')
    print('|---|---|---|---|' + '---|' * (2 * len(ths)) + '---|---|---|---|')
    for r in hf_rows:
      print(f"| {r['case']} | {r['B']} | {r['P']} + {r['N']} | {fmt(r['gemjax_tok_s'])} | " +
            ' | '.join(fmt(r['hf_tok_s'][t], 1) for t in ths) + ' | ' +
            ' | '.join(f"**{r['ratio'][t]:.1f}x**" for t in ths) + ' | ' +
            f"{r['positions_equal']}/{r['positions']} | {r['rows_equal']}/{r['B']} | "
            f"{r['prefix_min']} / {r['prefix_median']:.0f} | "
            f"{r['logit_maxdiff']:.1e} (of max {r['logit_maxabs']:.2f}) |")
  else:
    print(f'HF comparison skipped: {hf_note}')


def main():
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--quick', action='store_true',
                  help='nano only, B = 1, 64 + 64 tokens, 2 rounds')
  ap.add_argument('--skip-hf', action='store_true', help='no transformers comparison')
  ap.add_argument('--cases', default='nano,reference')
  ap.add_argument('--batches', default='1,16')
  ap.add_argument('--prompt', type=int, default=256)
  ap.add_argument('--new', type=int, default=256)
  ap.add_argument('--reps', type=int, default=3)
  ap.add_argument('--hf-cases', default=None, help='default: --cases')
  ap.add_argument('--hf-reps', type=int, default=2)
  ap.add_argument('--hf-threads', default='2,1',
                  help='torch thread counts to time HF with (the first one is compared)')
  ap.add_argument('--recompute-check', type=int, default=2,
                  help='tokens of decode.recompute_tokens timed as a cross-check (0 = off)')
  ap.add_argument('--json', default=None, help='also write the results here')
  args = ap.parse_args()
  if args.quick:
    args.cases, args.batches, args.prompt, args.new, args.reps = 'nano', '1', 64, 64, 2
    args.hf_reps = 1
  cases = args.cases.split(',')
  batches = [int(b) for b in args.batches.split(',')]
  hf_cases = (args.hf_cases or args.cases).split(',')
  hf_threads = [int(t) for t in args.hf_threads.split(',')]

  import jax
  env = dict(jax=jax.__version__, backend=jax.default_backend(), cpus=os.cpu_count(),
             reps=args.reps, hf_reps=args.hf_reps, python=platform.python_version(),
             omp_wait_policy=os.environ.get('OMP_WAIT_POLICY'))
  hf_note = '--skip-hf'
  have_hf = False
  if not args.skip_hf:
    try:
      import torch
      import transformers
      torch.set_num_threads(2)
      env.update(torch=torch.__version__, transformers=transformers.__version__,
                 torch_threads=args.hf_threads)
      transformers.logging.set_verbosity_error()
      have_hf = True
    except ImportError as e:
      hf_note = f'transformers/torch not importable ({e}); pip install torch transformers'
      print(f'HF comparison skipped: {hf_note}', file=sys.stderr)

  t_start = time.perf_counter()
  cache_rows, hf_rows = [], []
  for case in cases:
    for B in batches:
      r = bench_cache(case, B, args.prompt, args.new, args.reps, args.recompute_check)
      cache_rows.append(r)
      print(json.dumps({k: v for k, v in r.items() if k != 'times'}), flush=True)
  if have_hf:
    for case in hf_cases:
      for B in batches:
        r = bench_hf(case, B, args.prompt, args.new, args.hf_reps, hf_threads)
        hf_rows.append(r)
        print(json.dumps({k: v for k, v in r.items() if k != 'times'}), flush=True)
  env['wall_s'] = time.perf_counter() - t_start
  print_tables(env, cache_rows, hf_rows, hf_note)
  print(f"\nwall time {env['wall_s']:.0f} s")
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(dict(env=env, cache=cache_rows, hf=hf_rows), f, indent=1)


if __name__ == '__main__':
  main()
