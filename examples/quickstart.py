"""Quick start: the same recurrent network trained with and without clipping.

A vanilla tanh RNN reads sequences of 40 numbers and must output their mean.
Its recurrent weights start large, so gradients explode through time: plain
SGD takes huge steps and the loss blows up, while the same optimizer behind
`jaxclip.clip_by_global_norm(1.0)` trains smoothly. The gradient norm each
run measured (read from the clipping state, no extra work) and the loss are
printed side by side.

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


def make_train_step(tx):
  @jax.jit
  def step(params, state, key):
    xs, ys = batch(key)
    loss, grads = jax.value_and_grad(loss_fn)(params, xs, ys)
    grad_norm = jaxclip.global_norm(grads)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss, grad_norm

  return step


def train(tx, steps, desc, seed=0):
  params = init_params(jax.random.key(seed))
  state, step = tx.init(params), make_train_step(tx)
  history = []
  for i in tqdm(range(steps), desc=desc, leave=False):
    params, state, loss, grad_norm = step(params, state, jax.random.key(1000 + i))
    history.append((float(loss), float(grad_norm)))
  return history


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=300)
  parser.add_argument("--fast", action="store_true", help="a short run, for CI")
  args = parser.parse_args()
  steps = 40 if args.fast else args.steps

  lr = 0.1
  plain = train(optax.sgd(lr, momentum=0.9), steps, "no clipping")
  clipped = train(
    optax.chain(jaxclip.clip_by_global_norm(1.0), optax.sgd(lr, momentum=0.9)),
    steps,
    "clip_by_global_norm(1.0)",
  )

  print(f"{'step':>5} | {'no clipping':^23} | {'clip_by_global_norm(1.0)':^23}")
  print(f"{'':>5} | {'loss':>10} {'grad norm':>12} | {'loss':>10} {'grad norm':>12}")
  every = max(steps // 15, 1)
  for i in list(range(0, steps, every)) + [steps - 1]:
    (l0, n0), (l1, n1) = plain[i], clipped[i]
    print(f"{i:>5} | {l0:>10.4g} {n0:>12.4g} | {l1:>10.4g} {n1:>12.4g}")
  final_plain, final_clip = plain[-1][0], clipped[-1][0]
  print(f"\nfinal loss without clipping: {final_plain:.4g}; with clipping: {final_clip:.4g}")
  print(
    f"largest gradient norm seen: {max(n for _, n in plain):.4g} (no clipping),"
    f" {max(n for _, n in clipped):.4g} (clipping)"
  )


if __name__ == "__main__":
  main()
