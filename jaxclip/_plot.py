"""A picture of recorded gradient norms against a threshold (needs matplotlib)."""

from __future__ import annotations

import os
import pathlib
from typing import Any

import numpy as np
import optax

from jaxclip import _recorder
from jaxclip._layers import LayerAxes

_TOP_TENSORS = 6


def _figure_class() -> Any:
  try:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
  except ImportError as e:
    raise ImportError(
      "jaxclip.plot_norms needs matplotlib, an optional extra: `pip install jaxclip[plot]`"
      " (or `pip install matplotlib`)."
    ) from e
  return Figure, FigureCanvasAgg


def _history(recorded: Any) -> tuple[np.ndarray, np.ndarray | None]:
  """All recorded global norms (non-finite ones kept) and per-tensor norms."""
  return _recorder.recorded_norms(recorded)


def plot_norms(
  recorded: Any,
  threshold: float | _recorder.ThresholdSuggestion | None = None,
  path: str | os.PathLike[str] = "norms.png",
  *,
  per_layer: bool = True,
  params: optax.Params | None = None,
  layer_axes: LayerAxes = None,
) -> pathlib.Path:
  """Saves a PNG of the recorded gradient norms against a clipping threshold.

  The top panel shows the global norm at each recorded step (log scale), the
  threshold as a horizontal line and the steps it would have clipped as red
  marks. With `per_layer` and per-tensor norms recorded, a second panel shows
  each tensor's share of the squared global norm over the steps (the largest
  few tensors, the rest summed as "other"), which tells which layers a global
  clip mostly acts on. Drawn with matplotlib's Agg backend, without pyplot,
  so it works headless and leaves pyplot's state alone.

  Needs the `plot` extra: ``pip install 'jaxclip[plot]'``.

  Args:
    recorded: What `suggest_max_norm` accepts: a `RecordNormsState`, a state
      holding one, or an array of norms ``(steps,)`` or ``(steps, tensors)``.
    threshold: A threshold to draw, a `ThresholdSuggestion` (its `max_norm`
      is drawn) or None for none.
    path: Where to write the PNG; parent directories are created.
    per_layer: Whether to add the per-tensor panel (when per-tensor norms were
      recorded).
    params: Optional tree whose floating leaves name the tensors (as in
      `stats`).
    layer_axes: The `layer_axes` given to `record_norms`, to name each layer
      slice of a stacked leaf.

  Returns:
    The path written.

  Raises:
    ImportError: If matplotlib is not installed (``pip install jaxclip[plot]``).
    ValueError: If nothing was recorded, or `params` does not match.

  Examples:
    >>> import pathlib, tempfile
    >>> import numpy as np
    >>> import jaxclip
    >>> norms = np.abs(np.random.default_rng(0).normal(1.0, 0.3, size=(50, 3)))
    >>> out = pathlib.Path(tempfile.mkdtemp()) / "norms.png"
    >>> jaxclip.plot_norms(norms, threshold=1.5, path=out).read_bytes()[:4]
    b'\\x89PNG'
  """
  figure_cls, canvas_cls = _figure_class()
  g, per = _history(recorded)
  if g.size == 0:
    raise ValueError("No steps were recorded: train with `record_norms` before plotting.")
  if isinstance(threshold, _recorder.ThresholdSuggestion):
    threshold = threshold.max_norm
  panel = per_layer and per is not None and per.shape[1] > 0
  fig = figure_cls(figsize=(8, 6.5 if panel else 3.6), layout="constrained")
  canvas_cls(fig)
  axes = fig.subplots(2 if panel else 1, 1, sharex=True, squeeze=False)[:, 0]
  _draw_global(axes[0], g, threshold)
  if panel:
    _draw_shares(axes[1], g, per, _recorder.names(per, params, layer_axes))
  axes[-1].set_xlabel("step")
  out = pathlib.Path(path)
  out.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(out, dpi=110)
  return out


def _draw_global(ax: Any, g: np.ndarray, threshold: float | None) -> None:
  steps = np.arange(g.size)
  finite = np.isfinite(g) & (g > 0)
  ax.plot(steps[finite], g[finite], color="tab:blue", lw=1.2, label="global norm")
  ax.set_yscale("log")
  ax.set_ylabel("gradient global norm")
  title = f"Gradient norm over {g.size} recorded steps"
  if threshold is not None:
    threshold = float(threshold)
    hit = finite & (g > threshold)
    ax.axhline(threshold, color="tab:red", ls="--", lw=1.2, label=f"max_norm = {threshold:.3g}")
    ax.plot(steps[hit], g[hit], "x", color="tab:red", ms=5, label="would be clipped")
    title += f": {int(hit.sum())} would be clipped ({100 * hit.mean():.0f}%)"
  if (~np.isfinite(g)).any():
    bad = steps[~np.isfinite(g)]
    ax.plot(bad, np.full(bad.shape, np.nanmax(g[finite]) if finite.any() else 1), "v", color="k")
  ax.set_title(title, fontsize=10)
  ax.grid(True, which="both", alpha=0.25)
  ax.legend(loc="lower left", fontsize=8, framealpha=0.9)


def _draw_shares(ax: Any, g: np.ndarray, per: np.ndarray, names: list[str]) -> None:
  ok = np.isfinite(g) & (g > 0) & np.all(np.isfinite(per), axis=1)
  share = np.zeros_like(per)
  share[ok] = per[ok] ** 2 / g[ok, None] ** 2
  order = np.argsort(-share[ok].mean(axis=0) if ok.any() else np.zeros(per.shape[1]))
  top = order[:_TOP_TENSORS]
  layers = [share[:, i] for i in top]
  labels = [names[i] for i in top]
  if per.shape[1] > len(top):
    layers.append(share[:, order[len(top) :]].sum(axis=1))
    labels.append(f"other ({per.shape[1] - len(top)} tensors)")
  ax.stackplot(np.arange(g.size), *layers, labels=labels, alpha=0.85)
  ax.set_ylim(0, 1)
  ax.set_ylabel("share of squared norm")
  ax.set_title("Which tensors make up the global norm", fontsize=10)
  ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
