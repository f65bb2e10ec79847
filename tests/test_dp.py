"""Tests of `jaxclip.noisy_mean` and `jaxclip.dp_epsilon` (jaxclip/_dp.py)."""

import math
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxclip

KEY = jax.random.key(0)


def test_noisy_mean_without_noise_is_the_mean():
  sums = {"w": jnp.array([[2.0, -4.0]]), "b": jnp.array([8.0]).astype(jnp.bfloat16), "n": None}
  out = jax.jit(jaxclip.noisy_mean)(sums, 1.0, 0.0, 4, key=KEY)
  np.testing.assert_array_equal(out["w"], [[0.5, -1.0]])
  assert out["b"].dtype == jnp.bfloat16 and float(out["b"][0]) == 2.0
  assert out["n"] is None


def test_noisy_mean_noise_has_the_dp_sgd_standard_deviation():
  sums = {"w": jnp.zeros((200, 500)), "b": jnp.zeros(100_000)}
  out = jax.jit(jaxclip.noisy_mean)(sums, 0.5, 1.5, 10, key=KEY)  # std 0.75 / 10
  for leaf in out.values():
    assert abs(float(jnp.std(leaf)) - 0.075) < 0.075 * 0.02
    assert abs(float(jnp.mean(leaf))) < 0.075 * 0.02
  # leaves get independent noise, and a different key gives different noise
  assert not np.allclose(out["w"].ravel()[:1000], out["b"][:1000])
  other = jaxclip.noisy_mean(sums, 0.5, 1.5, 10, key=jax.random.key(1))
  assert not np.allclose(out["b"], other["b"])


def test_noisy_mean_noises_complex_leaves_on_both_parts():
  # A complex sum was released as it was: no noise, not divided.
  sums = {"z": jnp.full(100_000, 10 + 20j, jnp.complex64)}
  out = jax.jit(jaxclip.noisy_mean)(sums, 0.5, 1.5, 10, key=KEY)["z"]
  assert out.dtype == jnp.complex64
  for part, mean in ((out.real, 1.0), (out.imag, 2.0)):
    assert abs(float(jnp.std(part)) - 0.075) < 0.075 * 0.02
    assert abs(float(jnp.mean(part)) - mean) < 0.075 * 0.02
  assert abs(float(jnp.corrcoef(out.real, out.imag)[0, 1])) < 0.02  # independent parts


def test_noisy_mean_takes_traced_arguments_and_validates_concrete_ones():
  fn = jax.jit(lambda s, c, z, n, k: jaxclip.noisy_mean(s, c, z, n, key=k))
  out = fn({"w": jnp.ones(3)}, 1.0, 0.0, 2.0, KEY)
  np.testing.assert_array_equal(out["w"], 0.5)
  with pytest.raises(ValueError, match="`noise_multiplier` must be >= 0"):
    jaxclip.noisy_mean({"w": jnp.ones(3)}, 1.0, -1.0, 2, key=KEY)
  with pytest.raises(ValueError, match="`batch_size` must be > 0"):
    jaxclip.noisy_mean({"w": jnp.ones(3)}, 1.0, 1.0, 0, key=KEY)
  with pytest.raises(ValueError, match="`l2_norm_clip` is NaN"):
    jaxclip.noisy_mean({"w": jnp.ones(3)}, math.nan, 1.0, 1, key=KEY)


dp_accounting = pytest.importorskip("dp_accounting")


def test_dp_epsilon_matches_the_accountant_and_behaves():
  eps = jaxclip.dp_epsilon(1.1, 256 / 60000, 10_000, 1e-5)
  event = dp_accounting.SelfComposedDpEvent(
    dp_accounting.PoissonSampledDpEvent(256 / 60000, dp_accounting.GaussianDpEvent(1.1)), 10_000
  )
  accountant = dp_accounting.rdp.RdpAccountant()
  accountant.compose(event)
  assert eps == pytest.approx(accountant.get_epsilon(1e-5))
  pld = jaxclip.dp_epsilon(1.1, 256 / 60000, 10_000, 1e-5, accountant="pld")
  assert 0.8 * eps < pld <= eps * 1.001  # PLD is tighter than RDP
  assert jaxclip.dp_epsilon(1.1, 256 / 60000, 20_000, 1e-5) > eps  # more steps cost more
  assert jaxclip.dp_epsilon(2.0, 256 / 60000, 10_000, 1e-5) < eps  # more noise costs less
  assert jaxclip.dp_epsilon(0.0, 0.01, 10, 1e-5) == math.inf
  assert jaxclip.dp_epsilon(1.0, 0.01, 0, 1e-5) == 0.0


@pytest.mark.parametrize(
  "kwargs, match",
  [
    ({"noise_multiplier": -1.0}, "`noise_multiplier` must be in"),
    ({"sampling_rate": 1.5}, "`sampling_rate` must be in"),
    ({"sampling_rate": 0.0}, "`sampling_rate` must be > 0"),
    ({"delta": 1.0}, "`delta` in"),
    ({"steps": -1}, "`steps` must be >= 0"),
    ({"accountant": "moments"}, "`accountant` must be 'rdp' or 'pld'"),
  ],
)
def test_dp_epsilon_argument_errors(kwargs, match):
  args = {"noise_multiplier": 1.0, "sampling_rate": 0.01, "steps": 10, "delta": 1e-5, **kwargs}
  with pytest.raises(ValueError, match=match):
    jaxclip.dp_epsilon(**args)


def test_dp_epsilon_without_dp_accounting_names_the_extra(monkeypatch):
  monkeypatch.setitem(sys.modules, "dp_accounting", None)
  with pytest.raises(ImportError, match=r"pip install 'jaxclip\[dp\]'"):
    jaxclip.dp_epsilon(1.0, 0.01, 10, 1e-5)
