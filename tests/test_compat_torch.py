"""Parity of `jaxclip.compat.torch` with PyTorch itself (CPU)."""

import math

import pytest

torch = pytest.importorskip(
  "torch", reason="parity tests need PyTorch: pip install 'jaxclip[parity]'"
)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jaxclip.compat import torch as ctorch  # noqa: E402
from tests._parity import assert_ulp, random_tensors  # noqa: E402

DTYPES = [np.float32, np.float16, jnp.bfloat16]
TORCH_DTYPE = {
  np.dtype(np.float32): torch.float32,
  np.dtype(np.float16): torch.float16,
  np.dtype(jnp.bfloat16): torch.bfloat16,
}
SHAPES = [[(7,)], [(3, 4), (5,), (2, 3, 5)], [(64, 33)], [(1,), (1000,)]]
NORM_TYPES = [2.0, 1.0, math.inf, -math.inf, 0.5, 3.0, "inf", 0.0]


# PyTorch's norm kernel reduces long float32 vectors in an order of its own
# (vector lanes), not the order of XLA; beyond about 32 entries per tensor the
# norm may differ by a few ulps (observed: up to 19 ulps for p = 3 over 2112
# entries, 7 for p = 2), and the clipped entries by the same relative amount.
# Up to 32 entries, and always in half precision, they agree to 1 ulp.
# For orders other than 1, 2, inf, -inf, 0, the final power 1/p amplifies a
# 1-ulp difference of the sum (observed: 3 ulps for p = 0.5 over 4 norms).
def _assert_close(actual, desired, gs, norm_type=2.0):
  actual = np.asarray(actual)
  big = max(np.size(g) for g in gs if g is not None) > 32
  amplified = float(norm_type) not in (1.0, 2.0, math.inf, -math.inf, 0.0)
  if actual.dtype == np.float32 and (big or amplified):
    np.testing.assert_allclose(actual, desired, rtol=1e-5, atol=0)
    assert actual.dtype == np.asarray(desired).dtype
  else:
    assert_ulp(actual, desired)


def _t(x):
  x = np.asarray(x)
  return torch.from_numpy(x.astype(np.float32)).to(TORCH_DTYPE[x.dtype])


def _np(t, dtype=None):
  dtype = dtype if dtype is not None else {v: k for k, v in TORCH_DTYPE.items()}[t.dtype]
  return t.detach().float().numpy().astype(dtype)


def _torch_clip(grads, max_norm, norm_type=2.0):
  params = []
  for g in grads:
    p = torch.nn.Parameter(torch.zeros(g.shape, dtype=TORCH_DTYPE[np.asarray(g).dtype]))
    p.grad = None if g is None else _t(g)
    params.append(p)
  total = torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type)
  return [_np(p.grad) for p in params], total


