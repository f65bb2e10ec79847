"""Tests of skip_on_spike, skip_large_norm and skip_nonfinite."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxclip
from jaxclip import (
  SkipLargeNormState,
  SkipNonFiniteState,
  SkipOnSpikeState,
  skip_large_norm,
  skip_nonfinite,
  skip_on_spike,
)


def ref_skip_on_spike(
  norms, losses, window, n_sigma, min_history, record_skipped=False, two_sided=False
):
  """OLMo's rule (mean + n_sigma * sample std of the finite window; with
  `two_sided`, newer OLMo-core's |value - mean| / std), one flag per step."""
  hist_n, hist_l, skips = [], [], []
  for n, loss in zip(norms, losses, strict=True):

    def out(v, h):
      h = [x for x in h if np.isfinite(x)]
      if len(h) < min_history:
        return False
      z = (v - np.mean(h)) / np.std(h, ddof=1)
      return (abs(z) if two_sided else z) > n_sigma

    finite = np.isfinite(n) and (loss is None or np.isfinite(loss))
    skip = not finite or out(n, hist_n) or (loss is not None and out(loss, hist_l))
    skips.append(skip)
    if finite and (record_skipped or not skip):
      hist_n = (hist_n + [n])[-window:]
      hist_l = (hist_l + [np.nan if loss is None else loss])[-window:]
  return skips


def _stream(seed, steps, spikes=()):
  rng = np.random.default_rng(seed)
  norms = np.exp(rng.normal(0, 0.1, steps))
  losses = 2.0 + 0.05 * rng.normal(size=steps)
  for t in spikes:
    norms[t] *= 5
    losses[t] += 1.0
  return norms.astype(np.float32), losses.astype(np.float32)


def _run(opt, norms, losses, jit=True):
  params = {"w": jnp.zeros(4)}
  state = opt.init(params)
  update = jax.jit(opt.update) if jit else opt.update
  out = []
  for n, loss in zip(norms, losses, strict=True):
    g = {"w": jnp.full(4, n / 2)}  # global norm n
    extra = {} if loss is None else {"loss": jnp.asarray(loss)}
    u, state = update(g, state, params, **extra)
    out.append((u, state))
  return out


@pytest.mark.parametrize("record_skipped", [False, True])
@pytest.mark.parametrize("use_loss", [False, True])
def test_skip_on_spike_matches_reference(use_loss, record_skipped):
  norms, losses = _stream(0, 80, spikes=(40, 41, 55, 70))
  if not use_loss:
    norms[55] = norms[70] = 1.0  # only the loss spiked there
  losses_in = list(losses) if use_loss else [None] * len(norms)
  opt = skip_on_spike(optax.sgd(1.0), 16, 4.0, 8, record_skipped=record_skipped)
  out = _run(opt, norms, losses_in)
  expected = ref_skip_on_spike(norms, losses_in, 16, 4.0, 8, record_skipped)
  got = [bool(s.skipped) for _, s in out]
  assert got == expected
  assert got[40] and int(out[-1][1].total_skipped) == sum(expected)
  if not record_skipped:  # recorded spikes widen OLMo's band: 55 and 70 may pass there
    assert got[55] == use_loss and got[70] == use_loss


@pytest.mark.parametrize("two_sided", [False, True])
def test_skip_on_spike_two_sided_matches_reference(two_sided):
  norms, losses = _stream(3, 60, spikes=(20,))
  norms[50] /= 5  # sudden drops: a spike only to the two-sided test
  losses[55] -= 1.0
  opt = skip_on_spike(optax.sgd(1.0), 16, 4.0, 8, two_sided=two_sided)
  got = [bool(s.skipped) for _, s in _run(opt, norms, list(losses))]
  assert got == ref_skip_on_spike(norms, list(losses), 16, 4.0, 8, True, two_sided)
  assert got[20] and got[50] == two_sided and got[55] == two_sided


def test_skip_on_spike_refuses_a_loss_that_is_not_a_scalar():
  opt = skip_on_spike(optax.sgd(1.0), 8, 6.0, 4)
  state = opt.init({"w": jnp.zeros(2)})
  for bad in (jnp.ones(5), jnp.ones(1)):
    with pytest.raises(ValueError, match=r"`loss` must be a scalar.*jnp.mean"):
      opt.update({"w": jnp.ones(2)}, state, loss=bad)


