"""Compile time and program size of every transform that optax also has.

For each tree (200 leaves of shape (8, 8) and 64 leaves of shape (128, 128) by
default) and each transform, lowers and compiles ``jax.jit(tx.update)`` (with
the parameters passed, as `adaptive_grad_clip` needs them) for jaxclip and for
optax, and prints the seconds, the size of the lowered StableHLO text in MB
and the jaxclip/optax ratios. optax has no per-tensor `clip_by_norm`
transform: jaxclip's `clip_by_norm` (and, on the first tree,
``clip_by_norm(axis=0)``) is compared with `optax.clip_by_block_rms`, the
closest per-tensor transform optax has. Each compilation starts from a fresh
`jax.jit`, so nothing is reused from the jit cache; the order is jaxclip then
optax for each row.

Usage: python benchmarks/bench_per_tensor.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import optax

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jaxclip  # noqa: E402


def compile_cost(make_tx, tree) -> tuple[float, float]:
  """(seconds to lower + compile, StableHLO text size in MB) of ``tx.update``."""
  tx = make_tx()
  state = tx.init(tree)
  fn = jax.jit(tx.update)
  start = time.perf_counter()
  lowered = fn.lower(tree, state, tree)
  lowered.compile()
  seconds = time.perf_counter() - start
  return seconds, len(lowered.as_text()) / 1e6


# name -> (jaxclip factory, optax factory, label of the optax column)
ROWS = {
  "clip_by_global_norm": (
    lambda: jaxclip.clip_by_global_norm(1.0),
    lambda: optax.clip_by_global_norm(1.0),
    "clip_by_global_norm",
  ),
  "clip_by_norm": (
    lambda: jaxclip.clip_by_norm(1.0),
    lambda: optax.clip_by_block_rms(1.0),
    "clip_by_block_rms",
  ),
  "clip_by_block_rms": (
    lambda: jaxclip.clip_by_block_rms(1.0),
    lambda: optax.clip_by_block_rms(1.0),
    "clip_by_block_rms",
  ),
  "adaptive_grad_clip": (
    lambda: jaxclip.adaptive_grad_clip(0.01),
    lambda: optax.adaptive_grad_clip(0.01),
    "adaptive_grad_clip",
  ),
  "clip": (lambda: jaxclip.clip(1.0), lambda: optax.clip(1.0), "clip"),
}
AXIS0 = (
  lambda: jaxclip.clip_by_norm(1.0, axis=0),
  lambda: optax.clip_by_block_rms(1.0),
  "clip_by_block_rms",
)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument(
    "--repeats", type=int, default=5, help="compilations of each; the median is printed"
  )
  args = parser.parse_args()
  print(
    f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), "
    f"jax {jax.__version__}, optax {optax.__version__}"
  )
  trees = [(200, (8, 8)), (64, (128, 128))]
  header = (
    f"{'transform':<26}{'optax counterpart':<20}{'jaxclip':>9}{'optax':>9}{'ratio':>7}"
    f"{'jaxclip MB':>12}{'optax MB':>10}{'ratio':>7}"
  )
  for n, shape in trees:
    tree = {f"p{i:04d}": jnp.ones(shape, jnp.float32) for i in range(n)}
    print(f"\n{n} leaves of {shape} (seconds: lower + compile, median of {args.repeats})")
    print(header)
    rows = dict(ROWS)
    if shape == (8, 8):
      rows["clip_by_norm(axis=0)"] = AXIS0
    for name, (ours, theirs, label) in rows.items():
      ours_s, theirs_s = [], []
      for _ in range(args.repeats):
        s, ours_mb = compile_cost(ours, tree)
        ours_s.append(s)
        s, theirs_mb = compile_cost(theirs, tree)
        theirs_s.append(s)
      o, t = statistics.median(ours_s), statistics.median(theirs_s)
      print(
        f"{name:<26}{label:<20}{o:>8.3f}s{t:>8.3f}s{o / t:>7.2f}"
        f"{ours_mb:>12.3f}{theirs_mb:>10.3f}{ours_mb / theirs_mb:>7.2f}",
        flush=True,
      )
  print("\nratio: jaxclip / optax (below 1: jaxclip compiles faster or to a smaller program)")


if __name__ == "__main__":
  main()
