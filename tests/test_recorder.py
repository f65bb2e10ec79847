"""record_norms and suggest_max_norm: fixed shapes, stopping, the numbers."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxclip
from jaxclip._recorder import RecordNormsState, ThresholdSuggestion, record_norms, suggest_max_norm

PARAMS = {"a": jnp.zeros((3, 2)), "b": jnp.zeros(4), "n": jnp.int32(0)}


def _grads(i):
  return {"a": jnp.full((3, 2), 0.1 * i + 0.1), "b": jnp.full(4, 1.0 / (i + 1)), "n": jnp.int32(i)}


def _expected(i):
  a, b = np.sqrt(6) * (0.1 * i + 0.1), 2.0 / (i + 1)
  return np.hypot(a, b), np.array([a, b])


def _record(n, steps, **kw):
  tx = optax.chain(record_norms(n, **kw), optax.sgd(0.1))
  state = tx.init(PARAMS)
  update = jax.jit(tx.update)
  for i in range(steps):
    g = _grads(i)
    updates, state = update(g, state, PARAMS)
  return state[0], g, updates


def test_identity_fixed_shapes_and_values():
  rec, g, updates = _record(5, 3)
  assert isinstance(rec, RecordNormsState)
  assert rec.global_norm.shape == (5,) and rec.norms.shape == (5, 2) and int(rec.count) == 3
  np.testing.assert_allclose(updates["a"], -0.1 * g["a"])  # the sgd step only
  for i in range(3):
    total, per = _expected(i)
    np.testing.assert_allclose(rec.global_norm[i], total, rtol=1e-6)
    np.testing.assert_allclose(rec.norms[i], per, rtol=1e-6)
  np.testing.assert_array_equal(rec.global_norm[3:], 0)


def test_stops_after_num_steps_and_keeps_shapes():
  rec, _, _ = _record(4, 9)
  assert rec.global_norm.shape == (4,) and int(rec.count) == 9
  np.testing.assert_allclose(rec.global_norm, [_expected(i)[0] for i in range(4)], rtol=1e-6)


def test_without_per_tensor():
  rec, _, _ = _record(3, 2, per_tensor=False)
  assert rec.norms.shape == (3, 0)


def test_recorder_errors():
  with pytest.raises(ValueError, match="num_steps"):
    record_norms(0)
  with pytest.raises(TypeError, match="num_steps"):
    record_norms(2.5)
  tx = record_norms(3)
  with pytest.raises(ValueError, match="floating leaves"):
    tx.update({"x": jnp.ones(2)}, tx.init(PARAMS))


def test_suggestion_matches_numpy():
  rng = np.random.default_rng(0)
  per = np.abs(rng.normal(size=(200, 3))) * np.array([1.0, 3.0, 0.5])
  g = np.sqrt((per**2).sum(axis=1))
  s = suggest_max_norm(
    per, percentile=95, params={"x": jnp.ones(1), "y": jnp.ones(1), "z": jnp.ones(1)}
  )
  assert isinstance(s, ThresholdSuggestion)
  np.testing.assert_allclose(s.raw, np.percentile(g, 95), rtol=1e-5)
  assert s.max_norm == float(f"{s.raw:.2g}")
  for q in (50, 90, 95, 99):
    np.testing.assert_allclose(s.percentiles[f"p{q}"], np.percentile(g, q), rtol=1e-5)
  np.testing.assert_allclose(s.percentiles["max"], g.max(), rtol=1e-5)
  share = np.mean(per**2 / g[:, None] ** 2, axis=0)
  assert [n for n, _ in s.dominant] == ["y", "x", "z"]
  np.testing.assert_allclose([v for _, v in s.dominant], np.sort(share)[::-1], rtol=1e-4)
  table = {label: (thr, n) for label, thr, n, _ in s.table}
  assert table["p90"][1] == int(np.sum(g > np.percentile(g, 90)))
  assert table["max"][1] == 0
  assert table["suggested"] == (s.max_norm, int(np.sum(g > s.max_norm)))
  text = str(s)
  assert "Suggested max_norm" in text and "y" in text and s.explain() == text


def test_suggestion_from_optimizer_states_and_one_dimensional_norms():
  rec, _, _ = _record(30, 30)
  tx = optax.chain(record_norms(30), optax.sgd(0.1))
  opt_state = (rec, tx.init(PARAMS)[1])
  g = np.asarray(rec.global_norm)
  for obj in (rec, opt_state, g):
    s = suggest_max_norm(obj, percentile=50)
    np.testing.assert_allclose(s.raw, np.median(g), rtol=1e-6)
  assert suggest_max_norm(g).dominant == ()
  assert suggest_max_norm(rec, params=PARAMS).dominant[0][0] in ("a", "b")


def test_suggestion_from_a_flax_train_state():
  train_state = pytest.importorskip(
    "flax.training.train_state", reason="flax not installed: pip install 'jaxclip[flax]'"
  )
  rec, _, _ = _record(30, 30)
  tx = optax.chain(record_norms(30), optax.sgd(0.1))
  ts = train_state.TrainState.create(apply_fn=None, params=PARAMS, tx=tx)
  ts = ts.replace(opt_state=(rec, ts.opt_state[1]))
  s = suggest_max_norm(ts, percentile=50)
  np.testing.assert_allclose(s.raw, np.median(np.asarray(rec.global_norm)), rtol=1e-6)


def test_only_recorded_steps_and_finite_norms_count():
  rec, _, _ = _record(50, 25)
  assert suggest_max_norm(rec).num_steps == 25
  g = np.r_[np.linspace(1, 2, 30), np.inf, np.nan]
  s = suggest_max_norm(g)
  assert s.num_steps == 30 and s.num_nonfinite == 2
  assert any("inf/NaN" in n for n in s.notes)


def test_default_rule_median_when_the_norm_settled():
  g = np.r_[12.0, 5.0, np.linspace(2.0, 1.0, 58)]  # fell from its first value
  s = suggest_max_norm(g)
  assert (s.percentile, s.factor) == (50.0, 1.0)
  np.testing.assert_allclose(s.raw, np.median(g))
  assert s.max_norm == float(f"{np.median(g):.2g}")
  assert "settled" in s.notes[0]
  assert "(the 50th percentile of 60 recorded" in str(s)


def test_default_rule_quarter_median_when_every_step_is_large():
  rng = np.random.default_rng(1)
  g = np.exp(rng.normal(size=80))  # no fall from the first step: noise-dominated
  g[0] = 2.9 * np.median(g)  # just under the 3x fall the rule asks for
  s = suggest_max_norm(g)
  assert (s.percentile, s.factor) == (50.0, 0.25)
  np.testing.assert_allclose(s.raw, 0.25 * np.median(g))
  assert f"0.25 x the 50th percentile, {np.median(g):.4g}, of 80 recorded" in str(s)
  assert "pass `percentile`" in s.notes[0] and "quarter of the median" in s.notes[0]
  g[0] = 3.1 * np.median(g)
  assert suggest_max_norm(g).factor == 1.0
  assert suggest_max_norm(g, percentile=90).factor == 1.0  # an explicit percentile is kept
  np.testing.assert_allclose(suggest_max_norm(g, percentile=90).raw, np.percentile(g, 90))


def test_default_rule_edge_cases():
  # The first finite norm is the reference: a non-finite first step is skipped.
  g = np.r_[np.nan, 10.0, np.linspace(1.0, 2.0, 30)]
  s = suggest_max_norm(g, percentile=None)
  assert s.factor == 1.0 and s.num_nonfinite == 1
  # Close to the rule's 3x fall, the other choice is named.
  g = np.r_[3.2, np.ones(30)]
  assert any("close to the rule's 3x" in n and "0.25" in n for n in suggest_max_norm(g).notes)
  assert not any("close to" in n for n in suggest_max_norm(np.r_[10.0, np.ones(30)]).notes)
  # A zero threshold would zero every update: an error, not a suggestion.
  for zeros in (np.zeros(30), np.r_[1.0, np.zeros(20), np.ones(10)]):
    with pytest.raises(ValueError, match="is 0"):
      suggest_max_norm(zeros)
  with pytest.raises(ValueError, match="is 0"):
    suggest_max_norm(np.zeros(30), percentile=90)
  assert suggest_max_norm(np.r_[np.zeros(10), np.ones(20)], percentile=90).max_norm == 1.0
  with pytest.raises(ValueError, match="percentile"):
    suggest_max_norm(np.ones(30), percentile=np.True_)


def test_drift_note():
  s = suggest_max_norm(np.geomspace(10.0, 0.1, 100))
  assert any("fell" in n for n in s.notes)


def test_suggest_errors():
  with pytest.raises(ValueError, match="min_steps=20"):
    suggest_max_norm(np.ones(5))
  rec, _, _ = _record(50, 3)
  with pytest.raises(ValueError, match="Only 3 finite steps"):
    suggest_max_norm(rec)
  diverged = np.r_[np.linspace(1.0, 50.0, 17), np.full(183, np.inf)]
  with pytest.raises(ValueError, match="Only 17 of the 200 .* the run diverged"):
    suggest_max_norm(diverged)
  with pytest.raises(ValueError, match="percentile"):
    suggest_max_norm(np.ones(30), percentile=0)
  with pytest.raises(ValueError, match="percentile"):
    suggest_max_norm(np.ones(30), percentile=101)
  with pytest.raises(ValueError, match="found 0 recorder"):
    suggest_max_norm(optax.sgd(0.1).init(PARAMS))
  with pytest.raises(ValueError, match="shape"):
    suggest_max_norm(np.ones((2, 2, 2)))
  with pytest.raises(ValueError, match="floating leaves"):
    suggest_max_norm(np.ones((30, 2)), params={"a": jnp.ones(1)})


def test_stats_reports_recording_progress():
  rec, _, _ = _record(4, 6)
  out = jaxclip_stats(rec)
  assert int(out["clip/recorded"]) == 4 and int(out["clip/count"]) == 6


def jaxclip_stats(state):
  from jaxclip._stats import stats

  return stats(state)


def test_recorder_composes_with_clipping():
  tx = optax.chain(record_norms(3), jaxclip.clip_by_global_norm(0.1))
  state = tx.init(PARAMS)
  updates, state = tx.update(_grads(0), state)
  np.testing.assert_allclose(jaxclip.global_norm(updates), 0.1, rtol=1e-6)
  np.testing.assert_allclose(state[0].global_norm[0], _expected(0)[0], rtol=1e-6)
