"""Step time of the step guards against `optax.apply_if_finite`, with and
without buffer donation.

Each guard wraps `optax.adamw` on a 16.8M-parameter transformer-shaped tree;
every variant is a jitted update + apply_updates step, timed as the median of
repeated steps after warmup, once with the parameters and optimizer state
donated (`donate_argnums`, as training loops usually do) and once without.

Usage: python benchmarks/bench_guards.py [--repeats 30]
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import jax
import jax.numpy as jnp
import optax

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from bench_adaptive import make_params, time_step  # noqa: E402

import jaxclip  # noqa: E402


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repeats", type=int, default=30)
  args = parser.parse_args()
  params = make_params(4)
  grads = jax.tree.map(lambda x: jnp.full_like(x, 1e-3), params)
  variants = {
    "adamw": lambda: optax.adamw(1e-4),
    "optax.apply_if_finite": lambda: optax.apply_if_finite(optax.adamw(1e-4), 5),
    "jaxclip.skip_nonfinite": lambda: jaxclip.skip_nonfinite(optax.adamw(1e-4)),
    "jaxclip.skip_on_spike": lambda: jaxclip.skip_on_spike(optax.adamw(1e-4)),
    "jaxclip.skip_large_norm": lambda: jaxclip.skip_large_norm(optax.adamw(1e-4), 100.0),
  }
  print(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}, optax {optax.__version__}")
  print(f"{'variant':<24}{'donated':>12}{'vs adamw':>10}{'not donated':>14}{'vs adamw':>10}")
  base = {
    d: time_step(variants["adamw"](), params, grads, args.repeats, donate=d) for d in (True, False)
  }
  for name, make in variants.items():
    t = {d: time_step(make(), params, grads, args.repeats, donate=d) for d in (True, False)}
    print(
      f"{name:<24}{t[True] * 1e3:>9.2f} ms{t[True] / base[True]:>9.2f}x"
      f"{t[False] * 1e3:>11.2f} ms{t[False] / base[False]:>9.2f}x"
    )


if __name__ == "__main__":
  main()
