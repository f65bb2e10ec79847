"""Tests of autoclip, zclip, adagc and quantile_clip against NumPy transcriptions
of the published rules."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxclip import (
  AdaGCState,
  AutoClipState,
  QuantileClipState,
  ZClipState,
  adagc,
  autoclip,
  quantile_clip,
  zclip,
)

RTOL = 2e-5


def _grads(seed: int, steps: int, spikes: tuple[int, ...] = ()) -> list[dict[str, np.ndarray]]:
  """A stream of two-tensor gradients with lognormal scale and a few spikes."""
  rng = np.random.default_rng(seed)
  out = []
  for t in range(steps):
    s = float(np.exp(rng.normal(0.0, 0.3))) * (30.0 if t in spikes else 1.0)
    out.append(
      {
        "w": (s * rng.normal(size=(4, 3))).astype(np.float32),
        "b": (0.3 * s * rng.normal(size=(3,))).astype(np.float32),
      }
    )
  return out


def _np_norm(g: dict[str, np.ndarray]) -> float:
  return float(np.sqrt(sum(np.sum(np.square(x.astype(np.float64))) for x in g.values())))


def _run(tx, grads, jit=True, **extra):
  state = tx.init(jax.tree.map(jnp.asarray, grads[0]))
  update = jax.jit(tx.update) if jit else tx.update
  outs, states = [], []
  for g in grads:
    u, state = update(jax.tree.map(jnp.asarray, g), state, **extra)
    outs.append(u)
    states.append(state)
  return outs, states


# ---------------------------------------------------------------- references


def ref_autoclip(grads, percentile):
  """AutoClip, as the paper's listing: percentile of all norms, clip_grad_norm_."""
  history, out = [], []
  for g in grads:
    n = _np_norm(g)
    history.append(n)
    clip = np.percentile(history, percentile)
    coef = min(1.0, clip / (n + 1e-6))  # torch.nn.utils.clip_grad_norm_
    out.append((clip, coef))
  return out


def ref_zclip(norms, alpha=0.97, z_thresh=2.5, max_norm=1.0, warmup=25, mode="zscore",
              clip_option="adaptive_scaling", clip_factor=1.0, skip=False, eps=1e-6):  # fmt: skip
  """bluorion-com/ZClip `ZClip.step`, on a stream of norms; returns clip coefficients."""
  buffer, mean, var, init, coefs = [], None, None, False, []
  for n in norms:
    if not init:
      buffer.append(n)
      if len(buffer) >= warmup:
        mean = sum(buffer) / len(buffer)
        var = sum((x - mean) ** 2 for x in buffer) / len(buffer)
        init, buffer = True, []
      coefs.append(min(1.0, max_norm / (n + 1e-6)) if max_norm is not None else 1.0)
      continue
    std = var**0.5
    clip_val = None
    if mode == "percentile":
      if n > mean + z_thresh * std:
        clip_val = mean + z_thresh * std
    else:
      z = (n - mean) / (std + eps)
      if z > z_thresh:
        if clip_option == "adaptive_scaling":
          clip_val = (mean + z_thresh * std / (z / z_thresh)) * clip_factor
        else:
          clip_val = mean
    eff = clip_val if clip_val is not None else n
    if max_norm is not None:
      eff = min(eff, max_norm)
    coefs.append(eff / (n + 1e-6) if n > eff else 1.0)
    if clip_val is not None and skip:
      continue
    x = clip_val if clip_val is not None else n
    mean = alpha * mean + (1 - alpha) * x
    var = alpha * var + (1 - alpha) * (x - mean) ** 2
  return coefs


def ref_adagc(grads, lam_rel, beta, warmup, lam_abs):
  """AdaGC, Algorithm 1 of the paper: per-tensor clip coefficients per step."""
  gamma, out = None, []
  for t, g in enumerate(grads):
    norms = np.array([np.linalg.norm(g[k].astype(np.float64)) for k in sorted(g)])
    if t < warmup:
      h = min(1.0, lam_abs / np.sqrt(np.sum(norms**2)))
      coefs = np.full(len(norms), h)
      clipped = coefs * norms
      gamma = clipped if gamma is None else np.minimum(gamma, clipped)
    else:
      coefs = np.minimum(1.0, lam_rel * gamma / norms)
      gamma = beta * gamma + (1 - beta) * coefs * norms
    out.append((coefs, gamma.copy()))
  return out


