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
  "record_norms": (lambda: jaxclip.record_norms(8), {"num_steps": 8}, False, ("num_steps",)),
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
  public_factories = {n for n in jaxclip.__all__ if inspect.isfunction(getattr(jaxclip, n))}
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
