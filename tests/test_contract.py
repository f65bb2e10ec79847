"""The contract every public jaxclip transform keeps.

Each transform in `jaxclip.__all__` is run under `jax.jit` and without,
chained with `optax.adam`, on dict/list/nested/empty trees in bf16 and fp32,
and through `optax.inject_hyperparams`; its state must be a pytree of arrays
whose structure, shapes and dtypes never change.
"""

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxclip

# name -> (factory call, hyperparameters for inject_hyperparams, needs params,
# static_args for inject_hyperparams: integer sizes and step counts)
TRANSFORMS = {
  "clip": (lambda: jaxclip.clip(0.5), {"max_delta": 0.5}, False),
  "clip_by_value": (
    lambda: jaxclip.clip_by_value(-0.5, 0.3),
    {"min_value": -0.5, "max_value": 0.3},
    False,
  ),
  "clip_by_norm": (lambda: jaxclip.clip_by_norm(0.5), {"max_norm": 0.5}, False),
  "clip_by_global_norm": (lambda: jaxclip.clip_by_global_norm(0.5), {"max_norm": 0.5}, False),
  "clip_by_block_rms": (lambda: jaxclip.clip_by_block_rms(0.2), {"threshold": 0.2}, False),
  "adaptive_grad_clip": (lambda: jaxclip.adaptive_grad_clip(0.05), {"clipping": 0.05}, True),
  "autoclip": (
    lambda: jaxclip.autoclip(10.0, history_size=16),
    {"percentile": 10.0, "history_size": 16},
    False,
    ("history_size",),
  ),
  "zclip": (
    lambda: jaxclip.zclip(warmup_steps=2, max_norm=0.5),
    {"warmup_steps": 2, "max_norm": 0.5},
    False,
    ("warmup_steps",),
  ),
  "adagc": (
    lambda: jaxclip.adagc(warmup_steps=1, warmup_max_norm=0.5),
    {"warmup_steps": 1, "warmup_max_norm": 0.5},
    False,
    ("warmup_steps",),
  ),
  "quantile_clip": (
    lambda: jaxclip.quantile_clip(initial_max_norm=0.5),
    {"initial_max_norm": 0.5},
    False,
    ("seed",),
  ),
  "skip_on_spike": (
    lambda: jaxclip.skip_on_spike(optax.identity(), window=8, min_history=4),
    {"inner": optax.identity(), "window": 8, "min_history": 4},
    False,
    ("window", "min_history"),
  ),
  "spam_clip": (
    lambda: jaxclip.spam_clip(start_step=1, reset_interval=2),
    {"threshold": 5000.0, "start_step": 1, "reset_interval": 2},
    False,
    ("start_step", "reset_interval"),
  ),
  "stable_spam_clip": (
    lambda: jaxclip.stable_spam_clip(adaptive_norm=True),
    {"theta": 0.999, "adaptive_norm": True},
    False,
  ),
  "clippy": (lambda: jaxclip.clippy(0.1, 1e-3), {"relative": 0.1, "absolute": 1e-3}, True),
  "record_norms": (lambda: jaxclip.record_norms(8), {"num_steps": 8}, False, ("num_steps",)),
  "skip_large_norm": (
    lambda: jaxclip.skip_large_norm(optax.identity(), 100.0),
    {"inner": optax.identity(), "max_norm": 100.0},
    False,
  ),
  "skip_nonfinite": (
    lambda: jaxclip.skip_nonfinite(optax.identity(), max_consecutive=3),
    {"inner": optax.identity(), "max_consecutive": 3},
    False,
    ("max_consecutive",),
  ),
}

NOT_TRANSFORMS = {
  "global_norm",
  "stats",
  "suggest_max_norm",
  "plot_norms",
  "unitwise_norm",
  "unitwise_clip",
  "per_example_global_norm_clip",
  "per_example_layer_norm_clip",
  "clipped_grad",
  "noisy_mean",
  "dp_epsilon",
}


