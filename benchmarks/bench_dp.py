"""Memory and time of a DP-SGD gradient (`jaxclip.clipped_grad`) against a
non-private gradient, with ghost clipping and with per-example gradients.

Three models, each compiled three ways: the non-private gradient of the
summed loss (``jax.grad``), ``clipped_grad(method="vmap")`` (per-example
gradients) and ``clipped_grad(method="ghost")``:

* a Flax Linen transformer LM (token embedding tied to the output head,
  pre-LayerNorm blocks of causal attention and a 4x GELU MLP; by default
  d_model 384, 4 layers, 6 heads, sequence 32, vocabulary 2048, batch 64);
* an Equinox model of the same kind without attention (embedding, residual
  MLP blocks with LayerNorm, a linear head, applied position by position);
* a plain-JAX function (two tanh layers sharing one weight, and a head).

For each it prints the compiled temporary memory
(``jax.jit(f).lower(...).compile().memory_analysis().temp_size_in_bytes``)
and its ratio to the non-private step's and to vmap's; for the transformer,
also the median step time (the three variants interleaved round by round)
and the largest batch each method fits in a memory budget: temporary plus
argument plus output bytes, fitted as ``a + b * batch`` from the compiled
programs at the batch and at half of it.

Usage: python benchmarks/bench_dp.py [--rounds 5] [--budget-gib 2]
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import equinox as eqx
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import _common  # noqa: E402

import jaxclip  # noqa: E402

METHODS = ("non-private", "vmap", "ghost")


def xent(logits, labels):
  logp = jax.nn.log_softmax(logits.astype(jnp.float32))
  return -jnp.take_along_axis(logp, labels[..., None], -1)[..., 0].mean(-1)


class Block(nn.Module):
  heads: int

  @nn.compact
  def __call__(self, x):
    d = x.shape[-1]
    h = nn.LayerNorm()(x)
    mask = nn.make_causal_mask(jnp.ones(x.shape[:2]))
    x = x + nn.MultiHeadDotProductAttention(num_heads=self.heads)(h, h, mask=mask)
    return x + nn.Dense(d)(nn.gelu(nn.Dense(4 * d)(nn.LayerNorm()(x))))


class LM(nn.Module):
  vocab: int
  d_model: int
  layers: int
  heads: int

  @nn.compact
  def __call__(self, ids):
    embed = nn.Embed(self.vocab, self.d_model)
    x = embed(ids)
    for _ in range(self.layers):
      x = Block(self.heads)(x)
    return embed.attend(nn.LayerNorm()(x))


def transformer(args, batch_size):
  model = LM(args.vocab, args.d_model, args.layers, args.heads)
  ids = jax.random.randint(jax.random.key(1), (batch_size, args.seq), 0, args.vocab)
  params = model.init(jax.random.key(0), ids[:1])
  batch = {"ids": ids, "next": jnp.roll(ids, -1, axis=1)}
  return (lambda p, b: xent(model.apply(p, b["ids"]), b["next"])), params, batch


class EqxBlock(eqx.Module):
  norm: eqx.nn.LayerNorm
  up: eqx.nn.Linear
  down: eqx.nn.Linear

  def __init__(self, d, key):
    k1, k2 = jax.random.split(key)
    self.norm, self.up, self.down = (
      eqx.nn.LayerNorm(d),
      eqx.nn.Linear(d, 4 * d, key=k1),
      eqx.nn.Linear(4 * d, d, key=k2),
    )

  def __call__(self, x):
    return x + self.down(jax.nn.gelu(self.up(self.norm(x))))


class EqxModel(eqx.Module):
  embed: eqx.nn.Embedding
  blocks: list
  head: eqx.nn.Linear

  def __init__(self, vocab, d, layers, key):
    keys = jax.random.split(key, layers + 2)
    self.embed = eqx.nn.Embedding(vocab, d, key=keys[0])
    self.blocks = [EqxBlock(d, k) for k in keys[1:-1]]
    self.head = eqx.nn.Linear(d, vocab, key=keys[-1])

  def __call__(self, token):  # one position
    x = self.embed(token)
    for block in self.blocks:
      x = block(x)
    return self.head(x)


def equinox_model(args, batch_size):
  model = EqxModel(args.vocab, args.d_model, args.layers, jax.random.key(0))
  ids = jax.random.randint(jax.random.key(1), (batch_size, args.seq), 0, args.vocab)

  def loss(m, b):
    logits = jax.vmap(jax.vmap(m))(b["ids"])
    return xent(logits, b["next"])

  return loss, model, {"ids": ids, "next": jnp.roll(ids, -1, axis=1)}


def plain_function(args, batch_size):
  d = args.d_model
  ks = jax.random.split(jax.random.key(0), 4)
  params = {
    "w": jax.random.normal(ks[0], (d, d)) / d**0.5,
    "b": jnp.zeros(d),
    "head": jax.random.normal(ks[1], (d, 16)) / d**0.5,
  }
  x = jax.random.normal(ks[2], (batch_size, args.seq, d))
  y = jax.random.normal(ks[3], (batch_size, args.seq, 16))

  def loss(p, b):
    h = jnp.tanh(jnp.tanh(b["x"] @ p["w"] + p["b"]) @ p["w"])  # one weight, used twice
    return jnp.mean((h @ p["head"] - b["y"]) ** 2, axis=(1, 2))

  return loss, params, {"x": x, "y": y}


def compiled(make, args, batch_size):
  """Per method, the compiled step and its arguments."""
  loss, params, batch = make(args, batch_size)
  fns = {
    "non-private": lambda p, b: jax.grad(lambda p: loss(p, b).sum())(p),
    "vmap": jaxclip.clipped_grad(loss, 1.0, method="vmap"),
    "ghost": jaxclip.clipped_grad(loss, 1.0, method="ghost"),
  }
  dynamic, static = eqx.partition(params, eqx.is_array)

  def split(fn):
    return lambda d, b: fn(eqx.combine(d, static), b)

  return {
    m: (jax.jit(split(f)).lower(dynamic, batch).compile(), (dynamic, batch)) for m, f in fns.items()
  }


def memory_table(name: str, steps: dict) -> dict:
  temp = {m: steps[m][0].memory_analysis().temp_size_in_bytes for m in METHODS}
  print(f"\n{name}")
  print(f"{'method':<13}{'temp MB':>10}{'vs non-private':>16}{'vs vmap':>10}")
  for m in METHODS:
    print(
      f"{m:<13}{temp[m] / 2**20:>10.1f}{temp[m] / temp['non-private']:>15.2f}x{temp[m] / temp['vmap']:>9.3f}x"
    )
  return temp


def total_bytes(step) -> int:
  ma = step.memory_analysis()
  return ma.temp_size_in_bytes + ma.argument_size_in_bytes + ma.output_size_in_bytes


def time_table(steps: dict, rounds: int) -> dict:
  runners = {}
  for m in METHODS:
    fn, a = steps[m]

    def run(fn=fn, a=a):
      jax.block_until_ready(fn(*a))

    run()
    runners[m] = run
  times = {m: _common.median(t) for m, t in _common.interleaved(runners, rounds, 1).items()}
  print(f"{'method':<13}{'ms/step':>10}{'vs non-private':>16}")
  for m in METHODS:
    print(f"{m:<13}{times[m] * 1e3:>10.1f}{times[m] / times['non-private']:>15.2f}x")
  return times


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--d-model", type=int, default=384)
  parser.add_argument("--layers", type=int, default=4)
  parser.add_argument("--heads", type=int, default=6)
  parser.add_argument("--seq", type=int, default=32)
  parser.add_argument("--vocab", type=int, default=2048)
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--budget-gib", type=float, default=2.0)
  args = parser.parse_args()
  print(
    f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), jax {jax.__version__},"
    f" optax {optax.__version__}, flax {flax.__version__}, equinox {eqx.__version__}"
  )

  steps = compiled(transformer, args, args.batch)
  n = _common.count_params(steps["ghost"][1][0])
  temp = memory_table(
    f"transformer LM (Flax Linen): d_model {args.d_model}, {args.layers} layers, {args.heads}"
    f" heads, sequence {args.seq}, vocabulary {args.vocab}, batch {args.batch},"
    f" {n / 1e6:.2f}M parameters",
    steps,
  )
  times = time_table(steps, args.rounds)
  half = compiled(transformer, args, args.batch // 2)
  budget = args.budget_gib * 2**30
  fits = {}
  for m in METHODS:
    big, small = total_bytes(steps[m][0]), total_bytes(half[m][0])
    per_example = (big - small) / (args.batch - args.batch // 2)
    fits[m] = int((budget - (big - per_example * args.batch)) // per_example)
  print(
    f"largest batch within {args.budget_gib:g} GiB (temporary + arguments + outputs):  "
    + "  ".join(f"{m} {fits[m]}" for m in METHODS)
  )

  temps = {"transformer": temp}
  for name, make in [("Equinox model", equinox_model), ("plain function", plain_function)]:
    loss, params, _ = make(args, 1)
    n = _common.count_params(eqx.filter(params, eqx.is_array))
    desc = {
      "Equinox model": f"embedding, {args.layers} residual LayerNorm + MLP blocks, linear head",
      "plain function": "two tanh layers sharing one weight, a head",
    }[name]
    temps[name] = memory_table(
      f"{name} ({desc}): sequence {args.seq}, batch {args.batch}, {n / 1e6:.2f}M parameters",
      compiled(make, args, args.batch),
    )

  print("\ntargets")
  for name, t in temps.items():
    np_ratio, vmap_ratio = t["ghost"] / t["non-private"], t["ghost"] / t["vmap"]
    print(
      f"{name:<15} ghost memory {np_ratio:.2f}x non-private (target <= 1.5x: "
      f"{'met' if np_ratio <= 1.5 else 'MISSED'}), {vmap_ratio:.3f}x vmap (target <= 0.25x: "
      f"{'met' if vmap_ratio <= 0.25 else 'MISSED'})"
    )
  ratio = times["ghost"] / times["non-private"]
  print(
    f"transformer     ghost time {ratio:.2f}x non-private (target <= 2.0x: {'met' if ratio <= 2 else 'MISSED'})"
  )


if __name__ == "__main__":
  main()
