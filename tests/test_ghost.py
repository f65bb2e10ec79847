"""Tests of `jaxclip.clipped_grad` (jaxclip/_ghost*.py).

The reference is ``method="vmap"``: per-example gradients from
``jax.vmap(jax.grad(...))``, their norms from the norm kernel. Ghost and
auto must give the same norms and clipped sums on real models, without
forming per-example gradients of the layers ghost clipping supports.
"""

import functools
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import jaxclip

nn = pytest.importorskip("flax.linen")
nnx = pytest.importorskip("flax.nnx")
eqx = pytest.importorskip("equinox")

KEY = jax.random.key(0)


def _keys(n):
  return jax.random.split(jax.random.key(1), n)


def _xent(logits, labels):
  logp = jax.nn.log_softmax(logits.astype(jnp.float32))
  return -jnp.take_along_axis(logp, labels[..., None], -1)[..., 0]


class _MLP(nn.Module):
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(16, dtype=self.dtype)(x))
    return nn.Dense(4, dtype=self.dtype)(x)


class _LM(nn.Module):
  """Token embedding, causal attention, LayerNorm, and a tied output head."""

  @nn.compact
  def __call__(self, ids):
    embed = nn.Embed(37, 16)
    x = embed(ids)
    h = nn.LayerNorm()(x)
    mask = nn.make_causal_mask(ids)
    return embed.attend(x + nn.MultiHeadDotProductAttention(num_heads=2)(h, h, mask=mask))


class _CNN(nnx.Module):
  def __init__(self, rngs):
    self.conv1 = nnx.Conv(1, 4, (3, 3), rngs=rngs)
    self.conv2 = nnx.Conv(4, 4, (3, 3), strides=2, padding="VALID", rngs=rngs)
    self.head = nnx.Linear(4 * 3 * 3, 5, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.conv2(nnx.relu(self.conv1(x))))
    return self.head(x.reshape(x.shape[0], -1))


def linen_mlp(dtype=jnp.float32):
  k = _keys(2)
  model = _MLP(dtype)
  batch = {"x": jax.random.normal(k[0], (6, 8)).astype(dtype), "y": jnp.arange(6) % 4}
  params = model.init(KEY, batch["x"])
  return (lambda p, b: _xent(model.apply(p, b["x"]), b["y"])), params, batch


def linen_lm():
  ids = jax.random.randint(_keys(1)[0], (5, 7), 0, 37)
  model = _LM()
  params = model.init(KEY, ids[:1])
  batch = {"ids": ids, "next": jnp.roll(ids, -1, axis=1)}
  return (lambda p, b: _xent(model.apply(p, b["ids"]), b["next"]).mean(-1)), params, batch


def nnx_cnn():
  graph, state = nnx.split(_CNN(nnx.Rngs(0)))
  k = _keys(1)
  batch = {"x": jax.random.normal(k[0], (5, 8, 8, 1)), "y": jnp.arange(5)}
  return (lambda s, b: _xent(nnx.merge(graph, s)(b["x"]), b["y"])), state, batch


def eqx_mlp():
  model = eqx.nn.MLP(4, 3, 8, 2, key=KEY)  # holds its activation: a leaf that is no array
  k = _keys(2)
  batch = {"x": jax.random.normal(k[0], (5, 4)), "y": jax.random.normal(k[1], (5, 3))}
  return (lambda m, b: jnp.sum((jax.vmap(m)(b["x"]) - b["y"]) ** 2, -1)), model, batch


def shared_weights():
  """A plain function using its weights several times: one table in row
  lookups of every kind (indexing, `take` clipping and dropping out-of-range
  ids, `dynamic_slice`) and as the output head, one matrix twice. Each
  weight's per-example gradient is the sum over its uses, cross terms
  included."""
  k = _keys(3)
  params = {"e": jax.random.normal(k[0], (300, 8)), "w": 0.5 * jax.random.normal(k[1], (8, 8))}
  batch = {"ids": jax.random.randint(k[2], (7, 6), -2, 302)}

  def loss(p, b):
    ids, e = b["ids"], p["e"]
    rows = e[jnp.clip(ids, 0, 299)] + jnp.take(e, ids, axis=0, mode="clip")
    rows += jnp.take(e, ids, axis=0, mode="fill", fill_value=0)  # out of range: no gradient
    rows += jax.lax.dynamic_slice_in_dim(e, ids[0, 0], 1, axis=0)
    h = jnp.tanh(jnp.tanh(rows @ p["w"]) @ p["w"])
    return jnp.sum((h @ e.T) ** 2, axis=(1, 2))

  return loss, params, batch


