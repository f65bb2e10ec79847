"""Exact ports of PyTorch's gradient clipping (``torch.nn.utils.clip_grad*``).

Each function follows the arithmetic of ``torch/nn/utils/clip_grad.py`` (and
of the PyTorch kernels it calls) operation for operation, so that a model
ported from PyTorch gets the same numbers. On CPU the only freedom left is
the order in which a norm's sum is reduced: float32 results agree with
PyTorch to 1 unit in the last place for tensors of up to 32 entries, and to
a few units for longer ones, where each library reduces in its own order
(measured tolerances in ``docs/porting.md``). They are *not* the jaxclip
formulas, and inherit PyTorch's behaviour:

* The total norm is the norm of the per-tensor norms. Each per-tensor norm is
  accumulated in float32 (for float16, bfloat16 and float32 tensors) and then
  rounded to the tensor's dtype, so a float16 tensor of norm above 65504 has
  norm inf; there is no rescaling, so float32 tensors with entries near 1e19
  have norm inf too.
* The scale is ``min(max_norm / (total_norm + 1e-6), 1)``, computed as
  PyTorch does (a reciprocal, then a product, in the norm's dtype): tensors at
  or just under `max_norm` are scaled by slightly less than 1, and tiny norms
  are dominated by the 1e-6.
* An inf total norm scales by 0 (finite entries become 0, infinite entries
  NaN); a NaN total norm makes everything NaN. A negative `max_norm` flips
  the sign of every gradient. Pass ``error_if_nonfinite=True`` to get an error
  instead (see `get_total_norm` for how this works under `jax.jit`).

Arguments are converted as PyTorch converts them (``float(norm_type)``,
``float(max_norm)``, ``float(clip_value)``), and every error message begins
with PyTorch's own text for the same condition, so that code matching
PyTorch's messages keeps working; jaxclip's hint follows it.

Gradients are pytrees (a list, a dict, a model's parameter tree); `None`
entries and integer leaves are skipped, like parameters whose ``.grad`` is
None, and a Python-number leaf is a TypeError naming it. Unlike PyTorch nothing is modified in place: clipped copies are
returned. See ``docs/porting.md`` for a side-by-side comparison.
"""

from __future__ import annotations

import math
import types
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.experimental import checkify

from jaxclip import _validate
from jaxclip.compat import _tree

__all__ = [
  "clip_grad_norm",
  "clip_grad_norm_transform",
  "clip_grad_value",
  "clip_grad_value_transform",
  "clip_grads_with_norm",
  "get_total_norm",
]

NormType = float | int | str

# PyTorch's message (torch/nn/utils/clip_grad.py), then jaxclip's hint. The
# order is formatted in Python; `{norm}` is left for `checkify` under jit.
_NONFINITE_MESSAGE = (
  "The total norm of order {p} for gradients from `parameters` is non-finite,"
  " so it cannot be clipped. To disable this error and scale the gradients by"
  " the non-finite norm anyway, set `error_if_nonfinite=False`. (The norm is"
  " {norm}: check the loss and the inputs for inf or NaN.)"
)


_ONE_ELEMENT = "only one element tensors can be converted to Python scalars"


def _as_float(value: Any, name: str, hint: str) -> float:
  """``float(value)``, as PyTorch converts `name`; its errors with a hint.

  A jax array plays the part of a tensor: one element converts, more raise
  PyTorch's ValueError for tensors. Anything else goes to ``float`` as it is
  (NumPy arrays too, as in PyTorch).
  """
  if isinstance(value, jax.Array):
    if value.size != 1:
      raise ValueError(f"{_ONE_ELEMENT}. jaxclip: `{name}` has shape {value.shape}; {hint}")
    value = value.reshape(())
  try:
    return float(value)
  except ValueError as e:
    raise ValueError(f"{e}. jaxclip: `{name}` {hint}") from None
  except TypeError as e:
    raise TypeError(f"{e}. jaxclip: `{name}` {hint}") from None