def test_skip_on_spike_in_multisteps_judges_a_running_mean_loss():
  # Inside MultiSteps the guard keeps the state of the last microbatch's
  # call, so it judges the loss passed there: a running mean of the
  # microbatch losses makes that the accumulated step's mean loss, and a
  # spike in any microbatch is caught.
  def run(spiked_microbatch, running_mean):
    opt = optax.MultiSteps(skip_on_spike(optax.sgd(0.1), 16, 3.0, 4), every_k_schedule=4)
    params = {"w": jnp.zeros(2)}
    state = opt.init(params)
    update = jax.jit(opt.update)
    for step in range(10):
      total = 0.0
      for m in range(4):
        loss = 1.0 + 0.01 * ((step + m) % 3)
        if step == 9 and m == spiked_microbatch:
          loss = 1000.0
        total += loss
        passed = total / (m + 1) if running_mean else loss
        _, state = update({"w": jnp.ones(2)}, state, params, loss=jnp.float32(passed))
    return bool(state.inner_opt_state.skipped)

  assert all(run(m, running_mean=True) for m in range(4))
  assert [run(m, running_mean=False) for m in range(4)] == [False, False, False, True]


def test_skip_on_spike_leaves_inner_state_and_params():
  norms, losses = _stream(1, 30, spikes=(25,))
  opt = skip_on_spike(optax.adam(0.1), 16, 4.0, 8)
  out = _run(opt, norms, losses)
  (_, before), (u, after) = out[24], out[25]
  assert bool(after.skipped)
  jax.tree.map(np.testing.assert_array_equal, after.inner_state, before.inner_state)
  np.testing.assert_array_equal(u["w"], np.zeros(4))
  params = optax.apply_updates({"w": jnp.ones(4)}, u)
  np.testing.assert_array_equal(params["w"], np.ones(4))


def test_skip_on_spike_nonfinite_always_skipped_and_not_recorded():
  opt = skip_on_spike(optax.sgd(1.0), 8, 6.0, 4)
  out = _run(opt, [1.0, np.inf, 1.0], [1.0, 1.0, np.nan])
  assert [bool(s.skipped) for _, s in out] == [False, True, True]
  assert int(out[-1][1].filled) == 1


def test_skip_on_spike_forwards_loss_to_inner():
  seen = []

  def update_fn(updates, state, params=None, *, loss, **extra):
    seen.append(loss)
    return updates, state

  inner = optax.GradientTransformationExtraArgs(lambda p: optax.EmptyState(), update_fn)
  opt = skip_on_spike(inner, 8, 6.0, 4)
  u, _ = opt.update({"w": jnp.ones(2)}, opt.init({"w": jnp.ones(2)}), loss=jnp.asarray(3.0))
  assert float(seen[-1]) == 3.0
  np.testing.assert_array_equal(u["w"], np.ones(2))


def test_skip_on_spike_jit_matches_eager_and_fixed_state():
  norms, losses = _stream(2, 24, spikes=(20,))
  opt = skip_on_spike(optax.adam(0.1), 8, 3.0, 4)
  a, b = _run(opt, norms, losses, jit=True), _run(opt, norms, losses, jit=False)
  init = opt.init({"w": jnp.zeros(4)})
  assert isinstance(init, SkipOnSpikeState)
  shapes = jax.tree.map(lambda x: (x.shape, x.dtype), init)
  for (ua, sa), (ub, sb) in zip(a, b, strict=True):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6), (ua, sa), (ub, sb))
    assert jax.tree.map(lambda x: (x.shape, x.dtype), sa) == shapes
  leaves, treedef = jax.tree.flatten(a[-1][1])
  assert all(isinstance(x, jax.Array) for x in leaves)
  restored = treedef.unflatten([np.asarray(x) for x in leaves])
  g = {"w": jnp.ones(4)}
  r1 = jax.jit(opt.update)(g, restored, {"w": jnp.zeros(4)}, loss=jnp.float32(2.0))
  r2 = jax.jit(opt.update)(g, a[-1][1], {"w": jnp.zeros(4)}, loss=jnp.float32(2.0))
  jax.tree.map(np.testing.assert_array_equal, r1, r2)


@pytest.mark.parametrize(
  "kwargs, match",
  [
    ({"window": 1}, "window"),
    ({"window": 8, "min_history": 9}, "min_history"),
    ({"min_history": 1}, "min_history"),
    ({"n_sigma": -1.0}, "n_sigma"),
  ],
)
def test_skip_on_spike_bad_arguments(kwargs, match):
  with pytest.raises(ValueError, match=match):
    skip_on_spike(optax.sgd(1.0), **kwargs)


