"""spam_clip and stable_spam_clip (jaxclip/_spam.py, jaxclip/_stable_spam.py).

Each is run step by step against a NumPy transcription of its reference:
TianjinYellow/SPAM-Optimizer `galore_torch/SPAM.py` (the spike clipping in
`AdamW.step`) and TianjinYellow/StableSPAM `galore_torch/stablespam.py` (the
clipping and norm scaling in `StableSPAM.step`, before Adam's moments). The
transcriptions run in float64; jaxclip runs in float32.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxclip

SHAPES = {"w": (6, 5), "b": (7,)}


def _grads(steps, seed=0, spikes=((3, "w"), (9, "b"), (12, "w"), (17, "w"), (23, "b"))):
  """Fixed float32 gradients, per step a dict; some steps hold 100x spikes."""
  rng = np.random.default_rng(seed)
  out = []
  for t in range(steps):
    g = {k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()}
    for step, key in spikes:
      if step == t:
        flat = g[key].reshape(-1)
        flat[rng.integers(flat.size, size=2)] *= 100.0
    out.append(g)
  return out


# The reference transcriptions, one tensor at a time.


def spam_reference(grads, threshold, beta2, grad_accu_steps, delta_t):
  """Per step, (clipped gradient, exp_avg_sq after the step), as SPAM.py.

  The reference computes `(total_step + 1) % DeltaT`, which fails for
  DeltaT = 0; here 0 means no reset, as in jaxclip.
  """
  exp_avg_sq = np.zeros_like(grads[0], np.float64)
  total_step, out = 0, []
  for grad in grads:
    grad = grad.astype(np.float64)
    if delta_t and (total_step + 1) % delta_t == 0:
      exp_avg_sq = np.zeros_like(grad)
    current_step = total_step + 1
    if threshold != 0 and current_step >= grad_accu_steps:
      mask = grad**2 > threshold * exp_avg_sq
      if not delta_t or current_step % delta_t >= grad_accu_steps:
        grad[mask] = np.sign(grad[mask]) * np.sqrt(exp_avg_sq[mask] * threshold)
    exp_avg_sq = beta2 * exp_avg_sq + (1.0 - beta2) * grad * grad
    total_step += 1
    out.append((grad, exp_avg_sq))
  return out


def stable_spam_reference(grads, theta, gamma1, gamma2, eps, adagn):
  """Per step, the gradient Stable-SPAM hands to Adam, as stablespam.py
  (``total_T=None``, so the cosine scale is 1; no momentum reset)."""
  m_max_t = m_norm_t = v_norm_t = 0.0
  step, out = 0, []
  for grad in grads:
    grad = grad.astype(np.float64)
    max_gradient = np.max(np.abs(grad))
    step += 1
    m_max_t = theta * m_max_t + (1 - theta) * max_gradient
    m_max_hat = m_max_t / (1 - theta**step)
    mask = np.abs(grad) > m_max_hat
    if mask.sum() > 0:
      grad[mask] = grad[mask] / max_gradient * m_max_hat
    if adagn:
      grad_norm = np.linalg.norm(grad)
      m_norm_t = gamma1 * m_norm_t + (1 - gamma1) * grad_norm
      v_norm_t = gamma2 * v_norm_t + (1 - gamma2) * grad_norm**2
      m_norm_hat = m_norm_t / (1 - gamma1**step)
      v_norm_hat = v_norm_t / (1 - gamma2**step)
      c_norm_t = m_norm_hat / (np.sqrt(v_norm_hat) + eps)
      if grad_norm > 0:
        grad = grad / grad_norm * c_norm_t
    out.append((grad, m_max_hat))
  return out


def _run(tx, grads):
  """jaxclip's updates and states, step by step (one jitted update)."""
  state = tx.init(jax.tree.map(jnp.asarray, grads[0]))
  update = jax.jit(tx.update)
  out = []
  for g in grads:
    u, state = update(jax.tree.map(jnp.asarray, g), state)
    out.append((u, state))
  return out


