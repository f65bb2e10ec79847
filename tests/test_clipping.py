"""Tests of the fixed-threshold clippers (`jaxclip._clipping`)."""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxclip


def _tree(scale=1.0):
  key = jax.random.key(0)
  k1, k2 = jax.random.split(key)
  return {
    "w": scale * jax.random.normal(k1, (6, 4)),
    "b": scale * jax.random.normal(k2, (4,)),
    "step": jnp.array(3, jnp.int32),
  }


def _update(tx, g, params=None):
  return tx.update(g, tx.init(g if params is None else params), params)


class TestClipByGlobalNorm:
  def test_scales_down_to_threshold_keeping_direction(self):
    g = _tree(10.0)
    out, state = _update(jaxclip.clip_by_global_norm(1.0), g)
    assert float(state.norm) > 1.0 and bool(state.clipped)
    np.testing.assert_allclose(jaxclip.global_norm(out), 1.0, rtol=1e-6)
    np.testing.assert_allclose(out["w"], g["w"] * state.scale, rtol=1e-6)
    assert out["step"] is g["step"]
    assert int(state.count) == 1 and float(state.threshold) == 1.0

  def test_identity_at_and_below_threshold(self):
    g = {"a": jnp.array([3.0, 4.0])}
    for max_norm in (5.0, 6.0):
      out, state = _update(jaxclip.clip_by_global_norm(max_norm), g)
      np.testing.assert_array_equal(out["a"], g["a"])
      assert not bool(state.clipped) and float(state.scale) == 1.0

  def test_matches_optax(self):
    g = _tree(10.0)
    del g["step"]
    ours, _ = _update(jaxclip.clip_by_global_norm(2.0), g)
    theirs, _ = optax.clip_by_global_norm(2.0).update(g, optax.EmptyState())
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), ours, theirs)

  @pytest.mark.parametrize("max_norm", [0.0, 1.0])
  def test_zero_gradients_stay_zero_without_nan(self, max_norm):
    g = {"a": jnp.zeros((3,)), "b": jnp.zeros((2, 2), jnp.bfloat16)}
    out, state = _update(jaxclip.clip_by_global_norm(max_norm), g)
    for leaf in jax.tree.leaves(out):
      assert not bool(jnp.any(leaf != 0))
    assert float(state.norm) == 0.0 and float(state.scale) == 1.0

  def test_zero_threshold_zeroes_updates(self):
    out, _ = _update(jaxclip.clip_by_global_norm(0.0), {"a": jnp.array([1.0, -2.0])})
    np.testing.assert_array_equal(out["a"], [0.0, 0.0])

  def test_gradient_through_update_finite_at_zero(self):
    tx = jaxclip.clip_by_global_norm(1.0)

    def f(x):
      out, _ = tx.update({"a": x}, tx.init({"a": x}))
      return jnp.sum(out["a"] ** 2) + jaxclip.global_norm(out)

    grad = jax.grad(f)(jnp.zeros(4))
    assert bool(jnp.all(jnp.isfinite(grad)))

  @pytest.mark.parametrize("bad", [jnp.inf, jnp.nan])
  def test_non_finite_norm_passes_updates_through(self, bad):
    g = {"a": jnp.array([1.0, bad]), "b": jnp.array([2.0, 3.0])}
    out, state = _update(jaxclip.clip_by_global_norm(1.0), g)
    np.testing.assert_array_equal(out["b"], g["b"])  # finite entries not zeroed
    np.testing.assert_array_equal(out["a"], g["a"])
    assert not bool(state.clipped) and not bool(jnp.isfinite(state.norm))

  def test_ord_one_and_inf(self):
    g = {"a": jnp.array([3.0, -4.0])}
    out, state = _update(jaxclip.clip_by_global_norm(3.5, ord=1), g)
    np.testing.assert_allclose(out["a"], g["a"] * 0.5, rtol=1e-6)
    out, state = _update(jaxclip.clip_by_global_norm(2.0, ord=math.inf), g)
    np.testing.assert_allclose(out["a"], g["a"] * 0.5, rtol=1e-6)

  def test_schedule_threshold(self):
    tx = jaxclip.clip_by_global_norm(lambda step: 1.0 + step)
    g = {"a": jnp.array([30.0, 40.0])}
    state = tx.init(g)
    norms = []
    for _ in range(3):
      out, state = tx.update(g, state)
      norms.append(float(jaxclip.global_norm(out)))
    np.testing.assert_allclose(norms, [1.0, 2.0, 3.0], rtol=1e-6)
    assert float(state.threshold) == 3.0

  def test_inject_hyperparams_on_mixed_dtypes(self):
    tx = optax.inject_hyperparams(jaxclip.clip_by_global_norm)(max_norm=1.0)
    g = {"a": jnp.full((3,), 2.0, jnp.bfloat16), "b": jnp.full((4,), 2.0)}
    out, state = jax.jit(tx.update)(g, tx.init(g))
    assert out["a"].dtype == jnp.bfloat16 and out["b"].dtype == jnp.float32
    np.testing.assert_allclose(jaxclip.global_norm(out), 1.0, rtol=1e-2)
    state.hyperparams["max_norm"] = jnp.asarray(100.0)
    out, _ = jax.jit(tx.update)(g, state)
    np.testing.assert_array_equal(out["b"], g["b"])

  @pytest.mark.parametrize("foreign", [optax.EmptyState(), None, ()])
  def test_accepts_stateless_states(self, foreign):
    g = {"a": jnp.array([3.0, 4.0])}
    out, state = jaxclip.clip_by_global_norm(1.0).update(g, foreign)
    np.testing.assert_allclose(out["a"], [0.6, 0.8], rtol=1e-6)
    assert state is foreign

  def test_schedule_with_stateless_state_is_an_error(self):
    tx = jaxclip.clip_by_global_norm(lambda n: 1.0)
    with pytest.raises(ValueError, match="schedule"):
      tx.update({"a": jnp.ones(2)}, optax.EmptyState())

  @pytest.mark.parametrize("bad", [-1.0, float("nan"), np.array([-2.0])])
  def test_bad_threshold(self, bad):
    with pytest.raises(ValueError, match="max_norm"):
      jaxclip.clip_by_global_norm(bad)

  def test_bad_threshold_type(self):
    with pytest.raises(TypeError, match="max_norm"):
      jaxclip.clip_by_global_norm("1.0")

  def test_masked_nodes_and_none_pass_through(self):
    params = {"a": jnp.ones(2), "b": jnp.ones(3), "c": None}
    tx = optax.masked(jaxclip.clip_by_global_norm(1.0), {"a": True, "b": False, "c": False})
    g = {"a": jnp.array([3.0, 4.0]), "b": jnp.array([30.0, 0, 0]), "c": None}
    out, _ = tx.update(g, tx.init(params))
    np.testing.assert_allclose(out["a"], [0.6, 0.8], rtol=1e-6)
    np.testing.assert_array_equal(out["b"], g["b"])
    assert out["c"] is None


