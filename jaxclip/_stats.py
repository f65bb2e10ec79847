"""Observability: the measurements of every jaxclip state as a flat dict.

`stats` walks any optimizer state (optax chains and wrappers, jaxclip guards,
a Flax `TrainState`, an `nnx.Optimizer`), finds the jaxclip records in it by
type and returns their fields as scalar arrays under stable, readable keys.
Each jaxclip state says itself what it reports: a `stats_name` class
attribute, a `summary()` method and, for per-tensor states, the
`per_tensor_fields` expanded per tensor. States of other libraries that
jaxclip reports (`optax.apply_if_finite`'s) are listed in `_FOREIGN`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxclip import _layers

Scalars = dict[str, jax.Array]


def _apply_if_finite(s: optax.ApplyIfFiniteState) -> Scalars:
  # Non-finite steps, not skipped ones: past `max_consecutive_errors` (not in
  # the state) optax applies them.
  return {
    "nonfinite": ~s.last_finite,
    "total_nonfinite": s.total_notfinite,
    "consecutive_nonfinite": s.notfinite_count,
  }


# States from other libraries, reported in jaxclip's terms: (name, report).
_FOREIGN: dict[type, tuple[str, Callable[[Any], Scalars]]] = {
  optax.ApplyIfFiniteState: ("apply_if_finite", _apply_if_finite),
}


def _is_record(x: Any) -> bool:
  """A jaxclip state (it says itself what it reports) or a known foreign one."""
  return hasattr(type(x), "stats_name") or type(x) in _FOREIGN


_INJECT_TYPES = (optax.InjectHyperparamsState, optax.InjectStatefulHyperparamsState)
# Fields of wrapper states that only hold the wrapped state: left out of keys.
_TRANSPARENT = frozenset({"inner_state", "inner_states", "inner_opt_state", "opt_state"})


def unwrap(x: Any) -> Any:
  """The array inside an `nnx.Variable` (as held by `nnx.Optimizer`), else x."""
  get_value = getattr(x, "get_value", None)
  if get_value is not None and not isinstance(x, jax.Array | np.ndarray):
    return get_value()
  return x


def _key_part(entry: Any, keep_all: bool = False) -> str | None:
  """One path entry as a key component (None: left out of the key)."""
  if isinstance(entry, jax.tree_util.GetAttrKey) and not keep_all and entry.name in _TRANSPARENT:
    return None
  return _layers.key_str(entry)


def path_name(path: tuple[Any, ...], keep_all: bool = True) -> str:
  """A key path as a slash-separated name: ``layer1/kernel``."""
  parts = (_key_part(e, keep_all) for e in path)
  return "/".join(p for p in parts if p is not None)


class _Found(NamedTuple):
  path: tuple[Any, ...]
  record: Any


def _is_node(x: Any) -> bool:
  return _is_record(x) or isinstance(x, _INJECT_TYPES)


def find_records(tree: Any, path: tuple[Any, ...] = ()) -> list[_Found]:
  """Every registered record and inject-hyperparams state in `tree`."""
  found = []
  for sub, x in jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_node)[0]:
    if not _is_node(x):
      continue
    found.append(_Found(path + sub, x))
    inner = getattr(x, "inner_state", None)
    if inner is not None:
      found.extend(find_records(inner, path + sub + (jax.tree_util.GetAttrKey("inner_state"),)))
  return found


def as_optimizer_state(obj: Any) -> Any:
  """`obj.opt_state` for a Flax `TrainState` or `nnx.Optimizer`, else `obj`."""
  if not isinstance(obj, tuple | list | dict) and hasattr(obj, "opt_state"):
    return obj.opt_state
  return obj


def _name_of(record: Any) -> str:
  if isinstance(record, _INJECT_TYPES):
    return "inject_hyperparams"
  if type(record) in _FOREIGN:
    return _FOREIGN[type(record)][0]
  return type(record).stats_name


def _qualifiers(found: list[_Found]) -> list[str]:
  """Deterministic, distinct key qualifiers for the records found."""
  if len(found) == 1:
    return [""]
  names = [_name_of(f.record) for f in found]
  quals = [
    n if names.count(n) == 1 else "/".join(filter(None, (path_name(f.path, False), n)))
    for f, n in zip(found, names)
  ]
  if len(set(quals)) < len(quals):  # wrappers of wrappers: spell out every field
    quals = ["/".join(filter(None, (path_name(f.path), n))) for f, n in zip(found, names)]
  return quals


def _report(record: Any, names: list[str] | None) -> Scalars:
  """The entries of one record (keys relative to its qualifier)."""
  if isinstance(record, _INJECT_TYPES):
    out = {}
    for k, v in sorted(record.hyperparams.items()):
      v = unwrap(v)
      if np.ndim(v) == 0 and np.issubdtype(jnp.asarray(v).dtype, np.number):
        out[f"hyperparams/{k}"] = jnp.asarray(v)
    return out
  record = type(record)(*(unwrap(f) for f in record))
  if type(record) in _FOREIGN:
    return _FOREIGN[type(record)][1](record)
  out = record.summary()
  if names is not None:
    for field in getattr(type(record), "per_tensor_fields", ()):
      vec = getattr(record, field)
      if vec.shape[0] != len(names):
        raise ValueError(
          f"`params` has {len(names)} floating leaves but a {type(record).__name__}"
          f" in the optimizer state records {vec.shape[0]} tensors. Pass the"
          " parameters the transform sees (for `optax.masked` or"
          " `optax.partition`, the selected subtree), or params=None."
        )
      out.update({f"{field}/{n}": vec[i] for i, n in enumerate(names)})
  return out


def stats(
  opt_state: Any,
  prefix: str = "clip",
  params: optax.Params | None = None,
  *,
  layer_axes: _layers.LayerAxes = None,
) -> Scalars:
  """The measurements of every jaxclip transform in an optimizer state.

  Finds, by type, every jaxclip state ("record") inside `opt_state`, through
  `optax.chain`, `optax.inject_hyperparams`, `optax.masked`,
  `optax.partition` / `optax.multi_transform`, `optax.MultiSteps`,
  `optax.apply_if_finite` and the jaxclip guards, and returns its fields as a
  flat dict of scalar arrays, ready for a logger. It only reads the state: it
  works eagerly and inside `jax.jit` (values are arrays, never Python
  numbers) and costs nothing beyond a few reductions of per-tensor vectors.

  Keys are ``{prefix}/{field}`` when there is one record, such as
  ``clip/global_norm``, ``clip/threshold``, ``clip/scale``,
  ``clip/clipped`` and ``clip/count``. Per-tensor records
  (`PerTensorClipState`, `AdaGCState`, `StableSpamClipState`) are summarised
  as ``norm_max``, ``scale_min``, ``clipped`` (any) and ``clipped_fraction``
  (`SpamClipState` and `ClippyState`, which measure entries against a bound,
  as ``ratio_max`` and the same three); with `params`,
  each tensor is also reported as ``{prefix}/norm/layer1/kernel``,
  ``.../scale/...``, ``.../clipped/...``. `skip_on_spike` reports
  ``skipped`` and ``total_skipped`` (and `skip_large_norm` its
  ``threshold`` too); `skip_nonfinite` reports ``nonfinite``
  (the last step's gradients were not finite), ``total_skipped``,
  ``consecutive_nonfinite`` and ``applied_nonfinite``;
  `optax.apply_if_finite` reports ``nonfinite``, ``total_nonfinite`` and
  ``consecutive_nonfinite`` (its state does not tell the steps it skipped
  from those it applied after giving up); `optax.inject_hyperparams` states report their scalar
  hyperparameters as ``{prefix}/hyperparams/learning_rate``.

  With several records, each key gets a qualifier after the prefix: the
  record's name (``clip_by_global_norm``, ``clip_by_value``, ``per_tensor``,
  ``autoclip``, ``adagc``, ``quantile_clip``, ``zclip``, ``spam_clip``,
  ``stable_spam_clip``, ``clippy``, ``skip_on_spike``, ``skip_large_norm``, ``skip_nonfinite``,
  ``apply_if_finite``, ``record_norms``, ``inject_hyperparams``) when no other record has the same name, otherwise
  its path in the state followed by its name (chain indices and partition
  labels; wrapper fields such as ``inner_state`` are left out), e.g.
  ``clip/0/per_tensor/norm_max`` and ``clip/2/per_tensor/norm_max``. Keys
  depend only on the structure of the optimizer, never on values, so they are
  the same at every step.

  Args:
    opt_state: An optimizer state (any pytree holding optax states), a Flax
      `TrainState` or an `nnx.Optimizer` (their `.opt_state` is read).
    prefix: First component of every key.
    params: Optional tree (parameters or gradients) whose floating leaves
      name the entries of per-tensor records; it must have as many floating
      leaves (layer slices, with `layer_axes`) as the records have entries.
    layer_axes: The `layer_axes` the per-tensor transforms were given: each
      layer slice of a stacked leaf is then named with its index, as in
      ``blocks/3/attn/qkv/kernel``.

  Returns:
    A dict from key to scalar array, sorted by key; empty when the state holds
    no jaxclip record.

  Raises:
    ValueError: If `params` does not have one floating leaf per entry of a
      per-tensor record.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import jaxclip
    >>> opt = optax.chain(jaxclip.clip_by_global_norm(1.0), optax.sgd(0.1))
    >>> g = {"w": jnp.array([3.0, 4.0])}
    >>> _, state = opt.update(g, opt.init(g), g)
    >>> {k: round(float(v), 4) for k, v in jaxclip.stats(state).items()}
    {'clip/clipped': 1.0, 'clip/count': 1.0, 'clip/global_norm': 5.0, 'clip/scale': 0.2, 'clip/threshold': 1.0}
  """
  found = find_records(as_optimizer_state(opt_state))
  names = None if params is None else _layers.tensor_names(params, layer_axes)
  out: Scalars = {}
  for qual, f in zip(_qualifiers(found), found):
    base = "/".join(filter(None, (prefix, qual)))
    for key, value in _report(f.record, names).items():
      out[f"{base}/{key}"] = jnp.asarray(value)
  return dict(sorted(out.items()))
