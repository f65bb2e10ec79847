"""Loss spikes in a small character-level transformer, with and without guards.

The model is a one-layer transformer (width 64, 4 attention heads, an MLP of
width 256, learned positions, ~64k parameters) with no LayerNorm anywhere, not
even before the output layer: nothing bounds the size of the activations or
of the logits, a known recipe for instability. It reads 32 characters and
predicts the next one, on Python's own source code (`textwrap`, `argparse`,
`inspect`, read with `inspect.getsource`, so nothing is downloaded). Adam
with its default betas (0.9, 0.999) runs at a high constant learning rate,
0.025, with no warmup, on batches of 16 sequences for 900 steps, seeds 0-5.

Without clipping the loss falls to about 2 nats, then in most runs the
gradient norm jumps to 10x its usual 0.5-1 or more and the loss blows up,
to hundreds or thousands of nats in the worst runs; some runs recover, some
do not. No inf or NaN appears. Seven update rules run over the same
seeds, initialisations and batches: plain Adam, `clip_by_global_norm(1.0)`
(it binds only on larger than usual gradients), and `autoclip` (at its
recommended 10th percentile), `zclip`, `adagc`, `skip_on_spike` and
`skip_nonfinite` with their default settings. The table reports, over the
seeds:

* final loss: mean of the last 20 losses of each run, averaged over runs
  (a single diverged run can dominate it);
* spike steps: steps whose loss exceeds 1.5x the median of the previous 50
  losses (or is not finite), summed over runs; a spike lasting 30 steps
  counts up to 30;
* divergent runs: runs with a non-finite loss, or whose final loss is above
  the initial one (ln 94 ~ 4.54, a uniform guess).

The runs are deterministic, but the dynamics are chaotic: a change of
rounding (another JAX version or CPU, or the same steps compiled as one
`lax.scan`) moves single spikes and can decide whether a given run blows up.

  python examples/spikes.py          # ~2.5 minutes on 2 CPU cores
  python examples/spikes.py --fast   # 150 steps, one seed, for CI (~30 s, mostly compiling)
"""

from __future__ import annotations

import argparse
import inspect
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxclip

SEQ, WIDTH, HEADS, BATCH = 32, 64, 4, 16


def corpus() -> tuple[np.ndarray, int]:
  """Character ids of the source of three stdlib modules, and the vocabulary size."""
  text = "".join(inspect.getsource(m) for m in (textwrap, argparse, inspect))
  chars = sorted(set(text))
  index = {c: i for i, c in enumerate(chars)}
  return np.asarray([index[c] for c in text], np.int32), len(chars)


def init_params(key, vocab: int) -> dict:
  k = jax.random.split(key, 7)
  normal = lambda i, shape, scale: jax.random.normal(k[i], shape) * scale  # noqa: E731
  d = WIDTH
  return {
    "embed": normal(0, (vocab, d), 0.02),
    "position": normal(1, (SEQ, d), 0.02),
    "qkv": normal(2, (d, 3 * d), d**-0.5),
    "proj": normal(3, (d, d), d**-0.5),
    "mlp_in": normal(4, (d, 4 * d), d**-0.5),
    "mlp_in_bias": jnp.zeros(4 * d),
    "mlp_out": normal(5, (4 * d, d), (4 * d) ** -0.5),
    "mlp_out_bias": jnp.zeros(d),
    "unembed": normal(6, (d, vocab), d**-0.5),
  }


def logits_fn(params, tokens):
  """One residual block (causal self-attention, then a GELU MLP), no normalisation."""
  batch, head_dim = tokens.shape[0], WIDTH // HEADS
  x = params["embed"][tokens] + params["position"]
  heads = lambda t: t.reshape(batch, SEQ, HEADS, head_dim)  # noqa: E731
  q, k, v = map(heads, jnp.split(x @ params["qkv"], 3, axis=-1))
  scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(head_dim)
  causal = jnp.tril(jnp.ones((SEQ, SEQ), bool))
  weights = jax.nn.softmax(jnp.where(causal, scores, -1e9), axis=-1)
  attended = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(batch, SEQ, WIDTH)
  x = x + attended @ params["proj"]
  hidden = jax.nn.gelu(x @ params["mlp_in"] + params["mlp_in_bias"])
  x = x + hidden @ params["mlp_out"] + params["mlp_out_bias"]
  return x @ params["unembed"]