MODELS = {
  "linen_mlp": linen_mlp,
  "linen_lm": linen_lm,
  "nnx_cnn": nnx_cnn,
  "eqx_mlp": eqx_mlp,
  "shared_weights": shared_weights,
  "bf16_mlp": functools.partial(linen_mlp, jnp.bfloat16),
}


@functools.cache
def _jitted(model, method, **kwargs):
  """``clipped_grad`` of a model, jitted with the clipping norm traced."""
  loss = MODELS[model]()[0]
  return eqx.filter_jit(
    lambda p, b, clip: jaxclip.clipped_grad(loss, clip, method=method, **kwargs)(p, b)
  )


@functools.cache
def _run(model, method):
  """(info with no clipping, grads and info at the median norm)."""
  _, params, batch = MODELS[model]()
  fn = _jitted(model, method)
  _, free = fn(params, batch, jnp.float32(jnp.inf))
  grads, info = fn(params, batch, jnp.median(free.norms))
  return free, grads, info


def _assert_trees_close(got, want, rtol):
  """Close leaf by leaf, to `rtol` of the largest entry of any leaf."""
  want = [np.asarray(b, np.float32) for b in jax.tree.leaves(want)]
  scale = max(np.max(np.abs(b)) for b in want)
  for a, b in zip(jax.tree.leaves(got), want, strict=True):
    np.testing.assert_allclose(np.asarray(a, np.float32), b, rtol=rtol, atol=rtol * scale)


@pytest.mark.parametrize("model", [m for m in MODELS if m != "bf16_mlp"])
def test_ghost_matches_vmap(model):
  free, grads, info = _run(model, "ghost")
  want_free, want_grads, want = _run(model, "vmap")
  np.testing.assert_allclose(free.norms, want_free.norms, rtol=1e-5)
  np.testing.assert_allclose(info.norms, want.norms, rtol=1e-5)
  np.testing.assert_allclose(info.losses, want.losses, rtol=1e-6)
  assert 0 < int(info.num_clipped) == int(want.num_clipped) < len(info.norms)
  assert int(info.num_nonfinite) == 0
  _assert_trees_close(grads, want_grads, 1e-5)
  assert jax.tree.structure(grads) == jax.tree.structure(want_grads)


def test_auto_is_ghost_when_nothing_falls_back():
  """Then "auto" compiles the program "ghost" does (and matches vmap alike)."""
  loss, params, batch = linen_lm()
  jaxprs = [
    str(jax.make_jaxpr(jaxclip.clipped_grad(loss, 1.0, method=m))(params, batch))
    for m in ("auto", "ghost")
  ]
  assert jaxprs[0] == jaxprs[1]


def _per_example_grads(loss):
  def one(p, example):
    return loss(p, jax.tree.map(lambda x: x[None], example))[0]

  return jax.jit(jax.vmap(jax.grad(one), in_axes=(None, 0)))


def test_vmap_matches_per_example_global_norm_clip():
  loss, params, batch = linen_mlp()
  free, got, info = _run("linen_mlp", "vmap")
  grads = _per_example_grads(loss)(params, batch)
  want, num_clipped = jaxclip.per_example_global_norm_clip(grads, jnp.median(free.norms))
  _assert_trees_close(got, want, 1e-6)
  assert int(info.num_clipped) == int(num_clipped)


def test_bf16_matches_vmap_to_bf16_rounding():
  """vmap rounds each example's gradient to bf16 (the dtype of the layer);
  ghost norms are computed in float32 from the bf16 factors."""
  free, grads, info = _run("bf16_mlp", "ghost")
  want_free, want_grads, want = _run("bf16_mlp", "vmap")
  np.testing.assert_allclose(free.norms, want_free.norms, rtol=4e-3)
  _assert_trees_close(grads, want_grads, 3e-2)
  assert info.norms.dtype == jnp.float32


