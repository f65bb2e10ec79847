"""Time of a whole training step with each clipper, against no clipping.

A jitted step of a plain-JAX MLP (forward, backward, clipping, AdamW, apply,
parameters and optimizer state donated) is timed for each clipper chained
before `optax.adamw` (the guards wrap adamw instead), and for optax's
counterpart where optax has one. The variants are run round by round,
interleaved, so that drift of the machine hits them alike; each prints its
median time per step, the ratio to the step without clipping and, for
jaxclip, the ratio to optax's counterpart. Every optimizer gets ``loss=``
(`optax.with_extra_args_support`), which the guards use and the others
ignore.

The default MLP (784 -> 2048 -> 2048 -> 2048 -> 1000, 12.0M parameters,
batch 32) takes a few tens of milliseconds per step on a 2-core CPU; change
--width, --depth and --batch to move the balance between the model's
compute and the optimizer's passes over the parameters.

Usage: python benchmarks/bench_fullstep.py [--rounds 20] [--steps-per-round 5]
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


def init_mlp(key, sizes: list[int]) -> list[dict]:
  keys = jax.random.split(key, len(sizes) - 1)
  return [
    {
      "w": jax.random.normal(k, (m, n), jnp.float32) / jnp.sqrt(m),
      "b": jnp.zeros((n,), jnp.float32),
    }
    for k, m, n in zip(keys, sizes[:-1], sizes[1:])
  ]


def loss_fn(params: list[dict], x: jax.Array, y: jax.Array) -> jax.Array:
  h = x
  for layer in params[:-1]:
    h = jax.nn.gelu(h @ layer["w"] + layer["b"])
  logits = h @ params[-1]["w"] + params[-1]["b"]
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def make_step(tx):
  tx = optax.with_extra_args_support(tx)

  def step(params, state, x, y):
    loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
    updates, state = tx.update(grads, state, params, loss=loss)
    return optax.apply_updates(params, updates), state, loss

  return tx, jax.jit(step, donate_argnums=(0, 1))


def variants() -> dict[str, tuple[optax.GradientTransformation, str | None]]:
  """name -> (optimizer, name of the optax counterpart or None)."""
  adamw = lambda: optax.adamw(1e-4)  # noqa: E731
  chain = lambda t: optax.chain(t, adamw())  # noqa: E731
  return {
    "none (adamw)": (adamw(), None),
    "optax.clip_by_global_norm": (chain(optax.clip_by_global_norm(1.0)), None),
    "jaxclip.clip_by_global_norm": (
      chain(jaxclip.clip_by_global_norm(1.0)),
      "optax.clip_by_global_norm",
    ),
    "jaxclip.clip_by_norm": (chain(jaxclip.clip_by_norm(1.0)), None),
    "optax.clip_by_block_rms": (chain(optax.clip_by_block_rms(1e-3)), None),
    "jaxclip.clip_by_block_rms": (
      chain(jaxclip.clip_by_block_rms(1e-3)),
      "optax.clip_by_block_rms",
    ),
    "optax.adaptive_grad_clip": (chain(optax.adaptive_grad_clip(0.01)), None),
    "jaxclip.adaptive_grad_clip": (
      chain(jaxclip.adaptive_grad_clip(0.01)),
      "optax.adaptive_grad_clip",
    ),
    "optax.clip": (chain(optax.clip(1e-3)), None),
    "jaxclip.clip": (chain(jaxclip.clip(1e-3)), "optax.clip"),
    "jaxclip.autoclip": (chain(jaxclip.autoclip(10.0)), None),
    "jaxclip.zclip": (chain(jaxclip.zclip()), None),
    "jaxclip.adagc": (chain(jaxclip.adagc()), None),
    "jaxclip.quantile_clip": (chain(jaxclip.quantile_clip()), None),
    "optax.apply_if_finite": (optax.apply_if_finite(adamw(), 5), None),
    "jaxclip.skip_nonfinite": (jaxclip.skip_nonfinite(adamw()), "optax.apply_if_finite"),
    "jaxclip.skip_on_spike": (jaxclip.skip_on_spike(adamw()), None),
  }


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--rounds", type=int, default=20)
  parser.add_argument("--steps-per-round", type=int, default=5)
  parser.add_argument("--width", type=int, default=2048)
  parser.add_argument("--depth", type=int, default=3, help="hidden layers")
  parser.add_argument("--batch", type=int, default=32)
  args = parser.parse_args()

  sizes = [784] + [args.width] * args.depth + [1000]
  params0 = init_mlp(jax.random.key(0), sizes)
  kx, ky = jax.random.split(jax.random.key(1))
  x = jax.random.normal(kx, (args.batch, sizes[0]), jnp.float32)
  y = jax.random.randint(ky, (args.batch,), 0, sizes[-1])
  print(
    f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), "
    f"jax {jax.__version__}, optax {optax.__version__}"
  )
  print(
    f"MLP {' -> '.join(map(str, sizes))}: {_common.count_params(params0) / 1e6:.1f}M parameters, "
    f"{len(jax.tree.leaves(params0))} tensors, batch {args.batch}, float32"
  )

  runners, counterpart = {}, {}
  for name, (opt, theirs) in variants().items():
    tx, step = make_step(opt)
    params = jax.tree.map(jnp.copy, params0)
    box = {"params": params, "state": tx.init(params)}

    def run(box=box, step=step):
      for _ in range(args.steps_per_round):
        box["params"], box["state"], loss = step(box["params"], box["state"], x, y)
      jax.block_until_ready(loss)

    run()  # compile and warm up
    run()
    runners[name] = run
    counterpart[name] = theirs

  times = _common.interleaved(runners, args.rounds, args.steps_per_round)

  base = _common.median(times["none (adamw)"])
  print(f"{'clipper (+ adamw)':<30}{'ms/step':>10}{'vs none':>10}{'jaxclip/optax':>15}")
  for name, ts in times.items():
    m = _common.median(ts)
    vs = ""
    if counterpart[name] is not None:
      vs = f"{m / _common.median(times[counterpart[name]]):>14.3f}x"
    print(f"{name:<30}{m * 1e3:>10.2f}{m / base:>9.3f}x{vs}")


if __name__ == "__main__":
  main()