def ref_quantile(norm_batches, gamma, eta, c0, noise=None):
  """Andrew et al. 2021, Algorithm 1 (geometric update) on batches of norms."""
  c, out = c0, []
  for t, norms in enumerate(norm_batches):
    b = np.sum(np.asarray(norms) <= c)
    if noise is not None:
      b = b + noise[t]
    b = b / len(norms)
    out.append((c, b))
    c = c * math.exp(-eta * (b - gamma))
  return out, c


# --------------------------------------------------------------------- autoclip


@pytest.mark.parametrize("percentile", [10.0, 50.0, 90.0])
def test_autoclip_matches_reference(percentile):
  grads = _grads(0, 40, spikes=(20, 33))
  outs, states = _run(autoclip(percentile, history_size=64), grads)
  for g, u, s, (clip, coef) in zip(
    grads, outs, states, ref_autoclip(grads, percentile), strict=True
  ):
    np.testing.assert_allclose(s.threshold, clip, rtol=RTOL)
    np.testing.assert_allclose(s.scale, coef, rtol=RTOL)
    np.testing.assert_allclose(u["w"], g["w"] * coef, rtol=RTOL, atol=1e-6)


def test_autoclip_window_wraps_like_reference_on_last_window():
  grads = _grads(1, 30)
  _, states = _run(autoclip(25.0, history_size=8), grads)
  norms = [_np_norm(g) for g in grads]
  for t in range(7, 30):
    np.testing.assert_allclose(
      states[t].threshold, np.percentile(norms[t - 7 : t + 1], 25.0), rtol=RTOL
    )
  assert int(states[-1].filled) == 8 and int(states[-1].position) == 30 % 8


def test_autoclip_window_tracks_full_history_percentile():
  """The windowed percentile against the paper's unbounded history."""
  rng = np.random.default_rng(0)
  norms = np.exp(rng.normal(0.0, 0.5, size=5000)).astype(np.float32)
  tx = autoclip(10.0, history_size=1000)

  def step(state, n):
    _, state = tx.update(n[None], state)
    return state, state.threshold

  _, thresholds = jax.lax.scan(step, tx.init(jnp.zeros(1)), jnp.asarray(norms))
  exact = np.array([np.percentile(norms[: t + 1], 10.0) for t in range(1000, 5000, 50)])
  rel = np.abs(np.asarray(thresholds)[1000:5000:50] - exact) / exact
  assert rel.max() < 0.08 and rel.mean() < 0.03, (rel.max(), rel.mean())  # measured 5.6%, 1.8%


def test_autoclip_skips_nonfinite_norms_in_history():
  tx = autoclip(50.0, history_size=4)
  state = tx.init(jnp.zeros(2))
  _, state = tx.update(jnp.array([3.0, 4.0]), state)
  u, state = tx.update(jnp.array([jnp.inf, 0.0]), state)
  assert int(state.filled) == 1 and not bool(state.clipped)
  assert np.isinf(u[0])


# ------------------------------------------------------------------------ zclip


@pytest.mark.parametrize(
  "kwargs",
  [
    {},
    {"clip_option": "mean"},
    {"mode": "percentile", "z_thresh": 1.5},
    {"skip_update_on_spike": True, "max_norm": None},
    {"clip_factor": 0.8, "max_norm": 100.0, "alpha": 0.9},
  ],
)
def test_zclip_matches_reference(kwargs):
  grads = _grads(2, 60, spikes=(30, 31, 45))
  grads = [{k: v / 4 for k, v in g.items()} for g in grads]  # norms near max_norm
  kw = {"warmup_steps": 10, **kwargs}
  outs, states = _run(zclip(**kw), grads)
  ref_kw = {"warmup": kw.pop("warmup_steps"), "skip": kw.pop("skip_update_on_spike", False)}
  coefs = ref_zclip([_np_norm(g) for g in grads], **ref_kw, **kw)
  assert sum(c < 1 for c in coefs[10:]) >= 2  # the spikes really are clipped
  for g, u, s, coef in zip(grads, outs, states, coefs, strict=True):
    np.testing.assert_allclose(s.scale, coef, rtol=RTOL)
    np.testing.assert_allclose(u["b"], g["b"] * coef, rtol=RTOL, atol=1e-6)


