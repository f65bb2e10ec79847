"""`clipped_grad` on a batch sharded over 8 host CPU devices; run by
tests/test_ghost.py in a subprocess (XLA_FLAGS must be set before jax starts).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
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


def _moves_data(hlo: str) -> list[str]:
  return [
    line
    for line in hlo.splitlines()
    if any(f"{op}(" in line or f"{op}-start(" in line for op in MOVES_DATA)
  ]


def _assert_same(got, info, want, want_info):
  np.testing.assert_allclose(info.norms, want_info.norms, rtol=1e-5)
  scale = max(float(np.max(np.abs(b))) for b in jax.tree.leaves(want))
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * scale)


def _check(loss, params, batch, axis_type):
  fn = jax.jit(jaxclip.clipped_grad(loss, 0.5, method="ghost"))
  want, want_info = fn(params, batch)
  mesh = jax.make_mesh((8,), ("d",), axis_types=(axis_type,))
  with jax.set_mesh(mesh):
    sharded = jax.device_put(batch, NamedSharding(mesh, P("d")))
    replicated = jax.device_put(params, NamedSharding(mesh, P()))
    compiled = fn.lower(replicated, sharded).compile()
    got, info = compiled(replicated, sharded)
  _assert_same(got, info, want, want_info)
  assert int(info.num_clipped) == int(want_info.num_clipped) > 0
  assert info.norms.sharding.spec == P("d")  # per-example values stay where they were
  hlo = compiled.as_text()
  assert _moves_data(hlo) == []
  assert "all-reduce" in hlo  # only the sums cross devices


def test_sharded_batch_gives_the_same_result_without_gathering():
  _check(*_problem(), AxisType.Auto)


def test_explicit_axes():
  _check(*_problem("one_hot"), AxisType.Explicit)


@pytest.mark.parametrize("method", ["ghost", "auto", "vmap"])
def test_inside_shard_map_with_varying_params(method):
  # Each device clips its own examples; the parameters are marked varying
  # (as JAX requires for per-device gradients) and the sums are added after.
  # The zeros that collect the ghost cotangents vary like the outputs they
  # are added to: otherwise JAX sums their cotangents over the devices.
  loss, params, batch = _problem()
  want, want_info = jax.jit(jaxclip.clipped_grad(loss, 0.5, method="vmap"))(params, batch)
  mesh = jax.make_mesh((8,), ("d",), axis_types=(AxisType.Explicit,))

  def local(p, b):
    p = jax.lax.pcast(p, "d", to="varying")
    g, info = jaxclip.clipped_grad(loss, 0.5, method=method)(p, b)
    return jax.lax.psum(g, "d"), info.norms, info.num_clipped[None]

  out_specs = (P(), P("d"), P("d"))
  fn = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P(), P("d")), out_specs=out_specs))
  sharded = jax.device_put(batch, NamedSharding(mesh, P("d")))
  replicated = jax.device_put(params, NamedSharding(mesh, P()))
  got, norms, clipped = fn(replicated, sharded)
  _assert_same(got, want_info._replace(norms=norms), want, want_info)
  assert int(jnp.sum(clipped)) == int(want_info.num_clipped) > 0


def test_inside_shard_map_params_that_do_not_vary_are_refused():
  loss, params, batch = _problem()
  mesh = jax.make_mesh((8,), ("d",), axis_types=(AxisType.Explicit,))
  fn = jax.shard_map(
    lambda p, b: jaxclip.clipped_grad(loss, 0.5)(p, b)[0],
    mesh=mesh,
    in_specs=(P(), P("d")),
    out_specs=P(),
  )
  sharded = jax.device_put(batch, NamedSharding(mesh, P("d")))
  with pytest.raises(ValueError, match=r"params\['embed'\]` does not.*pcast"):
    jax.jit(fn)(params, sharded)


@pytest.mark.parametrize("method", ["ghost", "auto"])
def test_tensor_parallel_weight_on_explicit_axes(method):
  # A column-parallel weight (features split over "model") and the batch
  # over "data": the ghost factors are split on the contracted features.
  ks = jax.random.split(jax.random.key(3), 4)
  params = {"w": jax.random.normal(ks[0], (16, 32)) / 4, "b": jax.random.normal(ks[1], (32,))}
  batch = {"x": jax.random.normal(ks[2], (8, 16)), "y": jax.random.normal(ks[3], (8, 32))}

  def loss(p, b):
    return jnp.sum((jnp.tanh(b["x"] @ p["w"] + p["b"]) - b["y"]) ** 2, axis=-1)

  want, want_info = jax.jit(jaxclip.clipped_grad(loss, 1.0, method="vmap"))(params, batch)
  mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(AxisType.Explicit,) * 2)
  with jax.set_mesh(mesh):
    ps = {
      "w": jax.device_put(params["w"], NamedSharding(mesh, P(None, "model"))),
      "b": jax.device_put(params["b"], NamedSharding(mesh, P("model"))),
    }
    bs = jax.device_put(batch, NamedSharding(mesh, P("data")))
    got, info = jax.jit(jaxclip.clipped_grad(loss, 1.0, method=method))(ps, bs)
  _assert_same(got, info, want, want_info)
  assert got["w"].sharding.spec == P(None, "model")


@pytest.mark.parametrize("axis_type", [AxisType.Explicit, AxisType.Auto])
@pytest.mark.parametrize("method", ["ghost", "vmap"])
def test_microbatches_of_a_sharded_batch_move_no_example(axis_type, method):
  # Each microbatch takes one example of every device's block, so it is
  # split over the devices as the batch is.
  loss, params, batch = _problem("one_hot")
  batch = jax.tree.map(lambda x: jnp.concatenate([x, x[::-1]]), batch)  # 32 examples
  fn = jax.jit(jaxclip.clipped_grad(loss, 0.5, method=method, microbatch_size=8))
  want, want_info = jax.jit(jaxclip.clipped_grad(loss, 0.5, method=method))(params, batch)
  mesh = jax.make_mesh((8,), ("d",), axis_types=(axis_type,))
  with jax.set_mesh(mesh):
    sharded = jax.device_put(batch, NamedSharding(mesh, P("d")))
    replicated = jax.device_put(params, NamedSharding(mesh, P()))
    compiled = fn.lower(replicated, sharded).compile()
    got, info = compiled(replicated, sharded)
    if axis_type == AxisType.Explicit:
      small = jax.jit(jaxclip.clipped_grad(loss, 0.5, method=method, microbatch_size=4))
      with pytest.raises(ValueError, match="multiple of 8"):
        small(replicated, sharded)
  _assert_same(got, info, want, want_info)
  assert _moves_data(compiled.as_text()) == []


def test_inside_shard_map_a_loss_varying_beyond_the_params_is_refused():
  # The loss varies over "m" through an argument split over it: JAX sums the
  # gradient of parameters that do not vary over "m" across it, which ghost
  # norms (from one device's activations) cannot see; "vmap" clips that sum.
  mesh = jax.make_mesh((2, 4), ("d", "m"), axis_types=(AxisType.Explicit,) * 2)
  ks = jax.random.split(jax.random.key(5), 3)
  params = {"w": jax.random.normal(ks[0], (3, 2))}
  batch = {"x": jax.random.normal(ks[1], (8, 3))}
  s_all = jax.random.normal(ks[2], (12,))  # each "m" device holds its own 3

  def loss(p, b, s):
    return jnp.sum(((b["x"] * s) @ p["w"]) ** 2, axis=-1)

  def run(method):
    def local(p, b, s):
      p = jax.lax.pcast(p, "d", to="varying")
      g, info = jaxclip.clipped_grad(loss, 1.0, method=method)(p, b, s)
      return info.norms

    fn = jax.shard_map(local, mesh=mesh, in_specs=(P(), P("d"), P("m")), out_specs=P("d"))
    put = lambda x, spec: jax.device_put(x, NamedSharding(mesh, spec))  # noqa: E731
    return jax.jit(fn)(put(params, P()), put(batch, P("d")), put(s_all, P("m")))

  for method in ("ghost", "auto"):
    with pytest.raises(ValueError, match=r"varies over the mesh axes \['m'\]"):
      run(method)
  x, w, s = np.asarray(batch["x"]), np.asarray(params["w"]), np.asarray(s_all).reshape(4, 3)
  want = [
    np.linalg.norm(sum(np.outer(x[i] * s[j], 2 * (x[i] * s[j]) @ w) for j in range(4)))
    for i in range(8)
  ]
  np.testing.assert_allclose(run("vmap"), want, rtol=1e-5)
