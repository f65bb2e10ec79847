"""How ghost clipping gets each parameter's per-example gradient norm.

Every differentiated parameter gets one of four plans:

* ``ghost``: all its uses are dense contractions, row lookups or
  convolutions, reached through casts, transposes or reshapes; a parameter
  used several times (tied embeddings, shared weights) must factor the same
  way in every use, through casts and transposes only, so that the cross
  terms of its uses can be computed. Its norm comes from factors
  (`jaxclip._ghost_norms`): ghost norms or the per-example gradient formed
  in the layer's own shape, whichever is smaller.
* ``direct``: used only by elementwise operations (biases, norm scales): its
  per-example gradient, the size of the parameter, is computed outright.
* ``fallback``: anything else. Under ``method="auto"`` its per-example
  gradient is formed, for this parameter alone; ``method="ghost"`` refuses.
* ``unused``: no gradient reaches it.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax.numpy as jnp

from jaxclip import _ghost_norms
from jaxclip._ghost_trace import Program, Use


class ParamPlan(NamedTuple):
  """The plan for one parameter (see the module docstring).

  Attributes:
    kind: ``"ghost"``, ``"direct"``, ``"fallback"`` or ``"unused"``.
    uses: Its uses, for ``ghost``.
    geoms: The geometry of each use.
    swapped: Per use, whether its factors are taken in the reverse order so
      that every use factors the parameter's axes alike.
    sizes: Per use, ``(H, T, K_a, K_b)`` in that order.
    ghost: Ghost norms (True) or the per-example gradient formed (False).
    reason: Why a ``fallback`` parameter is not ghost-clipped.
  """

  kind: str
  uses: tuple[Use, ...] = ()
  geoms: tuple[_ghost_norms.Geometry, ...] = ()
  swapped: tuple[bool, ...] = ()
  sizes: tuple[tuple[int, int, int, int], ...] = ()
  ghost: bool = True
  reason: str = ""


def make_plan(prog: Program, diff_avals: list[Any]) -> list[ParamPlan]:
  """One plan per differentiated parameter."""
  return [_classify(prog, k, aval) for k, aval in enumerate(diff_avals)]


def _names(prog: Program, uses: list[Use]) -> str:
  names = sorted({"the output" if u.op < 0 else f"`{prog.ops[u.op].prim.name}`" for u in uses})
  return ", ".join(names)


def _classify(prog: Program, k: int, aval: Any) -> ParamPlan:
  uses = prog.uses_of(k)
  if not uses:
    return ParamPlan("unused")
  if jnp.issubdtype(aval.dtype, jnp.complexfloating):
    return ParamPlan("fallback", reason="complex parameters are not ghost-clipped")
  kinds = {u.kind for u in uses}
  if kinds == {"elementwise"}:
    return ParamPlan("direct")
  if not kinds <= {"dense", "lookup", "conv"}:
    return ParamPlan("fallback", reason=f"it is used by {_names(prog, uses)}")
  complex_uses = [
    u
    for u in uses
    if any(jnp.issubdtype(a.dtype, jnp.complexfloating) for a in prog.ops[u.op].out_avals)
  ]
  if complex_uses:  # a real weight applied to complex activations
    return ParamPlan(
      "fallback", reason=f"its use by {_names(prog, complex_uses)} is complex-valued"
    )
  bad = [u for u in uses if not u.view.iso]
  if bad:
    chain = sorted({prog.ops[i].prim.name for u in bad for i in u.view.chain})
    return ParamPlan(
      "fallback",
      reason=f"it reaches {_names(prog, bad)} through a broadcast or slice ({', '.join(chain)})",
    )
  geoms = [_ghost_norms.geometry(prog, u) for u in uses]
  if any(g is None for g in geoms):
    odd = [u for u, g in zip(uses, geoms) if g is None]
    return ParamPlan(
      "fallback", reason=f"its use by {_names(prog, odd)} is not of a form supported"
    )
  if len(uses) == 1:
    g = geoms[0]
    return ParamPlan(
      "ghost", tuple(uses), (g,), (False,), (g.size,), _ghost_norms.use_ghost([g.size])
    )
  return _shared(prog, uses, geoms)


def _shared(prog: Program, uses: list[Use], geoms: list) -> ParamPlan:
  """A parameter used several times: every use must factor its axes alike."""
  fail = ParamPlan(
    "fallback",
    reason=f"it is used {len(uses)} times ({_names(prog, uses)}) in ways whose cross"
    " terms cannot be factored",
  )
  if any(u.view.perm is None or u.kind == "conv" for u in uses):
    return fail
  first, second = geoms[0].sets
  swapped, sizes = [], []
  for g in geoms:
    if g.hset != geoms[0].hset or {g.sets, g.sets[::-1]}.isdisjoint({(first, second)}):
      return fail
    flip = g.sets != (first, second)
    h, t, ka, kb = g.size
    swapped.append(flip)
    sizes.append((h, t, kb, ka) if flip else (h, t, ka, kb))
  ghost = _ghost_norms.use_ghost(sizes)
  return ParamPlan("ghost", tuple(uses), tuple(geoms), tuple(swapped), tuple(sizes), ghost)
