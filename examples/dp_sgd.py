"""DP-SGD on scikit-learn's digits, with ghost clipping and privacy accounting.

An MLP (64 -> 256 -> 256 -> 10) classifies the 8x8 digit images of
`sklearn.datasets.load_digits` (1,797 images, shipped with scikit-learn),
trained twice from the same initialisation with the same optimizer (Adam)
and number of steps:

* non-private: the mean gradient of shuffled batches of 64;
* DP-SGD (Abadi et al., 2016): at every step each training image is in the
  batch independently with probability q = 64 / N (Poisson sampling, the
  sampling the guarantee assumes). `jaxclip.clipped_grad` sums the
  per-example gradients clipped to L2 norm `--l2-norm-clip` with ghost
  clipping (no per-example gradient is formed), and `jaxclip.noisy_mean`
  adds Gaussian noise of standard deviation `noise_multiplier *
  l2_norm_clip` and divides by the expected batch size 64. To keep shapes
  fixed under `jax.jit`, a batch is padded to 96 examples; padding has a
  zero loss, so it adds nothing, and a larger draw runs in several chunks
  whose clipped sums are added.

It prints epsilon at delta = 1e-5 (`jaxclip.dp_epsilon`, Google's
`dp_accounting`), the test accuracy of both runs, the fraction of examples
clipped, and the compiled memory of the clipped-gradient step with ghost
clipping against per-example gradients (``method="vmap"``).

  python examples/dp_sgd.py          # ~30 s on 2 CPU cores
  python examples/dp_sgd.py --fast   # 3 epochs, ~25 s (mostly compilation), for CI
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

import jaxclip

HIDDEN, CLASSES, CAPACITY, DELTA = 256, 10, 96, 1e-5


def load_data(seed: int):
  x, y = load_digits(return_X_y=True)
  x = (x / 16.0).astype(np.float32)  # pixel values are 0..16
  return train_test_split(x, y.astype(np.int32), test_size=0.25, random_state=seed, stratify=y)


def init_params(key, n_in: int) -> list[dict]:
  sizes = [n_in, HIDDEN, HIDDEN, CLASSES]
  keys = jax.random.split(key, len(sizes) - 1)
  return [
    {"w": jax.random.normal(k, (m, n)) / np.sqrt(m), "b": jnp.zeros(n)}
    for k, m, n in zip(keys, sizes[:-1], sizes[1:])
  ]


def logits_fn(params, x):
  for layer in params[:-1]:
    x = jnp.tanh(x @ layer["w"] + layer["b"])
  return x @ params[-1]["w"] + params[-1]["b"]


def per_example_loss(params, batch):
  """Cross-entropy of each example, zero for padding (`mask` 0)."""
  logits = logits_fn(params, batch["x"])
  return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]) * batch["mask"]


def accuracy(params, x, y) -> float:
  return float(jnp.mean(jnp.argmax(logits_fn(params, x), -1) == y))


def poisson_chunks(rng, n: int, q: float):
  """The indices of one Poisson-sampled batch, padded into chunks of CAPACITY."""
  idx = np.flatnonzero(rng.random(n) < q)
  for start in range(0, max(len(idx), 1), CAPACITY):
    part = idx[start : start + CAPACITY]
    mask = np.zeros(CAPACITY, np.float32)
    mask[: len(part)] = 1
    yield np.pad(part, (0, CAPACITY - len(part))), mask


def train_private(args, data, params, optimizer, steps: int):
  x_train, _, y_train, _ = data
  q = args.batch_size / len(x_train)
  clipped = jax.jit(jaxclip.clipped_grad(per_example_loss, args.l2_norm_clip, method="ghost"))

  @jax.jit
  def apply(params, opt_state, grads_sum, key):
    grads = jaxclip.noisy_mean(
      grads_sum, args.l2_norm_clip, args.noise_multiplier, args.batch_size, key=key
    )
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  opt_state, key = optimizer.init(params), jax.random.key(args.seed + 1)
  rng = np.random.default_rng(args.seed + 2)  # the sampling: independent of the model
  clipped_count = seen = 0
  for _ in range(steps):
    total = jax.tree.map(jnp.zeros_like, params)
    for idx, mask in poisson_chunks(rng, len(x_train), q):
      batch = {"x": x_train[idx], "y": y_train[idx], "mask": mask}
      grads_sum, info = clipped(params, batch)
      total = jax.tree.map(jnp.add, total, grads_sum)
      clipped_count += int(info.num_clipped)  # padding has a zero gradient: never clipped
      seen += int(mask.sum())
    key, sub = jax.random.split(key)
    params, opt_state = apply(params, opt_state, total, sub)
  return params, clipped_count / max(seen, 1)


def train_plain(args, data, params, optimizer, steps: int):
  x_train, _, y_train, _ = data

  @jax.jit
  def step(params, opt_state, x, y):
    grads = jax.grad(lambda p: per_example_loss(p, {"x": x, "y": y, "mask": 1.0}).mean())(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  opt_state, rng = optimizer.init(params), np.random.default_rng(args.seed + 2)
  for _ in range(steps):
    idx = rng.choice(len(x_train), args.batch_size, replace=False)
    params, opt_state = step(params, opt_state, x_train[idx], y_train[idx])
  return params


def step_memory(params, n_in: int, l2_norm_clip: float) -> dict[str, float]:
  """Compiled temporary memory (MB) of the clipped-gradient step, per method."""
  batch = {
    "x": jnp.zeros((CAPACITY, n_in)),
    "y": jnp.zeros(CAPACITY, jnp.int32),
    "mask": jnp.ones(CAPACITY),
  }
  out = {}
  for method in ("ghost", "vmap"):
    fn = jax.jit(jaxclip.clipped_grad(per_example_loss, l2_norm_clip, method=method))
    out[method] = fn.lower(params, batch).compile().memory_analysis().temp_size_in_bytes / 2**20
  return out


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--fast", action="store_true", help="few epochs, for CI")
  parser.add_argument("--epochs", type=int, default=None, help="default 30 (3 with --fast)")
  parser.add_argument("--batch-size", type=int, default=64, help="expected batch size")
  parser.add_argument("--learning-rate", type=float, default=2e-3)
  parser.add_argument("--l2-norm-clip", type=float, default=1.0)
  parser.add_argument("--noise-multiplier", type=float, default=1.2)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()
  if args.epochs is None:
    args.epochs = 3 if args.fast else 30

  data = load_data(args.seed)
  x_train, x_test, _, y_test = data
  steps = args.epochs * len(x_train) // args.batch_size
  q = args.batch_size / len(x_train)
  params = init_params(jax.random.key(args.seed), x_train.shape[1])
  optimizer = optax.adam(args.learning_rate)

  start = time.perf_counter()
  plain = train_plain(args, data, params, optimizer, steps)
  private, clipped_fraction = train_private(args, data, params, optimizer, steps)
  elapsed = time.perf_counter() - start
  eps = jaxclip.dp_epsilon(args.noise_multiplier, q, steps, DELTA)
  memory = step_memory(params, x_train.shape[1], args.l2_norm_clip)

  print(
    f"digits: {len(x_train)} train / {len(x_test)} test images, {steps} steps ({args.epochs} epochs)"
  )
  print(f"non-private test accuracy: {accuracy(plain, x_test, y_test):.3f}")
  print(f"DP-SGD test accuracy:      {accuracy(private, x_test, y_test):.3f}")
  print(
    f"privacy:                   epsilon = {eps:.2f} at delta = {DELTA:g} (RDP accountant;"
    f" Poisson sampling q = {q:.4f}, noise multiplier {args.noise_multiplier},"
    f" l2_norm_clip {args.l2_norm_clip})"
  )
  print(f"examples clipped:          {clipped_fraction:.1%} of the sampled examples")
  print(
    f"clipped-gradient step:     {memory['ghost']:.2f} MB temporary memory with ghost clipping,"
    f" {memory['vmap']:.2f} MB with per-example gradients (batch of {CAPACITY})"
  )
  print(f"time:                      {elapsed:.1f} s")


if __name__ == "__main__":
  main()