def test_bf16_ghost_norms_are_the_float32_norms():
  """A bf16 layer whose per-example gradient is known: sum_t x_t (x) 1."""
  x = jax.random.normal(KEY, (4, 5, 8)).astype(jnp.bfloat16)
  w = jax.random.normal(KEY, (8, 3))

  def loss(p, b):
    return jnp.sum((b["x"] @ p["w"].astype(jnp.bfloat16)).astype(jnp.float32), axis=(1, 2))

  exact = np.linalg.norm(np.asarray(x, np.float64).sum(1), axis=-1) * np.sqrt(3)
  _, ghost = jax.jit(jaxclip.clipped_grad(loss, 1.0, method="ghost"))({"w": w}, {"x": x})
  _, vmap = jax.jit(jaxclip.clipped_grad(loss, 1.0, method="vmap"))({"w": w}, {"x": x})
  np.testing.assert_allclose(ghost.norms, exact, rtol=1e-6)
  np.testing.assert_allclose(vmap.norms, exact, rtol=1e-2)


def _shapes_in(jaxpr, out):
  for eqn in jaxpr.eqns:
    out.update(tuple(v.aval.shape) for v in eqn.outvars if hasattr(v.aval, "shape"))
    for value in eqn.params.values():
      for sub in value if isinstance(value, tuple | list) else [value]:
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          _shapes_in(inner, out)
  return out


@pytest.mark.parametrize("model", ["linen_lm", "shared_weights"])
def test_ghost_forms_no_per_example_gradient(model):
  loss, params, batch = MODELS[model]()
  b = len(jax.tree.leaves(batch)[0])
  leaves = [
    (jax.tree_util.keystr(p), x) for p, x in jax.tree_util.tree_flatten_with_path(params)[0]
  ]
  weights = [x.shape for p, x in leaves if "bias" not in p and "scale" not in p]  # not direct
  shapes = {}
  for method in ("ghost", "vmap"):
    jaxpr = jax.make_jaxpr(jaxclip.clipped_grad(loss, 1.0, method=method))(params, batch)
    shapes[method] = _shapes_in(jaxpr.jaxpr, set())
  per_example = {(b, *s) for s in weights}
  assert per_example <= shapes["vmap"]  # the check sees them where they are
  assert not per_example & shapes["ghost"]


class _Layer(nn.Module):
  @nn.compact
  def __call__(self, h, _):
    return jnp.tanh(nn.Dense(6)(h)), None


class _Scanned(nn.Module):
  """Layers under `nn.scan` (parameters enter a `scan`), and a remat layer."""

  @nn.compact
  def __call__(self, x):
    layers = nn.scan(_Layer, variable_axes={"params": 0}, split_rngs={"params": True}, length=2)
    h, _ = layers()(x, None)
    return nn.remat(nn.Dense)(2)(h)


def test_scan_is_refused_by_ghost_and_materialised_by_auto():
  model = _Scanned()
  x = jax.random.normal(KEY, (5, 3, 6))
  params = model.init(KEY, x)

  def loss(p, b):
    return jnp.sum(model.apply(p, b) ** 2, axis=(1, 2))

  with pytest.raises(ValueError, match=r"(?s)method='ghost'.*\['kernel'\].*`scan`.*'auto'"):
    jaxclip.clipped_grad(loss, 1.0, method="ghost")(params, x)
  _assert_auto_matches_vmap(loss, params, x, 0.5)


def _assert_auto_matches_vmap(loss, params, batch, clip):
  """The default method ("auto", forming what ghost cannot measure) gives
  vmap's norms and clipped sum."""
  got, info = jax.jit(jaxclip.clipped_grad(loss, clip))(params, batch)
  want, want_info = jax.jit(jaxclip.clipped_grad(loss, clip, method="vmap"))(params, batch)
  np.testing.assert_allclose(info.norms, want_info.norms, rtol=1e-5)
  _assert_trees_close(got, want, 1e-5)


