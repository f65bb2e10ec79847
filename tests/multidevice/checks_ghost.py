"""`clipped_grad` on a batch sharded over 8 host CPU devices; run by
tests/test_ghost.py in a subprocess (XLA_FLAGS must be set before jax starts).
"""

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import jaxclip

MOVES_DATA = ("all-gather", "all-to-all", "collective-permute")


def setup_module():
  assert jax.device_count() == 8, "run with --xla_force_host_platform_device_count=8"


def _problem(lookup: str = "gather"):
  """A small causal attention LM in plain JAX: an embedding tied to the output
  head, a norm scale, and query, key and value projections. The embedding is
  a row gather, or a one-hot product (`Explicit` mesh axes need an output
  sharding for a gather with split indices, which plain indexing does not
  give)."""
  ks = jax.random.split(jax.random.key(0), 4)
  params = {
    "embed": jax.random.normal(ks[0], (64, 32)),
    "scale": jnp.ones(32),
    "qkv": jax.random.normal(ks[1], (3, 32, 32)) / 32**0.5,
  }
  ids = jax.random.randint(ks[2], (16, 8), 0, 64)

  def loss(p, b):
    if lookup == "gather":
      x = p["embed"][b["ids"]]
    else:
      x = jax.nn.one_hot(b["ids"], 64) @ p["embed"]
    h = x * jax.lax.rsqrt(jnp.mean(x**2, -1, keepdims=True) + 1e-6) * p["scale"]
    q, k, v = jnp.einsum("btd,ide->ibte", h, p["qkv"])
    scores = jnp.einsum("bte,bse->bts", q, k) + jnp.triu(jnp.full((8, 8), -1e9), 1)
    x = x + jnp.einsum("bts,bse->bte", jax.nn.softmax(scores), v)
    logp = jax.nn.log_softmax(x @ p["embed"].T)
    return -jnp.take_along_axis(logp, b["next"][..., None], -1)[..., 0].mean(-1)

  return loss, params, {"ids": ids, "next": jnp.roll(ids, -1, axis=1)}


def _check(loss, params, batch, axis_type):
  fn = jax.jit(jaxclip.clipped_grad(loss, 0.5, method="ghost"))
  want, want_info = fn(params, batch)
  mesh = jax.make_mesh((8,), ("d",), axis_types=(axis_type,))
  with jax.set_mesh(mesh):
    sharded = jax.device_put(batch, NamedSharding(mesh, P("d")))
    replicated = jax.device_put(params, NamedSharding(mesh, P()))
    compiled = fn.lower(replicated, sharded).compile()
    got, info = compiled(replicated, sharded)
  np.testing.assert_allclose(info.norms, want_info.norms, rtol=1e-5)
  assert int(info.num_clipped) == int(want_info.num_clipped) > 0
  scale = max(float(np.max(np.abs(b))) for b in jax.tree.leaves(want))
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * scale)
  assert info.norms.sharding.spec == P("d")  # per-example values stay where they were
  hlo = compiled.as_text()
  moving = [
    line
    for line in hlo.splitlines()
    if any(f"{op}(" in line or f"{op}-start(" in line for op in MOVES_DATA)
  ]
  assert moving == []
  assert "all-reduce" in hlo  # only the sums cross devices


def test_sharded_batch_gives_the_same_result_without_gathering():
  _check(*_problem(), AxisType.Auto)


def test_explicit_axes():
  _check(*_problem("one_hot"), AxisType.Explicit)