class TestClipByNorm:
  def test_tensorflow_worked_example(self):
    out, state = _update(jaxclip.clip_by_norm(5.0), {"t": jnp.array([-2.0, 3.0, 6.0])})
    np.testing.assert_allclose(out["t"], np.array([-2.0, 3.0, 6.0]) * 5 / 7, rtol=1e-6)
    np.testing.assert_allclose(state.norm, [7.0], rtol=1e-6)
    np.testing.assert_array_equal(state.clipped, [True])

  def test_each_leaf_separately(self):
    g = {"a": jnp.array([3.0, 4.0]), "b": jnp.array([0.3, 0.4]), "i": jnp.arange(2)}
    out, state = _update(jaxclip.clip_by_norm(1.0), g)
    np.testing.assert_allclose(out["a"], [0.6, 0.8], rtol=1e-6)
    np.testing.assert_array_equal(out["b"], g["b"])
    np.testing.assert_array_equal(out["i"], g["i"])
    assert state.norm.shape == (2,)  # one entry per floating leaf

  def test_many_small_leaves(self):
    g = {f"p{i:03d}": jnp.full((4,), float(i)) for i in range(100)}
    out, state = jax.jit(jaxclip.clip_by_norm(4.0).update)(g, jaxclip.clip_by_norm(4.0).init(g))
    for i in range(100):
      expected = np.full(4, float(i)) * min(1.0, 4.0 / (2.0 * i)) if i else np.zeros(4)
      np.testing.assert_allclose(out[f"p{i:03d}"], expected, rtol=1e-6)
    np.testing.assert_allclose(state.norm, 2.0 * np.arange(100), rtol=1e-6)

  def test_axis(self):
    g = jnp.array([[3.0, 0.3], [4.0, 0.4]])
    out, state = _update(jaxclip.clip_by_norm(1.0, axis=0), g)
    np.testing.assert_allclose(out, [[0.6, 0.3], [0.8, 0.4]], rtol=1e-6)
    np.testing.assert_allclose(state.norm, [5.0], rtol=1e-6)
    np.testing.assert_allclose(state.scale, [0.2], rtol=1e-6)

  @pytest.mark.parametrize("axis", [0, -1, (0, 1)])
  def test_axis_with_a_leaf_of_no_units(self, axis):
    g = {"w": jnp.array([[3.0, 0.3], [4.0, 0.4]]), "e": jnp.zeros((3, 0)), "f": jnp.zeros((0, 2))}
    tx = jaxclip.clip_by_norm(1.0, axis=axis)
    want, _ = _update(jaxclip.clip_by_norm(1.0, axis=axis), {"w": g["w"]})
    for update in (tx.update, jax.jit(tx.update)):
      out, state = update(g, tx.init(g))
      np.testing.assert_allclose(out["w"], want["w"], rtol=1e-6)
      assert out["e"].shape == (3, 0) and out["f"].shape == (0, 2)
      np.testing.assert_array_equal(state.norm[:2], 0)  # leaves e, f (sorted keys)
      np.testing.assert_array_equal(state.scale[:2], 1)
      assert not state.clipped[:2].any()

  def test_axis_out_of_range(self):
    with pytest.raises(ValueError, match="axis=2"):
      _update(jaxclip.clip_by_norm(1.0, axis=2), {"a": jnp.ones((2, 2))})

  def test_bad_axis_type(self):
    with pytest.raises(TypeError, match="axis"):
      jaxclip.clip_by_norm(1.0, axis="0")

  def test_injected_axis_says_to_make_it_static(self):
    tx = optax.inject_hyperparams(jaxclip.clip_by_norm)(max_norm=1.0, axis=0)
    with pytest.raises(TypeError, match=r"static_args=\('axis',\)"):
      tx.init({"a": jnp.ones((2, 2))})