def _norm_type(norm_type: NormType) -> float:
  # As in PyTorch: any number, also 'inf', '-inf', '2' (and a bool, as 1 or 0).
  if not _validate.is_concrete(norm_type):
    raise TypeError(
      "`norm_type` is a traced array; it must be a Python number, known when"
      " the step is traced. Under `optax.inject_hyperparams`, pass"
      " static_args=('norm_type',)."
    )
  return _as_float(
    norm_type,
    "norm_type",
    "must be a Python number or a numeric string such as 'inf' (a static"
    " value, not a traced array); use 2.0 for the Euclidean norm.",
  )


def _threshold(value: Any, name: str) -> Any:
  """`max_norm` or `clip_value`: ``float(value)`` as in PyTorch when concrete.

  A traced value (under `jax.jit` or `optax.inject_hyperparams`) is kept as an
  array; it must hold one number, as ``float`` requires.
  """
  if _validate.is_concrete(value):
    return _as_float(value, name, "must be a number (or an array holding one number).")
  if jnp.size(value) != 1:
    raise ValueError(
      f"{_ONE_ELEMENT}. jaxclip: `{name}` has shape {jnp.shape(value)}; pass a scalar."
    )
  return jnp.reshape(value, ())


def _opmath(dtype: jnp.dtype) -> jnp.dtype:
  """The dtype PyTorch computes in for `dtype` (float32 for half types)."""
  return jnp.promote_types(dtype, jnp.float32)


def _vector_norm(x: jax.Array, p: float) -> jax.Array:
  """`torch.linalg.vector_norm(x, p)`: accumulated in float32, in x's dtype."""
  acc = _opmath(jnp.finfo(x.dtype).dtype)
  a = jnp.abs(x).astype(acc).ravel()
  if p == 2:
    r = jnp.sqrt(jnp.sum(a * a))
  elif p == math.inf:
    r = jnp.max(a, initial=0)
  elif p == -math.inf:
    r = jnp.min(a, initial=math.inf)
  elif p == 0:
    r = jnp.sum(a != 0).astype(acc)
  elif p == 1:
    r = jnp.sum(a)
  else:
    r = _pow(jnp.sum(_pow(a, p)), 1 / p)
  return r.astype(jnp.finfo(x.dtype).dtype)


def _pow(a: jax.Array, e: float) -> jax.Array:
  """``a ** e`` with PyTorch's special cases for common exponents."""
  if e == 0.5:
    return jnp.sqrt(a)
  if e == 2:
    return a * a
  return a**e


def _materialised(grads: Any, warn: bool = False) -> Any:
  """`grads` as a list if it is a generator (PyTorch's `parameters` idiom),
  with `clip_grad_norm_`'s warning for an empty one (`warn`); any other tree
  as it is."""
  if not isinstance(grads, types.GeneratorType):
    return grads
  grads = list(grads)
  if warn and not grads:
    warnings.warn(
      "`parameters` is an empty generator, no gradient clipping will occur.", stacklevel=3
    )
  return grads


def _moved(v: jax.Array, x: jax.Array) -> jax.Array:
  """`v` on the device of the concrete array `x` when both sit on single,
  different devices (PyTorch's ``.to(device)`` for gradients spread over
  devices); else `v` (under `jax.jit`, or sharded arrays)."""
  if not all(isinstance(a, jax.Array) and _validate.is_concrete(a) for a in (v, x)):
    return v
  here, there = v.devices(), x.devices()
  if here == there or len(here) != 1 or len(there) != 1:
    return v
  return jax.device_put(v, next(iter(there)))


