"""Step overhead of the adaptive transforms and guards, chained with adamw.

Each optimizer is jitted on a 16.8M-parameter tree of transformer-like shapes
and timed against `jaxclip.clip_by_global_norm` + adamw in the same run
(median of repeated timings, after warmup), once with fresh output buffers and
once with the parameters and optimizer state donated. Run:

  python benchmarks/bench_adaptive.py [--layers 4] [--repeats 30]
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxclip
from jaxclip import (
  adagc,
  autoclip,
  clippy,
  quantile_clip,
  skip_nonfinite,
  skip_on_spike,
  spam_clip,
  stable_spam_clip,
  zclip,
)


def make_params(layers: int, d: int = 512, vocab: int = 8192) -> dict:
  key = iter(jax.random.split(jax.random.PRNGKey(0), 16 * layers + 4))
  p = {"embed": jax.random.normal(next(key), (vocab, d)) * 0.02}
  for i in range(layers):
    p[f"layer{i}"] = {
      "qkv": jax.random.normal(next(key), (d, 3 * d)) * 0.02,
      "out": jax.random.normal(next(key), (d, d)) * 0.02,
      "up": jax.random.normal(next(key), (d, 4 * d)) * 0.02,
      "down": jax.random.normal(next(key), (4 * d, d)) * 0.02,
      "ln1": jnp.ones(d),
      "ln2": jnp.ones(d),
      "b_up": jnp.zeros(4 * d),
      "b_down": jnp.zeros(d),
    }
  return p


def time_step(opt, params, grads, repeats: int, donate: bool = False) -> float:
  """Median seconds of a jitted update + apply step (after warmup); `loss=`
  is passed to `update`. With `donate`, params and state buffers are donated."""
  opt = optax.with_extra_args_support(opt)
  params = jax.tree.map(jnp.copy, params)
  state = opt.init(params)

  def step(params, state, grads):
    updates, state = opt.update(grads, state, params, loss=jnp.float32(1.0))
    return optax.apply_updates(params, updates), state

  step = jax.jit(step, donate_argnums=(0, 1) if donate else ())
  for _ in range(3):
    params, state = jax.block_until_ready(step(params, state, grads))
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    params, state = jax.block_until_ready(step(params, state, grads))
    times.append(time.perf_counter() - t0)
  return float(np.median(times))


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--layers", type=int, default=4)
  parser.add_argument("--repeats", type=int, default=30)
  args = parser.parse_args()
  params = make_params(args.layers)
  n = sum(x.size for x in jax.tree.leaves(params))
  grads = jax.tree.map(lambda x: jnp.full_like(x, 1e-3), params)
  adamw = lambda: optax.adamw(1e-4)  # noqa: E731
  candidates = {
    "autoclip": lambda: optax.chain(autoclip(10.0), adamw()),
    "zclip": lambda: optax.chain(zclip(), adamw()),
    "adagc": lambda: optax.chain(adagc(), adamw()),
    "quantile_clip": lambda: optax.chain(quantile_clip(), adamw()),
    "spam_clip": lambda: optax.chain(spam_clip(), adamw()),
    "stable_spam_clip": lambda: optax.chain(stable_spam_clip(), adamw()),
    "stable_spam+gn": lambda: optax.chain(stable_spam_clip(adaptive_norm=True), adamw()),
    "clippy": lambda: optax.chain(adamw(), clippy()),  # after the optimizer
    "skip_on_spike": lambda: skip_on_spike(optax.chain(jaxclip.clip_by_global_norm(1.0), adamw())),
    "skip_nonfinite": lambda: skip_nonfinite(
      optax.chain(jaxclip.clip_by_global_norm(1.0), adamw())
    ),
    "skip_large_norm": lambda: jaxclip.skip_large_norm(
      optax.chain(jaxclip.clip_by_global_norm(1.0), adamw()), 100.0
    ),
  }
  baseline = lambda: optax.chain(jaxclip.clip_by_global_norm(1.0), adamw())  # noqa: E731
  print(f"{n / 1e6:.1f}M parameters, {len(jax.tree.leaves(params))} tensors, {jax.devices()[0]}")
  print(f"{'':<16}{'not donated':^31}{'donated':^31}")
  print(f"{'transform':<16}" + f"{'ms/step':>10}{'baseline ms':>13}{'ratio':>8}" * 2)
  for name, make in candidates.items():
    row = f"{name:<16}"
    for donate in (False, True):
      # Interleave baseline and candidate so drift affects both alike.
      base_t, cand_t = [], []
      for _ in range(3):
        base_t.append(time_step(baseline(), params, grads, args.repeats, donate))
        cand_t.append(time_step(make(), params, grads, args.repeats, donate))
      b, c = float(np.median(base_t)), float(np.median(cand_t))
      row += f"{c * 1e3:>10.2f}{b * 1e3:>13.2f}{c / b:>8.3f}"
    print(row, flush=True)


if __name__ == "__main__":
  main()
