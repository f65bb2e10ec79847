"""Tests of `skippable_update`, the guards' in-place skippable optimizer step."""

from __future__ import annotations

import re
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxclip import _skip, skip_nonfinite

PARAMS = {"w": jnp.linspace(-1.0, 1.0, 12).reshape(3, 4), "b": jnp.arange(3.0)}
GRADS = [jax.tree.map(lambda x, s=s: jnp.sin(x * (s + 1.0)) + 0.1 * s, PARAMS) for s in range(4)]


def _reference(inner, skip, updates, state, params, extra_args):
  """The plain formulation: run `inner`, then select old state and zero updates."""
  new_updates, new_state = inner.update(updates, state, params, **extra_args)
  new_updates = jax.tree.map(lambda u: jnp.where(skip, jnp.zeros_like(u), u), new_updates)
  new_state = jax.tree.map(lambda o, n: jnp.where(skip, o, n), state, new_state)
  return new_updates, new_state


class ConstantState(NamedTuple):
  count: jax.Array
  flag: jax.Array
  twin_a: jax.Array
  twin_b: jax.Array


def _odd_state_transform() -> optax.GradientTransformation:
  """A state with a constant field and two fields holding one computed value."""

  def init(params):
    del params
    return ConstantState(
      jnp.zeros([], jnp.int32), jnp.zeros([], jnp.int32), jnp.zeros([]), jnp.ones([])
    )

  def update(updates, state, params=None):
    del params
    total = sum(jnp.sum(x) for x in jax.tree.leaves(updates)) + state.twin_a
    return updates, ConstantState(state.count + 1, jnp.int32(7), total, total)

  return optax.GradientTransformation(init, update)


INNER = {
  "sgd": lambda: optax.sgd(0.1),
  "momentum_nesterov": lambda: optax.sgd(0.1, momentum=0.9, nesterov=True),
  "adamw": lambda: optax.adamw(1e-2, weight_decay=0.1),
  "lion": lambda: optax.lion(1e-3),
  "adafactor": lambda: optax.adafactor(1e-2),
  "chain_clip_adam": lambda: optax.chain(optax.clip_by_global_norm(0.5), optax.adam(1e-2)),
  "inject_hyperparams": lambda: optax.inject_hyperparams(optax.adam)(learning_rate=1e-2),
  "multi_steps": lambda: optax.MultiSteps(optax.adam(1e-2), every_k_schedule=2),
  "masked": lambda: optax.masked(optax.adam(1e-2), {"w": True, "b": False}),
  "partition": lambda: optax.partition(
    {"a": optax.adam(1e-2), "s": optax.sgd(0.1, momentum=0.5)}, {"w": "a", "b": "s"}
  ),
  "schedule_free": lambda: optax.contrib.schedule_free_adamw(1e-2),
  "odd_state": _odd_state_transform,
  "identity": optax.identity,
}


def _steps(fn, inner, skips, jit):
  inner = optax.with_extra_args_support(inner)
  step = lambda s, g, skip: fn(inner, skip, g, s, PARAMS, {})  # noqa: E731
  step = jax.jit(step) if jit else step
  state, out = inner.init(PARAMS), []
  for g, skip in zip(GRADS, skips, strict=True):
    updates, state = step(state, g, jnp.asarray(skip))
    out.append((updates, state))
  return out


@pytest.mark.parametrize("jit", [True, False], ids=["jit", "eager"])
@pytest.mark.parametrize("name", sorted(INNER))
def test_matches_the_plain_formulation(name, jit):
  skips = [False, True, True, False]
  got = _steps(_skip.skippable_update, INNER[name](), skips, jit)
  want = _steps(_reference, INNER[name](), skips, jit)
  chex.assert_trees_all_equal(got, want)
  # A skipped step returns the state it was given and zero updates.
  chex.assert_trees_all_equal(got[1][1], got[0][1])
  chex.assert_trees_all_equal(got[2][1], got[0][1])
  assert all(not np.any(np.asarray(u)) for u in jax.tree.leaves(got[1][0]))


def test_under_vmap_each_example_skips_alone():
  inner = optax.with_extra_args_support(optax.adam(1e-2))
  grads = jax.tree.map(lambda *xs: jnp.stack(xs), *GRADS[:2])
  state = jax.vmap(inner.init)(jax.tree.map(lambda x: jnp.stack([x, x]), PARAMS))
  skip = jnp.array([True, False])

  def one(g, s, k):
    return _skip.skippable_update(inner, k, g, s, PARAMS, {})

  updates, new_state = jax.vmap(one)(grads, state, skip)
  want_updates, want_state = jax.vmap(lambda g, s, k: _reference(inner, k, g, s, PARAMS, {}))(
    grads, state, skip
  )
  chex.assert_trees_all_equal((updates, new_state), (want_updates, want_state))
  assert int(new_state[0].count[0]) == 0 and int(new_state[0].count[1]) == 1


def test_extra_args_and_closed_over_traced_values_reach_inner():
  seen = {}

  def inner_update(updates, state, params=None, *, loss=None, **extra):
    del params, extra
    seen["loss"] = loss
    return jax.tree.map(lambda u: u * loss, updates), state

  inner = optax.GradientTransformationExtraArgs(lambda p: optax.EmptyState(), inner_update)

  @jax.jit
  def step(lr, g, loss):
    scaled = optax.chain(inner, optax.scale(lr))  # built inside jit: closes over a tracer
    scaled = optax.with_extra_args_support(scaled)
    return _skip.skippable_update(
      scaled, jnp.asarray(False), g, scaled.init(PARAMS), PARAMS, {"loss": loss}
    )

  updates, _ = step(jnp.float32(0.5), GRADS[0], jnp.float32(3.0))
  chex.assert_trees_all_close(updates, jax.tree.map(lambda g: g * 1.5, GRADS[0]))
  assert seen["loss"] is not None


def _copied_shapes(compiled_text: str) -> list[str]:
  """Shapes of the arrays that a compiled program copies."""
  return re.findall(r"= (\w+\[[\d,]*\])\{?[\d,]*\}? copy\(", compiled_text)


def test_donated_state_is_updated_in_place():
  """With donated buffers no optimizer-state array is copied (they were all
  copied with the plain select formulation)."""
  params = {"w": jnp.ones((256, 64)), "v": jnp.ones((128, 32))}
  opt = skip_nonfinite(optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3)))

  def step(params, state, grads):
    updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  state = opt.init(params)
  compiled = jax.jit(step, donate_argnums=(0, 1)).lower(params, state, params).compile()
  copied = _copied_shapes(compiled.as_text())
  assert not [s for s in copied if s in ("f32[256,64]", "f32[128,32]")], copied


def test_a_state_of_another_structure_is_a_type_error():
  def update(updates, state, params=None):
    del params
    return updates, tuple(state.values())

  inner = optax.with_extra_args_support(
    optax.GradientTransformation(lambda p: {"a": jnp.zeros([]), "b": jnp.ones([])}, update)
  )
  step = jax.jit(
    lambda g: _skip.skippable_update(inner, jnp.asarray(False), g, inner.init(g), g, {})
  )
  with pytest.raises(TypeError, match="structure"):
    step(GRADS[0])
  with pytest.raises(TypeError, match="structure"):  # eager too
    _skip.skippable_update(inner, jnp.asarray(False), GRADS[0], inner.init(GRADS[0]), None, {})
