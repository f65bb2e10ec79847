"""Compile time of a jitted `clip_by_global_norm` update over many small leaves.

For each leaf count, lowers and compiles `tx.update` for a tree of that many
leaves of shape (16,), with jaxclip and with optax, and prints the seconds and
the ratio. optax's compile time grows steeply with the leaf count; pass
--optax-max-leaves to bound which sizes are run with optax.

Usage: python benchmarks/bench_compile.py [--leaves 500 1000 2000 4000]
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import optax

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jaxclip  # noqa: E402


def compile_seconds(tx, tree) -> float:
  fn = jax.jit(tx.update)
  state = tx.init(tree)
  start = time.perf_counter()
  fn.lower(tree, state).compile()
  return time.perf_counter() - start


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--leaves", type=int, nargs="+", default=[500, 1000, 2000, 4000])
  parser.add_argument("--optax-max-leaves", type=int, default=2000)
  args = parser.parse_args()
  print(
    f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), jax {jax.__version__}, optax {optax.__version__}"
  )
  print(f"{'leaves':>7}{'jaxclip':>10}{'optax':>10}{'optax/jaxclip':>15}")
  for n in args.leaves:
    tree = {f"p{i:05d}": jnp.ones((16,), jnp.float32) for i in range(n)}
    ours = compile_seconds(jaxclip.clip_by_global_norm(1.0), tree)
    if n <= args.optax_max_leaves:
      theirs = compile_seconds(optax.clip_by_global_norm(1.0), tree)
      print(f"{n:>7}{ours:>9.2f}s{theirs:>9.2f}s{theirs / ours:>14.1f}x")
    else:
      print(f"{n:>7}{ours:>9.2f}s{'skipped':>10}{'':>15}")


if __name__ == "__main__":
  main()