class TestClipByValue:
  def test_bounds_and_record(self):
    g = {"a": jnp.array([-3.0, 0.2, 2.0, jnp.inf, -jnp.inf])}
    out, state = _update(jaxclip.clip_by_value(-1.0, 0.5), g)
    np.testing.assert_array_equal(out["a"], np.float32([-1.0, 0.2, 0.5, 0.5, -1.0]))
    np.testing.assert_allclose(state.clipped_fraction, 0.8, rtol=1e-6)
    assert bool(state.clipped) and float(state.max_abs) == math.inf

  def test_nan_stays_nan(self):
    out, _ = _update(jaxclip.clip(1.0), jnp.array([jnp.nan, 5.0]))
    assert bool(jnp.isnan(out[0])) and float(out[1]) == 1.0

  def test_clip_matches_optax(self):
    g = _tree(3.0)
    del g["step"]  # optax also clips integer leaves; jaxclip leaves them alone
    ours, _ = _update(jaxclip.clip(1.0), g)
    theirs, _ = optax.clip(1.0).update(g, optax.EmptyState())
    jax.tree.map(np.testing.assert_array_equal, ours, theirs)

  def test_min_above_max(self):
    with pytest.raises(ValueError, match="min_value"):
      jaxclip.clip_by_value(1.0, -1.0)

  def test_negative_max_delta(self):
    with pytest.raises(ValueError, match="max_delta"):
      jaxclip.clip(-0.1)

  def test_bf16_preserved(self):
    out, _ = _update(jaxclip.clip(1.0), jnp.array([3.0, -0.5], jnp.bfloat16))
    assert out.dtype == jnp.bfloat16


class TestClipByBlockRMS:
  def test_matches_optax(self):
    g = _tree(5.0)
    del g["step"]
    ours, state = _update(jaxclip.clip_by_block_rms(1.0), g)
    theirs, _ = optax.clip_by_block_rms(1.0).update(g, optax.EmptyState())
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), ours, theirs)
    for leaf in jax.tree.leaves(ours):
      assert float(jnp.sqrt(jnp.mean(leaf**2))) <= 1.0 + 1e-6

  def test_zero_update_zero_threshold(self):
    out, _ = _update(jaxclip.clip_by_block_rms(0.0), jnp.zeros(3))
    np.testing.assert_array_equal(out, np.zeros(3))

  @pytest.mark.parametrize("threshold", [1.0, 0.5])
  @pytest.mark.parametrize("jit", [False, True])
  def test_rms_as_optax_computes_it(self, threshold, jit):
    # The RMS is sqrt(mean(g**2)), rounded as optax's; the clipped entries
    # are a product, where optax divides: at most 1 ulp apart.
    u = (jnp.array([500.0, 5.0]),)
    tx = jaxclip.clip_by_block_rms(threshold)
    update = jax.jit(tx.update) if jit else tx.update
    ours, state = update(u, tx.init(u))
    theirs, _ = optax.clip_by_block_rms(threshold).update(u, optax.EmptyState())
    assert float(state.norm[0]) == float(jnp.sqrt(jnp.mean(u[0] ** 2)))
    np.testing.assert_array_max_ulp(np.asarray(ours[0]), np.asarray(theirs[0]), maxulp=1)
    np.testing.assert_array_max_ulp(
      np.sqrt(np.mean(np.asarray(ours[0]) ** 2, dtype=np.float32)), np.float32(threshold), maxulp=2
    )

  @pytest.mark.parametrize("value", [1e25, 1e-21])
  def test_rms_of_extreme_values(self, value):
    # The mean is taken of the rescaled sums: no overflow, no underflow.
    x = jnp.full((1000,), value)
    tx = jaxclip.clip_by_block_rms(1.0)
    _, state = tx.update(x, tx.init(x))
    np.testing.assert_allclose(state.norm, [value], rtol=1e-6)