# SPAM


@pytest.mark.parametrize(
  "threshold, beta, start, reset",
  [(5000.0, 0.999, 20, 0), (50.0, 0.9, 4, 0), (20.0, 0.99, 3, 7)],
  ids=["defaults", "tight", "with-reset"],
)
def test_spam_matches_reference_step_by_step(threshold, beta, start, reset):
  grads = _grads(26)
  tx = jaxclip.spam_clip(threshold, beta, start_step=start, reset_interval=reset)
  ours = _run(tx, grads)
  keys = sorted(SHAPES)  # the order of jax.tree.leaves
  n_clipped = 0
  for i, key in enumerate(keys):
    ref = spam_reference([g[key] for g in grads], threshold, beta, start, reset)
    for t, ((want, want_v), (u, state)) in enumerate(zip(ref, ours)):
      np.testing.assert_allclose(u[key], want, rtol=1e-6, err_msg=f"{key}, step {t + 1}")
      np.testing.assert_allclose(state.v[key], want_v, rtol=1e-6, err_msg=f"{key}, step {t + 1}")
      changed = np.asarray(want != grads[t][key])
      n_clipped += changed.sum()
      assert bool(state.clipped[i]) == changed.any()
      factor = np.min(want[changed] / grads[t][key][changed]) if changed.any() else 1.0
      np.testing.assert_allclose(state.scale[i], factor, rtol=1e-5)
  assert n_clipped > 0  # the spikes were clipped


def test_spam_v_is_adams_second_moment_when_chained():
  # Chained before Adam with the same beta, spam_clip's v is Adam's nu: the
  # clipping is SPAM's.
  grads = _grads(8)
  opt = optax.chain(jaxclip.spam_clip(10.0, 0.999, start_step=2), optax.scale_by_adam(b2=0.999))
  state = opt.init(jax.tree.map(jnp.asarray, grads[0]))
  for g in grads:
    _, state = jax.jit(opt.update)(jax.tree.map(jnp.asarray, g), state)
  for v, nu in zip(jax.tree.leaves(state[0].v), jax.tree.leaves(state[1].nu)):
    np.testing.assert_allclose(v, nu, rtol=1e-6)
  assert bool(jnp.any(state[0].clipped))


def test_spam_first_steps_only_build_v():
  tx = jaxclip.spam_clip(1.0, 0.5, start_step=3)
  g = jnp.array([1.0, -2.0])
  state = tx.init(g)
  u, state = tx.update(g, state)
  np.testing.assert_array_equal(u, g)
  np.testing.assert_allclose(state.v, [0.5, 2.0])  # no bias correction
  u, state = tx.update(10 * g, state)  # g**2 > v, but clipping starts at step 3
  np.testing.assert_array_equal(u, 10 * g)
  u, state = tx.update(10 * g, state)
  np.testing.assert_allclose(u, np.sign(g) * np.sqrt([50.25, 201.0]), rtol=1e-6)  # sqrt(1 * v)
  assert bool(state.clipped[0])
  np.testing.assert_allclose(state.scale[0], np.sqrt(201.0) / 20, rtol=1e-6)


def test_spam_entries_without_history_are_not_clipped():
  # v == 0 (only zero gradients so far): the reference would clip the entry
  # to 0, and keep it there for good since the clipped value feeds v.
  tx = jaxclip.spam_clip(5000.0, 0.9, start_step=1)
  state = tx.init(jnp.zeros(3))
  u, state = tx.update(jnp.zeros(3), state)
  assert not np.any(np.asarray(u)) and not np.any(np.asarray(state.v))
  g = jnp.array([0.0, 3.0, -4.0])
  u, state = tx.update(g, state)
  np.testing.assert_array_equal(u, g)
  np.testing.assert_allclose(state.v, 0.1 * np.square(g), rtol=1e-6)
  assert float(state.ratio[0]) == 0.0 and not bool(state.clipped[0])