def _trees(dtype):
  key = jax.random.key(7)
  ks = jax.random.split(key, 4)
  big = lambda k, s: (3.0 * jax.random.normal(k, s)).astype(dtype)  # noqa: E731
  return {
    "dict": {"w": big(ks[0], (4, 3)), "b": big(ks[1], (3,))},
    "list": [big(ks[2], (5,)), big(ks[3], (2, 2))],
    "nested": {"layer": [{"k": big(ks[0], (3, 3))}, (big(ks[1], (2,)),)], "n": jnp.int32(2)},
    "empty": {},
  }


def test_every_public_name_is_classified():
  # jaxclip.TrainState, a class, is imported on first use and needs Flax.
  names = [n for n in jaxclip.__all__ if n != "TrainState"]
  public_factories = {n for n in names if inspect.isfunction(getattr(jaxclip, n))}
  assert public_factories == set(TRANSFORMS) | NOT_TRANSFORMS


def _check_state(init_state, new_state):
  leaves = jax.tree.leaves(new_state)
  assert all(isinstance(x, jax.Array) for x in leaves)
  assert jax.tree.structure(init_state) == jax.tree.structure(new_state)
  for a, b in zip(jax.tree.leaves(init_state), leaves):
    assert a.shape == b.shape and a.dtype == b.dtype


def _params_for(tree):
  return jax.tree.map(lambda x: jnp.ones_like(x), tree)


@pytest.mark.parametrize("name", sorted(TRANSFORMS))
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("kind", ["dict", "list", "nested", "empty"])
def test_jit_and_eager_agree(name, dtype, kind):
  make, _, needs_params, *_ = TRANSFORMS[name]
  tx = make()
  assert isinstance(tx, optax.GradientTransformationExtraArgs)
  g = _trees(dtype)[kind]
  params = _params_for(g) if needs_params else None
  state = tx.init(_params_for(g))
  eager, eager_state = tx.update(g, state, params)
  jitted, jit_state = jax.jit(tx.update)(g, state, params)
  _check_state(state, eager_state)
  _check_state(state, jit_state)
  for a, b, x in zip(jax.tree.leaves(eager), jax.tree.leaves(jitted), jax.tree.leaves(g)):
    assert a.dtype == x.dtype == b.dtype and a.shape == x.shape
    np.testing.assert_allclose(
      np.asarray(a, np.float32),
      np.asarray(b, np.float32),
      rtol=1e-2 if dtype == jnp.bfloat16 else 1e-6,
    )
  # a second step from the new state
  jax.jit(tx.update)(g, jit_state, params)


@pytest.mark.parametrize("name", sorted(TRANSFORMS))
def test_chain_with_adam_trains(name):
  make, _, needs_params, *_ = TRANSFORMS[name]
  target = jnp.array([1.0, -2.0, 3.0])
  params = {"x": jnp.zeros(3) + 0.1}
  opt = optax.chain(make(), optax.adam(0.1))
  state = opt.init(params)
  loss = lambda p: jnp.sum((p["x"] - target) ** 2)  # noqa: E731

  @jax.jit
  def step(params, state):
    grads = jax.grad(loss)(params)
    updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  start = loss(params)
  for _ in range(100):
    params, state = step(params, state)
  assert float(loss(params)) < 0.1 * float(start)


@pytest.mark.parametrize("name", sorted(TRANSFORMS))
def test_inject_hyperparams(name):
  make, hparams, needs_params, *static = TRANSFORMS[name]
  factory = getattr(jaxclip, name)
  tx = optax.inject_hyperparams(factory, static_args=static[0] if static else ())(**hparams)
  g = _trees(jnp.float32)["dict"]
  g = {"w": g["w"], "b": g["b"].astype(jnp.bfloat16)}  # mixed dtypes
  params = _params_for(g)
  state = tx.init(params)
  direct, _ = make().update(g, make().init(params), params if needs_params else None)
  out, state = jax.jit(tx.update)(g, state, params if needs_params else None)
  for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(direct)):
    assert a.dtype == b.dtype
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=1e-2)


