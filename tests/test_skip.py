"""Tests of `skippable_update`, the guards' in-place skippable optimizer step."""

from __future__ import annotations

import os
import pathlib
import re
import sys
import traceback
import warnings
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


@pytest.mark.filterwarnings("ignore::jaxclip._skip.StateCopyWarning")  # multi_steps
@pytest.mark.parametrize("jit", [True, False], ids=["jit", "eager"])
@pytest.mark.parametrize("name", sorted(INNER))
def test_matches_the_plain_formulation(name, jit):
  skips = [False, True, True, False]
  got = _steps(_skip.skippable_update, INNER[name](), skips, jit)
  want = _steps(_reference, INNER[name](), skips, jit)
  if jit:
    # Two different programs: XLA may fuse and vectorise the inner step's
    # arithmetic differently in each (it does for Adam's update with jaxlib
    # 0.12.1), so the results may differ in the last bits.
    chex.assert_trees_all_close(got, want, rtol=1e-6, atol=0)
  else:
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


def _guarded_step(inner):
  opt = skip_nonfinite(inner)

  def step(params, state, grads):
    updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  return jax.jit(step, donate_argnums=(0, 1)).lower(PARAMS, opt.init(PARAMS), GRADS[0])


def test_lowered_program_names_the_inner_optimizers_source():
  """Each re-bound operation keeps its traceback: the moment updates of Adam
  are located in optax's code, not in jaxclip's `_skip.py`."""
  text = _guarded_step(optax.adam(1e-2)).as_text(debug_info=True)
  files = {os.path.normpath(f) for f in re.findall(r'loc\("([^"]+\.py)"', text)}
  assert any(f.endswith(os.path.join("optax", "_src", "transform.py")) for f in files), files
  assert "scale_by_adam" in text


def _scoped_update(updates, state, params=None):
  del params
  with jax.named_scope("inner_scope"):
    state = state + 1.0
    return jax.tree.map(lambda u: u * state, updates), state


SCOPED = optax.GradientTransformation(lambda params: jnp.zeros([]), _scoped_update)


def test_name_stacks_are_kept():
  lowered = _guarded_step(SCOPED)
  assert re.search(r"inner_scope/(add|mul)", lowered.as_text(debug_info=True))
  op_names = re.findall(r'op_name="([^"]*)"', lowered.compile().as_text())
  assert any("inner_scope/" in name for name in op_names), op_names


def _nan_update(updates, state, params=None):
  del params
  zero = state - state
  return jax.tree.map(lambda u: u * (zero / zero), updates), state + 1.0


@pytest.mark.parametrize("transform", ["jit", "vmap"])
def test_debug_nans_points_at_the_inner_update(transform):
  """With `jax_debug_nans`, a NaN made by the inner update is reported with
  a traceback through the inner update's code.

  Both version ends behave alike. Under `jax.jit`, JAX reruns the step
  de-optimized (eagerly, where `skippable_update` calls `inner.update`
  directly), so the inner update is on the error's own traceback. Under an
  eager `jax.vmap` the re-bound division raises, and only the restored source
  information puts the inner update's frames on the traceback of the error's
  cause (`JaxStackTraceBeforeTransformation`).
  """
  inner = optax.with_extra_args_support(
    optax.GradientTransformation(lambda params: jnp.zeros([]), _nan_update)
  )
  step = lambda g, s, skip: _skip.skippable_update(inner, skip, g, s, PARAMS, {})  # noqa: E731
  if transform == "jit":
    step, args = jax.jit(step), (GRADS[0], jnp.zeros([]), jnp.asarray(False))
  else:
    batch = jax.tree.map(lambda x: x[None], GRADS[0])
    step, args = jax.vmap(step), (batch, jnp.zeros([1]), jnp.asarray([False]))
  previous = jax.config.jax_debug_nans
  # Operations that JAX already dispatches through its C++ fast path skip the
  # NaN checks (both version ends), so whether an eager division is checked
  # would depend on the tests run before this one.
  jax.clear_caches()
  jax.config.update("jax_debug_nans", True)
  try:
    with pytest.raises(FloatingPointError) as info:
      jax.block_until_ready(step(*args))
  finally:
    jax.config.update("jax_debug_nans", previous)
  frames, error = [], info.value
  while error is not None:
    frames += traceback.extract_tb(error.__traceback__)
    error = error.__cause__ or error.__context__
  assert any(f.name == "_nan_update" and f.filename == __file__ for f in frames), frames


def _jitted(transform):
  return optax.GradientTransformation(transform.init, jax.jit(transform.update))


@pytest.mark.parametrize(
  "inner, cause",
  [
    (optax.MultiSteps(optax.adam(1e-2), every_k_schedule=2), "cond"),
    (_jitted(optax.adam(1e-2)), "jit"),
  ],
  ids=["multi_steps", "jit"],
)
def test_state_selected_after_a_sub_computation_warns_once(inner, cause, monkeypatch):
  monkeypatch.setattr(_skip, "_warned", set())
  with pytest.warns(_skip.StateCopyWarning, match=rf"`{cause}`.*copy a donated") as record:
    _guarded_step(inner)
  # Attributed to the code that called the guard, not to JAX's tracing.
  assert [w.filename for w in record] == [__file__]
  with warnings.catch_warnings():
    warnings.simplefilter("error", _skip.StateCopyWarning)
    _guarded_step(inner)  # once per process


def test_library_frames_are_known_through_symlinks(tmp_path, monkeypatch):
  # jaxclip imported through a symlinked path: its module file is the link,
  # the frames' files are resolved; both must be compared resolved.
  real = pathlib.Path(_skip.__file__).resolve().parent
  link = tmp_path / "jaxclip"
  link.symlink_to(real, target_is_directory=True)
  monkeypatch.setattr(sys.modules["jaxclip"], "__file__", str(link / "__init__.py"))
  assert _skip._is_library(str(real / "_skip.py"))
  assert _skip._is_library(str(link / "_skip.py"))
  assert not _skip._is_library(__file__)


def test_a_state_updated_in_place_does_not_warn(monkeypatch):
  monkeypatch.setattr(_skip, "_warned", set())
  inner = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-2), optax.scale(0.5))
  with warnings.catch_warnings():
    warnings.simplefilter("error", _skip.StateCopyWarning)
    _guarded_step(inner)