def get_total_norm(
  grads: Any,
  norm_type: NormType = 2.0,
  error_if_nonfinite: bool = False,
  foreach: bool | None = None,
) -> jax.Array:
  """`torch.nn.utils.get_total_norm`: the norm of the per-tensor norms.

  Each floating leaf's norm is computed as `torch.linalg.vector_norm` does
  (accumulated in float32, rounded to the leaf's dtype); the norms are
  grouped by dtype in order of first appearance (PyTorch's order), stacked in
  their promoted dtype and their norm taken in turn. For p = 2 this is the
  norm of all entries together; for other orders, e.g. ``-inf`` (the
  smallest tensor-wise minimum) or 0 (the number of non-zero tensors), the
  result is PyTorch's. This differs from `jaxclip.global_norm`, which sums
  in float32 throughout and never overflows.

  With ``error_if_nonfinite=True`` an inf or NaN norm raises a RuntimeError
  when the gradients are concrete. Under `jax.jit` values are not known at
  trace time, so the check is a `jax.experimental.checkify` check: wrap the
  jitted function with `checkify.checkify` and call ``.throw()`` on the error
  it returns::

    from jax.experimental import checkify

    @jax.jit
    def step(grads):
      return get_total_norm(grads, error_if_nonfinite=True)

    err, norm = checkify.checkify(step)(grads)
    err.throw()  # raises a JaxRuntimeError if the norm was not finite

  Calling the jitted function without `checkify.checkify` fails at trace time.

  Args:
    grads: A pytree of gradients (a list, a dict, ...); `None` entries and
      integer leaves are skipped.
    norm_type: The order p: any float, ``math.inf``, ``-math.inf``, or a
      string such as ``'inf'``.
    error_if_nonfinite: Whether to raise if the total norm is inf or NaN.
    foreach: PyTorch's choice between its per-tensor and fused kernels;
      accepted for drop-in calls and ignored (the result is the same).

  Returns:
    A scalar in the promoted dtype of the leaves (float32 for no leaves).

  Raises:
    RuntimeError: If `error_if_nonfinite` and the (concrete) norm is not
      finite, with PyTorch's message ("The total norm of order 2.0 for
      gradients from `parameters` is non-finite, ...").
    ValueError: If `norm_type` is a string that is not a number (``float``'s
      error, as in PyTorch).
    TypeError: If `norm_type` is neither a number nor a string, or a
      gradient leaf is a Python number.

  Examples:
    >>> import jax.numpy as jnp
    >>> from jaxclip.compat import torch
    >>> g = [jnp.array([3.0, 4.0]), None, jnp.array([12.0])]
    >>> torch.get_total_norm(g)
    Array(13., dtype=float32)
    >>> torch.get_total_norm(g, norm_type="inf")
    Array(12., dtype=float32)

  References:
    PyTorch, [torch.nn.utils.get_total_norm](https://pytorch.org/docs/stable/generated/torch.nn.utils.get_total_norm.html).
  """
  p = _norm_type(norm_type)
  leaves = _tree.inexact_leaves(_materialised(grads))
  if not leaves:
    return jnp.zeros((), jnp.float32)
  _check_no_empty_for_max(leaves, p, foreach)
  groups: dict[jnp.dtype, list[jax.Array]] = {}
  for x in leaves:
    groups.setdefault(x.dtype, []).append(_vector_norm(x, p))
  # Each norm on its leaf's device, gathered on the first leaf's (PyTorch).
  norms = [_moved(n, leaves[0]) for group in groups.values() for n in group]
  dtype = jnp.result_type(*norms)
  total = _vector_norm(jnp.stack([n.astype(dtype) for n in norms]), p)
  if error_if_nonfinite:
    _check_finite(total, p)
  return total


def _check_no_empty_for_max(leaves: list[jax.Array], p: float, foreach: bool | None) -> None:
  """PyTorch's RuntimeError for an inf or -inf norm of an empty gradient
  (a max or min has no identity), in the wording of the kernel it uses."""
  if p not in (math.inf, -math.inf) or all(x.size for x in leaves):
    return
  if p == math.inf and foreach is not False:
    raise RuntimeError(
      "_foreach_norm cannot compute the infinity norm on an empty tensor because"
      " the operation does not have an identity"
    )
  raise RuntimeError(
    f"linalg.vector_norm cannot compute the {p} norm on an empty tensor because"
    " the operation does not have an identity"
  )