@pytest.mark.parametrize("name", sorted(TRANSFORMS))
def test_zero_gradients_give_zero_updates(name):
  make, _, needs_params, *_ = TRANSFORMS[name]
  tx = make()
  g = {"a": jnp.zeros((3, 2)), "b": jnp.zeros((2,), jnp.bfloat16)}
  params = _params_for(g)
  out, _ = jax.jit(tx.update)(g, tx.init(params), params if needs_params else None)
  for leaf in jax.tree.leaves(out):
    assert not bool(jnp.any(leaf != 0))


@pytest.mark.parametrize("name", sorted(TRANSFORMS))
def test_empty_leaves_pass_through_and_change_nothing_else(name):
  # Leaves with no entries (also with no units along an axis: (3, 0)) are
  # carried through, as optax does, and leave the other leaves' updates as
  # they are without them.
  make, _, needs_params, *_ = TRANSFORMS[name]
  full = {"w": 3.0 * jnp.arange(-3.0, 3.0).reshape(2, 3)}
  empty = {"e1": jnp.zeros((3, 0)), "e2": jnp.zeros((0,)), "e3": jnp.zeros((2, 0, 3))}
  results = []
  for g in (full, {**full, **empty}):
    tx, params = make(), _params_for(g)
    for update in (tx.update, jax.jit(tx.update)):
      out, _ = update(g, tx.init(params), params if needs_params else None)
      assert all(out[k].shape == g[k].shape for k in g)
      results.append(out["w"])
  for r in results[1:]:
    np.testing.assert_allclose(r, results[0], rtol=1e-6)


@pytest.mark.parametrize("name", sorted(TRANSFORMS))
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.complex64])
def test_gradient_through_update_is_finite(name, dtype):
  # At zero gradients (first step) and at a gradient repeated after a few
  # steps (an adaptive rule then sees a norm equal to its running mean).
  make, _, needs_params, *_ = TRANSFORMS[name]
  if dtype == jnp.complex64 and name in ("clip", "clip_by_value"):
    pytest.skip("element-wise bounds are real (optax.clip raises too)")
  tx = make()
  g = {"w": jnp.array([[0.3, -0.4], [0.2, 0.1]], dtype), "b": jnp.array([0.5, -0.5], dtype)}
  params = _params_for(g) if needs_params else None

  def total(grads, state):
    out = tx.update(grads, state, params)[0]
    return sum(jnp.real(jnp.sum(x)) for x in jax.tree.leaves(out))

  state = tx.init(_params_for(g))
  zeros = jax.tree.map(jnp.zeros_like, g)
  step, grad_of = jax.jit(tx.update), jax.jit(jax.grad(total))
  states = [state]
  for _ in range(4):
    state = step(g, state, params)[1]
  states.append(state)
  for s in states:
    for at in (zeros, g):
      for leaf in jax.tree.leaves(grad_of(at, s)):
        assert bool(jnp.all(jnp.isfinite(leaf))), (name, leaf)


@pytest.mark.parametrize("name", sorted(TRANSFORMS))
def test_can_be_built_inside_jit(name):
  # Factories called while a jit traces (e.g. an optimizer built in a step)
  # validate their concrete arguments without converting tracers to bool.
  make, _, needs_params, *_ = TRANSFORMS[name]

  @jax.jit
  def build_and_step(g):
    tx = make()
    return tx.update(g, tx.init(g), g if needs_params else None)[0]

  build_and_step({"a": jnp.ones(3)})


