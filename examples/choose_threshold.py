"""Choosing the clipping threshold from a real run.

1. Train a small MLP on scikit-learn's handwritten digits for N steps with
   `record_norms` first in the chain: an identity transform that keeps the
   global and per-tensor gradient norms of those steps.
2. Ask `suggest_max_norm` for a threshold (by its default rule, from how the
   recorded global norms moved, or at `--percentile`) and print its
   reasoning; save a plot of the norms.
3. Train again from the same initialisation with
   `clip_by_global_norm(suggested)` and print a summary of both runs.

Run: python examples/choose_threshold.py [--steps 400] [--out DIR] [--fast]
"""

from __future__ import annotations

import argparse
import pathlib
import tempfile

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from tqdm import tqdm

from jaxclip import clip_by_global_norm, plot_norms, record_norms, stats, suggest_max_norm

BATCH, LEARNING_RATE = 32, 3e-3


class MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(128, name="hidden1")(x))
    x = nn.relu(nn.Dense(64, name="hidden2")(x))
    return nn.Dense(10, name="logits")(x)


def load_data():
  digits = load_digits()
  x = (digits.data / 16.0).astype(np.float32)
  return train_test_split(x, digits.target, test_size=0.25, random_state=0)


def make_step(model, tx):
  @jax.jit
  def step(params, opt_state, x, y):
    def loss_fn(p):
      logits = model.apply({"params": p}, x)
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return step


def train(model, params, tx, data, steps, desc):
  x_train, _, y_train, _ = data
  opt_state = tx.init(params)
  step = make_step(model, tx)
  rng = np.random.default_rng(0)
  losses, clipped, norms = [], 0, []
  for _ in tqdm(range(steps), desc=desc, leave=False, disable=None):
    idx = rng.integers(0, len(x_train), BATCH)
    params, opt_state, loss = step(params, opt_state, x_train[idx], y_train[idx])
    losses.append(float(loss))
    record = stats(opt_state)  # empty for the recording run, which does not clip
    if "clip/global_norm" in record:
      clipped += bool(record["clip/clipped"])
      # the norm clip_by_global_norm measured, and the norm of what it passed on
      norm = float(record["clip/global_norm"])
      norms.append((norm, norm * float(record["clip/scale"])))
  return params, opt_state, np.asarray(losses), clipped, np.asarray(norms)


def accuracy(model, params, data):
  _, x_test, _, y_test = data
  logits = model.apply({"params": params}, x_test)
  return float(jnp.mean(jnp.argmax(logits, -1) == y_test))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=400, help="steps recorded, then trained")
  parser.add_argument(
    "--percentile", type=float, default=None, help="default: suggest_max_norm's rule"
  )
  parser.add_argument("--out", type=pathlib.Path, default=None, help="folder for the plot")
  parser.add_argument("--fast", action="store_true", help="few steps, for CI")
  args = parser.parse_args()
  steps = 60 if args.fast else args.steps
  out = args.out or pathlib.Path(tempfile.mkdtemp(prefix="jaxclip_"))

  data = load_data()
  model = MLP()
  params = model.init(jax.random.key(0), jnp.zeros((1, 64)))["params"]

  recorder = optax.chain(record_norms(num_steps=steps), optax.adam(LEARNING_RATE))
  p1, state, loss1, _, _ = train(model, params, recorder, data, steps, "recording")
  suggestion = suggest_max_norm(state, percentile=args.percentile, params=params)
  print(suggestion)
  png = plot_norms(state, suggestion, out / "choose_threshold.png", params=params)
  print(f"\nplot saved to {png}")

  clipped_tx = optax.chain(clip_by_global_norm(suggestion.max_norm), optax.adam(LEARNING_RATE))
  p2, _, loss2, n_clipped, norms = train(model, params, clipped_tx, data, steps, "clipped")

  tail = max(steps // 10, 1)
  print("\nSummary")
  print(
    f"  recorded run : final loss {loss1[-tail:].mean():.4f}, test accuracy"
    f" {accuracy(model, p1, data):.3f}; not clipped: the norms above are as computed"
  )
  print(
    f"  clipped run  : final loss {loss2[-tail:].mean():.4f}, test accuracy"
    f" {accuracy(model, p2, data):.3f}, max_norm {suggestion.max_norm:.3g} clipped"
    f" {n_clipped}/{steps} steps ({100 * n_clipped / steps:.0f}%)"
  )
  print(
    f"                 largest gradient norm {norms[:, 0].max():.3g} before clipping,"
    f" {norms[:, 1].max():.3g} after"
  )


if __name__ == "__main__":
  main()
