"""A Flax NNX MLP on scikit-learn's digits, with `nnx.Optimizer` and `nnx.jit`.

The optimizer is ``skip_on_spike(chain(clip_by_global_norm(1.0), adamw))``.
`nnx.Optimizer.update(model, grads, loss=loss)` passes ``loss=`` on to the
optimizer by itself, so no wrapper is needed. One batch two thirds into
training is corrupted (inputs times 100) to show a step being skipped. The
statistics printed are read from ``optimizer.opt_state`` (its leaves are NNX
variables: read them with ``[...]``).

  python examples/flax_nnx.py          # 30 epochs, a few seconds
  python examples/flax_nnx.py --fast   # 6 epochs, for CI
"""

from __future__ import annotations

import argparse
import time

import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from sklearn.datasets import load_digits
from tqdm import tqdm

import jaxclip

BATCH = 64


class MLP(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.hidden = nnx.Linear(64, 128, rngs=rngs)
    self.out = nnx.Linear(128, 10, rngs=rngs)

  def __call__(self, x):
    return self.out(nnx.relu(self.hidden(x)))


def load():
  digits = load_digits()
  x = (digits.data / 16.0).astype(np.float32)
  order = np.random.default_rng(0).permutation(len(x))
  x, y = x[order], digits.target[order]
  split = int(0.8 * len(x))
  return (x[:split], y[:split]), (x[split:], y[split:])


def loss_fn(model: MLP, x, y):
  return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()


@nnx.jit
def train_step(model: MLP, optimizer: nnx.Optimizer, x, y):
  loss, grads = nnx.value_and_grad(loss_fn)(model, x, y)
  optimizer.update(model, grads, loss=loss)  # loss= reaches skip_on_spike
  return loss


@nnx.jit
def accuracy(model: MLP, x, y):
  return jnp.mean(jnp.argmax(model(x), -1) == y)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--fast", action="store_true", help="6 epochs (CI)")
  args = parser.parse_args()
  epochs = 6 if args.fast else 30
  start = time.perf_counter()
  (x_train, y_train), (x_test, y_test) = load()
  steps_per_epoch = len(x_train) // BATCH
  corrupt_at = 2 * epochs * steps_per_epoch // 3

  model = MLP(nnx.Rngs(0))
  tx = jaxclip.skip_on_spike(
    optax.chain(jaxclip.clip_by_global_norm(1.0), optax.adamw(3e-3, weight_decay=1e-4)),
    window=64,
    min_history=32,
  )
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

  rng = np.random.default_rng(1)
  norms, norms_after, clipped, skipped_steps = [], [], [], []
  for _ in tqdm(range(epochs), desc="epochs", leave=False, disable=None):
    order = rng.permutation(len(x_train))
    for i in range(steps_per_epoch):
      idx = order[i * BATCH : (i + 1) * BATCH]
      step = int(optimizer.step[...])
      x = x_train[idx] * (100.0 if step == corrupt_at else 1.0)
      train_step(model, optimizer, x, y_train[idx])
      guard = optimizer.opt_state  # SkipOnSpikeState, its leaves nnx variables
      clip_state = guard.inner_state[0]  # ClipByGlobalNormState
      norms.append(float(guard.norm[...]))  # measured by skip_on_spike, before clipping
      clipped.append(bool(clip_state.clipped[...]) and not bool(guard.skipped[...]))
      if guard.skipped[...]:
        skipped_steps.append(step)
      else:  # the norm of the gradient that clip_by_global_norm passed on to adamw
        norms_after.append(float(clip_state.norm[...] * clip_state.scale[...]))

  guard = optimizer.opt_state
  norms = np.array(norms)
  print(f"digits: {len(x_train)} train / {len(x_test)} test images, {epochs} epochs")
  print(f"test accuracy: {float(accuracy(model, x_test, y_test)):.2%}")
  print(
    f"steps: {int(optimizer.step[...])}; gradient norm before clipping: median {np.median(norms):.3f},"
    f" max {norms.max():.3g} (step {int(norms.argmax())});"
    f" after clipping (steps taken): max {max(norms_after):.3g}"
  )
  print(f"clipped by clip_by_global_norm(1.0): {sum(clipped)} steps ({np.mean(clipped):.1%})")
  print(
    f"skipped by skip_on_spike: {int(guard.total_skipped[...])} step(s) {skipped_steps}"
    f" (the corrupted batch was step {corrupt_at})"
  )
  print(f"last loss seen by skip_on_spike: {float(guard.loss[...]):.4f}")
  print(f"({time.perf_counter() - start:.1f} s)")


if __name__ == "__main__":
  main()