@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan])
def test_spam_nonfinite_entry_passes_and_leaves_its_v(bad):
  tx = jaxclip.spam_clip(4.0, 0.5, start_step=1)
  state = tx.init(jnp.zeros(3))
  _, state = tx.update(jnp.array([1.0, 1.0, 1.0]), state)  # v = 0.5
  u, state = jax.jit(tx.update)(jnp.array([bad, 9.0, 0.5]), state)
  u = np.asarray(u)
  assert u[0] == bad if bad == bad else np.isnan(u[0])
  np.testing.assert_allclose(u[1:], [np.sqrt(2.0), 0.5])  # 81 > 4 * 0.5: clipped
  np.testing.assert_allclose(state.v, [0.5, 0.25 + 1.0, 0.25 + 0.125])
  u, state = tx.update(jnp.array([1.0, 1.0, 1.0]), state)  # the next step is clean
  assert np.all(np.isfinite(np.asarray(state.v))) and np.all(np.asarray(u) == 1.0)


def test_spam_huge_finite_entry_is_clipped():
  # 1e30**2 overflows float32; the entry is finite, so it is a spike to clip.
  tx = jaxclip.spam_clip(5000.0, 0.5, start_step=2)
  state = tx.init(jnp.zeros(2))
  _, state = tx.update(jnp.ones(2), state)  # v = 0.5
  u, state = tx.update(jnp.array([-1e30, 1.0]), state)
  np.testing.assert_allclose(u, [-50.0, 1.0], rtol=1e-6)
  np.testing.assert_allclose(state.v, [0.25 + 1250.0, 0.75], rtol=1e-6)


def test_spam_bf16_keeps_float32_v_and_matches_float32():
  g32 = _grads(6, spikes=((4, "w"),))
  g16 = [jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16), g) for g in g32]
  tx = jaxclip.spam_clip(9.0, 0.9, start_step=2)
  low = _run(tx, g16)
  high = _run(tx, [jax.tree.map(lambda x: np.asarray(x, np.float32), g) for g in g16])
  for (u, s), (u32, s32) in zip(low, high):
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(u))
    assert (
      all(v.dtype == jnp.float32 for v in jax.tree.leaves(s.v)) and s.ratio.dtype == jnp.float32
    )
    for a, b in zip(jax.tree.leaves(u), jax.tree.leaves(u32)):
      np.testing.assert_allclose(np.asarray(a, np.float32), b.astype(jnp.bfloat16), rtol=1e-2)
    for v, v32 in zip(jax.tree.leaves(s.v), jax.tree.leaves(s32.v)):
      np.testing.assert_allclose(v, v32, rtol=1e-2)


def test_spam_complex_entries_keep_their_phase():
  tx = jaxclip.spam_clip(4.0, 0.5, start_step=2)
  state = tx.init(jnp.zeros(2, jnp.complex64))
  _, state = tx.update(jnp.array([1 + 1j, 1.0], jnp.complex64), state)  # v = (1, 0.5)
  g = jnp.array([3 + 4j, 1.0], jnp.complex64)
  u, state = tx.update(g, state)
  np.testing.assert_allclose(u, [(3 + 4j) / 5 * 2, 1.0], rtol=1e-6)  # |u| = sqrt(4 * 1)
  assert state.v.dtype == jnp.float32