def test_clip_by_value_counts_in_the_leaf_dtype():
  x = jnp.array([0.1, 0.05], jnp.bfloat16)  # 0.1 in bf16 is the bf16 bound itself
  tx = jaxclip.clip_by_value(-0.1, 0.1)
  out, state = tx.update(x, tx.init(x))
  np.testing.assert_array_equal(out, x)
  assert not bool(state.clipped) and float(state.clipped_fraction) == 0.0


@pytest.mark.parametrize(
  ("bounds", "values", "outside"),
  [
    ((-1.0, 1.0), [0.5, -1.0, 1.0], 0),  # on the bounds: inside, no count taken
    ((-1.0, 2.0), [0.5, -1.5, 1.5], 1),  # the nearer bound is reached
    ((0.5, 2.0), [0.6, 1.0, 1.5], 1),  # 0 lies outside: the bf16 0.25 is out
    ((-2.0, -0.5), [-1.0, -1.5, 0.0], 2),
    ((-1.0, 1.0), [0.5, jnp.nan, 0.0], math.nan),
  ],
)
def test_clip_by_value_counts_whenever_an_entry_may_be_outside(bounds, values, outside):
  x = {"a": jnp.array(values), "b": jnp.array([0.25], jnp.bfloat16)}
  tx = jaxclip.clip_by_value(*bounds)
  _, state = jax.jit(tx.update)(x, tx.init(x))
  np.testing.assert_allclose(state.clipped_fraction, outside / 4, rtol=1e-6)


def test_clip_counts_entries_outside_a_bound_rounded_in_the_leaf_dtype():
  # 1.003 is 1.0 in bf16: the bf16 entry 1.0078125 is outside, the f32 leaf's
  # entries are not, and the count must not be skipped.
  x = {"a": jnp.array([1.0078125], jnp.bfloat16), "b": jnp.array([1.0, 0.5])}
  _, state = _update(jaxclip.clip(1.003), x)
  np.testing.assert_allclose(state.clipped_fraction, 1 / 3, rtol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float8_e4m3fn, np.float32])
def test_thresholds_of_any_floating_dtype_are_accepted(dtype):
  g = {"w": jnp.array([3.0, 4.0])}
  for tx in (
    jaxclip.clip_by_global_norm(jnp.asarray(1.0, dtype)),
    jaxclip.clip_by_norm(np.asarray(1.0, dtype)),
    jaxclip.clip(jnp.asarray(1.0, dtype)),
  ):
    out, _ = tx.update(g, tx.init(g))
    assert float(jnp.max(jnp.abs(out["w"]))) <= 1.0 + 1e-6


def test_non_numeric_threshold_is_a_type_error():
  with pytest.raises(TypeError, match="max_norm"):
    jaxclip.clip_by_global_norm(np.asarray("1.0"))


SCALAR_THRESHOLDS = {
  "clip_by_global_norm": ("max_norm", jaxclip.clip_by_global_norm),
  "clip_by_norm": ("max_norm", jaxclip.clip_by_norm),
  "clip_by_block_rms": ("threshold", jaxclip.clip_by_block_rms),
  "adaptive_grad_clip": ("clipping", jaxclip.adaptive_grad_clip),
}


