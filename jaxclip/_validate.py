"""Validation of user arguments: every check of a hyperparameter lives here.

Only concrete values are checked. Hyperparameters may be traced arrays (under
`optax.inject_hyperparams`, or a factory called while a jit traces): their
values are known only inside the step, so they pass through unchecked. Checks
use NumPy (and `jnp` only for dtype queries), so that they run while a jit
traces the caller.
Every error names the argument, the value and the fix.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from typing import Any, TypeAlias

import jax
import jax.numpy as jnp
import numpy as np

# A threshold: a number, an array (possibly traced, e.g. under
# `optax.inject_hyperparams`) or a schedule mapping the step count to a value.
Threshold: TypeAlias = jax.typing.ArrayLike | Callable[[jax.Array], jax.typing.ArrayLike]
# The order of a norm: a number p > 0 or 'inf'.
Ord: TypeAlias = int | float | str


def is_concrete(value: object) -> bool:
  """Whether `value` can be inspected in Python (it is not traced)."""
  return not isinstance(value, jax.core.Tracer)


def _as_real(value: Any, name: str) -> np.ndarray:
  """A concrete real value as float64 (bf16, fp16 and float8 included)."""
  arr = np.asarray(value)
  if not (jnp.issubdtype(arr.dtype, jnp.integer) or jnp.issubdtype(arr.dtype, jnp.floating)):
    raise TypeError(
      f"`{name}` must be a real number or an array of real numbers, got"
      f" {value!r} of dtype {arr.dtype}."
    )
  return arr.astype(np.float64)


def check_threshold(
  value: Threshold,
  name: str,
  *,
  allow_negative: bool = False,
  allow_schedule: bool = True,
  scalar: bool = True,
) -> None:
  """Raises for a concrete non-numeric, NaN (or negative) threshold, or, with
  `scalar`, one that is not a scalar.

  Any real dtype is accepted (bf16, fp16 and float8 thresholds included).
  Schedules and traced values are not checked here: their values are only
  known inside the step (`check_scalar` checks their shape there). With
  ``allow_schedule=False`` a callable is a TypeError.
  """
  if callable(value) and not allow_schedule:
    raise TypeError(
      f"`{name}` must be a number or an array, got the callable {value!r}:"
      " this argument does not take a schedule."
    )
  if callable(value) or not is_concrete(value):
    return
  if isinstance(value, bool | np.bool_):
    raise TypeError(f"`{name}` must be a number or an array, got the bool {value!r}.")
  if not isinstance(value, numbers.Number | np.ndarray | np.generic | jax.Array):
    raise TypeError(
      f"`{name}` must be a number, an array or a schedule (a callable taking"
      f" the step count), got {value!r} of type {type(value).__name__}."
    )
  arr = _as_real(value, name)
  if scalar:
    check_scalar(arr, name)
  if np.any(np.isnan(arr)):
    raise ValueError(
      f"`{name}` is NaN ({value!r}); pass a number such as 1.0, or math.inf to disable clipping."
    )
  if not allow_negative and np.any(arr < 0):
    raise ValueError(
      f"`{name}` must be >= 0, got {value!r}. A threshold of 0 zeroes every"
      " non-zero update and math.inf disables clipping."
    )


def check_scalar(value: Any, name: str) -> None:
  """Raises a ValueError if `value` (concrete or traced: shapes are known
  while tracing) is not a scalar: an array would be broadcast into the
  updates, changing their shapes, or read as one value per tensor."""
  shape = np.shape(value)
  if shape:
    raise ValueError(
      f"`{name}` must be a scalar, got an array of shape {shape}. Pass one"
      " number (a 0-d array, or a schedule returning one); to treat tensors"
      " differently, use `optax.masked` or `optax.partition`."
    )


def check_range(value: Any, name: str, lo: float, hi: float, fix: str) -> None:
  """Raises a ValueError if a concrete `value` is outside ``[lo, hi]``."""
  check_threshold(value, name, allow_negative=True, allow_schedule=False)
  if not is_concrete(value):
    return
  v = _as_real(value, name)
  if np.any((v < lo) | (v > hi)):
    raise ValueError(f"`{name}` must be in [{lo}, {hi}], got {value!r}. {fix}")


def check_ord(ord: Any, name: str = "ord") -> float:
  """Returns a norm order as a float p > 0 (``math.inf`` for the max norm).

  None means 2; a concrete 0-d array is accepted.
  """
  if ord is None:
    return 2.0
  if isinstance(ord, jax.Array | np.ndarray | np.generic):
    if not is_concrete(ord):
      raise TypeError(
        f"`{name}` must be a Python number, not a traced array. Under"
        f" `optax.inject_hyperparams`, pass static_args=('{name}',)."
      )
    if np.ndim(ord) != 0:
      raise ValueError(f"`{name}` must be a scalar, got shape {np.shape(ord)}.")
    ord = float(ord)
  if isinstance(ord, str):
    if ord.strip().lower() in ("inf", "+inf", "infinity", "+infinity"):
      return math.inf
    raise ValueError(
      f"`{name}` must be a number > 0 or 'inf', got {ord!r}. Use 2 for the"
      " Euclidean norm, 1 for the sum of magnitudes or math.inf for the max."
    )
  if isinstance(ord, bool) or not isinstance(ord, numbers.Real):
    raise TypeError(
      f"`{name}` must be a Python number > 0 or 'inf', got {ord!r} of type {type(ord).__name__}."
    )
  p = float(ord)
  if not p > 0:  # also catches NaN
    raise ValueError(
      f"`{name}` must be > 0, got {ord!r}: p-norms with p <= 0 are not norms"
      " and are not scale-equivariant. Use 2, 1, math.inf or any p > 0."
    )
  return p


def check_axis(axis: Any, name: str = "axis") -> int | tuple[int, ...] | None:
  """Validates reduction axes: None, an int or a tuple of ints."""
  if axis is None:
    return None
  if isinstance(axis, int) and not isinstance(axis, bool):
    return axis
  if isinstance(axis, tuple | list) and all(
    isinstance(a, int) and not isinstance(a, bool) for a in axis
  ):
    return tuple(axis)
  hint = ""
  if isinstance(axis, jax.Array | np.ndarray):
    hint = f" Under `optax.inject_hyperparams`, pass static_args=('{name}',)."
  raise TypeError(f"`{name}` must be None, an int or a tuple of ints, got {axis!r}.{hint}")


def check_int(value: Any, name: str, minimum: int) -> int:
  """Validates a static integer hyperparameter (sizes, step counts)."""
  if isinstance(value, bool) or not isinstance(value, numbers.Integral):
    raise TypeError(
      f"`{name}` must be a Python int >= {minimum}, got {value!r} of type"
      f" {type(value).__name__}. It sets an array shape or a step count, so it"
      " cannot be traced: under `optax.inject_hyperparams`, list it in"
      f" static_args=('{name}',)."
    )
  if value < minimum:
    raise ValueError(f"`{name}` must be >= {minimum}, got {value!r}.")
  return int(value)


def check_choice(value: Any, name: str, choices: tuple[str, ...]) -> str:
  """Validates a mode given as a string (case-insensitive)."""
  if not isinstance(value, str) or value.lower() not in choices:
    raise ValueError(f"`{name}` must be one of {choices}, got {value!r}.")
  return value.lower()


def check_bool(value: Any, name: str) -> bool:
  """Validates a flag."""
  if not isinstance(value, bool | np.bool_):
    raise TypeError(f"`{name}` must be True or False, got {value!r}.")
  return bool(value)
