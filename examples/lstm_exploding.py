"""Exploding gradients in an LSTM, and `jaxclip.clip_by_global_norm`.

The adding problem (Hochreiter & Schmidhuber, 1997): a sequence of 100 pairs
(value in [0, 1], marker), two of them marked, one in each half; the target
is the sum of the two marked values. Predicting the mean (1.0) gives a mean
squared error of 1/6 ~ 0.167; only a model that carries the first marked
value across up to 100 steps does better.

A Flax Linen LSTM (`nn.RNN(nn.OptimizedLSTMCell(32))`) is trained twice with
SGD (learning rate 1.0, momentum 0.9) from the same initialisation on the
same batches, with a stock `flax.training.train_state.TrainState`:

* ``tx = chain(clip_by_global_norm(inf), sgd)``: never clips, but records the
  gradient norm in its state;
* ``tx = chain(clip_by_global_norm(1.0), sgd)``.

The gradient norms printed are the ones the clipping state recorded.

  python examples/lstm_exploding.py          # 800 steps, ~30 s on 2 CPU cores
  python examples/lstm_exploding.py --fast   # 100 steps, for CI
"""

from __future__ import annotations

import argparse
import math
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state
from tqdm import tqdm

import jaxclip

LENGTH, HIDDEN, BATCH = 100, 32, 64


class AddingLSTM(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.RNN(nn.OptimizedLSTMCell(HIDDEN))(x)
    return nn.Dense(1)(h[:, -1])[:, 0]


def adding_batch(key):
  k_value, k_first, k_second = jax.random.split(key, 3)
  values = jax.random.uniform(k_value, (BATCH, LENGTH))
  first = jax.random.randint(k_first, (BATCH,), 0, LENGTH // 2)
  second = jax.random.randint(k_second, (BATCH,), LENGTH // 2, LENGTH)
  markers = jax.nn.one_hot(first, LENGTH) + jax.nn.one_hot(second, LENGTH)
  return jnp.stack([values, markers], axis=-1), jnp.sum(values * markers, axis=1)


@jax.jit
def train_step(state, key):
  x, y = adding_batch(key)
  loss_fn = lambda params: jnp.mean((state.apply_fn({"params": params}, x) - y) ** 2)
  loss, grads = jax.value_and_grad(loss_fn)(state.params)
  state = state.apply_gradients(grads=grads)
  clip_state = state.opt_state[0]  # what clip_by_global_norm recorded at this step
  return state, loss, clip_state.norm, clip_state.clipped


def train(max_norm: float, lr: float, steps: int, desc: str):
  model = AddingLSTM()
  params = model.init(jax.random.key(0), jnp.zeros((1, LENGTH, 2)))["params"]
  tx = optax.chain(jaxclip.clip_by_global_norm(max_norm), optax.sgd(lr, momentum=0.9))
  state = train_state.TrainState.create(apply_fn=model.apply, params=params, tx=tx)
  losses, norms, clipped = [], [], []
  for step in tqdm(range(steps), desc=desc, leave=False):
    state, loss, norm, was_clipped = train_step(state, jax.random.fold_in(jax.random.key(1), step))
    losses.append(float(loss))
    norms.append(float(norm))
    clipped.append(bool(was_clipped))
  return np.array(losses), np.array(norms), np.array(clipped)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--fast", action="store_true", help="100 steps (CI)")
  parser.add_argument("--lr", type=float, default=1.0)
  parser.add_argument("--max-norm", type=float, default=1.0)
  args = parser.parse_args()
  steps = 100 if args.fast else 800
  start = time.perf_counter()
  plain = train(math.inf, args.lr, steps, "no clipping")
  clip = train(args.max_norm, args.lr, steps, f"clip_by_global_norm({args.max_norm})")

  print(f"adding problem, length {LENGTH}, LSTM({HIDDEN}), SGD lr {args.lr} momentum 0.9")
  print("loss of predicting the mean: 0.167\n")
  print(f"{'step':>5} | {'no clipping':^24} | {f'clip_by_global_norm({args.max_norm})':^32}")
  print(f"{'':>5} | {'loss':>10} {'grad norm':>13} | {'loss':>10} {'grad norm':>13} clipped")
  shown = sorted({*range(0, 30, 3), *range(0, steps, steps // 10), steps - 1})
  for t in shown:
    print(
      f"{t:>5} | {plain[0][t]:>10.4g} {plain[1][t]:>13.4g} |"
      f" {clip[0][t]:>10.4g} {clip[1][t]:>13.4g} {'yes' if clip[2][t] else 'no'}"
    )

  bad = np.flatnonzero(~np.isfinite(plain[0]) | (plain[1] > 1e3))
  tail = slice(-steps // 5, None)
  print()
  if bad.size:
    nan = np.flatnonzero(~np.isfinite(plain[0]))
    print(
      f"no clipping: gradient norm {plain[1][bad[0]]:.3g} at step {bad[0]};"
      + (f" loss inf/NaN from step {nan[0]} on (diverged)" if nan.size else " (exploding)")
    )
  else:
    print(f"no clipping: did not diverge; final loss {np.mean(plain[0][tail]):.4f}")
  print(
    f"clip_by_global_norm({args.max_norm}): final loss {np.mean(clip[0][tail]):.4f}"
    f" (mean of the last {steps // 5} steps), largest gradient norm"
    f" {np.max(clip[1]):.3g}, {np.mean(clip[2]):.0%} of steps clipped"
  )
  print(f"({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
  main()
