"""The ghost-clipping pass: per-example norms from one backward pass, then the
clipped sum from the same activations and cotangents ("book-keeping").

Each example's loss runs through the `Program` (under `jax.vmap`) with a
zero added to the output of every op that uses a ghost-clipped parameter,
and to every parameter whose per-example gradient is formed outright. One
backward pass with respect to these zeros gives, per example, the output
cotangent of each such op and the gradient of each such parameter; the
parameters themselves are not differentiated. With the op's inputs (saved
on the way) the cotangents give the ghost norms. Once the clipping factors
``c_i`` are known, each op's contribution to the clipped sum is its pullback
over the whole batch with example i's activations (for lookups, its
cotangents) weighted by ``c_i``: the weight-gradient computation of an
ordinary backward pass. An example whose loss or gradient is not finite has
``c_i = 0`` and its cotangents and activations zeroed, as ``0 * inf`` is NaN,
so that it contributes exactly zero.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jaxclip import _base, _ghost_norms, _norms
from jaxclip._ghost_plan import ParamPlan
from jaxclip._ghost_trace import Lit, Program, Use, apply_chain, bind, evaluate, zeros


class GhostPass:
  """The ghost pass of one program and plan."""

  def __init__(self, prog: Program, plan: list[ParamPlan]):
    self.prog, self.plan = prog, plan
    self.perturbed = [k for k, p in enumerate(plan) if p.kind in ("direct", "fallback")]
    # op index -> {operand position: use} for the uses of ghost parameters
    self.views: dict[int, dict[int, Use]] = {}
    for p in plan:
      for u in p.uses:
        self.views.setdefault(u.op, {})[u.pos] = u
    self.ops = sorted(self.views)

  def _saved_positions(self, index: int) -> list[int]:
    op = self.prog.ops[index]
    return [
      k for k, r in enumerate(op.ins) if not isinstance(r, Lit) and k not in self.views[index]
    ]

  def _literals(self, index: int) -> dict[int, Any]:
    """The literal inputs of op `index` (a constant start of a slice)."""
    return {k: r.val for k, r in enumerate(self.prog.ops[index].ins) if isinstance(r, Lit)}

  def _view_values(self, index: int, diff: list[Any]) -> dict[int, Any]:
    return {
      pos: apply_chain(self.prog, u.view.chain, diff[u.view.param])
      for pos, u in self.views[index].items()
    }

  def example(self, diff: list[Any], others: list[Any]) -> tuple:
    """One example: loss, aux, saved inputs, op cotangents and gradients of
    the perturbed parameters."""
    inputs = [*diff, *others]
    avals = {i: self.prog.ops[i].out_avals[0] for i in self.ops}
    taps0 = {i: zeros(a) for i, a in avals.items()}
    z0 = {k: jnp.zeros_like(diff[k]) for k in self.perturbed}

    def f(taps, z):
      outs, saved = evaluate(self.prog, inputs, z, taps, self._saved_positions)
      loss, aux = jax.tree.unflatten(self.prog.out_tree, outs)
      return loss, (loss, aux, saved)

    _, vjp_fn, (loss, aux, saved) = jax.vjp(f, taps0, z0, has_aux=True)
    cots, grads = vjp_fn(jnp.ones_like(loss))
    return loss, aux, saved, cots, grads

  def ghost_norms(self, diff: list[Any], saved: dict, cots: dict, size: int) -> jax.Array:
    """Per example (`size` of them, batched `saved` and `cots`), the norm of
    each ghost-clipped parameter's gradient, shape ``[size, P]``.

    On one device, taken from the factors as they are; only when some
    example's factors are out of the range where that is exact
    (`_ghost_norms.in_range`) are its norms taken again, one example at a
    time, from balanced factors: scaled copies of every example's factors at
    once would take as much memory as the activations. Where the batch may be
    split over devices, a pass one example at a time would gather it, so
    every norm is taken from balanced factors."""
    if not any(p.kind == "ghost" for p in self.plan):
      return jnp.zeros((size, 0), jnp.float32)

    def norms(balance: bool) -> tuple[jax.Array, jax.Array]:
      return jax.vmap(lambda s, c: self._param_norms(diff, s, c, balance=balance))(saved, cots)

    if not _norms.one_device():
      return norms(balance=True)[0]
    found, ok = norms(balance=False)

    def balanced() -> jax.Array:
      again = jax.lax.map(lambda sc: self._param_norms(diff, *sc, balance=True)[0], (saved, cots))
      return jnp.where(ok[:, None], found, again)

    return _norms.cond(jnp.all(ok), lambda: found, balanced)

  def _param_norms(
    self, diff: list[Any], saved: dict, cots: dict, *, balance: bool
  ) -> tuple[jax.Array, jax.Array]:
    """One example's norm of each ghost-clipped parameter's gradient, and
    whether its factors are in range."""
    out, ok = [], jnp.ones((), bool)
    for p in self.plan:
      if p.kind != "ghost":
        continue
      factors = []
      for u, geom, flip in zip(p.uses, p.geoms, p.swapped):
        inputs = {**self._literals(u.op), **saved[u.op], **self._view_values(u.op, diff)}
        a, b = geom.factors(inputs, cots[u.op])
        factors.append((b, a) if flip else (a, b))
      out.append(_ghost_norms.norm(factors, list(p.sizes), p.ghost, balance=balance))
      if p.ghost and not balance:
        ok &= _ghost_norms.in_range(factors)
    return jnp.stack(out), ok

  def norms(self, ghost: jax.Array, grads: dict[int, jax.Array]) -> jax.Array:
    """Per example, the global norm of the ghost-clipped parameters (their
    norms `ghost`, ``[B, P]``) and the perturbed ones (their gradients)."""
    leaves = ([ghost] if ghost.shape[1] else []) + [grads[k] for k in self.perturbed]
    if not leaves:
      return jnp.zeros(ghost.shape[:1], jnp.float32)
    return _norms.tree_norm(leaves, 2.0, batch_ndim=1)

  def sums(
    self, diff: list[Any], saved: dict, cots: dict, grads: dict, scale: jax.Array
  ) -> list[Any]:
    """Per parameter, the sum over the batch of the clipped gradients."""
    out: list[Any] = [jnp.zeros_like(x) for x in diff]
    for k, s in zip(self.perturbed, _base.weighted_sums(scale, [grads[k] for k in self.perturbed])):
      out[k] = s
    acc: dict[int, jax.Array] = {}
    for index in reversed(self.ops):  # in the order of a backward pass
      # The barrier makes this op's weighted copies wait for the previous
      # op's result, so that one op's copies are alive at a time.
      kept, g, acc = jax.lax.optimization_barrier((saved[index], cots[index], acc))
      kept, g = self._weighted(index, kept, g, scale)
      for u, ct in self._pullback(index, diff, kept, g):
        x = diff[u.view.param]
        _, chain_vjp = jax.vjp(lambda p, u=u: apply_chain(self.prog, u.view.chain, p), x)
        (ct_p,) = chain_vjp(ct)
        acc[u.view.param] = acc.get(u.view.param, 0) + ct_p.astype(_acc_dtype(x))
    for k, s in acc.items():
      out[k] = s.astype(diff[k].dtype)
    return out

  def _weighted(self, index: int, saved: dict, g: jax.Array, scale: jax.Array) -> tuple:
    """The saved inputs and cotangents of op `index` with the clipping
    factors applied once, and dropped examples' floating inputs zeroed (an
    inf or NaN would survive a factor of 0). The op is linear in its one
    floating saved input (the activation of a dense or conv op): the factors
    go into that copy; otherwise (lookups) into the cotangents."""
    dropped = scale == 0
    # 0 * inf is NaN: a dropped example's cotangents are zeroed too.
    g = _zero_dropped(g, dropped)
    floating = [k for k, v in saved.items() if _norms.is_inexact(v)]
    linear = self.prog.ops[index].prim.name in ("dot_general", "conv_general_dilated")
    if linear and len(floating) == 1:
      (k,) = floating
      x = saved[k]
      w = _batch_mask(scale, x).astype(_acc_dtype(x))
      weighted = (x.astype(w.dtype) * w).astype(x.dtype)
      return {**saved, k: jnp.where(_batch_mask(dropped, x), jnp.zeros((), x.dtype), weighted)}, g
    kept = {k: _zero_dropped(v, dropped) for k, v in saved.items()}
    return kept, _scaled(g, scale)

  def _pullback(self, index: int, diff: list[Any], saved: dict, g: jax.Array) -> list:
    """The cotangent of each ghost-parameter operand of op `index`, summed
    over the batch, for output cotangents `g` (batched)."""
    op, uses = self.prog.ops[index], self.views[index]
    positions = sorted(uses)
    views = self._view_values(index, diff)

    def run(vs: tuple, res: dict) -> Any:
      by_pos = dict(zip(positions, vs))
      vals = [
        r.val if isinstance(r, Lit) else by_pos[k] if k in by_pos else res[k]
        for k, r in enumerate(op.ins)
      ]
      return bind(op, vals)[0]

    if saved:
      f = lambda *vs: jax.vmap(lambda res: run(vs, res))(saved)  # noqa: E731
    else:  # every input is a parameter: the output is the same for every example
      f, g = (lambda *vs: run(vs, {})), jnp.sum(g, axis=0)
    _, vjp_fn = jax.vjp(f, *(views[k] for k in positions))
    return list(zip((uses[k] for k in positions), vjp_fn(g)))


def _acc_dtype(x: jax.Array) -> jnp.dtype:
  return jnp.result_type(x.dtype, _norms.accumulation_dtype(x.dtype))


def _batch_mask(mask: jax.Array, x: jax.Array) -> jax.Array:
  return mask.reshape(mask.shape + (1,) * (x.ndim - 1))


def _zero_dropped(x: jax.Array, dropped: jax.Array) -> jax.Array:
  """`x` (floating, batched) with the entries of dropped examples zeroed."""
  if not _norms.is_inexact(x):
    return x
  return jnp.where(_batch_mask(dropped, x), jnp.zeros((), x.dtype), x)


def _scaled(g: jax.Array, scale: jax.Array) -> jax.Array:
  s = _batch_mask(scale, g).astype(_acc_dtype(g))
  return (g.astype(s.dtype) * s).astype(g.dtype)