@pytest.mark.parametrize("name", sorted(TRANSFORMS))
def test_state_can_be_donated(name):
  # Training loops donate the optimizer state (`donate_argnums`): no two state
  # fields may share a buffer, at init or after a step.
  make, _, needs_params, *_ = TRANSFORMS[name]
  opt = optax.chain(make(), optax.adam(0.1))
  params = {"w": jnp.ones((4, 3)), "b": jnp.zeros(3)}

  def step(params, state):
    grads = jax.tree.map(lambda p: p + 1.0, params)
    updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  step = jax.jit(step, donate_argnums=(0, 1))
  state = opt.init(params)
  for _ in range(3):
    params, state = step(params, state)
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(params))


def _stateful_guard(name):
  """The guards around a stateful inner optimizer (adam), not only identity."""
  if name == "skip_on_spike":
    return jaxclip.skip_on_spike(optax.adam(0.1), window=8, min_history=4)
  if name == "skip_large_norm":
    return jaxclip.skip_large_norm(optax.adam(0.1), 100.0)
  return jaxclip.skip_nonfinite(optax.adam(0.1), max_consecutive=3)


def _make(name):
  return _stateful_guard(name) if name.startswith("skip_") else TRANSFORMS[name][0]()


@pytest.mark.parametrize("name", sorted(TRANSFORMS))
def test_state_dtypes_are_fixed_at_init_under_x64(name):
  # f64 params, f32 gradients: every state leaf keeps the dtype `init` gave
  # it, so the state is a valid `lax.scan` carry and nothing retraces.
  with jax.enable_x64(True):
    params = {"w": jnp.ones((4, 3), jnp.float64), "b": jnp.ones((3,), jnp.float64)}
    grads = jax.tree.map(lambda p: (2.0 * p).astype(jnp.float32), params)
    tx = _make(name)
    state = tx.init(params)
    _, new_state = jax.jit(tx.update)(grads, state, params)
    _check_state(state, new_state)

    def body(s, _):
      return tx.update(grads, s, params)[1], None

    jax.lax.scan(body, state, length=2)  # the state is a valid carry


LEARNED_THRESHOLDS = {
  "autoclip",
  "zclip",
  "adagc",
  "quantile_clip",
  "spam_clip",
  "stable_spam_clip",
}


@pytest.mark.parametrize("name", sorted(TRANSFORMS))
def test_a_narrower_state_does_not_narrow_the_scaling_under_x64(name):
  # A state made from f32 params keeps f32 records, but f64 updates are
  # scaled in f64, as from a state made from f64 params: norms beyond the
  # float32 range (which would record as inf) still clip. Learned thresholds
  # come from statistics kept in the state's dtype (f32 here, where squares
  # of 1e30 overflow), so they agree to f32 precision on moderate values.
  if name.startswith("skip_"):
    pytest.skip("guards scale nothing")
  needs_params = TRANSFORMS[name][2]
  with jax.enable_x64(True):
    for size in (1.0,) if name in LEARNED_THRESHOLDS else (1.0, 1e30):
      grads = {"w": size * jnp.array([[3.0, 1e-9], [4.0, 2.0]], jnp.float64)}
      params = {"w": jnp.array([[1.0, 2.0], [3.0, 4.0]], jnp.float64)}
      tx = _make(name)
      p = params if needs_params else None
      narrow = tx.init(jax.tree.map(lambda x: x.astype(jnp.float32), params))
      out, state = jax.jit(tx.update)(grads, narrow, p)
      want, _ = jax.jit(tx.update)(grads, tx.init(params), p)
      _check_state(narrow, state)
      for got, expected in zip(jax.tree.leaves(out), jax.tree.leaves(want), strict=True):
        assert got.dtype == jnp.float64
        if name in LEARNED_THRESHOLDS:  # learned from statistics kept in f32
          np.testing.assert_allclose(got, expected, rtol=1e-6)
        else:
          np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("name", sorted(TRANSFORMS))
