"""Run time of per-example clipping (the DP-SGD step), against optax.

Times jitted `per_example_global_norm_clip` and `per_example_layer_norm_clip`
(uniform split of the bound over the leaves) of jaxclip and of optax on the
same list of per-example gradients (by default a batch of 32 examples of about
1M parameters each, in four leaves shaped like a small MLP), interleaving all
of them round by round, and prints the median time of each and the
jaxclip/optax ratio of each function. It also times one read of the
per-example gradients (a jitted sum of squares), the least any implementation
must do.

Usage: python benchmarks/bench_per_example.py [--batch 32] [--rounds 30]
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

import _common  # noqa: E402

import jaxclip  # noqa: E402


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--rounds", type=int, default=30)
  parser.add_argument("--calls-per-round", type=int, default=5)
  args = parser.parse_args()

  shapes = [(784, 1024), (1024,), (1024, 256), (256,)]
  keys = jax.random.split(jax.random.key(0), len(shapes))
  grads = [jax.random.normal(k, (args.batch, *s), jnp.float32) for k, s in zip(keys, shapes)]
  per_example = sum(x.size for x in grads) // args.batch
  print(
    f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), "
    f"jax {jax.__version__}, optax {optax.__version__}"
  )
  print(
    f"{args.batch} examples x {per_example / 1e6:.2f}M parameters, {len(grads)} leaves, float32"
  )

  # The norms are around sqrt(1M) = 1000: a clip of 1000 scales about half
  # the examples; split uniformly over the 4 leaves, 500 per leaf scales the
  # two large leaves of most examples.
  fns = {}
  for name, bound in (
    ("per_example_global_norm_clip", 1000.0),
    ("per_example_layer_norm_clip", 1000.0),
  ):
    for lib in (optax, jaxclip):
      fn = getattr(lib, name)
      fns[f"{lib.__name__}.{name}"] = jax.jit(lambda g, fn=fn, bound=bound: fn(g, bound))
  fns["one read of the grads"] = jax.jit(lambda g: sum(jnp.sum(jnp.square(x)) for x in g))
  runners = {}
  for name, fn in fns.items():

    def run(fn=fn):
      for _ in range(args.calls_per_round):
        out = fn(grads)
      jax.block_until_ready(out)

    run()  # compile and warm up
    run()
    runners[name] = run

  times = _common.interleaved(runners, args.rounds, args.calls_per_round)

  base = _common.median(times["optax.per_example_global_norm_clip"])
  print(f"{'variant':<40}{'median call':>14}{'vs optax global':>17}{'jaxclip/optax':>15}")
  for name, ts in times.items():
    m = _common.median(ts)
    pair = name.replace("jaxclip.", "optax.")
    ratio = f"{m / _common.median(times[pair]):>14.3f}x" if name.startswith("jaxclip.") else ""
    print(f"{name:<40}{m * 1e3:>11.3f} ms{m / base:>16.3f}x{ratio}")


if __name__ == "__main__":
  main()