def test_nonfinite_examples_contribute_zero_and_are_counted():
  loss, params, batch = linen_mlp()
  x = batch["x"].at[2, 0].set(jnp.nan)  # a NaN gradient and loss
  penalty = jnp.zeros(6).at[4].set(jnp.inf)  # an infinite loss, a finite gradient

  def loss_fn(p, b):
    return loss(p, b) + b["penalty"]

  bad = {**batch, "x": x, "penalty": penalty}
  per_example = _per_example_grads(loss_fn)(params, bad)
  keep = jnp.array([1, 1, 0, 1, 0, 1], bool)
  finite = jax.tree.map(
    lambda g: jnp.where(keep.reshape(-1, *[1] * (g.ndim - 1)), g, 0), per_example
  )
  want, num_clipped = jaxclip.per_example_global_norm_clip(finite, 0.5)
  for method in ("ghost", "vmap"):
    grads, info = jax.jit(jaxclip.clipped_grad(loss_fn, 0.5, method=method))(params, bad)
    assert int(info.num_nonfinite) == 2
    assert int(info.num_clipped) == int(num_clipped) + 2
    assert np.isnan(info.norms[2]) and np.isfinite(info.norms[4])
    _assert_trees_close(grads, want, 1e-6)


def _clipped_both_ways(loss, params, batch, clip):
  """(summed gradient, norms) of ghost and vmap clipping, and the norms of
  JAX's own per-example gradients, in float64."""
  out = {
    m: jax.jit(jaxclip.clipped_grad(loss, clip, method=m))(params, batch) for m in ("ghost", "vmap")
  }
  grads = jax.vmap(
    jax.grad(lambda p, b: loss(p, jax.tree.map(lambda x: x[None], b))[0]), (None, 0)
  )(params, batch)
  flat = np.concatenate(
    [np.asarray(g, np.float64).reshape(g.shape[0], -1) for g in jax.tree.leaves(grads)], 1
  )
  return out, np.linalg.norm(flat, axis=1)


def test_an_out_of_range_index_gets_the_gradient_jax_gives_it():
  # `E[ids]` gathers in PROMISE_IN_BOUNDS mode: the forward pass clamps an
  # out-of-range id, but the gradient's scatter drops its row. The norm must
  # be that of the gradient summed (it counted the clamped row: norm 0 and
  # a contribution of 20 for a clip norm of 1).
  params = {"e": jnp.zeros((11, 4))}

  def loss(p, b):
    rows = p["e"][b["ids"]]
    return rows[:, 0] @ jnp.full(4, 10.0) - rows[:, 1] @ jnp.full(4, 10.0)

  batch = {"ids": jnp.array([[10, 11], [3, 10], [-1, 12]])}
  out, want = _clipped_both_ways(loss, params, batch, 1.0)
  for method, (grads, info) in out.items():
    np.testing.assert_allclose(info.norms, want, rtol=1e-6, err_msg=method)
    assert float(jnp.linalg.norm(grads["e"])) <= 3.0 * (1 + 1e-6)
  _assert_trees_close(out["ghost"][0], out["vmap"][0], 1e-6)


@pytest.mark.parametrize("scale", [1e19, 1e-19, 1e20])
def test_ghost_norms_of_unbalanced_factors(scale):
  # Activations of `scale` and cotangents of 1 / `scale`: the gradient is
  # moderate, but the Gram products of the factors taken alone underflow or
  # overflow float32 (the norm was 0, unclipped, or NaN, dropped).
  x = jnp.array([[[1.0, 1.0, 1.0, 1.0], [1.0, -1.0, 1.0, -1.0]]] * 2)

  def loss(p, b):
    return jnp.sum(jnp.tanh((b["x"] * b["a"]) @ p["w"] * b["c"]), (1, 2))

  batch = {"x": x, "a": jnp.array([scale, 1.0]), "c": jnp.array([1 / scale, 1.0])}
  out, want = _clipped_both_ways(loss, {"w": jnp.eye(4)}, batch, 0.5)
  for method, (_, info) in out.items():
    np.testing.assert_allclose(info.norms, want, rtol=1e-5, err_msg=method)
    assert int(info.num_clipped) == 2 and int(info.num_nonfinite) == 0
  _assert_trees_close(out["ghost"][0], out["vmap"][0], 1e-5)


