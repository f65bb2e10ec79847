"""Helpers shared by the benchmark scripts: model-shaped trees and timers."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp


def transformer_tree(
  d_model: int = 672, layers: int = 7, vocab: int = 4096, dtype=jnp.float32
) -> dict:
  """Gradients shaped like a GPT-style transformer (about 40M parameters and
  87 leaves with the defaults)."""
  key = jax.random.key(0)
  shapes = {"embed": (vocab, d_model), "final_ln": {"scale": (d_model,), "bias": (d_model,)}}
  for i in range(layers):
    shapes[f"layer_{i:02d}"] = {
      "qkv": {"kernel": (d_model, 3 * d_model), "bias": (3 * d_model,)},
      "out": {"kernel": (d_model, d_model), "bias": (d_model,)},
      "mlp_in": {"kernel": (d_model, 4 * d_model), "bias": (4 * d_model,)},
      "mlp_out": {"kernel": (4 * d_model, d_model), "bias": (d_model,)},
      "ln1": {"scale": (d_model,), "bias": (d_model,)},
      "ln2": {"scale": (d_model,), "bias": (d_model,)},
    }
  leaves, treedef = jax.tree.flatten(shapes, is_leaf=lambda s: isinstance(s, tuple))
  keys = jax.random.split(key, len(leaves))
  arrays = [jax.random.normal(k, s, dtype) for k, s in zip(keys, leaves)]
  return jax.tree.unflatten(treedef, arrays)


def count_params(tree) -> int:
  return sum(x.size for x in jax.tree.leaves(tree))


def time_steps(fn: Callable[[], object], repeats: int) -> list[float]:
  """Wall-clock seconds of `repeats` calls of `fn` (which blocks)."""
  out = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    out.append(time.perf_counter() - start)
  return out


def median(xs: list[float]) -> float:
  return statistics.median(xs)


def interleaved(runners: dict[str, Callable[[], object]], rounds: int, per_call: int) -> dict:
  """Seconds per step of each runner, one call of each per round in turn (so
  that drift in the machine's speed hits every variant alike); each call runs
  `per_call` steps."""
  times: dict[str, list[float]] = {name: [] for name in runners}
  for _ in range(rounds):
    for name, run in runners.items():
      times[name] += [t / per_call for t in time_steps(run, 1)]
  return times