def _check_finite(total: jax.Array, p: float) -> None:
  message = _NONFINITE_MESSAGE.format(p=p, norm="{norm}")
  if _validate.is_concrete(total):
    if not bool(jnp.isfinite(total)):
      raise RuntimeError(message.format(norm=float(total)))
    return
  checkify.check(jnp.isfinite(total), message, norm=total)


def clip_grads_with_norm(
  grads: Any,
  max_norm: jax.typing.ArrayLike,
  total_norm: jax.typing.ArrayLike,
  foreach: bool | None = None,
) -> Any:
  """`torch.nn.utils.clip_grads_with_norm_`, returning the clipped copy.

  Every floating leaf is multiplied by ``min(max_norm / (total_norm + 1e-6),
  1)``, computed as PyTorch does: ``total_norm + 1e-6`` and its reciprocal
  are rounded to the norm's dtype, `max_norm` is not (PyTorch multiplies by
  Python numbers in float32), and each leaf is multiplied in the promoted
  dtype of the leaf and the scale, then rounded back to the leaf's dtype.

  Args:
    grads: A pytree of gradients.
    max_norm: The largest allowed norm, converted with ``float`` as in
      PyTorch (a traced scalar is kept). Not validated otherwise: a negative
      value flips the sign of the gradients.
    total_norm: The norm to clip by, e.g. from `get_total_norm`.
    foreach: PyTorch's choice between its per-tensor and fused kernels;
      accepted for drop-in calls and ignored (the result is the same).

  Returns:
    The gradients scaled, in the structure of `grads`.

  Raises:
    ValueError: If `max_norm` is a string that is not a number, or an array
      of more than one element (PyTorch's errors).
    TypeError: If ``float(max_norm)`` fails otherwise (PyTorch's error).

  Examples:
    >>> import jax.numpy as jnp
    >>> from jaxclip.compat import torch
    >>> g = {"w": jnp.array([3.0, 4.0])}
    >>> torch.clip_grads_with_norm(g, 1.0, torch.get_total_norm(g))["w"]
    Array([0.5999999 , 0.79999983], dtype=float32)

  References:
    PyTorch, [torch.nn.utils.clip_grads_with_norm_](https://pytorch.org/docs/stable/generated/torch.nn.utils.clip_grads_with_norm_.html).
  """
  max_norm = _threshold(max_norm, "max_norm")
  total = jnp.asarray(total_norm)
  if total.ndim:
    raise RuntimeError(
      f"scalar tensor expected to be 0 dim but it has {total.ndim} dimensions and"
      f" {total.size} elements. jaxclip: pass the total norm as a scalar, e.g."
      " from `get_total_norm`."
    )
  if not jnp.issubdtype(total.dtype, jnp.floating):
    total = total.astype(jnp.float32)
  op = _opmath(total.dtype)
  denom = (total.astype(op) + jnp.asarray(1e-6, op)).astype(total.dtype)
  reciprocal = (1 / denom.astype(op)).astype(total.dtype)
  coef = (reciprocal.astype(op) * jnp.asarray(max_norm, op)).astype(total.dtype)
  coef = jnp.minimum(coef, jnp.asarray(1.0, coef.dtype))

  def scale(x):
    dtype = jnp.promote_types(x.dtype, coef.dtype)
    return (x.astype(dtype) * _moved(coef, x).astype(dtype)).astype(x.dtype)

  return _tree.map_inexact(scale, _materialised(grads))