# ----------------------------------------------------------------- skip_nonfinite


def _grads(pattern):
  return [{"w": jnp.array([1.0, np.nan if bad else 2.0])} for bad in pattern]


def test_skip_nonfinite_counts_and_skips():
  opt = skip_nonfinite(optax.adam(0.1))
  params = {"w": jnp.zeros(2)}
  state = opt.init(params)
  assert isinstance(state, SkipNonFiniteState)
  records = []
  for g in _grads([0, 1, 1, 0, 1]):
    before = state.inner_state
    u, state = jax.jit(opt.update)(g, state, params)
    records.append(
      (int(state.total_skipped), int(state.consecutive_skipped), bool(state.last_finite))
    )
    if not bool(state.last_finite):
      jax.tree.map(np.testing.assert_array_equal, state.inner_state, before)
      np.testing.assert_array_equal(u["w"], np.zeros(2))
  assert records == [(0, 0, True), (1, 1, False), (2, 2, False), (2, 0, True), (3, 1, False)]
  assert int(state.count) == 5 and int(state.applied_nonfinite) == 0


def test_skip_nonfinite_gives_up_after_max_consecutive():
  opt = skip_nonfinite(optax.sgd(1.0), max_consecutive=2)
  state = opt.init({"w": jnp.zeros(2)})
  applied = []
  for g in _grads([1, 1, 1, 1, 0, 1]):
    u, state = opt.update(g, state)
    applied.append(bool(np.isnan(u["w"][1])))
  assert applied == [False, False, True, True, False, False]
  assert int(state.applied_nonfinite) == 2 and int(state.total_skipped) == 3


def test_skip_nonfinite_forwards_extra_args():
  seen = []

  def update_fn(updates, state, params=None, **extra):
    seen.append(extra)
    return updates, state

  inner = optax.GradientTransformationExtraArgs(lambda p: optax.EmptyState(), update_fn)
  opt = skip_nonfinite(inner)
  opt.update({"w": jnp.ones(2)}, opt.init({"w": jnp.ones(2)}), loss=1.5)
  assert seen[-1]["loss"] == 1.5


GUARDS = [skip_nonfinite, skip_on_spike, functools.partial(skip_large_norm, max_norm=10.0)]


@pytest.mark.parametrize("guard", GUARDS)
def test_guards_forward_extra_args_through_multisteps(guard):
  # MultiSteps takes extra keyword arguments without being a
  # GradientTransformationExtraArgs: they still reach what it wraps.
  seen = []

  def update_fn(updates, state, params=None, **extra):
    seen.append(extra)
    return updates, state

  inner = optax.GradientTransformationExtraArgs(lambda p: optax.EmptyState(), update_fn)
  opt = guard(optax.MultiSteps(inner, every_k_schedule=1))
  opt.update({"w": jnp.ones(2)}, opt.init({"w": jnp.ones(2)}), value=2.5)
  assert seen[-1]["value"] == 2.5


def test_a_plain_transformation_gets_no_extra_args():
  # Under optax's contract a plain GradientTransformation takes no extra
  # arguments, even if its update accepts **kwargs (and passes them on).
  inner = optax.scale_by_adam()
  plain = optax.GradientTransformation(
    inner.init, lambda u, s, p=None, **kw: inner.update(u, s, p, **kw)
  )
  opt = skip_nonfinite(plain)
  u, _ = opt.update({"w": jnp.ones(2)}, opt.init({"w": jnp.ones(2)}), loss=1.0)
  assert np.all(np.isfinite(np.asarray(u["w"])))


@pytest.mark.parametrize("guard", GUARDS)
def test_guards_refuse_what_is_not_a_transformation(guard):
  with pytest.raises(TypeError, match=r"`inner` must be an optax.GradientTransformation.*call it"):
    guard(optax.sgd)  # the factory, not an optimizer
  with pytest.raises(TypeError, match=r"`inner` must be an optax.GradientTransformation, got None"):
    guard(None)


def test_skip_nonfinite_bad_argument():
  with pytest.raises(ValueError, match="max_consecutive"):
    skip_nonfinite(optax.sgd(1.0), max_consecutive=-1)
  with pytest.raises(TypeError, match="max_consecutive"):
    skip_nonfinite(optax.sgd(1.0), max_consecutive=2.0)