@pytest.mark.parametrize("size", [1e-20, 1e-30, 1e20, 1e30])
@pytest.mark.parametrize("layer", ["dense", "sequence", "lookup", "materialized"])
def test_tiny_and_huge_per_example_norms_are_measured(layer, size):
  # Per-example norms whose squares leave float32 (norm 2e-20: squared norm
  # 4e-40, flushed to 0, and the example went into the sum unclipped; norm
  # 2e20: squared norm inf, and the example was dropped as non-finite).
  if layer == "dense":  # T = 1: ghost norms of one position
    params, batch = {"v": jnp.ones((4, 1))}, jnp.full((2, 1, 4), size)
  elif layer == "sequence":  # T = 6 positions
    params, batch = {"v": jnp.ones((4, 1))}, jnp.full((2, 6, 4), size)
  elif layer == "lookup":
    params, batch = {"e": jnp.full((5, 4), 0.5)}, jnp.array([[1, 2], [3, 3]])
  else:  # T**2 > K_a * K_b: the gradient is formed, then measured
    params, batch = {"v": jnp.ones((2, 2))}, jnp.full((2, 8, 2), size)

  def loss(p, b):
    if layer == "lookup":
      return jnp.sum(p["e"][b] * size, (1, 2))
    return jnp.sum(b @ p["v"], (1, 2))

  clip = size * 1e-2  # below every norm: each example is clipped to it
  out, want = _clipped_both_ways(loss, params, batch, clip)
  assert np.all(np.isfinite(want)) and np.all(want > clip)
  for method, (grads, info) in out.items():
    np.testing.assert_allclose(info.norms, want, rtol=1e-5, err_msg=method)
    assert int(info.num_clipped) == 2 and int(info.num_nonfinite) == 0, method
    total = np.sqrt(sum(np.sum(np.asarray(g, np.float64) ** 2) for g in jax.tree.leaves(grads)))
    assert total <= 2 * clip * (1 + 1e-5), method


def test_a_formed_gradient_at_the_top_of_the_float32_range():
  # An entry of 2e38 in a formed (fallback) gradient: scaled by the largest
  # power of two float32 holds, and the norm undone by the same one (it was
  # doubled to inf and the example dropped).
  x = jnp.zeros((2, 6, 4)).at[:, 0, 0].set(2e38)
  out, want = _clipped_both_ways(
    lambda p, b: jnp.sum(b @ p["v"], (1, 2)), {"v": jnp.ones((4, 1))}, x, 1e38
  )
  for method, (_, info) in out.items():
    np.testing.assert_allclose(info.norms, want, rtol=1e-6, err_msg=method)
    assert int(info.num_nonfinite) == 0 and int(info.num_clipped) == 2, method


def test_one_huge_position_does_not_flush_the_others():
  # Position 0 holds activations of 1e21 (padding) with a zero cotangent,
  # or activations of 1e21 with cotangents of 1e-21: scaling each side by its
  # largest entry alone flushed the other positions' products to 0 (norm 0,
  # unclipped).
  x = jnp.array([[[1e21, 1e21, 1e21, 1e21], [1.0, 2.0, 0.0, 1.0], [3.0, -1.0, 1.0, 0.0]]] * 2)

  def loss(p, b):
    y = b["x"] @ p["w"]
    weight = jnp.array([0.0, 1.0, 1.0])[:, None] + b["c"] * jnp.array([1.0, 0.0, 0.0])[:, None]
    return jnp.sum(y * weight, (1, 2))

  batch = {"x": x, "c": jnp.array([0.0, 1e-21])}
  out, want = _clipped_both_ways(loss, {"w": jnp.eye(4)}, batch, 1.0)  # T**2 < K**2: ghost
  assert want.min() > 1
  for method, (grads, info) in out.items():
    np.testing.assert_allclose(info.norms, want, rtol=1e-5, err_msg=method)
    assert int(info.num_clipped) == 2
    assert float(jnp.linalg.norm(grads["w"])) <= 2.0 * (1 + 1e-5)