def clip_grad_norm(
  grads: Any,
  max_norm: jax.typing.ArrayLike,
  norm_type: NormType = 2.0,
  error_if_nonfinite: bool = False,
  foreach: bool | None = None,
) -> tuple[Any, jax.Array]:
  """`torch.nn.utils.clip_grad_norm_`, returning ``(clipped, total_norm)``.

  `get_total_norm` followed by `clip_grads_with_norm`. The norm returned is
  the one before clipping, as in PyTorch.

  Args:
    grads: A pytree of gradients; `None` entries and integer leaves are
      skipped.
    max_norm: The largest allowed norm (not validated, as in PyTorch).
    norm_type: The order of the norm: any float or ``'inf'``.
    error_if_nonfinite: Whether to raise if the total norm is inf or NaN
      (under `jax.jit`, see `get_total_norm`).
    foreach: PyTorch's choice between its per-tensor and fused kernels;
      accepted for drop-in calls and ignored (the result is the same).

  Returns:
    ``(clipped, total_norm)``.

  Raises:
    RuntimeError: If `error_if_nonfinite` and the concrete norm is not finite.
    ValueError: If `norm_type` or `max_norm` is a string that is not a
      number, or an array of more than one element.
    TypeError: If ``float(norm_type)`` or ``float(max_norm)`` fails otherwise.

  Examples:
    >>> import jax.numpy as jnp
    >>> from jaxclip.compat import torch
    >>> clipped, norm = torch.clip_grad_norm([jnp.array([3.0, 4.0])], 10.0)
    >>> clipped[0], norm
    (Array([3., 4.], dtype=float32), Array(5., dtype=float32))

  References:
    PyTorch, [torch.nn.utils.clip_grad_norm_](https://pytorch.org/docs/stable/generated/torch.nn.utils.clip_grad_norm_.html).
  """
  grads = _materialised(grads, warn=True)
  total = get_total_norm(grads, norm_type, error_if_nonfinite, foreach)
  return clip_grads_with_norm(grads, max_norm, total), total


def clip_grad_value(
  grads: Any, clip_value: jax.typing.ArrayLike, foreach: bool | None = None
) -> Any:
  """`torch.nn.utils.clip_grad_value_`, returning the clipped copy.

  Every floating entry is clamped to ``[-clip_value, clip_value]`` (first
  from below, then from above, as PyTorch does; a negative `clip_value` thus
  sets every entry to `clip_value`). NaN stays NaN.

  Args:
    grads: A pytree of gradients.
    clip_value: The largest allowed magnitude, converted with ``float`` as
      in PyTorch (a traced scalar is kept).
    foreach: PyTorch's choice between its per-tensor and fused kernels;
      accepted for drop-in calls and ignored (the result is the same).

  Returns:
    The gradients clamped, in the structure of `grads`.

  Raises:
    ValueError: If `clip_value` is a string that is not a number, or an
      array of more than one element (PyTorch's errors).
    TypeError: If ``float(clip_value)`` fails otherwise (PyTorch's error).
    RuntimeError: If a concrete `clip_value` overflows a gradient's dtype
      (PyTorch's error).
    NotImplementedError: If a gradient is complex (PyTorch's error).

  Examples:
    >>> import jax.numpy as jnp
    >>> from jaxclip.compat import torch
    >>> torch.clip_grad_value([jnp.array([-3.0, 0.5, 2.0])], 1.0)[0]
    Array([-1. ,  0.5,  1. ], dtype=float32)

  References:
    PyTorch, [torch.nn.utils.clip_grad_value_](https://pytorch.org/docs/stable/generated/torch.nn.utils.clip_grad_value_.html).
  """
  del foreach
  clip_value = _threshold(clip_value, "clip_value")
  grads = _materialised(grads)
  for x in _tree.inexact_leaves(grads):
    _check_clamp_bound(x.dtype, clip_value)

  def clamp(x):
    v = jnp.asarray(clip_value).astype(x.dtype)
    return jnp.minimum(jnp.maximum(x, -v), v)

  return _tree.map_inexact(clamp, grads)


# PyTorch's names of the dtypes in its conversion errors.
_C10_NAMES = {"float16": "c10::Half", "bfloat16": "c10::BFloat16", "float32": "float"}