@pytest.mark.parametrize("name", sorted(SCALAR_THRESHOLDS))
@pytest.mark.parametrize("shape", [(2,), (1,), (1, 1)])
def test_a_threshold_that_is_not_a_scalar_is_an_error(name, shape):
  """optax raises for a non-scalar `max_norm`; unchecked, one was broadcast
  into 0-d leaves (changing their shape) or read as one value per tensor."""
  arg, make = SCALAR_THRESHOLDS[name]
  g = {"a": jnp.ones(()), "b": jnp.ones((3,))}
  match = re.escape(f"`{arg}` must be a scalar, got an array of shape {shape}")
  with pytest.raises(ValueError, match=match):
    make(jnp.ones(shape))
  for tx in (
    make(lambda count: jnp.ones(shape)),  # a schedule
    optax.inject_hyperparams(make)(jnp.ones(shape)),  # traced
  ):
    with pytest.raises(ValueError, match=match):
      jax.jit(tx.update)(g, tx.init(g), g)


@pytest.mark.parametrize("name", sorted(SCALAR_THRESHOLDS))
@pytest.mark.parametrize("bad", [-1.0, float("nan")])
def test_a_schedules_bad_value_is_an_error_outside_jit(name, bad):
  """A concrete threshold of -1 is refused; a schedule returning it flipped
  the updates' sign (optax's behaviour). Outside `jax.jit` its value is
  known and checked."""
  arg, make = SCALAR_THRESHOLDS[name]
  g = {"a": jnp.ones(()), "b": jnp.ones((3,))}
  tx = make(lambda count: jnp.where(count < 1, 1.0, bad))
  state = tx.init(g)
  _, state = tx.update(g, state, g)  # step 0: 1.0
  with pytest.raises(ValueError, match=rf"schedule given as `{arg}` returned .* at step 1"):
    tx.update(g, state, g)


@pytest.mark.parametrize(
  "make, match",
  [
    (lambda bad: jaxclip.clip(lambda n: bad), "`max_delta` returned"),
    (lambda bad: jaxclip.clippy(relative=lambda n: bad), "`relative` returned"),
    (lambda bad: jaxclip.clippy(absolute=lambda n: bad), "`absolute` returned"),
    (lambda bad: jaxclip.clip_by_value(lambda n: 2 + 0 * bad, 1.0), "min_value` 2.0 above"),
  ],
  ids=["clip", "clippy_relative", "clippy_absolute", "clip_by_value"],
)
def test_entrywise_schedules_are_checked_outside_jit(make, match):
  g = {"a": jnp.array([3.0, -4.0])}
  for bad in (-1.0, float("nan")):
    tx = make(bad)
    if "min_value" in match and np.isnan(bad):
      continue
    with pytest.raises(ValueError, match=match):
      tx.update(g, tx.init(g), g)


@pytest.mark.parametrize("bound_shape", [(3, 2), (3,), (2, 1, 1)])
def test_clip_by_value_bounds_must_not_change_the_shape(bound_shape):
  g = {"w": jnp.ones((2,))} if bound_shape != (2, 1, 1) else {"w": jnp.ones((1, 2))}
  tx = jaxclip.clip_by_value(-jnp.ones(bound_shape), jnp.ones(bound_shape))
  with pytest.raises(ValueError, match="min_value"):
    tx.update(g, tx.init(g))


def test_clip_by_value_bounds_that_broadcast_are_fine():
  g = {"w": jnp.array([[-3.0, 3.0], [0.5, -0.5]])}
  tx = jaxclip.clip_by_value(jnp.array([-1.0, -2.0]), jnp.array([1.0, 2.0]))
  out, _ = tx.update(g, tx.init(g))
  np.testing.assert_array_equal(out["w"], [[-1.0, 2.0], [0.5, -0.5]])


def test_global_norm_rejects_python_number_leaves():
  with pytest.raises(TypeError, match=r"\['w'\]\[1\]"):
    jaxclip.global_norm({"w": [jnp.ones(2), 4.0]})


def test_zclip_modes_and_flags_are_keyword_only():
  with pytest.raises(TypeError):
    jaxclip.zclip(0.97, 2.5, 25, 1.0, "percentile")
  tx = jaxclip.zclip(0.97, 2.5, 25, 1.0, mode="percentile", skip_update_on_spike=True)
  assert isinstance(tx, optax.GradientTransformationExtraArgs)


def test_clip_writes_no_scalar_out_as_a_full_size_array():
  # Leaves of one large shape, clipped and counted at every step: no scalar
  # (bound or constant) may be broadcast into an array of their size.
  tree = [jnp.full((256, 512), 2.0) for _ in range(4)]
  tx = jaxclip.clip(1.0)
  text = jax.jit(tx.update).lower(tree, tx.init(tree)).compile().as_text()
  written = re.findall(r"= f32\[256,512\]\{1,0\} fusion\([^)]*\).*calls=%wrapped_broadcast", text)
  assert not written, written
  updates, state = tx.update(tree, tx.init(tree))
  assert float(state.clipped_fraction) == 1.0