@pytest.mark.parametrize("bad", [jnp.inf, -jnp.inf, jnp.nan])
def test_nonfinite_inputs_have_defined_behaviour(name, bad):
  # One non-finite entry: no exception, a well-formed state, and the finite
  # entries are never silently rescaled by a non-finite norm. Guards skip.
  needs_params = TRANSFORMS[name][2]
  tx = _make(name)
  g = {"a": jnp.array([1.0, bad, 2.0]), "b": jnp.array([3.0, 4.0])}
  params = _params_for(g)
  state = tx.init(params)
  out, new_state = jax.jit(tx.update)(g, state, params if needs_params else None)
  _check_state(state, new_state)
  if name.startswith("skip_"):
    assert all(bool(jnp.all(x == 0)) for x in jax.tree.leaves(out))
    inner = new_state.inner_state
    assert all(
      bool(jnp.all(a == b))
      for a, b in zip(jax.tree.leaves(inner), jax.tree.leaves(state.inner_state))
    )
  elif name not in ("clip", "clip_by_value"):
    # Norm-based: the finite entries of the tensor holding the inf/NaN pass
    # through unscaled (so a guard sees the problem); others are clipped as usual.
    np.testing.assert_array_equal(np.asarray(out["a"])[[0, 2]], [1.0, 2.0])
  else:
    lo, hi = (-0.5, 0.5) if name == "clip" else (-0.5, 0.3)
    a = np.asarray(out["a"])
    assert a[0] == hi and a[2] == hi
    assert np.isnan(a[1]) if bad != bad else a[1] == (hi if bad > 0 else lo)


@pytest.mark.parametrize("name", sorted(TRANSFORMS))
def test_python_number_leaves_are_a_type_error_naming_the_leaf(name):
  # A Python number is not an array: never a norm of 0 and a silent pass-through.
  needs_params = TRANSFORMS[name][2]
  tx = _make(name)
  g = {"w": [3.0, 4.0]}
  with pytest.raises(TypeError, match=r"\['w'\]\[0\]"):
    tx.update(g, tx.init({"w": [jnp.ones(()), jnp.ones(())]}), g if needs_params else None)


@pytest.fixture
def compilations():
  """Names of the XLA compilations made while the test runs."""
  seen = []

  def listener(event, duration, **kwargs):
    if event == "/jax/core/compile/backend_compile_duration":
      seen.append(event)

  jax.monitoring.register_event_duration_secs_listener(listener)
  yield seen
  unregister = getattr(jax.monitoring, "unregister_event_duration_listener", None)
  if unregister is not None:  # not in every supported jax
    unregister(listener)


@pytest.mark.parametrize("name", sorted(TRANSFORMS))
def test_eager_update_compiles_once(name, compilations):
  # Outside jit, a second step runs what the first compiled: a branch taken
  # by `lax.cond` on new closures would be compiled again at every step.
  make, _, needs_params, *_ = TRANSFORMS[name]
  tx = make()
  g = _trees(jnp.float32)["dict"]
  params = _params_for(g) if needs_params else None
  _, state = tx.update(g, tx.init(_params_for(g)), params)
  jax.block_until_ready(state)
  del compilations[:]
  jax.block_until_ready(tx.update(g, state, params))
  assert compilations == []


# jax 0.12 warns that a generator leaf will be an error of its own one day.
@pytest.mark.filterwarnings("ignore:Python iterable type:DeprecationWarning")
@pytest.mark.parametrize("name", sorted(TRANSFORMS))
def test_leaves_that_are_not_arrays_are_a_type_error_naming_the_leaf(name):
  # A generator (e.g. `grads.values()` passed as a tree) is a leaf of its own:
  # skipped, it would give a norm of 0 and a silent pass-through.
  needs_params = TRANSFORMS[name][2]
  tx = _make(name)
  g = {"w": (x for x in [jnp.ones(2)])}
  with pytest.raises(TypeError, match=r"\['w'\] is a generator"):
    tx.update(g, tx.init({"w": jnp.ones(2)}), g if needs_params else None)
