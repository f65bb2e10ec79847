"""Running an optimizer step that may be skipped, with its state updated in place.

A guard must return the old optimizer state on a skipped step. Written as
``new = where(skip, old, inner(old))``, the step reads the old state twice:
once for the selection and once more for the updates, which the inner
optimizer computes from its *new* state (Adam's from the new moments), and
XLA recomputes that new state from the old one rather than keep a copy. When
the state is donated, the selection overwrites the old state in place while
the updates still need it, so XLA copies the whole optimizer state first:
measured on CPU, that made a guarded AdamW step 3x slower than a plain one.

Under a trace (`jax.jit`, `jax.vmap`, ...), `skippable_update` evaluates the
inner update's jaxpr instead and selects each new state value *where it is
computed*, so every later use (the updates included) reads the selected
value. On a step that is not skipped the selected value is the new one, so
the result is unchanged; on a skipped step the updates are zero whatever they
were computed from. The old state is then read once, before its buffer is
written, and the update runs in place. Each operation keeps the source
information it was traced with (traceback and name stack), so the lowered
program, profiles and `jax_debug_nans` errors name the inner optimizer's
code. Two consequences of a skipped step computing the rest of the inner step
from the old state: callbacks inside the inner step (``jax.debug.print``) see
those values, and a gradient taken *through* a skipped step can be NaN where
an intermediate is (Adam's bias correction divides by zero when its own count
is still 0).

A state value computed inside a sub-computation that has other outputs too
(a `lax.cond`, as in `optax.MultiSteps`, a `jax.jit` of the inner update, a
loop) can only be selected at that output, and what else the sub-computation
computes from it reads the old state: still correct, but XLA may then copy a
donated state. A `StateCopyWarning` says so, once per process for each kind
of sub-computation.

Without a trace (eager calls) nothing is fused or donated, and the plain
formulation is used.

JAX has no public API for this. Tracing (`jax.make_jaxpr`) and reading the
jaxpr (equations, their primitives, parameters and variables,
`jax.extend.core.Literal`) use its documented structure. Evaluating an
equation as `jax.core.eval_jaxpr` does needs APIs that `jax.extend` exposes
without stability guarantees, all in `_bind` and `_location`: the
primitive's `get_bind_params`, the equation's context manager, and
`jax.extend.source_info_util` for its source information. The public
alternatives considered keep a copy somewhere: selecting after the step
copies a donated state, and an `optimization_barrier` between the inner step
and the selection keeps the new state in buffers of its own (as much extra
memory as the state).
"""

from __future__ import annotations

import os
import sys
import sysconfig
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.extend import core as jex_core
from jax.extend import source_info_util


