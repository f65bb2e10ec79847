"""Checks on 8 host CPU devices; run by tests/test_sharding.py in a subprocess.

XLA_FLAGS=--xla_force_host_platform_device_count=8 must be set before jax
starts, so this file is run in a pytest session of its own.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import jaxclip

COLLECTIVES_THAT_MOVE_DATA = ("all-gather", "all-to-all", "collective-permute")


def setup_module():
  assert jax.device_count() == 8, "run with --xla_force_host_platform_device_count=8"


def _host_tree():
  ks = jax.random.split(jax.random.key(0), 4)
  tree = {
    "w": 10.0 * jax.random.normal(ks[0], (1024, 64)),
    "v": jax.random.normal(ks[1], (64 * 1024,)),
    "small": [jax.random.normal(jax.random.fold_in(ks[2], i), (8,)) for i in range(40)],
    "bias": jax.random.normal(ks[3], (64,)),
  }
  return tree


def _expected(tree, max_norm):
  tx = jaxclip.clip_by_global_norm(max_norm)
  return tx.update(tree, tx.init(tree))


def _data_moving_ops(hlo_text):
  return [
    line.strip()[:120]
    for line in hlo_text.splitlines()
    if any(op + "(" in line or op + "-start(" in line for op in COLLECTIVES_THAT_MOVE_DATA)
  ]


def _shard(tree, mesh, shard_small):
  def put(x):
    if x.size <= 1 << 14 and not shard_small:
      spec = P()
    else:
      spec = P("d") if x.ndim == 1 else P("d", None)
    return jax.device_put(x, NamedSharding(mesh, spec))

  return jax.tree.map(put, tree)


@pytest.mark.parametrize("axis_type", [AxisType.Explicit, AxisType.Auto])
def test_sharded_jit_matches_single_device_without_gathering(axis_type):
  mesh = jax.make_mesh((8,), ("d",), axis_types=(axis_type,))
  host = _host_tree()
  # Under Explicit sharding the kernel sees which leaves are sharded and
  # reduces them in place; under Auto it cannot, and small leaves (up to
  # 2**14 elements) are bucketed, which gathers them if they are sharded:
  # here they stay replicated (see docs/sharding.md).
  tree = _shard(host, mesh, shard_small=axis_type == AxisType.Explicit)
  tx = jaxclip.clip_by_global_norm(1.0)
  state = tx.init(tree)
  step = jax.jit(tx.update)
  out, new_state = step(tree, state)
  expected, expected_state = _expected(host, 1.0)
  np.testing.assert_allclose(new_state.norm, expected_state.norm, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(expected)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
  assert out["w"].sharding.is_equivalent_to(tree["w"].sharding, 2)  # stays sharded
  hlo = step.lower(tree, state).compile().as_text()
  assert _data_moving_ops(hlo) == []
  assert "all-reduce" in hlo  # only the partial norms cross devices


def _put(tree, mesh, specs):
  return jax.tree.map(lambda x, s: jax.device_put(x, NamedSharding(mesh, s)), tree, specs)


def _per_device_norm(ord):
  def fn(shard):
    return jaxclip.global_norm(shard, ord, axis_name="d")

  return fn


@pytest.mark.parametrize("ord", [2, 1, math.inf, 3])
@pytest.mark.parametrize("scale", [1.0, 1e20])  # 1e20 takes the rescaling path
def test_shard_map_axis_name_gives_global_norm(ord, scale):
  mesh = jax.make_mesh((8,), ("d",), axis_types=(AxisType.Explicit,))
  host = jax.tree.map(lambda x: scale * x, {"w": _host_tree()["w"], "v": _host_tree()["v"]})
  specs = {"w": P("d", None), "v": P("d")}
  fn = jax.shard_map(_per_device_norm(ord), mesh=mesh, in_specs=(specs,), out_specs=P())
  got = jax.jit(fn)(_put(host, mesh, specs))
  np.testing.assert_allclose(got, jaxclip.global_norm(host, ord), rtol=1e-5)


def test_shard_map_clip_by_global_norm_matches_single_device():
  mesh = jax.make_mesh((8,), ("d",), axis_types=(AxisType.Explicit,))
  host = {"w": _host_tree()["w"], "v": _host_tree()["v"]}
  specs = {"w": P("d", None), "v": P("d")}
  tx = jaxclip.clip_by_global_norm(1.0, axis_name="d")

  def step(g):
    out, state = tx.update(g, tx.init(g))
    return out, state.norm

  fn = jax.shard_map(step, mesh=mesh, in_specs=(specs,), out_specs=(specs, P()))
  out, norm = jax.jit(fn)(_put(host, mesh, specs))
  expected, expected_state = _expected(host, 1.0)
  np.testing.assert_allclose(norm, expected_state.norm, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(expected)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)


def test_pmap_axis_name():
  host = jax.random.normal(jax.random.key(1), (8, 1000))
  tx = jaxclip.clip_by_global_norm(1.0, axis_name="i")

  def step(g):
    out, state = tx.update({"g": g}, tx.init({"g": g}))
    return out["g"], state.norm

  out, norms = jax.pmap(step, axis_name="i")(host)
  expected, expected_state = _expected({"g": host}, 1.0)
  np.testing.assert_allclose(norms, np.full(8, float(expected_state.norm)), rtol=1e-5)
  np.testing.assert_allclose(out, expected["g"], rtol=1e-5, atol=1e-7)


ADAPTIVE_WITH_AXIS = {
  "autoclip": lambda ax: jaxclip.autoclip(50.0, history_size=4, axis_name=ax),
  "zclip": lambda ax: jaxclip.zclip(warmup_steps=2, axis_name=ax),
  "adagc": lambda ax: jaxclip.adagc(warmup_steps=2, axis_name=ax),
  "quantile_clip": lambda ax: jaxclip.quantile_clip(axis_name=ax),
  "skip_on_spike": lambda ax: jaxclip.skip_on_spike(
    optax.adam(0.1), window=4, n_sigma=1.0, min_history=2, axis_name=ax
  ),
  "skip_nonfinite": lambda ax: jaxclip.skip_nonfinite(optax.adam(0.1), axis_name=ax),
}


def _gradient_steps():
  """Five steps of gradients {w, v}; the 4th has one NaN, in one shard only."""
  base = {"w": _host_tree()["w"], "v": _host_tree()["v"]}
  steps = [jax.tree.map(lambda x, s=s: x * (1.0 + s) ** 2, base) for s in range(5)]
  steps[3]["v"] = steps[3]["v"].at[5].set(np.nan)
  return steps


@pytest.mark.parametrize("name", sorted(ADAPTIVE_WITH_AXIS))
def test_shard_map_axis_name_matches_single_device(name):
  """With `axis_name`, every device computes the statistics of the whole
  gradient: the sharded run equals the single-device one (updates and every
  recorded statistic), and a NaN in one shard makes every device skip."""
  mesh = jax.make_mesh((8,), ("d",), axis_types=(AxisType.Explicit,))
  specs = {"w": P("d", None), "v": P("d")}
  steps = _gradient_steps()
  params = jax.tree.map(jnp.zeros_like, steps[0])

  def run(tx, grads_list, params):
    state = tx.init(params)
    outs = []
    for g in grads_list:
      u, state = tx.update(g, state, params, loss=jnp.float32(1.0))
      outs.append((u, jaxclip.stats(state)))
    return outs

  want = jax.jit(lambda gs, p: run(ADAPTIVE_WITH_AXIS[name](None), gs, p))(steps, params)
  sharded = jax.shard_map(
    lambda gs, p: run(ADAPTIVE_WITH_AXIS[name]("d"), gs, p),
    mesh=mesh,
    in_specs=([specs] * len(steps), specs),
    out_specs=[(specs, P())] * len(steps),
  )
  got = jax.jit(sharded)([_put(g, mesh, specs) for g in steps], _put(params, mesh, specs))
  for (gu, gs), (wu, ws) in zip(got, want, strict=True):
    assert gs.keys() == ws.keys()
    for key in ws:
      np.testing.assert_allclose(gs[key], ws[key], rtol=1e-5, err_msg=key)
    for a, b in zip(jax.tree.leaves(gu), jax.tree.leaves(wu), strict=True):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
  if name.startswith("skip"):
    skipped = [int(stats["clip/total_skipped"]) for _, stats in want]
    assert skipped[3] == skipped[2] + 1  # the NaN step (the sharded run agreed above)
    assert not any(np.any(np.asarray(x)) for x in jax.tree.leaves(got[3][0]))  # zero updates


@pytest.mark.parametrize("axis_type", [AxisType.Explicit, AxisType.Auto])
def test_guards_under_sharded_jit_with_donation(axis_type):
  """Guards on sharded parameters with donated buffers: same results as on
  one device, outputs stay sharded, no data moved between devices."""
  mesh = jax.make_mesh((8,), ("d",), axis_types=(axis_type,))
  steps = _gradient_steps()
  host_params = jax.tree.map(jnp.zeros_like, steps[0])
  for make in (ADAPTIVE_WITH_AXIS["skip_nonfinite"], ADAPTIVE_WITH_AXIS["skip_on_spike"]):
    tx = optax.with_extra_args_support(make(None))

    def step(params, state, grads, tx=tx):
      u, state = tx.update(grads, state, params, loss=jnp.float32(1.0))
      return optax.apply_updates(params, u), state

    p_host, s_host = host_params, tx.init(host_params)
    params = _shard(host_params, mesh, shard_small=True)
    state = tx.init(params)
    sharded_step = jax.jit(step, donate_argnums=(0, 1))
    hlo = sharded_step.lower(params, state, _shard(steps[0], mesh, True)).compile().as_text()
    assert _data_moving_ops(hlo) == []
    for g in steps:
      p_host, s_host = jax.jit(step)(p_host, s_host, g)
      params, state = sharded_step(params, state, _shard(g, mesh, True))
    assert params["w"].sharding.is_equivalent_to(NamedSharding(mesh, P("d", None)), 2)
    for a, b in zip(jax.tree.leaves((params, state)), jax.tree.leaves((p_host, s_host))):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