def test_zclip_warmup_buffer_and_initialisation():
  norms = [1.0, 2.0, 3.0]
  tx = zclip(warmup_steps=3, max_norm=2.5)
  state = tx.init(jnp.zeros(1))
  for n in norms:
    u, state = tx.update(jnp.array([n]), state)
  np.testing.assert_allclose(u, [2.5])  # warmup clips at max_norm
  np.testing.assert_allclose(state.mean, 2.0)
  np.testing.assert_allclose(state.var, np.var(norms), rtol=1e-6)
  assert state.warmup_norms.shape == (3,) and int(state.filled) == 3


def test_zclip_nonfinite_norm_leaves_statistics():
  tx = zclip(warmup_steps=2)
  state = tx.init(jnp.zeros(1))
  for n in (0.5, 0.6):
    _, state = tx.update(jnp.array([n]), state)
  u, new = tx.update(jnp.array([jnp.nan]), state)
  assert np.isnan(u[0]) and not bool(new.spike)
  np.testing.assert_array_equal(new.mean, state.mean)
  np.testing.assert_array_equal(new.var, state.var)


# ------------------------------------------------------------------------ adagc


def test_adagc_matches_reference():
  grads = _grads(3, 30, spikes=(15, 22))
  outs, states = _run(adagc(relative=1.05, beta=0.98, warmup_steps=5, warmup_max_norm=2.0), grads)
  ref = ref_adagc(grads, 1.05, 0.98, 5, 2.0)
  # state vectors are in jax.tree.leaves order: "b", "w" (sorted keys)
  assert sum(bool(np.any(s.clipped)) for s in states[5:]) >= 2
  for g, u, s, (coefs, gamma) in zip(grads, outs, states, ref, strict=True):
    np.testing.assert_allclose(s.scale, coefs, rtol=RTOL)
    np.testing.assert_allclose(s.ema, gamma, rtol=RTOL)
    np.testing.assert_allclose(u["w"], g["w"] * coefs[1], rtol=RTOL, atol=1e-6)
    np.testing.assert_allclose(u["b"], g["b"] * coefs[0], rtol=RTOL, atol=1e-6)


def test_adagc_many_leaves_bucketed():
  """With >= 32 small leaves the norm kernel buckets them; order must hold."""
  rng = np.random.default_rng(4)
  params = {f"p{i:02d}": jnp.asarray(rng.normal(size=(i + 1,)), jnp.float32) for i in range(40)}
  tx = adagc(relative=1.0, warmup_steps=1, warmup_max_norm=1e9)
  state = tx.init(params)
  _, state = tx.update(params, state)
  half = jax.tree.map(lambda x: x * 2.0, params)
  u, state = tx.update(half, state)
  for x, y in zip(jax.tree.leaves(params), jax.tree.leaves(u), strict=True):
    np.testing.assert_allclose(y, x, rtol=1e-5)  # each tensor back to its own norm


# --------------------------------------------------------------- quantile_clip


def test_quantile_clip_matches_reference():
  grads = _grads(5, 50)
  outs, states = _run(quantile_clip(0.3, 0.2, 0.5), grads)
  ref, _ = ref_quantile([[_np_norm(g)] for g in grads], 0.3, 0.2, 0.5)
  for g, u, s, (c, b) in zip(grads, outs, states, ref, strict=True):
    np.testing.assert_allclose(s.threshold, c, rtol=1e-4)
    np.testing.assert_allclose(s.fraction_below, b)
    coef = min(1.0, c / _np_norm(g))
    np.testing.assert_allclose(u["w"], g["w"] * coef, rtol=1e-4, atol=1e-6)


def test_quantile_clip_per_example_matches_reference_and_converges():
  rng = np.random.default_rng(6)
  batches = [rng.lognormal(0.0, 0.5, size=(64, 1)).astype(np.float32) for _ in range(300)]
  tx = quantile_clip(0.5, 0.2, 0.1, per_example=True)
  outs, states = _run(tx, [{"x": b} for b in batches])
  ref, c_final = ref_quantile([b[:, 0] for b in batches], 0.5, 0.2, 0.1)
  for b, u, s, (c, frac) in zip(batches, outs, states, ref, strict=True):
    np.testing.assert_allclose(s.threshold, c, rtol=1e-4)
    np.testing.assert_allclose(s.fraction_below, frac)
    np.testing.assert_allclose(u["x"], [np.sum(np.minimum(b[:, 0], c))], rtol=1e-4)
  assert abs(float(states[-1].next_threshold) - 1.0) < 0.15  # the median of lognormal(0, .5)
  np.testing.assert_allclose(states[-1].next_threshold, c_final, rtol=1e-4)