def test_spam_threshold_may_be_a_schedule_or_traced():
  g = jnp.array([1.0, 1.0])
  tx = jaxclip.spam_clip(lambda step: jnp.where(step < 1, 1e9, 1.0), 0.5, start_step=1)
  state = tx.init(g)
  _, state = tx.update(g, state)
  u, state = tx.update(3 * g, state)  # 9 > 1.0 * 0.5
  np.testing.assert_allclose(u, np.sqrt(0.5) * np.ones(2), rtol=1e-6)
  assert float(state.threshold) == 1.0
  inject = optax.inject_hyperparams(jaxclip.spam_clip, static_args=("start_step", "reset_interval"))
  tx = inject(threshold=1.0, beta=0.5, start_step=1)
  state = tx.init(g)
  _, state = jax.jit(tx.update)(g, state)
  u, _ = jax.jit(tx.update)(3 * g, state)
  np.testing.assert_allclose(u, np.sqrt(0.5) * np.ones(2), rtol=1e-5)


def test_spam_stats_report_ratios_and_scales():
  tx = jaxclip.spam_clip(4.0, 0.5, start_step=2)
  g = {"a": jnp.ones(3), "b": jnp.ones(1)}
  state = tx.init(g)
  _, state = tx.update(g, state)  # v = 0.5
  u, state = tx.update({"a": jnp.array([3.0, 1.0, 1.0]), "b": jnp.array([1.0])}, state)
  np.testing.assert_allclose(u["a"], [np.sqrt(2.0), 1.0, 1.0], rtol=1e-6)
  out = jaxclip.stats(state, params=g)
  np.testing.assert_allclose(out["clip/ratio/a"], 18.0)  # 9 / 0.5
  np.testing.assert_allclose(out["clip/scale_min"], np.sqrt(2.0) / 3, rtol=1e-6)
  np.testing.assert_allclose(out["clip/clipped_fraction"], 0.5)  # 1 of 2 tensors
  assert bool(out["clip/clipped/a"]) and not bool(out["clip/clipped/b"])
  assert int(out["clip/count"]) == 2 and float(out["clip/threshold"]) == 4.0


@pytest.mark.parametrize(
  "kwargs, error, match",
  [
    (dict(threshold=-1.0), ValueError, "`threshold` must be >= 0"),
    (dict(threshold=float("nan")), ValueError, "`threshold` is NaN"),
    (dict(beta=1.0), ValueError, "`beta` must be < 1"),
    (dict(beta=1.5), ValueError, r"`beta` must be in \[0.0, 1.0\]"),
    (dict(start_step=0), ValueError, "`start_step` must be >= 1"),
    (dict(start_step=2.0), TypeError, "`start_step` must be a Python int"),
    (dict(reset_interval=-1), ValueError, "`reset_interval` must be >= 0"),
    (dict(reset_interval=20), ValueError, "must be 0 or above `start_step=20`"),
  ],
)
def test_spam_argument_errors(kwargs, error, match):
  with pytest.raises(error, match=match):
    jaxclip.spam_clip(**kwargs)


def test_spam_state_errors():
  tx = jaxclip.spam_clip()
  with pytest.raises(TypeError, match="needs its own state, a SpamClipState"):
    tx.update(jnp.ones(2), optax.EmptyState())
  with pytest.raises(ValueError, match="initialised for 1 floating leaves"):
    tx.update([jnp.ones(2), jnp.ones(2)], tx.init(jnp.ones(2)))
  with pytest.raises(ValueError, match=r"of shapes \[\(2,\)\] but the updates have 1 of shapes"):
    tx.update(jnp.ones((1, 2)), tx.init(jnp.ones(2)))


# Stable-SPAM


@pytest.mark.parametrize(
  "theta, gamma1, gamma2, adagn",
  [(0.999, 0.7, 0.9, False), (0.999, 0.7, 0.9, True), (0.9, 0.85, 0.99999, True)],
  ids=["clip-only", "adagn-defaults", "adagn-llama-script"],
)
def test_stable_spam_matches_reference_step_by_step(theta, gamma1, gamma2, adagn):
  grads = _grads(24, seed=1)
  tx = jaxclip.stable_spam_clip(theta, adaptive_norm=adagn, gamma1=gamma1, gamma2=gamma2)
  ours = _run(tx, grads)
  n_clipped = 0
  for i, key in enumerate(sorted(SHAPES)):
    ref = stable_spam_reference([g[key] for g in grads], theta, gamma1, gamma2, 1e-8, adagn)
    for t, ((want, want_threshold), (u, state)) in enumerate(zip(ref, ours)):
      np.testing.assert_allclose(u[key], want, rtol=1e-6, err_msg=f"{key}, step {t + 1}")
      np.testing.assert_allclose(state.threshold[i], want_threshold, rtol=1e-6)
      n_clipped += bool(state.clipped[i])
  assert n_clipped > 5