def test_a_dropped_lookup_row_does_not_flush_the_others():
  # An out-of-range id (dropped from the gradient) whose cotangent is 1e21:
  # it set the scale of the cotangents' side, and the valid rows' products
  # underflowed (norm 0, unclipped).
  table = jnp.arange(40.0).reshape(10, 4) / 10
  weight = jnp.array([1e21, 1.0, 1.0])

  def loss(p, b):
    rows = p["e"].at[b].get(mode="fill", fill_value=0.0)
    return jnp.sum(rows * weight[:, None], (1, 2))

  out, want = _clipped_both_ways(loss, {"e": table}, jnp.array([[10, 1, 2], [12, 3, 5]]), 1.0)
  for method, (_, info) in out.items():
    np.testing.assert_allclose(info.norms, want, rtol=1e-6, err_msg=method)
    assert int(info.num_clipped) == 2


def test_a_nonfinite_activation_with_a_zero_cotangent_drops_the_example():
  # The gradient is NaN (0 * inf) though the loss is finite, as `vmap` finds.
  def loss(p, b):
    y = b @ p["w"]
    return jnp.sum(jnp.where(jnp.array([False, True, True])[:, None], y, 0.0), (1, 2))

  rows = [[1.0, 2.0, 0.0, 1.0], [3.0, -1.0, 1.0, 0.0]]
  x = jnp.array([[[v, 1, 1, 1], *rows] for v in (jnp.nan, jnp.inf, 1e30)])
  for method in ("ghost", "vmap"):
    grads, info = jax.jit(jaxclip.clipped_grad(loss, 1.0, method=method))({"w": jnp.eye(4)}, x)
    np.testing.assert_array_equal(np.isfinite(info.norms), [False, False, True], err_msg=method)
    np.testing.assert_allclose(info.norms[2], np.sqrt(76.0), rtol=1e-6, err_msg=method)
    assert int(info.num_nonfinite) == 2
    assert bool(jnp.all(jnp.isfinite(grads["w"])))


def test_a_slice_at_a_constant_start_is_a_lookup():
  table = jnp.arange(12.0).reshape(4, 3) / 10

  def loss(p, b):
    row = lax.dynamic_slice(p["e"], (2, 0), (1, 3))  # a literal start
    return jnp.sum((row * b) ** 2, (1, 2))

  out, want = _clipped_both_ways(loss, {"e": table}, jnp.ones((2, 1, 3)), 0.1)
  for method, (_, info) in out.items():
    np.testing.assert_allclose(info.norms, want, rtol=1e-6, err_msg=method)
  _assert_trees_close(out["ghost"][0], out["vmap"][0], 1e-6)


def _stretched(kind):
  """A weight whose axis of size 1 is broadcast (repeating its entries)
  before a dense, conv or lookup use: the loss, params and batch."""
  k = _keys(4)
  if kind == "dense":
    params = {"w": jax.random.normal(k[0], (1, 7))}
    batch = jax.random.normal(k[1], (4, 5, 6))
    return (
      (lambda p, b: jnp.sum(jnp.tanh(b @ jnp.broadcast_to(p["w"], (6, 7))), (1, 2))),
      params,
      batch,
    )
  if kind == "conv":
    params = {"k": jax.random.normal(k[0], (1, 1, 3, 4))}
    batch = jax.random.normal(k[1], (4, 6, 6, 3))
    dims = ("NHWC", "HWIO", "NHWC")

    def loss(p, b):
      kernel = jnp.broadcast_to(p["k"], (3, 3, 3, 4))
      out = lax.conv_general_dilated(b, kernel, (1, 1), "SAME", dimension_numbers=dims)
      return jnp.sum(jnp.tanh(out), (1, 2, 3))

    return loss, params, batch
  params = {"e": jax.random.normal(k[0], (5, 1))}
  batch = jax.random.randint(k[1], (4, 6), 0, 5)
  return (lambda p, b: jnp.sum(jnp.sin(jnp.broadcast_to(p["e"], (5, 4))[b]), (1, 2))), params, batch


