"""Step time of each clipping transform chained with AdamW, against optax.

Runs one jitted optimizer step (update + apply_updates, buffers donated) on
gradients shaped like a 40M-parameter transformer, for:

* bare `optax.adamw`,
* for each of `clip` (by value), `clip_by_global_norm`, `clip_by_block_rms`
  and `adaptive_grad_clip`: ``optax.chain(optax.<t>(...), optax.adamw(...))``
  and ``optax.chain(jaxclip.<t>(...), optax.adamw(...))``,
* `jaxclip.clip_by_norm` + adamw (optax has no per-tensor norm clipper),

interleaving the variants round by round so that machine noise hits them
alike, and prints the median step time of each, the ratio to bare adamw and,
for jaxclip's chains, the ratio to optax's chain of the same transform. It also times
one read of the gradients (a jitted sum of squares, with nothing written):
any clipper must read the gradients once before the optimizer may use them,
so ``1 + read / adamw`` is the floor for a clipping chain.

Usage: python benchmarks/bench_runtime.py [--rounds 30] [--dtype float32]
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

# transform name -> arguments, the same for jaxclip and optax
TRANSFORMS = {
  "clip": (1.0,),
  "clip_by_global_norm": (1.0,),
  "clip_by_block_rms": (1.0,),
  "adaptive_grad_clip": (0.01,),
  "clip_by_norm": (1.0,),
}


def make_step(tx):
  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  return jax.jit(step, donate_argnums=(0, 1))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--rounds", type=int, default=30)
  parser.add_argument("--steps-per-round", type=int, default=5)
  parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  parser.add_argument("--d-model", type=int, default=672)
  parser.add_argument("--layers", type=int, default=7)
  args = parser.parse_args()

  dtype = jnp.dtype(args.dtype)
  grads = _common.transformer_tree(args.d_model, args.layers, dtype=dtype)
  print(
    f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), jax {jax.__version__}, optax {optax.__version__}"
  )
  print(
    f"tree: {_common.count_params(grads) / 1e6:.1f}M parameters, {len(jax.tree.leaves(grads))} leaves, {args.dtype}"
  )

  adamw = lambda: optax.adamw(1e-3)  # noqa: E731
  variants = {"adamw": adamw()}
  for name, targs in TRANSFORMS.items():
    if hasattr(optax, name):
      variants[f"optax.{name}"] = optax.chain(getattr(optax, name)(*targs), adamw())
    variants[f"jaxclip.{name}"] = optax.chain(getattr(jaxclip, name)(*targs), adamw())
  runners = {}
  for name, tx in variants.items():
    params = jax.tree.map(jnp.copy, grads)
    box = {"params": params, "state": tx.init(params), "step": make_step(tx)}

    def run(box=box):
      for _ in range(args.steps_per_round):
        box["params"], box["state"] = box["step"](box["params"], box["state"], grads)
      jax.block_until_ready(box["params"])

    run()  # compile and warm up
    run()
    runners[name] = run

  read = jax.jit(
    lambda g: sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(g))
  )

  def run_read():
    for _ in range(args.steps_per_round):
      out = read(grads)
    jax.block_until_ready(out)

  run_read()
  runners["one read of the grads"] = run_read

  times = _common.interleaved(runners, args.rounds, args.steps_per_round)

  base = _common.median(times["adamw"])
  print(f"{'variant (+ adamw)':<32}{'median step':>14}{'vs adamw':>10}{'jaxclip/optax':>15}")
  for name, ts in times.items():
    m = _common.median(ts)
    optax_name = name.replace("jaxclip.", "optax.")
    vs_optax = ""
    if name.startswith("jaxclip.") and optax_name in times:
      vs_optax = f"{m / _common.median(times[optax_name]):>14.3f}x"
    print(f"{name:<32}{m * 1e3:>11.3f} ms{m / base:>9.3f}x{vs_optax}")
  floor = 1 + _common.median(times["one read of the grads"]) / base
  print(f"floor for any clipping chain (adamw + one read): {floor:.3f}x adamw")


if __name__ == "__main__":
  main()