def test_stable_spam_first_step_and_zero_gradients():
  tx = jaxclip.stable_spam_clip()
  g = {"a": jnp.array([3.0, -4.0]), "z": jnp.zeros(2)}
  u, state = tx.update(g, tx.init(g))
  np.testing.assert_array_equal(u["a"], g["a"])  # the threshold is max |g| itself
  np.testing.assert_array_equal(u["z"], 0.0)
  np.testing.assert_allclose(state.threshold, [4.0, 0.0], rtol=1e-6)
  assert not np.any(np.asarray(state.clipped))
  tx = jaxclip.stable_spam_clip(adaptive_norm=True)
  u, state = tx.update(g, tx.init(g))
  np.testing.assert_allclose(jnp.linalg.norm(u["a"]), 1.0, rtol=1e-6)  # m_hat / sqrt(v_hat)
  np.testing.assert_array_equal(u["z"], 0.0)
  np.testing.assert_allclose(state.norm_scale, [1 / 5, 1.0], rtol=1e-6)


@pytest.mark.parametrize("bad", [np.inf, np.nan])
def test_stable_spam_nonfinite_tensor_passes_and_leaves_its_emas(bad):
  tx = jaxclip.stable_spam_clip(0.5, adaptive_norm=True)
  g = {"a": jnp.array([1.0, bad]), "b": jnp.array([2.0])}
  state = tx.init(g)
  u, state = jax.jit(tx.update)(g, state)
  np.testing.assert_array_equal(u["a"], g["a"])
  assert state.steps.tolist() == [0, 1] and float(state.max_ema[0]) == 0.0
  assert float(state.norm_ema[0]) == 0.0 and np.isinf(state.threshold[0])
  # Its next finite step is its first: threshold = its max, nothing clipped.
  u, state = tx.update({"a": jnp.array([3.0, -4.0]), "b": jnp.array([2.0])}, state)
  np.testing.assert_allclose(state.threshold, [4.0, 2.0], rtol=1e-6)
  np.testing.assert_allclose(u["a"], [0.6, -0.8], rtol=1e-6)  # AdaGN: norm 1


def test_stable_spam_bf16_and_complex():
  g16 = [jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16), g) for g in _grads(5, seed=2)]
  tx = jaxclip.stable_spam_clip(0.9)
  for (u, state), g in zip(_run(tx, g16), g16):
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(u))
    assert state.max_ema.dtype == jnp.float32
    for a, x, t in zip(jax.tree.leaves(u), jax.tree.leaves(g), state.threshold):
      a, x = np.asarray(a, np.float32), np.asarray(x, np.float32)
      assert np.all(np.abs(a) <= float(t) * (1 + 2**-7)) and np.all(np.sign(a) == np.sign(x))
  tx = jaxclip.stable_spam_clip(0.5)
  state = tx.init(jnp.zeros(2, jnp.complex64))
  _, state = tx.update(jnp.array([1.0, 2j], jnp.complex64), state)  # T = 2
  u, _ = tx.update(jnp.array([6 + 8j, 1.0], jnp.complex64), state)  # T = 5.5 / 0.75
  np.testing.assert_allclose(u, [(6 + 8j) * (5.5 / 0.75) / 10, 1.0], rtol=1e-6)


