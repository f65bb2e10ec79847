"""Stacked layers: leaves that hold several layers on leading axes.

`flax.linen.scan`, `nnx.scan`/`nnx.vmap` and vmapped Equinox stacks store the
L layers of a block in one leaf of shape ``(L, ...)``. A per-tensor clipper
should treat each layer slice as its own tensor; `layer_axes` tells it which
leaves are stacked and on how many leading axes:

* an int: every floating leaf has that many leading layer axes;
* a mapping from a path fragment to an int, e.g. ``{"blocks": 1}``: a leaf
  whose key path contains that fragment (one or more consecutive components,
  written ``"decoder/layers"``) has that many; the first fragment found along
  the path wins, and leaves that match none have none.

Each layer slice is then one entry of the per-tensor records, named with its
index right after the fragment: ``blocks/3/attn/qkv/kernel`` (with an int,
the index comes first: ``3/attn/qkv/kernel``).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from jaxclip import _norms

LayerAxes = int | Mapping[str, int] | None

# Normalised: None, an int > 0, or ((fragment components, count), ...).
_Rules = int | tuple[tuple[tuple[str, ...], int], ...] | None


def key_str(entry: Any) -> str:
  """One key path entry as a name component."""
  if isinstance(entry, jax.tree_util.GetAttrKey):
    return entry.name
  if isinstance(entry, jax.tree_util.DictKey):
    return str(entry.key)
  if isinstance(entry, jax.tree_util.SequenceKey):
    return str(entry.idx)
  if isinstance(entry, jax.tree_util.FlattenedIndexKey):
    return str(entry.key)
  return str(entry).strip(".[]'\"")


def check_layer_axes(layer_axes: Any) -> _Rules:
  """Validates `layer_axes` (see the module docstring) and normalises it."""
  fix = (
    "Pass an int (every leaf has that many leading layer axes) or a dict such as"
    ' {"blocks": 1} from a path fragment to a count.'
  )
  if layer_axes is None:
    return None
  if isinstance(layer_axes, bool) or not isinstance(layer_axes, int | Mapping):
    raise TypeError(f"`layer_axes` must be None, an int or a mapping, got {layer_axes!r}. {fix}")
  if isinstance(layer_axes, int):
    if layer_axes < 0:
      raise ValueError(f"`layer_axes` must be >= 0, got {layer_axes}. {fix}")
    return layer_axes or None
  rules = []
  for fragment, count in layer_axes.items():
    parts = tuple(str(fragment).strip("/").split("/")) if isinstance(fragment, str) else ()
    if not parts or not all(parts):
      raise ValueError(
        f"`layer_axes` keys must be path fragments such as 'blocks' or 'decoder/layers',"
        f" got {fragment!r}."
      )
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
      raise ValueError(
        f"`layer_axes[{fragment!r}]` must be an int >= 0 (the number of leading layer"
        f" axes), got {count!r}."
      )
    rules.append((parts, count))
  return tuple(rules) or None


def _match(parts: Sequence[str], rules: _Rules) -> tuple[int, int]:
  """(number of layer axes, where the index goes among `parts`)."""
  if rules is None:
    return 0, 0
  if isinstance(rules, int):
    return rules, 0
  for end in range(1, len(parts) + 1):
    for fragment, count in rules:
      start = end - len(fragment)
      if start >= 0 and tuple(parts[start:end]) == fragment:
        return count, end
  return 0, 0


def _floating_paths(tree: Any) -> list[tuple[list[str], Any]]:
  flat = _flatten(tree, is_leaf=lambda x: x is None or _variable(x))
  return [([key_str(e) for e in path], x) for path, x in flat if _norms.is_inexact(x)]


def _flatten(tree: Any, is_leaf: Any) -> list[tuple[tuple[Any, ...], Any]]:
  """`tree`'s leaves with their paths; a Flax `nnx.Variable`'s path ends at
  the variable (``layer1/kernel``, not ``layer1/kernel/value``), then goes on
  into its value if that is itself a tree."""
  out = []
  for path, x in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)[0]:
    if _variable(x):
      value = x.get_value() if hasattr(x, "get_value") else x.value
      out.extend((path + sub, v) for sub, v in _flatten(value, is_leaf))
    else:
      out.append((path, x))
  return out


def _variable(x: Any) -> bool:
  nnx = sys.modules.get("flax.nnx")  # never imported here: Flax is optional
  return nnx is not None and isinstance(x, nnx.Variable)


def layer_counts(tree: Any, rules: _Rules) -> list[int]:
  """Per floating leaf of `tree`, its number of leading layer axes.

  Raises:
    ValueError: If a leaf has fewer axes than its layer axes.
  """
  counts = []
  for parts, x in _floating_paths(tree):
    k, _ = _match(parts, rules)
    if k > np.ndim(x):
      raise ValueError(
        f"`layer_axes` gives the leaf {'/'.join(parts) or 'at the root'} of shape"
        f" {np.shape(x)} {k} leading layer axes, more than it has. Declare layer axes"
        " only for the stacked part of the tree (a dict such as {'blocks': 1})."
      )
    counts.append(k)
  return counts


def num_entries(tree: Any, rules: _Rules) -> int:
  """The number of per-tensor entries: one per layer slice of every leaf."""
  return sum(
    math.prod(np.shape(x)[:k])
    for (_, x), k in zip(_floating_paths(tree), layer_counts(tree, rules))
  )


def tensor_names(tree: Any, layer_axes: LayerAxes = None) -> list[str]:
  """Names of the per-tensor entries of `tree`: one per floating leaf, or with
  `layer_axes`, one per layer slice (``blocks/3/attn/qkv/kernel``)."""
  rules = check_layer_axes(layer_axes)
  names = []
  for i, ((parts, x), k) in enumerate(zip(_floating_paths(tree), layer_counts(tree, rules))):
    _, at = _match(parts, rules)
    if not k:
      names.append("/".join(parts) or f"{i}")
      continue
    for index in np.ndindex(*np.shape(x)[:k]):
      names.append("/".join([*parts[:at], *map(str, index), *parts[at:]]))
  return names
