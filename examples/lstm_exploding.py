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

The gradient norms printed are the ones the clipping state recorded: the
norm of the gradient before clipping, and for the clipped run also the norm
after clipping (the norm times the scale the clipper applied, at most 1.0).

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
  return state, loss, clip_state.norm, clip_state.scale * clip_state.norm, clip_state.clipped


def train(max_norm: float, lr: float, steps: int, desc: str):
  model = AddingLSTM()
  params = model.init(jax.random.key(0), jnp.zeros((1, LENGTH, 2)))["params"]
  tx = optax.chain(jaxclip.clip_by_global_norm(max_norm), optax.sgd(lr, momentum=0.9))
  state = train_state.TrainState.create(apply_fn=model.apply, params=params, tx=tx)
  losses, norms, after, clipped = [], [], [], []
  for step in tqdm(range(steps), desc=desc, leave=False, disable=None):
    state, loss, norm, norm_after, was_clipped = train_step(
      state, jax.random.fold_in(jax.random.key(1), step)
    )
    losses.append(float(loss))
    norms.append(float(norm))
    after.append(float(norm_after))
    clipped.append(bool(was_clipped))
  # loss, grad norm before clipping, grad norm after clipping, clipped or not
  return np.array(losses), np.array(norms), np.array(after), np.array(clipped)


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
  print(f"{'':>5} | {'no clipping':^24} | {f'clip_by_global_norm({args.max_norm})':^52}")
  print(f"{'':>5} | {'':>24} | {'':>10} {'grad norm':>17} {'grad norm':>15}")
  print(
    f"{'step':>5} | {'loss':>10} {'grad norm':>13} |"
    f" {'loss':>10} {'before clipping':>17} {'after clipping':>15} clipped"
  )
  shown = sorted({*range(0, 30, 3), *range(0, steps, steps // 10), steps - 1})
  for t in shown:
    print(
      f"{t:>5} | {plain[0][t]:>10.4g} {plain[1][t]:>13.4g} |"
      f" {clip[0][t]:>10.4g} {clip[1][t]:>17.4g} {clip[2][t]:>15.4g}"
      f" {'yes' if clip[3][t] else 'no':>7}"
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
    f" {np.max(clip[1]):.3g} before clipping and {np.max(clip[2]):.3g} after,"
    f" {np.mean(clip[3]):.0%} of steps clipped"
  )
  print(f"({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
  main()