def test_skip_on_spike_follows_a_lasting_change_of_level():
  # Norms jump from about 1 to about 10 for good: the default (OLMo's) rule
  # skips the first steps at the new level, then the window catches up.
  opt = skip_on_spike(optax.sgd(1.0), window=16, n_sigma=3.0, min_history=8)
  state = opt.init(jnp.zeros(2))
  skipped = []
  step = jax.jit(opt.update)
  for i in range(80):
    level = 1.0 if i < 30 else 10.0
    g = jnp.array([level * (1 + 0.05 * np.sin(i)), 0.0])
    _, state = step(g, state)
    skipped.append(bool(state.skipped))
  assert any(skipped[30:40])  # the jump is caught
  assert not any(skipped[60:])  # and training goes on at the new level
  # Keeping skipped values out of the window locks into skipping.
  opt = skip_on_spike(optax.sgd(1.0), window=16, n_sigma=3.0, min_history=8, record_skipped=False)
  state = opt.init(jnp.zeros(2))
  step = jax.jit(opt.update)
  for i in range(80):
    level = 1.0 if i < 30 else 10.0
    _, state = step(jnp.array([level * (1 + 0.05 * np.sin(i)), 0.0]), state)
  assert bool(state.skipped)


def test_skip_large_norm_skips_exactly_the_norms_above_the_bound():
  # axlearn's fixed `drop_norm` rule: a step is taken iff its norm is finite
  # and at most the bound (a norm equal to it is taken).
  norms = [1.0, 50.0, 10.0, np.inf, 10.5, np.nan, 3.0, 200.0, 0.0]
  opt = skip_large_norm(optax.adam(0.1), 10.0)
  params = {"w": jnp.zeros(4)}
  state = opt.init(params)
  assert isinstance(state, SkipLargeNormState)
  step = jax.jit(opt.update)
  skipped = []
  for n in norms:
    g = {"w": jnp.full(4, n / 2)}  # global norm n
    before = state.inner_state
    u, state = step(g, state, params)
    skipped.append(bool(state.skipped))
    if skipped[-1]:
      np.testing.assert_array_equal(u["w"], np.zeros(4))
      jax.tree.map(np.testing.assert_array_equal, state.inner_state, before)
    else:
      assert np.all(np.isfinite(np.asarray(u["w"])))
  assert skipped == [not (n <= 10.0) for n in norms]
  assert int(state.total_skipped) == 5 and int(state.count) == len(norms)
  # The inner optimizer saw only the steps that were taken.
  assert int(state.inner_state[0].count) == len(norms) - 5
  assert float(state.threshold) == 10.0 and float(state.norm) == 0.0


def test_skip_large_norm_then_clip_matches_the_unguarded_chain_on_kept_steps():
  # axlearn's recipe: skip above 100, clip to 1 what is kept. On the kept
  # steps the guarded chain is the plain chain run on those steps alone.
  chain = optax.chain(jaxclip.clip_by_global_norm(1.0), optax.adam(0.1))
  guarded = skip_large_norm(chain, 100.0)
  params = {"w": jnp.zeros(3)}
  gs, ps = guarded.init(params), chain.init(params)
  for n in (5.0, 400.0, 0.5, 150.0, 80.0):
    g = {"w": jnp.array([n, 0.0, 0.0])}
    u, gs = guarded.update(g, gs, params)
    if n <= 100.0:
      want, ps = chain.update(g, ps, params)
      np.testing.assert_allclose(u["w"], want["w"], rtol=1e-6)
    else:
      np.testing.assert_array_equal(u["w"], np.zeros(3))
  assert int(gs.total_skipped) == 2


def test_skip_large_norm_with_a_schedule_and_a_traced_bound():
  # A schedule of the step count (skipped steps counted), and a bound given
  # by optax.inject_hyperparams (a traced value).
  opt = skip_large_norm(optax.sgd(1.0), lambda count: 1.0 + count)
  state = opt.init(jnp.zeros(2))
  skipped = []
  for _ in range(4):
    _, state = jax.jit(opt.update)(jnp.array([2.5, 0.0]), state)
    skipped.append((bool(state.skipped), float(state.threshold)))
  assert skipped == [(True, 1.0), (True, 2.0), (False, 3.0), (False, 4.0)]
  injected = optax.inject_hyperparams(skip_large_norm)(inner=optax.sgd(1.0), max_norm=2.0)
  state = injected.init(jnp.zeros(2))
  _, state = jax.jit(injected.update)(jnp.array([2.5, 0.0]), state)
  assert bool(state.inner_state.skipped)