def loss_fn(params, x, y):
  return optax.softmax_cross_entropy_with_integer_labels(logits_fn(params, x), y).mean()


def batches(data: np.ndarray, seed: int, steps: int):
  """Inputs and next-character targets, each of shape (steps, BATCH, SEQ)."""
  rng = np.random.default_rng(seed)
  starts = rng.integers(0, len(data) - SEQ - 1, size=(steps, BATCH))
  windows = data[starts[..., None] + np.arange(SEQ + 1)]
  return windows[..., :-1], windows[..., 1:]


def train(opt, params, xs, ys) -> np.ndarray:
  """Losses of each run, shape (runs, steps).

  `params` (the initial parameters), `xs` and `ys` (of shape (runs, steps,
  BATCH, SEQ)) have one entry per run along their leading axis: the training
  step is jitted once and vmapped over the runs, which take their steps
  together. (A `lax.scan` over the steps runs no faster here and is slower to
  compile.)
  """

  def step(params, state, x, y):
    loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
    updates, state = opt.update(grads, state, params, loss=loss)
    return optax.apply_updates(params, updates), state, loss

  step = jax.jit(jax.vmap(step))
  state = jax.jit(jax.vmap(opt.init))(params)
  losses = []
  for t in range(xs.shape[1]):
    params, state, loss = step(params, state, xs[:, t], ys[:, t])
    losses.append(loss)
  return np.stack(jax.device_get(losses), axis=1)


def count_spikes(losses: np.ndarray, window: int = 50, factor: float = 1.5) -> int:
  """Steps whose loss is not finite or above `factor` x the median of the last `window`."""
  spikes = 0
  for t in range(window, len(losses)):
    if not np.isfinite(losses[t]) or losses[t] > factor * np.median(losses[t - window : t]):
      spikes += 1
  return spikes


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--fast", action="store_true", help="150 steps, one seed (CI)")
  parser.add_argument("--lr", type=float, default=0.025)
  args = parser.parse_args()
  steps, seeds = (150, [0]) if args.fast else (900, list(range(6)))
  data, vocab = corpus()
  keys = jnp.stack([jax.random.PRNGKey(s) for s in seeds])
  params = jax.jit(jax.vmap(init_params, in_axes=(0, None)), static_argnums=1)(keys, vocab)
  xy = [batches(data, s, steps) for s in seeds]
  xs, ys = np.stack([x for x, _ in xy]), np.stack([y for _, y in xy])
  adam = lambda: optax.adam(args.lr)  # noqa: E731
  methods = {
    "none": lambda: adam(),
    "clip_by_global_norm(1.0)": lambda: optax.chain(jaxclip.clip_by_global_norm(1.0), adam()),
    "autoclip(10)": lambda: optax.chain(jaxclip.autoclip(10.0), adam()),
    "zclip()": lambda: optax.chain(jaxclip.zclip(), adam()),
    "adagc()": lambda: optax.chain(jaxclip.adagc(), adam()),
    "skip_on_spike(adam)": lambda: jaxclip.skip_on_spike(adam()),
    "skip_nonfinite(adam)": lambda: jaxclip.skip_nonfinite(adam()),
  }
  print(
    f"{len(data)} characters, vocabulary {vocab}, {steps} steps of {BATCH}x{SEQ},"
    f" seeds {seeds}, adam lr {args.lr}"
  )
  print("| method | final loss | spike steps | divergent runs |\n|---|---|---|---|")
  start = time.perf_counter()
  for name, make in methods.items():
    losses = train(make(), params, xs, ys)
    finals = [np.mean(run[-20:]) for run in losses]
    spikes = sum(count_spikes(run) for run in losses)
    divergent = sum(
      (not np.all(np.isfinite(run))) or final > run[0]
      for run, final in zip(losses, finals, strict=True)
    )
    print(f"| {name} | {np.mean(finals):.3f} | {spikes} | {divergent}/{len(seeds)} |", flush=True)
  print(f"\n{time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
  main()
