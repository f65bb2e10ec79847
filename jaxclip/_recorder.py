"""Choosing a clipping threshold: record the norms of a real run, then suggest.

`record_norms` is an identity transform that keeps the global and per-tensor
gradient norms of the first steps in fixed-size arrays; `suggest_max_norm`
turns them into a `max_norm` for `clip_by_global_norm`, with the numbers
behind it.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxclip import _base, _layers, _norms, _stats, _validate

_REPORTED_PERCENTILES = (50.0, 90.0, 95.0, 99.0)
_TABLE_PERCENTILES = (50.0, 75.0, 90.0, 95.0, 99.0, 100.0)
# The default rule (measured in docs/study.md): a quarter of the median norm,
# or the median itself when it is under a third of the first recorded norm.
_SETTLED_FALL = 3.0
_UNSETTLED_FACTOR = 0.25


class RecordNormsState(NamedTuple):
  """State of `record_norms`: the norms of the first `num_steps` steps.

  Rows past the number of recorded steps, ``min(count, num_steps)``, are 0.

  Attributes:
    count: Number of updates seen, recorded or not (int32).
    global_norm: Shape ``(num_steps,)``: the global norm of the updates at
      each recorded step (float32, float64 for float64 updates).
    norms: Shape ``(num_steps, num_tensors)``: the norm of each floating leaf,
      in `jax.tree.leaves` order (per layer with `layer_axes`, as
      `PerTensorClipState` says; ``num_tensors`` is 0 with
      ``per_tensor=False``).
  """

  count: jax.Array
  global_norm: jax.Array
  norms: jax.Array

  stats_name = "record_norms"

  def summary(self) -> dict[str, jax.Array]:
    """What `jaxclip.stats` reports."""
    return {"recorded": jnp.minimum(self.count, self.global_norm.shape[0]), "count": self.count}


def record_norms(
  num_steps: int, *, per_tensor: bool = True, layer_axes: _layers.LayerAxes = None
) -> optax.GradientTransformationExtraArgs:
  """Records the gradient norms of the first `num_steps` steps, unchanged.

  An identity transform for choosing a clipping threshold from a real run:
  put it first in the chain, train as usual, then pass the state to
  `suggest_max_norm` (or `plot_norms`). It keeps the global norm and, with
  `per_tensor`, the norm of every floating leaf, in arrays of fixed shapes
  ``(num_steps,)`` and ``(num_steps, num_tensors)``: the state jits and
  checkpoints like any other and never grows. After `num_steps` steps it only
  counts; the norms are no longer computed.

  Args:
    num_steps: Number of steps to record (a Python int >= 1).
    per_tensor: Whether to also record the norm of each tensor (used to find
      the layers that dominate the global norm).
    layer_axes: Which leaves stack several layers on leading axes (an int
      for every leaf, or a dict such as ``{"blocks": 1}`` from a path
      fragment to a count): each layer slice is then recorded as a tensor of
      its own. Give the same `layer_axes` to `suggest_max_norm`,
      `plot_norms` and `stats` to name them.

  Returns:
    An `optax.GradientTransformationExtraArgs` whose state is a
    `RecordNormsState`.

  Raises:
    TypeError: If `num_steps` is not an int.
    ValueError: If `num_steps < 1`, or if the updates do not have the
      floating leaves of the tree passed to `init`.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import jaxclip
    >>> opt = optax.chain(jaxclip.record_norms(num_steps=100), optax.sgd(0.1))
    >>> params = {"b": jnp.zeros(2), "w": jnp.zeros(2)}
    >>> state = opt.init(params)
    >>> g = {"b": jnp.array([0.0, 1.0]), "w": jnp.array([3.0, 4.0])}
    >>> _, state = opt.update(g, state, params)
    >>> recorder = state[0]
    >>> recorder.global_norm.shape, recorder.norms.shape
    ((100,), (100, 2))
    >>> recorder.norms[0]
    Array([1., 5.], dtype=float32)
  """
  num_steps = _validate.check_int(num_steps, "num_steps", 1)
  rules = _layers.check_layer_axes(layer_axes)

  def init_fn(params):
    dtype = _base.record_dtype(params)
    _norms.inexact_leaves(params)  # a Python-number leaf is an error
    k = _layers.num_entries(params, rules) if per_tensor else 0
    return RecordNormsState(
      _base.zero_count(), jnp.zeros((num_steps,), dtype), jnp.zeros((num_steps, k), dtype)
    )

  def update_fn(updates, state, params=None, **extra_args):
    del params, extra_args
    if not isinstance(state, RecordNormsState):
      return updates, state
    leaves = _norms.inexact_leaves(updates)
    k = state.norms.shape[1]
    if per_tensor and _layers.num_entries(updates, rules) != k:
      raise ValueError(
        f"record_norms was initialised for {k} tensors (floating leaves, or layer"
        f" slices with `layer_axes`) but the updates have"
        f" {_layers.num_entries(updates, rules)}: call `init` with the parameters"
        " being trained."
      )

    def record(s):
      dtype = s.global_norm.dtype
      if k:  # the global norm from the per-tensor ones: one pass over the updates
        row = _norms.leaf_norms(_norms.Layout(leaves, _layers.layer_counts(updates, rules)), 2.0)
        g = _norms.tree_norm([row], 2.0).astype(dtype)
      else:
        row, g = jnp.zeros((0,)), _norms.tree_norm(leaves, 2.0).astype(dtype)
      return s._replace(
        global_norm=s.global_norm.at[s.count].set(g),
        norms=s.norms.at[s.count].set(row.astype(dtype)),
      )

    state = _norms.cond(state.count < num_steps, record, lambda s: s, state)
    return updates, state._replace(count=state.count + 1)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


@dataclasses.dataclass(frozen=True)
class ThresholdSuggestion:
  """A proposed `max_norm` and the measurements behind it (plain Python data).

  `str(suggestion)` (or `suggestion.explain()`) reads as a short report.

  Attributes:
    max_norm: The suggested threshold: `raw` rounded to two significant digits.
    raw: `factor` times the `percentile`-th percentile of the recorded finite
      global norms.
    percentile: The percentile the suggestion starts from: the one asked for,
      or 50 with the default rule.
    factor: The multiple of that percentile suggested: 1, or 0.25 when the
      default rule finds that the norm did not fall from its first finite
      value.
    num_steps: Number of finite recorded steps the suggestion rests on.
    num_nonfinite: Recorded steps with an inf or NaN norm (left out).
    percentiles: Global-norm summary: ``{"p50": ..., "p90": ..., "p95": ...,
      "p99": ..., "max": ..., "mean": ...}``.
    dominant: Up to five ``(tensor name, mean share)`` pairs, largest first:
      the mean over steps of ``norm(tensor)**2 / global_norm**2``. Empty when
      no per-tensor norms were recorded.
    table: Rows ``(label, threshold, steps clipped, fraction clipped)`` for
      thresholds at several percentiles and the suggestion itself: how often
      each would have clipped the recorded steps (norm > threshold).
    notes: Warnings about the data (drift, few steps, non-finite steps).
    global_norm: The finite recorded global norms, in step order.
  """

  max_norm: float
  raw: float
  percentile: float
  num_steps: int
  num_nonfinite: int
  percentiles: dict[str, float]
  dominant: tuple[tuple[str, float], ...]
  table: tuple[tuple[str, float, int, float], ...]
  notes: tuple[str, ...]
  global_norm: np.ndarray = dataclasses.field(repr=False)
  factor: float = 1.0

  def explain(self) -> str:
    """A human-readable report of the suggestion and its reasoning."""
    p = self.percentiles
    if self.factor == 1:
      basis = f"the {self.percentile:g}th percentile of"
    else:
      basis = f"{self.factor:g} x the {self.percentile:g}th percentile,"
      basis += f" {self.raw / self.factor:.4g}, of"
    lines = [
      f"Suggested max_norm: {self.max_norm:.4g}  ({basis} {self.num_steps} recorded global"
      f" norms: {self.raw:.4g}, to 2 significant digits)",
      "Global norm: "
      + "  ".join(f"{k} {v:.4g}" for k, v in p.items() if k != "mean")
      + f"  (mean {p['mean']:.4g})",
    ]
    if self.dominant:
      lines.append("Tensors with the largest mean share of the squared global norm:")
      width = max(len(n) for n, _ in self.dominant)
      lines += [f"  {n:<{width}}  {100 * s:5.1f}%" for n, s in self.dominant]
    lines.append("Recorded steps each threshold would have clipped:")
    lines.append(f"  {'':<10}{'threshold':>11}{'steps':>13}{'fraction':>10}")
    for label, thr, n, frac in self.table:
      steps = f"{n}/{self.num_steps}"
      lines.append(f"  {label:<10}{thr:>11.4g}{steps:>13}{100 * frac:>9.1f}%")
    lines.append("Notes:")
    lines += [f"  - {n}" for n in self.notes]
    return "\n".join(lines)

  def __str__(self) -> str:
    return self.explain()


def recorded_norms(obj: Any) -> tuple[np.ndarray, np.ndarray | None]:
  """(global norms, per-tensor norms or None) from a state or arrays."""
  if isinstance(obj, jax.Array | np.ndarray | list):
    arr = np.asarray(obj, dtype=np.float64)
    if arr.ndim == 1:
      return arr, None
    if arr.ndim == 2:
      return np.asarray(_norms.norm_along(jnp.asarray(arr), 2.0, 1))[:, 0], arr
    raise ValueError(
      f"Expected recorded norms of shape (steps,) or (steps, tensors), got shape {arr.shape}."
    )
  if not isinstance(obj, RecordNormsState):
    obj = _one_recorder(obj)
  n = min(int(obj.count), obj.global_norm.shape[0])
  per = np.asarray(obj.norms, np.float64)[:n]
  return np.asarray(obj.global_norm, np.float64)[:n], per if per.shape[1] else None


def _one_recorder(obj: Any) -> RecordNormsState:
  state = _stats.as_optimizer_state(obj)
  found = [f.record for f in _stats.find_records(state) if isinstance(f.record, RecordNormsState)]
  if len(found) != 1:
    raise ValueError(
      f"Expected a RecordNormsState, an optimizer state holding exactly one, or"
      f" an array of norms; found {len(found)} recorder(s) in a"
      f" {type(obj).__name__}. Chain `jaxclip.record_norms(num_steps)` into the"
      " optimizer, or pass the recorder's state itself."
    )
  return RecordNormsState(*(_stats.unwrap(f) for f in found[0]))


def _round_sig(x: float, digits: int = 2) -> float:
  if not np.isfinite(x) or x == 0:
    return float(x)
  return float(f"{x:.{digits}g}")


def _drift_notes(g: np.ndarray) -> list[str]:
  q = max(len(g) // 4, 1)
  early, late = float(np.median(g[:q])), float(np.median(g[-q:]))
  if early == 0 or late == 0:
    return []
  ratio = late / early
  if ratio < 0.5:
    return [
      f"The norm fell {1 / ratio:.3g}x from the first to the last quarter of the"
      " recording: early-training norms are larger, so this threshold will clip"
      " less often later. For a tighter value, record later steps and pass"
      " `percentile`."
    ]
  if ratio > 2:
    return [
      f"The norm grew {ratio:.3g}x from the first to the last quarter of the"
      " recording: check the run is stable, and re-check the threshold later."
    ]
  return []


def suggest_max_norm(
  recorded: Any,
  percentile: float | None = None,
  params: optax.Params | None = None,
  *,
  min_steps: int = 20,
  layer_axes: _layers.LayerAxes = None,
) -> ThresholdSuggestion:
  """Proposes a `max_norm` for `clip_by_global_norm` from recorded norms.

  The method: take the global gradient norms of a real, unclipped run from
  its first step (`record_norms`) and drop the non-finite ones. With
  `percentile` given, suggest that percentile, rounded to two significant
  digits. By default, follow a rule measured on four tasks in
  `docs/study.md` (each recorded over its first fifth):

  * Suggest a **quarter of the median** recorded norm. It clips most steps,
    so clipping acts as a smaller, adaptive step size. Where every step was
    large (a learning rate too high, heavy-tailed gradient noise) its loss
    was 1.10-1.27x the best fixed threshold's, and the median's 1.8-15x.
  * Unless the median is under a third of the first finite recorded norm:
    training started with large steps and settled, the pattern of rare
    spikes. Then suggest the **median**: the large early steps and later
    spikes are cut, and ordinary steps pass untouched as the norm keeps
    falling.

  The rule reads the first recorded norm as the norm at initialisation: for
  norms recorded later in a run, past a learning-rate warmup, or when
  fine-tuning, pass `percentile` (90-99 for a guard against rare spikes
  only). The suggestion comes with the percentiles of the norm, the tensors
  that dominate it, and a table of how many recorded steps each candidate
  threshold would have clipped.

  Limits: norms are largest early in training and drift afterwards, so a
  threshold from the first steps clips less and less (to protect a later
  phase, record a window that looks like it and pass `percentile`); the
  global norm of a model grows roughly like the square root of its number of
  tensors, so thresholds do not transfer between models; and the norm
  depends on the batch size, the loss scale and the learning rate, so
  re-record after changing them.

  Args:
    recorded: A `RecordNormsState`; an optimizer state, Flax `TrainState` or
      `nnx.Optimizer` holding exactly one; or an array of global norms
      ``(steps,)`` or of per-tensor norms ``(steps, tensors)``, in step order.
    percentile: The percentile of the global norms to suggest, in (0, 100];
      None (default) for the rule above. 90 cuts only the largest tenth of
      the recorded steps.
    params: Optional tree whose floating leaves name the tensors (as in
      `stats`); without it tensors are named by index.
    min_steps: The fewest finite recorded steps accepted.
    layer_axes: The `layer_axes` given to `record_norms`, to name each layer
      slice of a stacked leaf (``blocks/3/attn/qkv/kernel``).

  Returns:
    A `ThresholdSuggestion` of plain Python and NumPy values; print it for
    the reasoning.

  Raises:
    ValueError: If fewer than `min_steps` finite steps were recorded, the
      suggestion would be 0, the percentile is outside (0, 100], or `params`
      does not match the number of recorded tensors.

  Examples:
    >>> import numpy as np
    >>> import jaxclip
    >>> norms = np.linspace(1.0, 2.0, 101)  # e.g. from jaxclip.record_norms
    >>> s = jaxclip.suggest_max_norm(norms, percentile=90)
    >>> s.max_norm, s.raw
    (1.9, 1.9)
    >>> s.table[-1]  # ('suggested', threshold, steps clipped, fraction)
    ('suggested', 1.9, 10, 0.09900990099009901)
    >>> falling = np.geomspace(10.0, 0.5, 101)  # settled: the median
    >>> jaxclip.suggest_max_norm(falling).max_norm
    2.2
    >>> flat = np.full(101, 2.0)  # never fell: a quarter of the median
    >>> jaxclip.suggest_max_norm(flat).max_norm
    0.5

  References:
    The measurements behind the default rule: `docs/study.md`.
  """
  min_steps = _validate.check_int(min_steps, "min_steps", 1)
  if percentile is not None and (
    isinstance(percentile, bool | np.bool_) or not 0 < float(percentile) <= 100
  ):
    raise ValueError(
      f"`percentile` must be in (0, 100] or None, got {percentile!r}; 90 clips"
      " about one step in ten, None picks from the recorded norms."
    )
  g_all, per = recorded_norms(recorded)
  finite = np.isfinite(g_all)
  g = g_all[finite]
  if g.size < min_steps:
    bad = g_all.size - g.size
    if bad > g.size:  # mostly inf/NaN: the run diverged, and more of it will not help
      raise ValueError(
        f"Only {g.size} of the {g_all.size} recorded steps have a finite norm: the"
        " run diverged, and its norms say little about a threshold. Record a"
        " stable run instead: a lower learning rate, or a loose clip after"
        " `record_norms` (e.g. `clip_by_global_norm(100.0)`), which keeps"
        " training going while the pre-clip norms are recorded."
      )
    raise ValueError(
      f"Only {g.size} finite steps were recorded ({bad} non-finite);"
      f" suggest_max_norm needs at least min_steps={min_steps}. Train for more"
      " steps with `record_norms(num_steps=...)` before asking, or lower `min_steps`."
    )
  if percentile is None:
    percentile, factor, rule = _default_rule(g)
  else:
    percentile, factor, rule = float(percentile), 1.0, []
  raw = factor * float(np.percentile(g, percentile))
  if raw == 0:
    raise ValueError(
      f"The {percentile:g}th percentile of the {g.size} finite recorded norms is 0"
      f" ({int(np.sum(g == 0))} of them are 0): a threshold of 0 would zero every"
      " update. Check that `record_norms` sees the gradients (first in the chain),"
      " or pass a higher `percentile`."
    )
  max_norm = _round_sig(raw)
  summary = {f"p{q:g}": float(np.percentile(g, q)) for q in _REPORTED_PERCENTILES}
  summary.update(max=float(g.max()), mean=float(g.mean()))
  rows = [(f"p{q:g}" if q < 100 else "max", float(np.percentile(g, q))) for q in _TABLE_PERCENTILES]
  rows.append(("suggested", max_norm))
  table = tuple((lab, thr, int(np.sum(g > thr)), float(np.mean(g > thr))) for lab, thr in rows)
  return ThresholdSuggestion(
    max_norm=max_norm,
    raw=raw,
    percentile=percentile,
    num_steps=int(g.size),
    num_nonfinite=int(g_all.size - g.size),
    percentiles=summary,
    dominant=_dominant(g_all, per, finite, names(per, params, layer_axes)),
    table=table,
    notes=tuple(rule + _notes(g, g_all.size - g.size, percentile)),
    global_norm=g,
    factor=factor,
  )


def _default_rule(g: np.ndarray) -> tuple[float, float, list[str]]:
  """(percentile, factor, notes) of the default rule for finite norms `g`."""
  first, median = float(g[0]), float(np.median(g))
  fall = first / median if median > 0 else math.inf
  if fall > _SETTLED_FALL:
    notes = [
      f"The norm fell {fall:.3g}x from its first value ({first:.3g}) to its median"
      f" ({median:.3g}): training settled, so the median is suggested. The large"
      " early steps and later spikes are cut."
    ]
  else:
    notes = [
      f"The norm did not fall 3x from its first value ({first:.3g}; median"
      f" {median:.3g}), so a quarter of the median is suggested. It clips most"
      " steps (a smaller, adaptive step size): close to the best in the study"
      " (docs/study.md) where every step was large. For a guard against rare"
      " spikes only, or norms not recorded from initialisation, pass"
      " `percentile` (90-99)."
    ]
  if 2 < fall < 4.5:
    notes.append(
      f"The fall ({fall:.3g}x) is close to the rule's 3x: the other choice,"
      f" {'a quarter of the median' if fall > _SETTLED_FALL else 'the median'}"
      f" ({(_UNSETTLED_FACTOR if fall > _SETTLED_FALL else 1) * median:.2g}), is as"
      " plausible; a second recording tells them apart."
    )
  if fall > _SETTLED_FALL:
    return 50.0, 1.0, notes
  return 50.0, _UNSETTLED_FACTOR, notes


def names(per: np.ndarray | None, params: Any, layer_axes: _layers.LayerAxes) -> list[str]:
  """Names of the recorded tensors: from `params` (checked to match), else by index."""
  if per is None:
    return []
  if params is None:
    return [f"tensor {i}" for i in range(per.shape[1])]
  found = _layers.tensor_names(params, layer_axes)
  if len(found) != per.shape[1]:
    raise ValueError(
      f"`params` has {len(found)} tensors (floating leaves, or layer slices with"
      f" `layer_axes`) but {per.shape[1]} were recorded; pass the tree given to"
      " `init` and the `layer_axes` given to `record_norms`."
    )
  return found


def _dominant(g, per, finite, names) -> tuple[tuple[str, float], ...]:
  if per is None:
    return ()
  ok = finite & np.all(np.isfinite(per), axis=1) & (g > 0)
  if not ok.any():
    return ()
  share = np.mean(per[ok] ** 2 / g[ok, None] ** 2, axis=0)
  order = np.argsort(-share, kind="stable")[:5]
  return tuple((names[i], float(share[i])) for i in order)


def _notes(g: np.ndarray, nonfinite: int, percentile: float) -> list[str]:
  notes = _drift_notes(g)
  tail = g.size * (100 - percentile) / 100
  if percentile < 100 and tail < 5:
    notes.append(
      f"Only ~{tail:.1f} of {g.size} steps lie above the {percentile:g}th"
      " percentile: record more steps for a stable estimate."
    )
  if nonfinite:
    notes.append(f"{nonfinite} recorded steps had inf/NaN norms and were left out.")
  notes.append(
    "The global norm grows roughly like sqrt(number of tensors) and depends on"
    " batch size, loss scale and learning rate: re-check after changing them."
  )
  return notes