@pytest.mark.parametrize("kind", ["dense", "conv", "lookup"])
def test_a_weight_broadcast_along_an_axis_of_size_one_is_measured_whole(kind):
  # Each entry of the weight is used several times: its gradient is the sum
  # of those uses, not a gradient of the broadcast copy. Ghost cannot measure
  # it without forming it (an error); auto forms it and matches vmap.
  loss, params, batch = _stretched(kind)
  with pytest.raises(ValueError, match=r"(?s)method='ghost'.*broadcast"):
    jaxclip.clipped_grad(loss, 1.0, method="ghost")(params, batch)
  _assert_auto_matches_vmap(loss, params, batch, 0.1)


def test_a_real_weight_on_complex_activations_is_not_ghost_clipped():
  w = jnp.eye(2)
  x = jnp.array([[[1j, 0.0], [0.0, 1j]], [[1.0, 1j], [2j, 0.0]]], jnp.complex64)

  def loss(p, b):
    return jnp.sum(jnp.abs(b @ p["w"]) ** 2, (1, 2))

  with pytest.raises(ValueError, match=r"params\['w'\]: its use by `dot_general` is complex"):
    jax.jit(jaxclip.clipped_grad(loss, 1.0, method="ghost"))({"w": w}, x)
  grads = jax.vmap(jax.grad(lambda p, b: loss(p, b[None])[0]), (None, 0))({"w": w}, x)["w"]
  want = np.linalg.norm(np.asarray(grads).reshape(2, -1), axis=1)
  for method in ("auto", "vmap"):
    got, info = jax.jit(jaxclip.clipped_grad(loss, 1.0, method=method))({"w": w}, x)
    np.testing.assert_allclose(info.norms, want, rtol=1e-6, err_msg=method)
    assert float(jnp.linalg.norm(got["w"])) <= 2.0 * (1 + 1e-6)


def test_has_aux_returns_per_example_aux():
  w = jax.random.normal(KEY, (3, 2))
  x = jax.random.normal(KEY, (4, 3))

  def loss_fn(p, b):
    out = b @ p
    losses = jnp.sum(out**2, -1)
    return losses, {"out": out, "mean": losses.mean()}

  for method in ("ghost", "vmap"):
    fn = jax.jit(jaxclip.clipped_grad(loss_fn, 1.0, method=method, has_aux=True))
    _, info = fn(w, x)
    np.testing.assert_allclose(info.aux["out"], x @ w, rtol=1e-6)  # as for the whole batch
    np.testing.assert_allclose(info.aux["mean"], info.losses, rtol=1e-6)  # one per example
  assert _run("linen_mlp", "ghost")[2].aux is None


def test_microbatches_give_the_same_result():
  _, params, batch = shared_weights()
  free, grads, info = _run("shared_weights", "vmap")
  parts = _jitted("shared_weights", "vmap", microbatch_size=3)  # 7 examples: 3 + 3, then 1
  got, got_info = parts(params, batch, jnp.median(free.norms))
  np.testing.assert_allclose(got_info.norms, info.norms, rtol=1e-6)
  assert int(got_info.num_clipped) == int(info.num_clipped)
  _assert_trees_close(got, grads, 1e-5)


def test_args_fixed_leaves_and_unused_parameters():
  params = {"w": jnp.ones((3, 2)), "unused": jnp.ones(4), "step": jnp.int32(3), "name": "mlp"}

  def loss(p, b, scale, square):
    assert p["name"] == "mlp"
    y = b @ p["w"] * scale
    return jnp.sum(y**2 if square else y, axis=-1)

  x = jax.random.normal(KEY, (4, 3))
  want = jax.grad(lambda w: loss({**params, "w": w}, x, 2.0, True).sum())(params["w"])
  for method in ("ghost", "vmap"):
    fn = eqx.filter_jit(jaxclip.clipped_grad(loss, 1e6, method=method))
    grads, _ = fn(params, x, jnp.float32(2.0), True)  # the bool is static under filter_jit
    np.testing.assert_allclose(grads["w"], want, rtol=1e-5)
    np.testing.assert_array_equal(grads["unused"], 0)
    assert grads["step"] is None and grads["name"] is None