def test_skip_large_norm_skips_nonfinite_norms_under_an_infinite_bound():
  # math.inf (or a warm-up schedule giving it) takes every finite step but
  # still skips inf and NaN ones, so Adam's moments stay finite.
  for bound in (jnp.inf, lambda count: jnp.where(count < 1, jnp.inf, 100.0)):
    opt = skip_large_norm(optax.adam(0.1), bound)
    state = opt.init(jnp.zeros(2))
    for g in ([jnp.inf, 1.0], [jnp.nan, 1.0], [-jnp.inf, 0.0]):
      u, state = jax.jit(opt.update)(jnp.array(g), state, jnp.zeros(2))
      np.testing.assert_array_equal(u, np.zeros(2))
    assert int(state.total_skipped) == 3 and int(state.inner_state[0].count) == 0
  opt = skip_large_norm(optax.sgd(1.0), jnp.inf)
  u, state = opt.update(jnp.array([1e38, 1e38]), opt.init(jnp.zeros(2)))
  assert not bool(state.skipped)  # a finite norm near the float32 limit is taken
  np.testing.assert_allclose(float(state.norm), 2**0.5 * 1e38, rtol=1e-6)


def test_skip_large_norm_bad_arguments():
  with pytest.raises(ValueError, match="max_norm"):
    skip_large_norm(optax.sgd(1.0), -1.0)
  with pytest.raises(ValueError, match="max_norm"):
    skip_large_norm(optax.sgd(1.0), float("nan"))
  with pytest.raises(TypeError, match="max_norm"):
    skip_large_norm(optax.sgd(1.0), "10")
  opt = skip_large_norm(optax.sgd(1.0), lambda count: -1.0)
  with pytest.raises(ValueError, match=r"schedule given as `max_norm` returned -1.0 at step 0"):
    opt.update(jnp.ones(2), opt.init(jnp.zeros(2)))
  with pytest.raises(TypeError, match="SkipLargeNormState"):
    opt.update(jnp.ones(2), optax.EmptyState())


def _maxtext_rule(norms, losses, interval, k):
  """MaxText's `skip_step_on_spikes`: mean + k * sample std of the last
  `interval` values (skipped ones included), tested once
  count + 1 >= max(2, interval // 2)."""
  hist_n, hist_l, skips = [], [], []
  for n, loss in zip(norms, losses, strict=True):
    gate = len(hist_n) + 1 >= max(2, interval // 2)

    def out(v, h):
      return v - np.mean(h) > k * np.std(h, ddof=1)

    skips.append(bool(gate and (out(n, hist_n) or out(loss, hist_l))))
    hist_n, hist_l = (hist_n + [n])[-interval:], (hist_l + [loss])[-interval:]
  return skips


def _levanter_rule(norms, losses, length, k):
  """Levanter's `skip_step`: mean + k * max(population std, 1e-6) of the last
  `length` values (skipped ones included), tested once `max(2, length // 2)`
  values are known."""
  hist_n, hist_l, skips = [], [], []
  for n, loss in zip(norms, losses, strict=True):

    def out(v, h):
      return v > np.mean(h) + k * max(np.std(h), 1e-6)

    gate = len(hist_n) >= max(2, length // 2)
    skips.append(bool(gate and (out(n, hist_n) or out(loss, hist_l))))
    hist_n, hist_l = (hist_n + [n])[-length:], (hist_l + [loss])[-length:]
  return skips


def test_skip_on_spike_ports_maxtext_and_levanter():
  # The argument mappings given in docs/adaptive.md.
  rng = np.random.default_rng(0)  # heavy-tailed: many steps near the band
  norms = np.exp(rng.normal(0, 0.3, 300)).astype(np.float32).astype(np.float64)
  losses = (2.0 + 0.05 * rng.standard_t(3, 300)).astype(np.float32).astype(np.float64)
  norms[7] *= 5  # the first step MaxText may skip (7 earlier values)
  interval, k = 16, 3.0
  maxtext = skip_on_spike(optax.sgd(1.0), interval, k, max(2, interval // 2) - 1)
  got = [bool(s.skipped) for _, s in _run(maxtext, norms, losses)]
  want = _maxtext_rule(norms, losses, interval, k)
  assert got == want and sum(want) >= 5
  # Levanter's population std: equal decisions once the window is full.
  levanter = skip_on_spike(
    optax.sgd(1.0), interval, k * np.sqrt((interval - 1) / interval), max(2, interval // 2)
  )
  got = [bool(s.skipped) for _, s in _run(levanter, norms, losses)]
  want = _levanter_rule(norms, losses, interval, k)
  assert got[interval:] == want[interval:] and sum(want[interval:]) >= 5