def test_quantile_clip_count_noise_uses_key():
  batch = {"x": jnp.ones((8, 3))}
  tx = quantile_clip(0.5, 0.2, 1.0, per_example=True, count_noise_std=2.0, seed=3)
  s0 = tx.init({"x": jnp.ones(3)})
  _, s1 = tx.update(batch, s0)
  _, s1b = jax.jit(tx.update)(batch, s0)
  np.testing.assert_allclose(s1.fraction_below, s1b.fraction_below)
  assert not np.array_equal(s1.key, s0.key)
  noise = np.asarray(jax.random.normal(jax.random.split(s0.key)[1], ()))
  # norms sqrt3 > 1: no example below C; the noisy fraction is clamped to [0, 1]
  np.testing.assert_allclose(s1.fraction_below, np.clip(2.0 * noise / 8, 0, 1), rtol=1e-5)
  key = jax.random.PRNGKey(9)
  _, s2 = tx.update(batch, s0, key=key)
  want = np.clip(2.0 * np.asarray(jax.random.normal(key, ())) / 8, 0, 1)
  np.testing.assert_allclose(s2.fraction_below, want, rtol=1e-5)
  np.testing.assert_array_equal(s2.key, s0.key)


def test_quantile_clip_noisy_fraction_is_clamped():
  # As TF Privacy's QuantileEstimatorQuery: with noise far above the batch
  # size, one step still moves C by at most exp(lr * max(q, 1 - q)).
  batch = {"x": jnp.ones((4, 3))}
  tx = quantile_clip(0.3, 0.2, 1.0, per_example=True, count_noise_std=50.0)
  s0 = tx.init({"x": jnp.ones(3)})
  step = jax.jit(lambda k: tx.update(batch, s0, key=k)[1])
  states = [step(jax.random.key(i)) for i in range(16)]
  fractions = np.array([float(s.fraction_below) for s in states])
  assert fractions.min() == 0.0 and fractions.max() == 1.0  # clamped both ways
  factors = np.array([float(s.next_threshold) for s in states])
  np.testing.assert_allclose(factors.min(), np.exp(-0.2 * 0.7), rtol=1e-5)
  np.testing.assert_allclose(factors.max(), np.exp(0.2 * 0.3), rtol=1e-5)


# ---------------------------------------------------------------- common contract

FACTORIES = {
  "autoclip": lambda: autoclip(10.0, history_size=16),
  "zclip": lambda: zclip(warmup_steps=4),
  "adagc": lambda: adagc(warmup_steps=3),
  "quantile_clip": lambda: quantile_clip(),
}
STATES = {"autoclip": AutoClipState, "zclip": ZClipState, "adagc": AdaGCState}
STATES["quantile_clip"] = QuantileClipState


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_jit_matches_eager_and_state_is_fixed(name):
  grads = _grads(7, 12, spikes=(9,))
  tx = FACTORIES[name]()
  o1, s1 = _run(tx, grads, jit=True)
  o2, s2 = _run(tx, grads, jit=False)
  init = tx.init(jax.tree.map(jnp.asarray, grads[0]))
  assert isinstance(init, STATES[name])
  shapes = jax.tree.map(lambda x: (x.shape, x.dtype), init)
  for a, b, sa, sb in zip(o1, o2, s1, s2, strict=True):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7), a, b)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7), sa, sb)
    assert jax.tree.map(lambda x: (x.shape, x.dtype), sa) == shapes


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_checkpoint_round_trip(name):
  grads = _grads(8, 8)
  tx = FACTORIES[name]()
  _, states = _run(tx, grads[:5])
  leaves, treedef = jax.tree.flatten(states[-1])
  assert all(isinstance(x, jax.Array) for x in leaves)
  restored = treedef.unflatten([np.array(x) for x in leaves])  # e.g. from .npz
  rest = _run_from(tx, grads[5:], restored)
  cont = _run_from(tx, grads[5:], states[-1])
  jax.tree.map(np.testing.assert_array_equal, rest, cont)


