"""Where a loss uses each parameter: the program analysis behind ghost clipping.

The loss of one example is traced to a jaxpr and flattened into a `Program`:
calls that receive a parameter (`jax.jit`, `jax.checkpoint`, closed calls)
are inlined; every other equation, `custom_jvp` and `custom_vjp` calls,
`scan`, `while` and `cond` included, is kept whole and bound as it is, so
its derivative is JAX's own. Each parameter is followed through *views*
(casts, transposes, reshapes, broadcasts, slices: linear maps of the
parameter alone) to the equations that *use* it, and every use is recorded
with its kind:

* ``dense``: `dot_general` (Dense layers, einsum, attention projections,
  `Embed.attend`);
* ``lookup``: `gather` or `dynamic_slice` of whole rows (embeddings);
* ``conv``: `conv_general_dilated` with the parameter as its kernel;
* ``elementwise``: an elementwise operation (biases, norm scales);
* ``other``: anything else (the parameter enters a `scan`, a `custom_vjp`,
  a reduction...).

Uses that carry no gradient (`stop_gradient`, comparisons) are not recorded.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.extend.core as jex
import jax.numpy as jnp
import numpy as np
from jax.extend.core import primitives as prims

# Equations whose body is inlined when they receive a parameter view.
_INLINE = {prims.jit_p, prims.closed_call_p, prims.remat_p, prims.call_p}
# Linear maps of one array that move or copy entries without mixing them.
_PERMUTING = {prims.convert_element_type_p, prims.transpose_p, prims.copy_p}
_RESHAPING = {prims.reshape_p, prims.squeeze_p, prims.rev_p, prims.broadcast_in_dim_p}
_SELECTING = {prims.slice_p}
_NO_GRADIENT = {prims.stop_gradient_p}
_ELEMENTWISE = {
  prims.add_p, prims.sub_p, prims.mul_p, prims.div_p, prims.neg_p, prims.max_p, prims.min_p,
  prims.exp_p, prims.exp2_p, prims.log_p, prims.log1p_p, prims.expm1_p, prims.tanh_p,
  prims.logistic_p, prims.sin_p, prims.cos_p, prims.tan_p, prims.sqrt_p, prims.rsqrt_p,
  prims.cbrt_p, prims.pow_p, prims.integer_pow_p, prims.square_p, prims.abs_p, prims.sign_p,
  prims.select_n_p, prims.clamp_p, prims.erf_p, prims.atan2_p, prims.add_jaxvals_p,
  prims.reduce_precision_p,
}  # fmt: skip


class Lit(NamedTuple):
  """A literal input of an equation."""

  val: Any


Ref = int | Lit  # a slot of the program, or a literal


class Op(NamedTuple):
  """One equation of the flattened program."""

  prim: jex.Primitive
  params: dict[str, Any]
  ins: tuple[Ref, ...]
  outs: tuple[int, ...]  # slots; -1 for an output nobody reads
  out_avals: tuple[Any, ...]
  ctx: Any  # the equation's context (e.g. a compute placement), entered to bind it


class View(NamedTuple):
  """A value that is a linear map of one parameter alone.

  Attributes:
    param: Index of the parameter (among the differentiated leaves).
    chain: Indices of the ops that map the parameter to this value.
    perm: Axis j of the view is axis ``perm[j]`` of the parameter, or None
      when the chain is not a permutation of axes.
    iso: Whether the chain preserves the norm of a gradient pulled back
      through it (casts, transposes, reshapes; not broadcasts or slices).
  """

  param: int
  chain: tuple[int, ...]
  perm: tuple[int, ...] | None
  iso: bool


class Use(NamedTuple):
  """Operand `pos` of op `op` is `view`, of a parameter; `kind` as above."""

  op: int
  pos: int
  view: View
  kind: str


class Program:
  """A flat list of ops, with the parameter views and uses found in it."""

  def __init__(self, num_params: int):
    self.ops: list[Op] = []
    self.consts: dict[int, Any] = {}
    self.num_slots = 0
    self.views: dict[int, View] = {}
    self.uses: list[Use] = []
    self.num_params = num_params
    self.inputs: list[int] = []
    self.outputs: list[Ref] = []
    self.out_tree: Any = None
    self.out_avals: list[Any] = []
    self.shapes: dict[int, tuple[int, ...]] = {}

  def new_slot(self, shape: tuple[int, ...] = ()) -> int:
    self.shapes[self.num_slots] = tuple(shape)
    self.num_slots += 1
    return self.num_slots - 1

  def shape(self, ref: Ref) -> tuple[int, ...]:
    return np.shape(ref.val) if isinstance(ref, Lit) else self.shapes[ref]

  def uses_of(self, param: int) -> list[Use]:
    return [u for u in self.uses if u.view.param == param]


def bind(op: Op, vals: Sequence[Any]) -> list[Any]:
  """Evaluates `op` on `vals` (as `jax.core.eval_jaxpr` does)."""
  with op.ctx.manager:
    out = op.prim.bind(*vals, **op.prim.get_bind_params(op.params))
  return list(out) if op.prim.multiple_results else [out]


def trace(fn: Callable[..., Any], in_avals: Sequence[Any], num_params: int) -> Program:
  """Traces ``fn(*in_avals)`` (flat arrays in, pytree out) to a `Program`.

  The first `num_params` inputs are the parameters followed to their uses.
  """
  closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(*in_avals)
  prog = Program(num_params)
  prog.out_tree = jax.tree.structure(out_shape)
  prog.out_avals = list(closed.out_avals)
  prog.inputs = [prog.new_slot(np.shape(x)) for x in in_avals]
  for k, slot in enumerate(prog.inputs[:num_params]):
    prog.views[slot] = View(k, (), tuple(range(np.ndim(in_avals[k]))), True)
  prog.outputs = _flatten(prog, closed.jaxpr, closed.consts, prog.inputs)
  for pos, ref in enumerate(prog.outputs):  # a parameter returned as it is
    if _is_view(prog, ref):
      prog.uses.append(Use(-1, pos, prog.views[ref], "other"))
  return prog


def _sub_jaxpr(eqn: Any) -> tuple[Any, Sequence[Any]]:
  for key in ("jaxpr", "call_jaxpr"):
    sub = eqn.params.get(key)
    if isinstance(sub, jex.ClosedJaxpr):
      return sub.jaxpr, sub.consts
    if isinstance(sub, jex.Jaxpr):
      return sub, ()
  raise NotImplementedError(f"no body found in {eqn.primitive}")  # pragma: no cover


def _flatten(prog: Program, jaxpr: Any, consts: Sequence[Any], in_refs: Sequence[Ref]) -> list:
  env: dict[Any, Ref] = {}
  for v, c in zip(jaxpr.constvars, consts):
    env[v] = prog.new_slot(np.shape(c))
    prog.consts[env[v]] = c
  env.update(zip(jaxpr.invars, in_refs))

  def read(v: Any) -> Ref:
    return Lit(v.val) if isinstance(v, jex.Literal) else env[v]

  for eqn in jaxpr.eqns:
    ins = tuple(read(v) for v in eqn.invars)
    if eqn.primitive in _INLINE and any(_is_view(prog, r) for r in ins):
      sub, sub_consts = _sub_jaxpr(eqn)
      env.update(zip(eqn.outvars, _flatten(prog, sub, sub_consts, ins)))
      continue
    outs = tuple(
      -1 if type(v).__name__ == "DropVar" else prog.new_slot(v.aval.shape) for v in eqn.outvars
    )
    avals = tuple(v.aval for v in eqn.outvars)
    op = Op(eqn.primitive, dict(eqn.params), ins, outs, avals, eqn.ctx)
    prog.ops.append(op)
    _observe(prog, len(prog.ops) - 1, op)
    env.update((v, s) for v, s in zip(eqn.outvars, outs) if s >= 0)
  return [read(v) for v in jaxpr.outvars]


def _is_view(prog: Program, ref: Ref) -> bool:
  return not isinstance(ref, Lit) and ref in prog.views


def _observe(prog: Program, index: int, op: Op) -> None:
  """Extends views through view ops; records every other use of a view."""
  view_pos = [k for k, r in enumerate(op.ins) if _is_view(prog, r)]
  if not view_pos or op.prim in _NO_GRADIENT:
    return
  if not any(jnp.issubdtype(a.dtype, jnp.inexact) for a in op.out_avals):
    return  # integer or boolean results carry no gradient
  if len(view_pos) == 1 and len(op.outs) == 1 and op.outs[0] >= 0:
    view = prog.views[op.ins[view_pos[0]]]
    extended = _extend(view, index, op, prog.shape(op.ins[view_pos[0]]))
    if extended is not None:
      prog.views[op.outs[0]] = extended
      return
  for k in view_pos:
    view = prog.views[op.ins[k]]
    prog.uses.append(Use(index, k, view, _kind(op, k)))


def _extend(view: View, index: int, op: Op, in_shape: tuple[int, ...]) -> View | None:
  """The view `op` makes of `view` (of shape `in_shape`), or None if `op` is
  not a view op."""
  if op.prim is prims.convert_element_type_p:
    if not jnp.issubdtype(op.params["new_dtype"], jnp.floating):
      return None
    return view._replace(chain=view.chain + (index,))
  if op.prim in _PERMUTING:
    perm = view.perm
    if op.prim is prims.transpose_p and perm is not None:
      perm = tuple(perm[a] for a in op.params["permutation"])
    return View(view.param, view.chain + (index,), perm, view.iso)
  if op.prim in _RESHAPING or op.prim in _SELECTING:
    iso = view.iso and _keeps_size(op, in_shape)
    return View(view.param, view.chain + (index,), None, iso)
  return None


def _keeps_size(op: Op, in_shape: tuple[int, ...]) -> bool:
  """Whether a reshaping or selecting op keeps every entry exactly once: a
  broadcast that repeats entries (along a new axis or an axis of size 1) or
  a slice does not."""
  if op.prim in _SELECTING:
    return False
  return math.prod(op.out_avals[0].shape) == math.prod(in_shape)


def _kind(op: Op, pos: int) -> str:
  if op.prim is prims.dot_general_p:
    return "dense"
  if op.prim in (prims.gather_p, prims.dynamic_slice_p) and pos == 0:
    return "lookup"
  if op.prim is prims.conv_general_dilated_p and pos == 1:
    return "conv"
  if op.prim in _ELEMENTWISE:
    return "elementwise"
  return "other"


def evaluate(
  prog: Program,
  inputs: Sequence[Any],
  perturb: dict[int, Any],
  taps: dict[int, Any],
  keep: Callable[[int], Sequence[int]],
) -> tuple[list[Any], dict[int, dict[int, Any]]]:
  """Runs the program.

  Args:
    prog: The program.
    inputs: One value per input slot.
    perturb: Parameter index -> array added to that parameter.
    taps: Op index -> array added to that op's (single) output.
    keep: Op index of a tapped op -> the positions of the inputs to return.

  Returns:
    The outputs, and per tapped op the values of its kept inputs.
  """
  env: dict[int, Any] = dict(prog.consts)
  for k, (slot, x) in enumerate(zip(prog.inputs, inputs)):
    env[slot] = x + perturb[k] if k in perturb else x
  saved: dict[int, dict[int, Any]] = {}

  def read(r: Ref) -> Any:
    return r.val if isinstance(r, Lit) else env[r]

  for index, op in enumerate(prog.ops):
    vals = [read(r) for r in op.ins]
    outs = bind(op, vals)
    if index in taps:
      outs[0] = outs[0] + taps[index]
      saved[index] = {k: vals[k] for k in keep(index)}
    env.update((s, x) for s, x in zip(op.outs, outs) if s >= 0)
  return [read(r) for r in prog.outputs], saved


def zeros(aval: Any) -> jax.Array:
  """Zeros of the type `aval`, its varying manual axes (inside `shard_map`)
  and explicit sharding included: added to a value of that type, they take
  a cotangent of the same type (plain zeros would be broadcast to it, and
  their cotangent summed over the devices)."""
  z = jnp.zeros(aval.shape, aval.dtype)
  if explicitly_sharded(aval):
    z = jax.sharding.reshard(z, aval.sharding)
  varying = varying_axes(aval)
  if varying:
    z = jax.lax.pcast(z, varying, to="varying")
  return z


def explicitly_sharded(aval: Any) -> bool:
  """Whether values of the type `aval` are split over explicit mesh axes."""
  spec = getattr(getattr(aval, "sharding", None), "spec", ())
  return any(s is not None for s in spec)


def varying_axes(aval: Any) -> tuple[str, ...]:
  """The manual mesh axes (inside `shard_map`) over which values of the type
  `aval` vary, sorted."""
  varying = getattr(aval, "vma", None)  # jax 0.9
  if varying is None:
    varying = getattr(getattr(aval, "manual_axis_type", None), "varying", None)
  return tuple(sorted(varying or ()))


def apply_chain(prog: Program, chain: Sequence[int], x: Any) -> Any:
  """The view the ops `chain` make of the parameter value `x`."""
  for index in chain:
    op = prog.ops[index]
    vals = [r.val if isinstance(r, Lit) else x for r in op.ins]
    x = bind(op, vals)[0]
  return x