def skippable_update(
  inner: optax.GradientTransformationExtraArgs,
  skip: jax.Array,
  updates: Any,
  state: Any,
  params: Any,
  extra_args: dict[str, Any],
) -> tuple[Any, Any]:
  """``inner.update`` where a true `skip` gives zero updates and `state` back.

  Args:
    inner: The wrapped optimizer.
    skip: Scalar boolean array: whether this step is skipped.
    updates: The gradients passed to the guard.
    state: The inner optimizer's state.
    params: The parameters (or None), forwarded to `inner`.
    extra_args: Extra keyword arguments, forwarded to `inner`.

  Returns:
    The updates (zero where skipped) and the new inner state (`state` where
    skipped).

  Raises:
    TypeError: If `inner` returns a state of another tree structure than the
      one it was given.
  """
  leaves = jax.tree.leaves((skip, updates, state, params, extra_args))
  if not any(isinstance(x, jax.core.Tracer) for x in leaves):
    new_updates, new_state = inner.update(updates, state, params, **extra_args)
    _check_structure(state, new_state)
    return _zero_where(skip, new_updates), jax.tree.map(
      lambda old, new: jnp.where(skip, old, new), state, new_state
    )
  dynamic, rebuild = _split_arrays((updates, state, params))

  def step(*arrays):
    u, s, p = rebuild(arrays)
    return inner.update(u, s, p, **extra_args)

  closed, (updates_shape, state_shape) = jax.make_jaxpr(step, return_shape=True)(*dynamic)
  _check_structure(state, state_shape)
  jaxpr = closed.jaxpr
  old_leaves = jax.tree.leaves(state)
  n_updates = len(jax.tree.leaves(updates_shape))
  update_vars, state_vars = jaxpr.outvars[:n_updates], jaxpr.outvars[n_updates:]
  old_value_of = _selections(jaxpr, state_vars, old_leaves)
  _warn_if_selected_after(jaxpr, state_vars)

  # The loop of `jax.core.eval_jaxpr`, with each selected value replaced as
  # soon as it is computed.
  env: dict[Any, Any] = dict(zip(jaxpr.constvars, closed.consts, strict=True))
  env.update(zip(jaxpr.invars, dynamic, strict=True))

  def read(atom):
    return env[atom] if _is_var(atom) else atom.val

  for eqn in jaxpr.eqns:
    outs = _bind(eqn, map(read, eqn.invars))
    for var, value in zip(eqn.outvars, outs, strict=True):
      env[var] = jnp.where(skip, old_value_of[var], value) if var in old_value_of else value

  new_state = [
    read(var) if _is_var(var) and var in old_value_of else jnp.where(skip, old, read(var))
    for var, old in zip(state_vars, old_leaves, strict=True)
  ]
  return (
    _zero_where(
      skip, jax.tree.unflatten(jax.tree.structure(updates_shape), map(read, update_vars))
    ),
    jax.tree.unflatten(jax.tree.structure(state_shape), new_state),
  )


class StateCopyWarning(UserWarning):
  """Part of a guarded optimizer's state is selected after the operation computing it.

  A donated optimizer state may then be copied on every step; the results
  are unchanged.
  """


# What a `cond` or `jit` that computes state values usually stands for.
_CAUSES = {
  "cond": "a `lax.cond` (optax.MultiSteps computes its state in one)",
  "jit": "a `jax.jit` of the inner update",
  "pjit": "a `jax.jit` of the inner update",
  "closed_call": "a `jax.jit` of the inner update",
  "while": "a `lax.while_loop` or `lax.fori_loop`",
  "scan": "a `lax.scan`",
}
_warned: set[str] = set()


def _warn_if_selected_after(jaxpr, state_vars) -> None:
  """Warns, once per process for each primitive, of state computed in a sub-computation.

  A state value that is one of several outputs of a `cond`, `jit`, loop, ...
  can only be selected at that output: whatever else the sub-computation
  computes from it (the updates, say) reads the unselected value, and so the
  old state, as the plain formulation does; XLA may then copy a donated state.
  """
  computed = {var for var in state_vars if _is_var(var)}
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if (
      name in _warned
      or len(eqn.outvars) < 2
      or computed.isdisjoint(eqn.outvars)
      or not any(_is_jaxpr(p) for p in eqn.params.values())
    ):
      continue
    _warned.add(name)
    warnings.warn(
      f"The optimizer wrapped by a jaxclip guard computes part of its state inside"
      f" {_CAUSES.get(name, f'a `{name}`')}, at {_location(eqn)}."
      f" A skipped step selects that state after the `{name}`, not where it is computed, so"
      " XLA may copy a donated optimizer state on every step (the results are unchanged)."
      " Reported once per process.",
      StateCopyWarning,
      stacklevel=_caller_level(),
    )


# Frames of these packages (and of the standard library) are not the user's.
_LIBRARIES = ("jax", "jaxlib", "optax", "jaxclip", "flax", "equinox", "chex")


def _is_library(filename: str) -> bool:
  path = os.path.realpath(filename)
  for name in _LIBRARIES:
    module = sys.modules.get(name)
    location = getattr(module, "__file__", None)
    if location and path.startswith(os.path.join(os.path.dirname(os.path.realpath(location)), "")):
      return True
  stdlib = os.path.join(os.path.realpath(sysconfig.get_paths()["stdlib"]), "")
  return path.startswith(stdlib) and "-packages" not in path[len(stdlib) :]