def _run_from(tx, grads, state):
  for g in grads:
    u, state = jax.jit(tx.update)(jax.tree.map(jnp.asarray, g), state)
  return u, state


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_chains_with_adamw_and_preserves_bf16(name):
  params = {"w": jnp.ones((3, 2), jnp.bfloat16), "b": jnp.zeros(2, jnp.bfloat16)}
  opt = optax.chain(FACTORIES[name](), optax.adamw(1e-3))
  state = opt.init(params)
  g = jax.tree.map(lambda x: jnp.full_like(x, 3.0), params)
  u, state = jax.jit(opt.update)(g, state, params)
  assert jax.tree.map(lambda x: x.dtype, u) == jax.tree.map(lambda x: x.dtype, params)


def test_inject_hyperparams_traced():
  tx = optax.inject_hyperparams(autoclip, static_args=("history_size",))(
    percentile=50.0, history_size=4
  )
  state = tx.init(jnp.zeros(2))
  u, state = jax.jit(tx.update)(jnp.array([3.0, 4.0]), state)
  np.testing.assert_allclose(u, [3.0, 4.0])
  tx = optax.inject_hyperparams(zclip, static_args=("warmup_steps", "mode", "clip_option"))(
    alpha=0.9, warmup_steps=2
  )
  _, state = jax.jit(tx.update)(jnp.array([3.0, 4.0]), tx.init(jnp.zeros(2)))


@pytest.mark.parametrize(
  "make, match",
  [
    (lambda: autoclip(101.0), "percentile"),
    (lambda: autoclip(-1.0), "percentile"),
    (lambda: autoclip(10.0, history_size=0), "history_size"),
    (lambda: zclip(alpha=1.5), "alpha"),
    (lambda: zclip(mode="median"), "mode"),
    (lambda: zclip(clip_option="max"), "clip_option"),
    (lambda: zclip(warmup_steps=0), "warmup_steps"),
    (lambda: zclip(max_norm=-1.0), "max_norm"),
    (lambda: zclip(z_thresh=float("nan")), "z_thresh"),
    (lambda: adagc(relative=-1.0), "relative"),
    (lambda: adagc(beta=2.0), "beta"),
    (lambda: adagc(warmup_steps=0), "warmup_steps"),
    (lambda: quantile_clip(target_quantile=1.5), "target_quantile"),
    (lambda: quantile_clip(learning_rate=-0.1), "learning_rate"),
    (lambda: quantile_clip(count_noise_std=1.0), "per_example"),
    (lambda: quantile_clip(per_example=True, axis_name="d"), "axis_name"),
  ],
)
def test_bad_arguments_raise_value_error(make, match):
  with pytest.raises(ValueError, match=match):
    make()


@pytest.mark.parametrize(
  "make", [lambda: autoclip(10.0, history_size=2.5), lambda: zclip(warmup_steps="3")]
)
def test_bad_types_raise_type_error(make):
  with pytest.raises(TypeError):
    make()


def test_percentile_mode_ignores_clip_option():
  zclip(mode="percentile", clip_option="whatever")


def test_adagc_recovers_from_a_tensor_with_no_finite_norm_in_warmup():
  tx = adagc(relative=1.0, warmup_steps=1, warmup_max_norm=10.0)
  state = tx.init({"a": jnp.ones(2)})
  _, state = tx.update({"a": jnp.array([jnp.nan, 1.0])}, state)  # warmup: non-finite
  _, state = tx.update({"a": jnp.array([3.0, 4.0])}, state)  # first finite norm
  assert np.isfinite(float(state.ema[0]))
  out, state = tx.update({"a": jnp.array([30.0, 40.0])}, state)
  assert bool(state.clipped[0]) and float(jnp.linalg.norm(out["a"])) < 50.0


@pytest.mark.parametrize(
  "make", [lambda: autoclip(), lambda: zclip(), lambda: adagc(), lambda: quantile_clip()]
)
def test_stateful_transforms_reject_a_foreign_state(make):
  with pytest.raises(TypeError, match="needs its own state"):
    make().update({"a": jnp.ones(2)}, optax.EmptyState())
