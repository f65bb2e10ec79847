"""Quick start: the same recurrent network trained with and without clipping.

A vanilla tanh RNN reads sequences of 40 numbers and must output their mean.
Its recurrent weights start large, so gradients explode through time: plain
SGD takes huge steps and the loss blows up, while the same optimizer behind
`jaxclip.clip_by_global_norm(1.0)` trains smoothly. The loss and the
gradient norm of both runs are printed side by side: for the clipped run, the
norm before clipping (what the clipper measured, read from its state, no extra
work) and after it (the norm of what reached SGD, at most 1.0).

Run: python examples/quickstart.py [--steps 300] [--fast]
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import optax
from tqdm import tqdm

import jaxclip

HIDDEN, LENGTH, BATCH = 32, 40, 64
LR, MAX_NORM = 0.1, 1.0


def init_params(key):
  k1, k2, k3 = jax.random.split(key, 3)
  return {
    "w_in": jax.random.normal(k1, (1, HIDDEN)),
    "w_rec": 1.6 * jax.random.normal(k2, (HIDDEN, HIDDEN)) / jnp.sqrt(HIDDEN),
    "b": jnp.zeros(HIDDEN),
    "w_out": jax.random.normal(k3, (HIDDEN, 1)) / jnp.sqrt(HIDDEN),
  }


def loss_fn(params, xs, ys):
  def cell(h, x):
    h = jnp.tanh(x @ params["w_in"] + h @ params["w_rec"] + params["b"])
    return h, None

  h, _ = jax.lax.scan(cell, jnp.zeros((xs.shape[1], HIDDEN)), xs[..., None])
  return jnp.mean((h @ params["w_out"] - ys) ** 2)


def batch(key):
  xs = jax.random.normal(key, (LENGTH, BATCH))
  return xs, jnp.mean(xs, axis=0)[:, None]


def make_train_step(max_norm):
  """One SGD step, behind `clip_by_global_norm(max_norm)` unless max_norm is None."""
  sgd = optax.sgd(LR, momentum=0.9)
  tx = sgd if max_norm is None else optax.chain(jaxclip.clip_by_global_norm(max_norm), sgd)

  @jax.jit
  def step(params, state, key):
    xs, ys = batch(key)
    loss, grads = jax.value_and_grad(loss_fn)(params, xs, ys)
    updates, state = tx.update(grads, state, params)
    if max_norm is None:
      before = after = jaxclip.global_norm(grads)
    else:  # what the clipper recorded: the norm it measured and the scale it applied
      before = state[0].norm
      after = state[0].scale * state[0].norm
    return optax.apply_updates(params, updates), state, loss, before, after

  return tx, step


def train(max_norm, steps, desc, seed=0):
  """Returns (loss, grad norm before clipping, grad norm after clipping) per step."""
  params = init_params(jax.random.key(seed))
  tx, step = make_train_step(max_norm)
  state = tx.init(params)
  history = []
  for i in tqdm(range(steps), desc=desc, leave=False, disable=None):
    params, state, loss, before, after = step(params, state, jax.random.key(1000 + i))
    history.append((float(loss), float(before), float(after)))
  return history


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=300)
  parser.add_argument("--fast", action="store_true", help="a short run, for CI")
  args = parser.parse_args()
  steps = 40 if args.fast else args.steps

  plain = train(None, steps, "no clipping")
  clipped = train(MAX_NORM, steps, f"clip_by_global_norm({MAX_NORM})")

  # Norms are global L2 norms of the gradient. Without clipping SGD sees the
  # gradient as it is; with clipping it sees the gradient rescaled to a norm of
  # at most MAX_NORM: "before clipping" is the norm the clipper measured.
  print(f"{'':>5} | {'no clipping':^24} | {f'clip_by_global_norm({MAX_NORM})':^44}")
  print(f"{'':>5} | {'':>24} | {'':>10} {'grad norm':>17} {'grad norm':>15}")
  print(
    f"{'step':>5} | {'loss':>10} {'grad norm':>13} |"
    f" {'loss':>10} {'before clipping':>17} {'after clipping':>15}"
  )
  every = max(steps // 15, 1)
  for i in list(range(0, steps, every)) + [steps - 1]:
    (l0, n0, _), (l1, n1, m1) = plain[i], clipped[i]
    print(f"{i:>5} | {l0:>10.4g} {n0:>13.4g} | {l1:>10.4g} {n1:>17.4g} {m1:>15.4g}")
  final_plain, final_clip = plain[-1][0], clipped[-1][0]
  print(f"\nfinal loss without clipping: {final_plain:.4g}; with clipping: {final_clip:.4g}")
  print(
    f"largest gradient norm: {max(n for _, n, _ in plain):.4g} without clipping;"
    f" with clipping {max(n for _, n, _ in clipped):.4g} before clipping,"
    f" {max(m for _, _, m in clipped):.4g} after"
  )


if __name__ == "__main__":
  main()