def _check_clamp_bound(dtype: jnp.dtype, clip_value: Any) -> None:
  """PyTorch's errors for a `clip_value` that its clamp cannot apply."""
  if jnp.issubdtype(dtype, jnp.complexfloating):
    raise NotImplementedError("clamp is not supported for complex types")
  if (
    isinstance(clip_value, float)
    and math.isfinite(clip_value)  # PyTorch clamps to an infinite bound
    and abs(clip_value) > float(jnp.finfo(dtype).max)
  ):
    name = _C10_NAMES.get(jnp.dtype(dtype).name, jnp.dtype(dtype).name)
    raise RuntimeError(
      f"value cannot be converted to type {name} without overflow. jaxclip:"
      f" `clip_value={clip_value}` is beyond the largest {jnp.dtype(dtype).name}."
    )


def clip_grad_norm_transform(
  max_norm: jax.typing.ArrayLike,
  norm_type: NormType = 2.0,
  error_if_nonfinite: bool = False,
) -> optax.GradientTransformationExtraArgs:
  """`clip_grad_norm` as an optax transform: ``optax.chain`` it before the
  optimizer, where PyTorch calls ``clip_grad_norm_`` before ``step()``.

  Args:
    max_norm: The largest allowed norm.
    norm_type: The order of the norm: any float or ``'inf'``.
    error_if_nonfinite: Whether to raise if the total norm is inf or NaN
      (under `jax.jit`, wrap the step with `checkify.checkify`, see
      `get_total_norm`).

  Returns:
    A stateless `optax.GradientTransformationExtraArgs`.

  Raises:
    ValueError: If `norm_type` or `max_norm` is a string that is not a number.
    TypeError: If ``float(norm_type)`` or ``float(max_norm)`` fails otherwise.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> from jaxclip.compat import torch
    >>> tx = optax.chain(torch.clip_grad_norm_transform(1.0), optax.sgd(1.0))
    >>> g = {"w": jnp.array([3.0, 4.0])}
    >>> tx.update(g, tx.init(g))[0]["w"]
    Array([-0.5999999 , -0.79999983], dtype=float32)

  References:
    PyTorch, [torch.nn.utils.clip_grad_norm_](https://pytorch.org/docs/stable/generated/torch.nn.utils.clip_grad_norm_.html).
  """
  _norm_type(norm_type)
  _threshold(max_norm, "max_norm")  # a bad one fails here, not at the first step

  def update_fn(updates, state, params=None, **extra_args):
    del params, extra_args
    return clip_grad_norm(updates, max_norm, norm_type, error_if_nonfinite)[0], state

  return optax.GradientTransformationExtraArgs(_init_empty, update_fn)


def clip_grad_value_transform(
  clip_value: jax.typing.ArrayLike,
) -> optax.GradientTransformationExtraArgs:
  """`clip_grad_value` as an optax transform.

  Args:
    clip_value: The largest allowed magnitude of an entry.

  Returns:
    A stateless `optax.GradientTransformationExtraArgs`.

  Raises:
    ValueError: If `clip_value` is a string that is not a number.
    TypeError: If ``float(clip_value)`` fails otherwise.

  Examples:
    >>> import jax.numpy as jnp
    >>> from jaxclip.compat import torch
    >>> tx = torch.clip_grad_value_transform(1.0)
    >>> tx.update([jnp.array([-3.0, 0.5])], tx.init(None))[0][0]
    Array([-1. ,  0.5], dtype=float32)

  References:
    PyTorch, [torch.nn.utils.clip_grad_value_](https://pytorch.org/docs/stable/generated/torch.nn.utils.clip_grad_value_.html).
  """
  _threshold(clip_value, "clip_value")

  def update_fn(updates, state, params=None, **extra_args):
    del params, extra_args
    return clip_grad_value(updates, clip_value), state

  return optax.GradientTransformationExtraArgs(_init_empty, update_fn)


def _init_empty(params: optax.Params) -> optax.EmptyState:
  del params
  return optax.EmptyState()