def _caller_level() -> int:
  """The `stacklevel` that attributes a warning raised by the caller of this
  function to the user's code that led to it: the first frame outside JAX,
  optax, jaxclip, the libraries between them and the standard library (under
  `jax.jit`, the line of the traced function that called the guard)."""
  frame, level = sys._getframe(1), 1
  while frame is not None and _is_library(frame.f_code.co_filename):
    frame, level = frame.f_back, level + 1
  return level if frame is not None else 1


def _is_jaxpr(param: Any) -> bool:
  params = param if isinstance(param, tuple | list) else (param,)
  return any(isinstance(p, jex_core.Jaxpr | jex_core.ClosedJaxpr) for p in params)


# JAX's unstable APIs (the module docstring says why) are used here only.


def _bind(eqn, args) -> list[Any]:
  """Binds one jaxpr equation to `args`, as `jax.core.eval_jaxpr` does.

  `get_bind_params` turns the equation's parameters back into the ones its
  primitive is bound with (a `custom_jvp_call`'s jaxprs into functions), the
  equation context restores the settings it was traced under (compute type,
  mesh, ...), and `user_context` restores its source information (traceback
  and name stack), so that profiles, the lowered program's locations and
  `jax_debug_nans` errors name the inner optimizer's code, not this module.
  """
  name_stack = source_info_util.current_name_stack() + eqn.source_info.name_stack
  with (
    source_info_util.user_context(eqn.source_info.traceback, name_stack=name_stack),
    eqn.ctx.manager,
  ):
    outs = eqn.primitive.bind(*args, **eqn.primitive.get_bind_params(eqn.params))
  return outs if eqn.primitive.multiple_results else [outs]


def _location(eqn) -> str:
  """The innermost user frame that traced `eqn`, as ``file:line (function)``."""
  return source_info_util.summarize(eqn.source_info)


def _zero_where(skip: jax.Array, tree: Any) -> Any:
  return jax.tree.map(lambda x: jnp.where(skip, jnp.zeros_like(x), x), tree)


def _check_structure(state: Any, new_state: Any) -> None:
  before, after = jax.tree.structure(state), jax.tree.structure(new_state)
  if before != after:
    raise TypeError(
      "The optimizer wrapped by a guard must return a state of the structure it"
      f" was given, to return that state on a skipped step: got {after}, expected"
      f" {before}."
    )


def _is_var(atom: Any) -> bool:
  return not isinstance(atom, jex_core.Literal)


def _selections(jaxpr, state_vars, old_leaves) -> dict[Any, Any]:
  """Maps each computed state value to the old value it is replaced by on a skip.

  A value is selected where it is computed only when it is one state leaf
  (not two, not an input passed through) of the old leaf's shape and dtype;
  the others are selected at the output.
  """
  inputs = set(jaxpr.invars) | set(jaxpr.constvars)
  owners: dict[Any, list[Any]] = {}
  for var, old in zip(state_vars, old_leaves, strict=True):
    if _is_var(var) and var not in inputs:
      owners.setdefault(var, []).append(old)
  return {
    var: olds[0]
    for var, olds in owners.items()
    if len(olds) == 1
    and np.shape(olds[0]) == var.aval.shape
    and jnp.result_type(olds[0]) == var.aval.dtype
  }


def _split_arrays(tree: Any):
  """Splits `tree`'s leaves into arrays (traced by `make_jaxpr`) and the rest."""
  leaves, treedef = jax.tree.flatten(tree)
  is_array = [isinstance(x, jax.Array | np.ndarray | np.generic) for x in leaves]
  dynamic = [x for x, a in zip(leaves, is_array, strict=True) if a]
  static = [x for x, a in zip(leaves, is_array, strict=True) if not a]

  def rebuild(arrays):
    arrays, others = iter(arrays), iter(static)
    return jax.tree.unflatten(treedef, [next(arrays) if a else next(others) for a in is_array])

  return dynamic, rebuild