@pytest.mark.parametrize("norm_type", NORM_TYPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shapes", SHAPES)
def test_get_total_norm(shapes, dtype, norm_type):
  gs = random_tensors(0, shapes, dtype)
  want = torch.nn.utils.get_total_norm([_t(g) for g in gs], norm_type)
  got = ctorch.get_total_norm(gs, norm_type)
  _assert_close(got, _np(want, got.dtype), gs)


@pytest.mark.parametrize("norm_type", NORM_TYPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shapes", SHAPES[:3])
@pytest.mark.parametrize("ratio", [0.5, 1.0, 2.0, 0.0, -1.0])
def test_clip_grad_norm(shapes, dtype, norm_type, ratio):
  gs = random_tensors(1, shapes, dtype)
  norm = float(torch.nn.utils.get_total_norm([_t(g) for g in gs], norm_type))
  max_norm = ratio * norm  # ratio 1.0: exactly at PyTorch's norm.
  want, want_total = _torch_clip(gs, max_norm, norm_type)
  got, got_total = ctorch.clip_grad_norm(gs, max_norm, norm_type)
  _assert_close(got_total, _np(want_total, got_total.dtype), gs)
  for g, w in zip(got, want):
    _assert_close(g, w, gs)


def test_mixed_dtypes():
  gs = random_tensors(2, [(5,), (3, 3)], np.float32) + random_tensors(3, [(4,)], np.float16)
  gs += random_tensors(4, [(6,)], jnp.bfloat16)
  for norm_type in NORM_TYPES:
    want, want_total = _torch_clip(gs, 0.3, norm_type)
    got, got_total = ctorch.clip_grad_norm(gs, 0.3, norm_type)
    _assert_close(got_total, _np(want_total, got_total.dtype), gs, norm_type)
    for g, w in zip(got, want):
      _assert_close(g, w, gs, norm_type)


@pytest.mark.parametrize(
  "special",
  [
    [np.zeros(3), np.zeros((2, 2))],
    [np.array([1.0, np.inf]), np.ones(2)],
    [np.array([1.0, np.nan]), np.ones(2)],
    [np.array([1e20, 1e20])],  # PyTorch does not rescale: norm inf
    [np.array([1e-25, 2e-25])],  # squares underflow: norm 0
    [np.array([1e-7, 0.0])],  # tiny norm: the 1e-6 dominates
  ],
)
@pytest.mark.parametrize("norm_type", [2.0, 1.0, math.inf])
@pytest.mark.parametrize("max_norm", [1.0, 0.0, -2.0, 1e-7])
def test_special_values(special, norm_type, max_norm):
  gs = [np.asarray(g, np.float32) for g in special]
  want, want_total = _torch_clip(gs, max_norm, norm_type)
  got, got_total = ctorch.clip_grad_norm(gs, max_norm, norm_type)
  assert_ulp(got_total, _np(want_total))
  for g, w in zip(got, want):
    assert_ulp(g, w)


@pytest.mark.parametrize("dtype", [np.float16, jnp.bfloat16])
def test_half_precision_edges(dtype):
  for g in ([60000.0, 60000.0], [1e-3], [300.0, 400.0], [0.1, 0.2, 0.3]):
    for max_norm in (1.0, 0.1, 1e-4, 7.3):
      gs = [np.asarray(g, np.float32).astype(dtype)]
      want, want_total = _torch_clip(gs, max_norm)
      got, got_total = ctorch.clip_grad_norm(gs, max_norm)
      assert_ulp(got_total, _np(want_total))
      assert_ulp(got[0], want[0])


def test_none_entries_and_empty():
  gs = [None, np.array([3.0, 4.0], np.float32), None]
  want, want_total = _torch_clip([np.zeros(1, np.float32), gs[1]], 1.0)
  got, got_total = ctorch.clip_grad_norm(gs, 1.0)
  assert got[0] is None and got[2] is None
  assert_ulp(got[1], want[1])
  assert_ulp(got_total, _np(want_total))
  want_empty = torch.nn.utils.get_total_norm([])
  assert_ulp(ctorch.get_total_norm([]), _np(want_empty))
  assert ctorch.clip_grad_norm([], 1.0)[0] == []


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("clip_value", [1.0, 0.1, 0.0, -0.5, 7.3])
def test_clip_grad_value(dtype, clip_value):
  gs = random_tensors(5, [(4, 5), (9,)], dtype, scale=2.0)
  gs[0][0, :3] = [np.nan, np.inf, -np.inf]
  params = [torch.nn.Parameter(torch.zeros(g.shape, dtype=TORCH_DTYPE[g.dtype])) for g in gs]
  for p, g in zip(params, gs):
    p.grad = _t(g)
  torch.nn.utils.clip_grad_value_(params, clip_value)
  got = ctorch.clip_grad_value(gs, clip_value)
  for g, p in zip(got, params):
    assert_ulp(g, _np(p.grad), 0)


def test_transforms_match_pytorch():
  gs = random_tensors(6, [(3, 3), (8,)], np.float32, scale=2.0)
  tree = {"a": gs[0], "b": gs[1]}
  for norm_type in (2.0, "inf", 1.0):
    want, _ = _torch_clip(gs, 0.7, norm_type)
    tx = ctorch.clip_grad_norm_transform(0.7, norm_type)
    got, _ = tx.update(tree, tx.init(tree))
    assert_ulp(got["a"], want[0])
    assert_ulp(got["b"], want[1])


def test_error_if_nonfinite_matches_pytorch():
  gs = [np.array([1.0, np.inf], np.float32)]
  with pytest.raises(RuntimeError, match="non-finite"):
    torch.nn.utils.get_total_norm([_t(gs[0])], error_if_nonfinite=True)
  with pytest.raises(RuntimeError, match="non-finite"):
    ctorch.clip_grad_norm(gs, 1.0, error_if_nonfinite=True)


def test_error_if_nonfinite_table_matches_pytorch():
  # PyTorch's test_clip_grad_norm_error_if_nonfinite table, in float32.
  from tests.test_compat import torch_nonfinite_cases

  for grads, norm_type, _ in torch_nonfinite_cases():
    params = []
    for g in grads:
      p = torch.nn.Parameter(torch.zeros(g.shape))
      p.grad = torch.from_numpy(g.copy())
      params.append(p)
    try:
      torch.nn.utils.clip_grad_norm_(params, 1, norm_type=norm_type, error_if_nonfinite=True)
      want = None
    except RuntimeError as e:
      want = str(e)
    if want is None:
      ctorch.clip_grad_norm(grads, 1, norm_type=norm_type, error_if_nonfinite=True)
    else:
      with pytest.raises(RuntimeError) as info:
        ctorch.clip_grad_norm(grads, 1, norm_type=norm_type, error_if_nonfinite=True)
      assert str(info.value).startswith(want), (str(info.value), want)


def _error(fn):
  try:
    fn()
  except Exception as e:  # noqa: BLE001 - any error, compared below
    return type(e), str(e)
  return None


@pytest.mark.parametrize("bad", ["euclid", None, [2.0], object(), "", 1j])
def test_argument_errors_begin_with_pytorchs(bad):
  def params():
    p = torch.nn.Parameter(torch.zeros(2))
    p.grad = torch.ones(2)
    return [p]

  g = [np.ones(2, np.float32)]
  pairs = [
    (
      lambda: torch.nn.utils.get_total_norm([torch.ones(2)], bad),
      lambda: ctorch.get_total_norm(g, bad),
    ),
    (lambda: torch.nn.utils.clip_grad_norm_(params(), bad), lambda: ctorch.clip_grad_norm(g, bad)),
    (
      lambda: torch.nn.utils.clip_grad_norm_(params(), 1.0, bad),
      lambda: ctorch.clip_grad_norm(g, 1.0, bad),
    ),
    (
      lambda: torch.nn.utils.clip_grad_value_(params(), bad),
      lambda: ctorch.clip_grad_value(g, bad),
    ),
  ]
  for theirs, ours in pairs:
    want, got = _error(theirs), _error(ours)
    assert want is not None and got is not None, (want, got)
    assert got[0] is want[0] and got[1].startswith(want[1]), (got, want)


def test_array_arguments_like_tensors():
  def params():
    p = torch.nn.Parameter(torch.zeros(2))
    p.grad = torch.tensor([3.0, 4.0])
    return [p]

  g = [np.array([3.0, 4.0], np.float32)]
  # More than one element: PyTorch's ValueError for tensors.
  want = _error(lambda: torch.nn.utils.clip_grad_norm_(params(), torch.ones(2)))
  got = _error(lambda: ctorch.clip_grad_norm(g, jnp.ones(2)))
  assert got[0] is want[0] and got[1].startswith(want[1]), (got, want)
  want = _error(lambda: torch.nn.utils.clip_grad_value_(params(), torch.ones(2)))
  got = _error(lambda: ctorch.clip_grad_value(g, jnp.ones(2)))
  assert got[0] is want[0] and got[1].startswith(want[1]), (got, want)
  # One element, numeric strings and bools are accepted by both.
  for max_norm, norm_type in [(torch.ones(1), torch.tensor(2.0)), ("1.5", "3"), (True, True)]:
    ps = params()
    total = torch.nn.utils.clip_grad_norm_(ps, max_norm, norm_type)
    ours_max = jnp.ones(1) if isinstance(max_norm, torch.Tensor) else max_norm
    ours_type = 2.0 if isinstance(norm_type, torch.Tensor) else norm_type
    clipped, got_total = ctorch.clip_grad_norm(g, ours_max, ours_type)
    assert_ulp(got_total, _np(total))
    assert_ulp(clipped[0], _np(ps[0].grad))


def test_clip_grad_norm_cases_of_pytorch():
  # The inputs of PyTorch's test_clip_grad_norm: a Linear(10, 10)'s gradients.
  big = [np.arange(1.0, 101).reshape(10, 10).astype(np.float32), np.ones(10, np.float32) / 1000]
  rng = np.random.default_rng(0)
  small = [(rng.random((10, 10)) / 10000).astype(np.float32), np.ones(10, np.float32) / 500]
  for grads in (big, small):
    for norm_type in [0.5, 1.5, 2, 4, "inf"]:
      want, want_total = _torch_clip(grads, 2, norm_type)
      got, got_total = ctorch.clip_grad_norm(grads, 2, norm_type)
      _assert_close(got_total, _np(want_total), grads, norm_type)
      for g, w in zip(got, want):
        _assert_close(g, w, grads, norm_type)


def test_clip_grad_value_cases_of_pytorch():
  # The inputs of PyTorch's test_clip_grad_value.
  grad_w = (np.arange(-50.0, 50).reshape(10, 10) / 5).astype(np.float32)
  grad_b = np.full(10, 2.0, np.float32)
  params = [torch.nn.Parameter(torch.zeros(10, 10)), torch.nn.Parameter(torch.zeros(10))]
  params[0].grad, params[1].grad = torch.from_numpy(grad_w.copy()), torch.from_numpy(grad_b.copy())
  torch.nn.utils.clip_grad_value_(params, 2.5)
  got = ctorch.clip_grad_value([grad_w, grad_b], 2.5)
  for g, p in zip(got, params):
    assert_ulp(g, _np(p.grad), 0)
