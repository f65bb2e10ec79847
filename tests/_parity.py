"""Helpers shared by the parity tests of `jaxclip.compat`."""

from __future__ import annotations

import numpy as np

_INT = {2: np.int16, 4: np.int32, 8: np.int64}


def _ordered(x: np.ndarray) -> np.ndarray:
  """Maps floats to integers whose differences count units in the last place."""
  bits = x.view(_INT[x.dtype.itemsize]).astype(np.int64)
  sign = np.int64(1) << (8 * x.dtype.itemsize - 1)
  return np.where(bits < 0, -(bits + sign), bits)


def assert_ulp(actual, desired, maxulp: int = 1) -> None:
  """Asserts equal dtypes, equal NaN positions and at most `maxulp` ulps apart.

  Works for float16, bfloat16, float32 and float64 (numpy's
  `assert_array_max_ulp` does not know bfloat16). +0 and -0 count as equal.
  """
  actual, desired = np.asarray(actual), np.asarray(desired)
  assert actual.dtype == desired.dtype, (actual.dtype, desired.dtype)
  assert actual.shape == desired.shape, (actual.shape, desired.shape)
  nan_a, nan_d = np.isnan(actual.astype(np.float64)), np.isnan(desired.astype(np.float64))
  np.testing.assert_array_equal(nan_a, nan_d, err_msg="NaN positions differ")
  a, d = actual[~nan_a], desired[~nan_d]
  diff = np.abs(_ordered(a) - _ordered(d))
  worst = int(diff.max()) if diff.size else 0
  assert worst <= maxulp, (
    f"{worst} ulp apart (max {maxulp}):\nactual  {a[diff > maxulp][:8]}\n"
    f"desired {d[diff > maxulp][:8]}"
  )


def random_tensors(seed: int, shapes, dtype, scale: float = 1.0) -> list[np.ndarray]:
  """Deterministic normal tensors of the given shapes, cast to `dtype`."""
  rng = np.random.default_rng(seed)
  return [(rng.standard_normal(s) * scale).astype(np.float32).astype(dtype) for s in shapes]