def test_stable_spam_stats_and_inject_hyperparams():
  g = {"a": jnp.array([1.0, -2.0]), "b": jnp.array([0.5])}
  opt = optax.chain(jaxclip.stable_spam_clip(0.5), optax.adam(1e-3))
  state = opt.init(g)
  _, state = opt.update(g, state)
  _, state = opt.update({"a": jnp.array([7.0, -8.0]), "b": jnp.array([0.5])}, state)
  out = jaxclip.stats(state, params=g)
  np.testing.assert_allclose(out["clip/threshold/a"], 6.0, rtol=1e-6)
  np.testing.assert_allclose(out["clip/scale_min"], 0.75, rtol=1e-6)
  assert bool(out["clip/clipped/a"]) and not bool(out["clip/clipped/b"])
  tx = optax.inject_hyperparams(jaxclip.stable_spam_clip)(theta=0.5, adaptive_norm=True)
  direct = jaxclip.stable_spam_clip(0.5, adaptive_norm=True)
  a, b = jax.jit(tx.update)(g, tx.init(g))[0], direct.update(g, direct.init(g))[0]
  np.testing.assert_allclose(a["a"], b["a"], rtol=1e-5)


@pytest.mark.parametrize(
  "kwargs, error, match",
  [
    (dict(theta=1.0), ValueError, "`theta` must be < 1"),
    (dict(theta=-0.1), ValueError, r"`theta` must be in \[0.0, 1.0\]"),
    (dict(gamma1=1.0), ValueError, "`gamma1` must be < 1"),
    (dict(gamma2=2.0), ValueError, "`gamma2` must be in"),
    (dict(eps=-1.0), ValueError, "`eps` must be >= 0"),
    (dict(adaptive_norm="yes"), TypeError, "`adaptive_norm` must be True or False"),
    (dict(theta=lambda step: 0.9), TypeError, "does not take a schedule"),
  ],
)
def test_stable_spam_argument_errors(kwargs, error, match):
  with pytest.raises(error, match=match):
    jaxclip.stable_spam_clip(**kwargs)


def test_spam_v_is_shaped_like_the_parameters():
  # optax.tree_utils.tree_map_params (used to derive state shardings) maps
  # v like optax's own moments; non-floating leaves hold zeros, never read.
  params = {"w": jnp.ones((2, 3)), "n": jnp.arange(3), "b": jnp.zeros(3, jnp.bfloat16)}
  opt = optax.chain(jaxclip.spam_clip(start_step=1), optax.adam(0.1))
  state = opt.init(params)
  assert jax.tree.structure(state[0].v) == jax.tree.structure(params)
  shapes = optax.tree_utils.tree_map_params(opt, lambda x: x.shape, state)
  assert shapes[0].v == {"w": (2, 3), "n": (3,), "b": (3,)}
  assert state[0].v["b"].dtype == jnp.float32
  grads = {"w": jnp.full((2, 3), 2.0), "n": jnp.arange(3), "b": jnp.ones(3, jnp.bfloat16)}
  _, state = jax.jit(opt.update)(grads, state, params)
  np.testing.assert_allclose(state[0].v["w"], 0.001 * 4.0, rtol=1e-6)
  np.testing.assert_array_equal(state[0].v["n"], 0)


def test_spam_threshold_zero_turns_clipping_off():
  # SPAM's code clips only `if self.thres != 0`; v is still tracked.
  tx = jaxclip.spam_clip(0.0, 0.5, start_step=1)
  state = tx.init(jnp.zeros(2))
  _, state = tx.update(jnp.array([1.0, 1.0]), state)
  u, state = jax.jit(tx.update)(jnp.array([100.0, -2.0]), state)
  np.testing.assert_array_equal(u, [100.0, -2.0])
  np.testing.assert_allclose(state.v, [0.25 + 5000.0, 0.25 + 2.0])
  assert not bool(jnp.any(state.clipped)) and float(state.scale[0]) == 1.0
