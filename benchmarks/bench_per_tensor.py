"""Compile time and program size of every transform that optax also has.

For each tree (200 leaves of shape (8, 8), 64 leaves of shape (128, 128),
the 87-leaf transformer of `bench_runtime.py` and, with ``--trees many``, 300
leaves of 40 shapes) and each transform, lowers and
compiles ``jax.jit(tx.update)`` (with the parameters passed, as
`adaptive_grad_clip` needs them) for jaxclip and for optax, and prints the
seconds, the size of the lowered StableHLO text in MB, the jaxclip/optax
ratios and the temporary buffers of each compiled program in MB. optax has no per-tensor `clip_by_norm`
transform: jaxclip's `clip_by_norm` (and, on the first tree,
``clip_by_norm(axis=0)``) is compared with `optax.clip_by_block_rms`, the
closest per-tensor transform optax has. Each compilation starts from a fresh
`jax.jit`, so nothing is reused from the jit cache; the order is jaxclip then
optax for each row.

Usage: python benchmarks/bench_per_tensor.py [--repeats 3] [--trees small medium transformer many]
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

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import _common  # noqa: E402

import jaxclip  # noqa: E402


def compile_cost(make_tx, tree) -> tuple[float, float, float]:
  """(seconds to lower + compile, StableHLO text size in MB, temporary
  buffers of the compiled program in MB) of ``tx.update``."""
  tx = make_tx()
  state = tx.init(tree)
  fn = jax.jit(tx.update)
  start = time.perf_counter()
  lowered = fn.lower(tree, state, tree)
  compiled = lowered.compile()
  seconds = time.perf_counter() - start
  temp = compiled.memory_analysis().temp_size_in_bytes / 1e6
  return seconds, len(lowered.as_text()) / 1e6, temp


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
  parser.add_argument(
    "--trees",
    nargs="+",
    default=["small", "medium", "transformer"],
    choices=["small", "medium", "transformer", "many"],
    help="small: 200 x (8, 8); medium: 64 x (128, 128); transformer: bench_runtime.py's"
    " tree; many: 300 leaves of 40 shapes (128, 129..168), each reduced in place",
  )
  args = parser.parse_args()
  print(
    f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), "
    f"jax {jax.__version__}, optax {optax.__version__}"
  )
  trees = {
    "small": ("200 leaves of (8, 8)", lambda: {f"p{i:04d}": jnp.ones((8, 8)) for i in range(200)}),
    "medium": (
      "64 leaves of (128, 128)",
      lambda: {f"p{i:04d}": jnp.ones((128, 128)) for i in range(64)},
    ),
    "transformer": (
      "bench_runtime.py's transformer (87 leaves, 40.7M parameters)",
      _common.transformer_tree,
    ),
    "many": (
      "300 leaves of 40 shapes, (128, 129) to (128, 168)",
      lambda: {f"p{i:04d}": jnp.ones((128, 129 + i % 40)) for i in range(300)},
    ),
  }
  header = (
    f"{'transform':<26}{'optax counterpart':<20}{'jaxclip':>9}{'optax':>9}{'ratio':>7}"
    f"{'jaxclip MB':>12}{'optax MB':>10}{'ratio':>7}{'temp MB':>9}{'optax':>8}"
  )
  for label, build in (trees[name] for name in args.trees):
    tree = build()
    print(f"\n{label} (seconds: lower + compile, median of {args.repeats})")
    print(header)
    rows = dict(ROWS)
    if label.startswith("200"):
      rows["clip_by_norm(axis=0)"] = AXIS0
    for name, (ours, theirs, counterpart) in rows.items():
      ours_s, theirs_s = [], []
      for _ in range(args.repeats):
        s, ours_mb, ours_temp = compile_cost(ours, tree)
        ours_s.append(s)
        s, theirs_mb, theirs_temp = compile_cost(theirs, tree)
        theirs_s.append(s)
      o, t = statistics.median(ours_s), statistics.median(theirs_s)
      print(
        f"{name:<26}{counterpart:<20}{o:>8.3f}s{t:>8.3f}s{o / t:>7.2f}"
        f"{ours_mb:>12.3f}{theirs_mb:>10.3f}{ours_mb / theirs_mb:>7.2f}"
        f"{ours_temp:>9.1f}{theirs_temp:>8.1f}",
        flush=True,
      )
  print("\nratio: jaxclip / optax (below 1: jaxclip compiles faster or to a smaller program)")


if __name__ == "__main__":
  main()
