"""DP-SGD on scikit-learn's digits: per-example clipping plus Gaussian noise.

A small MLP (64 -> 64 -> 10) classifies the 8x8 digit images of
`sklearn.datasets.load_digits` (1,797 images, shipped with scikit-learn). Two
runs share the initialisation, the batches and the optimizer (Adam):

* non-private: the mean gradient of each batch;
* DP-SGD (Abadi et al., 2016): per-example gradients with `jax.vmap`, each
  clipped to L2 norm `--l2-norm-clip` and summed by
  `jaxclip.per_example_global_norm_clip`, Gaussian noise of standard deviation
  `noise_multiplier * l2_norm_clip` added to the sum (from an explicit PRNG
  key), divided by the batch size.

It prints the test accuracy of both runs, the fraction of examples whose
gradient was clipped and the noise multiplier. No privacy accounting is done:
the batches are fixed-size shuffles (not the Poisson sampling the usual
accountants assume) and no (epsilon, delta) is computed. Use a DP library's
accountant for a guarantee.

  python examples/dp_sgd.py          # ~10 s on 2 CPU cores
  python examples/dp_sgd.py --fast   # ~8 s (mostly compilation), for CI
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from tqdm import tqdm

import jaxclip

HIDDEN, CLASSES = 64, 10


def load_data(seed: int):
  x, y = load_digits(return_X_y=True)
  x = (x / 16.0).astype(np.float32)  # pixel values are 0..16
  return train_test_split(x, y.astype(np.int32), test_size=0.25, random_state=seed, stratify=y)


def init_params(key, n_in: int):
  k1, k2 = jax.random.split(key)
  return {
    "w1": jax.random.normal(k1, (n_in, HIDDEN)) / np.sqrt(n_in),
    "b1": jnp.zeros(HIDDEN),
    "w2": jax.random.normal(k2, (HIDDEN, CLASSES)) / np.sqrt(HIDDEN),
    "b2": jnp.zeros(CLASSES),
  }


def logits_fn(params, x):
  h = jnp.tanh(x @ params["w1"] + params["b1"])
  return h @ params["w2"] + params["b2"]


def loss_fn(params, x, y):
  return optax.softmax_cross_entropy_with_integer_labels(logits_fn(params, x), y).mean()


def example_loss(params, x, y):
  """The loss of one example (`x` of shape (64,)); vmapped for per-example gradients."""
  return loss_fn(params, x[None], y[None])


def accuracy(params, x, y) -> float:
  return float(jnp.mean(jnp.argmax(logits_fn(params, x), -1) == y))


def make_epoch(optimizer, private: bool, l2_norm_clip: float, noise_multiplier: float):
  """One jitted pass over the batches: `(params, opt_state, key, xb, yb) -> ...`."""

  def private_grad(params, x, y, key):
    per_example = jax.vmap(jax.grad(example_loss), in_axes=(None, 0, 0))(params, x, y)
    summed, num_clipped = jaxclip.per_example_global_norm_clip(per_example, l2_norm_clip)
    leaves, treedef = jax.tree.flatten(summed)
    keys = jax.random.split(key, len(leaves))
    std = noise_multiplier * l2_norm_clip
    noisy = [g + std * jax.random.normal(k, g.shape, g.dtype) for g, k in zip(leaves, keys)]
    return jax.tree.map(lambda g: g / x.shape[0], treedef.unflatten(noisy)), num_clipped

  def step(carry, batch):
    params, opt_state, key = carry
    x, y = batch
    if private:
      key, sub = jax.random.split(key)
      grads, num_clipped = private_grad(params, x, y, sub)
    else:
      grads, num_clipped = jax.grad(loss_fn)(params, x, y), jnp.zeros([], jnp.int32)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state, key), num_clipped

  @jax.jit
  def epoch(params, opt_state, key, xb, yb):
    (params, opt_state, key), num_clipped = jax.lax.scan(step, (params, opt_state, key), (xb, yb))
    return params, opt_state, key, jnp.sum(num_clipped)

  return epoch


def train(args, data, private: bool) -> tuple[float, float]:
  """Trains one model; returns its test accuracy and the fraction of examples clipped."""
  x_train, x_test, y_train, y_test = data
  optimizer = optax.adam(args.learning_rate)
  params = init_params(jax.random.key(args.seed), x_train.shape[1])
  opt_state = optimizer.init(params)
  noise_key = jax.random.key(args.seed + 1)  # the DP noise, independent of the init
  epoch = make_epoch(optimizer, private, args.l2_norm_clip, args.noise_multiplier)
  rng = np.random.default_rng(args.seed)  # same batches for both runs
  steps = len(x_train) // args.batch_size
  clipped = seen = 0
  bar = tqdm(range(args.epochs), desc="DP-SGD" if private else "non-private", leave=False)
  for _ in bar:
    order = rng.permutation(len(x_train))[: steps * args.batch_size].reshape(steps, -1)
    params, opt_state, noise_key, n = epoch(
      params, opt_state, noise_key, x_train[order], y_train[order]
    )
    clipped, seen = clipped + int(n), seen + order.size
    bar.set_postfix(test_acc=f"{accuracy(params, x_test, y_test):.3f}")
  return accuracy(params, x_test, y_test), clipped / seen


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--fast", action="store_true", help="few epochs, for CI")
  parser.add_argument("--epochs", type=int, default=None, help="default 60 (10 with --fast)")
  parser.add_argument("--batch-size", type=int, default=64)
  parser.add_argument("--learning-rate", type=float, default=1e-2)
  parser.add_argument("--l2-norm-clip", type=float, default=1.0)
  parser.add_argument("--noise-multiplier", type=float, default=1.0)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()
  if args.epochs is None:
    args.epochs = 10 if args.fast else 60

  data = load_data(args.seed)
  start = time.perf_counter()
  plain_acc, _ = train(args, data, private=False)
  dp_acc, clipped_fraction = train(args, data, private=True)
  elapsed = time.perf_counter() - start

  print(f"digits: {len(data[0])} train / {len(data[1])} test images, {args.epochs} epochs")
  print(f"non-private test accuracy: {plain_acc:.3f}")
  print(f"DP-SGD test accuracy:      {dp_acc:.3f}")
  print(
    f"examples clipped:          {clipped_fraction:.1%} of all per-example gradients"
    f" (l2_norm_clip={args.l2_norm_clip})"
  )
  print(
    f"noise multiplier:          {args.noise_multiplier} (noise std"
    f" {args.noise_multiplier * args.l2_norm_clip} on each batch's summed gradient)"
  )
  print("privacy accounting:        none; no (epsilon, delta) guarantee is computed")
  print(f"time:                      {elapsed:.1f} s")


if __name__ == "__main__":
  main()