def test_python_numbers_in_params_are_held_fixed_and_alone_refused():
  """Python floats are not differentiated (as with `equinox.filter_grad`);
  params made of them alone would train nothing, silently: an error."""

  def loss(p, x):
    return p["w"] * x + p["b"]

  x = jnp.array([10.0, 20.0, 30.0])
  fn = jaxclip.clipped_grad(loss, 1e6)
  grads, info = fn({"w": jnp.float32(2.5), "b": 1.0}, x)  # under eqx.filter_jit alike
  np.testing.assert_allclose(grads["w"], 60.0)
  assert grads["b"] is None
  np.testing.assert_allclose(info.norms, [10.0, 20.0, 30.0])
  # `jax.jit` turns every argument into an array: then `b` is differentiated.
  grads, _ = jax.jit(fn)({"w": jnp.float32(2.5), "b": 1.0}, x)
  np.testing.assert_allclose(grads["b"], 3.0)
  with pytest.raises(ValueError, match=r"(?s)no floating-point array.*\['b'\], \['w'\].*asarray"):
    jaxclip.clipped_grad(loss, 1.0)({"w": 2.5, "b": 1.0}, x)
  with pytest.raises(ValueError, match="no floating-point array"):
    jaxclip.clipped_grad(loss, 1.0, method="ghost")({"w": jnp.int32(2), "b": jnp.int32(1)}, x)


def test_mixing_examples_shows_in_losses():
  """Each example is computed alone: a mean over the batch sees one example."""

  def loss(p, x):
    centred = x - x.mean(axis=0)  # mixes the examples of the batch
    return jnp.sum((centred * p["w"]) ** 2, -1)

  params, x = {"w": jnp.ones(3)}, jax.random.normal(KEY, (4, 3))
  _, info = jax.jit(jaxclip.clipped_grad(loss, 1.0))(params, x)
  np.testing.assert_array_equal(info.losses, 0)  # one example, centred on itself
  assert not np.allclose(loss(params, x), info.losses)


def test_argument_errors():
  loss, params, batch = linen_mlp()
  with pytest.raises(ValueError, match="`method`.*'fast'"):
    jaxclip.clipped_grad(loss, 1.0, method="fast")
  with pytest.raises(ValueError, match="`l2_norm_clip` must be >= 0, got -1"):
    jaxclip.clipped_grad(loss, -1.0)
  with pytest.raises(ValueError, match="`l2_norm_clip` is NaN"):
    jaxclip.clipped_grad(loss, float("nan"))
  with pytest.raises(TypeError, match="`loss_fn` must be a function"):
    jaxclip.clipped_grad("loss", 1.0)
  with pytest.raises(ValueError, match="`microbatch_size` must be >= 1"):
    jaxclip.clipped_grad(loss, 1.0, microbatch_size=0)
  mean_loss = jaxclip.clipped_grad(lambda p, b: loss(p, b).mean(), 1.0)
  with pytest.raises(ValueError, match=r"shape \[B\].*here 6.*returned shape \(\)"):
    mean_loss(params, batch)
  with pytest.raises(ValueError, match=r"same leading.*batch\['x'\]: \(6, 8\).*\(5,\)"):
    jaxclip.clipped_grad(loss, 1.0)(params, {"x": batch["x"], "y": batch["y"][:5]})
  with pytest.raises(TypeError, match="has_aux=True"):
    jaxclip.clipped_grad(lambda p, b: (loss(p, b), None), 1.0)(params, batch)
  with pytest.raises(TypeError, match=r"\(losses, aux\)"):
    jaxclip.clipped_grad(loss, 1.0, has_aux=True)(params, batch)


def test_traced_l2_norm_clip_of_zero_zeroes_everything():
  _, params, batch = MODELS["linen_mlp"]()
  grads, info = _jitted("linen_mlp", "ghost")(params, batch, jnp.float32(0.0))
  assert int(info.num_clipped) == 6
  assert all(np.all(np.asarray(g) == 0) for g in jax.tree.leaves(grads))


@pytest.mark.multidevice
def test_sharded_batch_is_not_gathered():
  here = pathlib.Path(__file__).parent
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env["XLA_FLAGS"] = (
    env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
  ).strip()
  result = subprocess.run(
    [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "checks_ghost.py"],
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
    cwd=here / "multidevice",
  )
  assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
  assert " passed" in result.stdout
