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
written, and the update runs in place. Two consequences of a skipped step
computing the rest of the inner step from the old state: callbacks inside
the inner step (``jax.debug.print``) see those values, and a gradient taken
*through* a skipped step can be NaN where an intermediate is (Adam's bias
correction divides by zero when its own count is still 0). Values computed
inside a `lax.cond` or a non-inlined `jax.jit` of the inner step are selected
at their output instead: still correct, but XLA may then copy them.

Without a trace (eager calls) nothing is fused or donated, and the plain
formulation is used.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.extend import core as jex_core


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

  # The loop of `jax.core.eval_jaxpr`, with each selected value replaced as
  # soon as it is computed (source locations are not carried over).
  env: dict[Any, Any] = dict(zip(jaxpr.constvars, closed.consts, strict=True))
  env.update(zip(jaxpr.invars, dynamic, strict=True))

  def read(atom):
    return env[atom] if _is_var(atom) else atom.val

  for eqn in jaxpr.eqns:
    with eqn.ctx.manager:
      outs = eqn.primitive.bind(*map(read, eqn.invars), **eqn.primitive.get_bind_params(eqn.params))
    if not eqn.primitive.multiple_results:
      outs = [outs]
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
