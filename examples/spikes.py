"""Loss spikes in a small character-level language model, with and without guards.

A Bengio-style MLP language model (context of 16 characters) is trained with
Adam at a deliberately high learning rate on Python's own source code
(`argparse`, `textwrap`, `inspect`, read with `inspect.getsource`), which
makes the loss spike. Five update rules run over the same seeds and batches:
no clipping, `clip_by_global_norm(1.0)`, `autoclip`, `zclip` and
`skip_on_spike`. The table reports the final loss (mean of the last 20
steps, averaged over seeds), the number of loss spikes (a loss above 1.5x
the median of the previous 50 losses) and the number of divergent runs (a
NaN, or a final loss above the initial one).

  python examples/spikes.py          # ~1-2 minutes on 2 CPU cores
  python examples/spikes.py --fast   # a few seconds, for CI
"""

from __future__ import annotations

import argparse
import inspect
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxclip
from jaxclip import autoclip, skip_on_spike, zclip

CONTEXT, VOCAB, EMBED, HIDDEN = 16, 128, 24, 256


def corpus() -> np.ndarray:
  text = "".join(inspect.getsource(m) for m in (argparse, textwrap, inspect))
  return np.frombuffer(text.encode("ascii", "replace"), np.uint8) % VOCAB


def init_params(key):
  k = jax.random.split(key, 3)
  return {
    "embed": jax.random.normal(k[0], (VOCAB, EMBED)) * 0.1,
    "w1": jax.random.normal(k[1], (CONTEXT * EMBED, HIDDEN)) / np.sqrt(CONTEXT * EMBED),
    "b1": jnp.zeros(HIDDEN),
    "w2": jax.random.normal(k[2], (HIDDEN, VOCAB)) / np.sqrt(HIDDEN),
    "b2": jnp.zeros(VOCAB),
  }


def loss_fn(params, x, y):
  h = params["embed"][x].reshape(x.shape[0], -1)
  h = jnp.tanh(h @ params["w1"] + params["b1"])
  logits = h @ params["w2"] + params["b2"]
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def batches(data: np.ndarray, seed: int, steps: int, batch: int):
  rng = np.random.default_rng(seed)
  idx = rng.integers(0, len(data) - CONTEXT - 1, size=(steps, batch))
  x = data[idx[..., None] + np.arange(CONTEXT)]
  return jnp.asarray(x, jnp.int32), jnp.asarray(data[idx + CONTEXT], jnp.int32)


def train(opt, seeds, data, steps, batch) -> np.ndarray:
  """Losses, shape (seeds, steps); one jitted scan, vmapped over seeds."""

  def run(key, xs, ys):
    params = init_params(key)

    def step(carry, xy):
      params, state = carry
      loss, grads = jax.value_and_grad(loss_fn)(params, *xy)
      updates, state = opt.update(grads, state, params, loss=loss)
      return (optax.apply_updates(params, updates), state), loss

    _, losses = jax.lax.scan(step, (params, opt.init(params)), (xs, ys))
    return losses

  data_xy = [batches(data, s, steps, batch) for s in seeds]
  xs = jnp.stack([d[0] for d in data_xy])
  ys = jnp.stack([d[1] for d in data_xy])
  keys = jnp.stack([jax.random.PRNGKey(s) for s in seeds])
  return np.asarray(jax.jit(jax.vmap(run))(keys, xs, ys))


def count_spikes(losses: np.ndarray, window: int = 50, factor: float = 1.5) -> int:
  spikes = 0
  for t in range(window, len(losses)):
    if not np.isfinite(losses[t]) or losses[t] > factor * np.median(losses[t - window : t]):
      spikes += 1
  return spikes


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--fast", action="store_true", help="few steps, one seed (CI)")
  parser.add_argument("--lr", type=float, default=0.02)
  args = parser.parse_args()
  steps, seeds, batch = (150, [0], 32) if args.fast else (1500, [0, 1, 2], 64)
  data = corpus()
  adam = lambda: optax.adam(args.lr)  # noqa: E731
  methods = {
    "none": lambda: adam(),
    "clip_by_global_norm(1.0)": lambda: optax.chain(jaxclip.clip_by_global_norm(1.0), adam()),
    "autoclip(10)": lambda: optax.chain(autoclip(10.0), adam()),
    "zclip()": lambda: optax.chain(zclip(), adam()),
    "skip_on_spike(adam)": lambda: skip_on_spike(adam()),
  }
  print(f"{len(data)} characters, {steps} steps, seeds {seeds}, adam lr {args.lr}")
  print("| method | final loss | loss spikes | divergent runs |\n|---|---|---|---|")
  for name, make in methods.items():
    losses = train(make(), seeds, data, steps, batch)
    finals = [np.mean(run[-20:]) for run in losses]
    spikes = sum(count_spikes(run) for run in losses)
    divergent = sum(
      (not np.all(np.isfinite(run))) or final > run[0]
      for run, final in zip(losses, finals, strict=True)
    )
    print(f"| {name} | {np.mean(finals):.3f} | {spikes} | {divergent}/{len(seeds)} |")


if __name__ == "__main__":
  main()
