"""jaxclip.stats: records found through every wrapper, eagerly and under jit."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxclip
from jaxclip._recorder import record_norms
from jaxclip._stats import stats

PARAMS = {"layer1": {"kernel": jnp.ones((2, 3)), "bias": jnp.zeros(3)}, "step": jnp.int32(0)}
GRADS = {"layer1": {"kernel": jnp.full((2, 3), 2.0), "bias": jnp.ones(3)}, "step": jnp.int32(0)}
NORM = float(np.sqrt(6 * 4 + 3))

GLOBAL_KEYS = {"clipped", "count", "global_norm", "scale", "threshold"}


def _run(opt, jit):
  state = opt.init(PARAMS)
  update = jax.jit(opt.update) if jit else opt.update
  _, state = update(GRADS, state, PARAMS)
  return jax.jit(stats)(state) if jit else stats(state)


def _suffixes(out, prefix="clip/"):
  return {k.removeprefix(prefix) for k in out}


WRAPPERS = {
  "chain": lambda t: optax.chain(t, optax.sgd(0.1)),
  "masked": lambda t: optax.masked(t, jax.tree.map(lambda _: True, PARAMS)),
  "multi_steps": lambda t: optax.MultiSteps(optax.chain(t, optax.sgd(0.1)), 1),
  "apply_if_finite": lambda t: optax.apply_if_finite(t, 2),
  "skip_nonfinite": jaxclip.skip_nonfinite,
  "skip_large_norm": lambda t: jaxclip.skip_large_norm(t, 100.0),
  "partition": lambda t: optax.partition(
    {"a": t, "b": optax.set_to_zero()}, jax.tree.map(lambda _: "a", PARAMS)
  ),
}


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("wrapper", sorted(WRAPPERS))
def test_finds_global_clip_through_wrappers(wrapper, jit):
  out = _run(WRAPPERS[wrapper](jaxclip.clip_by_global_norm(1.0)), jit)
  norm_key = next(k for k in out if k.endswith("/global_norm"))
  np.testing.assert_allclose(out[norm_key], NORM, rtol=1e-6)
  assert all(isinstance(v, jax.Array) and v.shape == () for v in out.values())
  if wrapper in ("apply_if_finite", "skip_nonfinite", "skip_large_norm"):
    total = "total_nonfinite" if wrapper == "apply_if_finite" else "total_skipped"
    assert f"clip/{wrapper}/{total}" in out
    if wrapper == "skip_large_norm":  # the guard's norm is the clipper's
      np.testing.assert_allclose(out["clip/skip_large_norm/global_norm"], NORM, rtol=1e-6)
      assert float(out["clip/skip_large_norm/threshold"]) == 100.0
    assert "clip/clip_by_global_norm/scale" in out
  else:
    assert _suffixes(out) == GLOBAL_KEYS


@pytest.mark.parametrize("guard", ["apply_if_finite", "skip_nonfinite"])
def test_nonfinite_guards_count_applied_steps_as_nonfinite_not_skipped(guard):
  # Past its limit a guard applies non-finite steps: stats must not call
  # them skipped.
  inner = optax.sgd(1.0)
  opt = (
    optax.apply_if_finite(inner, 1)
    if guard == "apply_if_finite"
    else (jaxclip.skip_nonfinite(inner, max_consecutive=1))
  )
  params = {"w": jnp.zeros(2)}
  state = opt.init(params)
  for _ in range(3):
    u, state = opt.update({"w": jnp.array([1.0, jnp.nan])}, state, params)
  assert np.isnan(np.asarray(u["w"][1]))  # the third step was applied
  out = {k.removeprefix("clip/"): v for k, v in stats(state).items()}  # one record
  assert not any(k.endswith("skipped") and k != "total_skipped" for k in out)
  assert bool(out["nonfinite"]) and int(out["consecutive_nonfinite"]) == 3
  if guard == "skip_nonfinite":
    assert int(out["total_skipped"]) == 1
    assert int(out["applied_nonfinite"]) == 2
  else:
    assert int(out["total_nonfinite"]) == 3


def test_keys_are_the_same_eagerly_under_jit_and_at_every_step():
  opt = jaxclip.skip_on_spike(optax.chain(jaxclip.clip_by_global_norm(1.0), optax.adam(1e-3)))
  state = opt.init(PARAMS)
  keys = list(stats(state))
  for _ in range(3):
    _, state = jax.jit(opt.update)(GRADS, state, PARAMS)
    assert list(stats(state)) == keys == list(jax.jit(stats)(state))
  assert keys == sorted(keys)
  assert "clip/skip_on_spike/skipped" in keys and "clip/clip_by_global_norm/global_norm" in keys


def test_inject_hyperparams_reports_hyperparameters():
  opt = optax.chain(
    optax.inject_hyperparams(jaxclip.clip_by_global_norm)(max_norm=2.0),
    optax.inject_hyperparams(optax.adam)(learning_rate=0.01),
  )
  out = _run(opt, jit=True)
  np.testing.assert_allclose(out["clip/0/inject_hyperparams/hyperparams/max_norm"], 2.0)
  np.testing.assert_allclose(out["clip/1/inject_hyperparams/hyperparams/learning_rate"], 0.01)
  np.testing.assert_allclose(out["clip/clip_by_global_norm/threshold"], 2.0)


@pytest.mark.filterwarnings("ignore:inject_stateful_hyperparams is deprecated")
def test_stateful_inject_hyperparams():
  opt = optax.inject_stateful_hyperparams(jaxclip.clip_by_global_norm)(max_norm=3.0)
  out = _run(opt, jit=False)
  assert "clip/clip_by_global_norm/global_norm" in out
  np.testing.assert_allclose(out["clip/inject_hyperparams/hyperparams/max_norm"], 3.0)


def test_same_type_twice_is_qualified_by_path():
  opt = optax.chain(jaxclip.clip_by_norm(1.0), optax.sgd(0.1), jaxclip.clip_by_norm(0.5))
  out = _run(opt, jit=False)
  assert "clip/0/per_tensor/norm_max" in out and "clip/2/per_tensor/norm_max" in out
  np.testing.assert_allclose(out["clip/0/per_tensor/norm_max"], np.sqrt(24), rtol=1e-6)


def test_per_tensor_summary_and_names_from_params():
  opt = optax.chain(jaxclip.clip_by_norm(3.0), optax.sgd(0.1))
  state = opt.init(PARAMS)
  _, state = opt.update(GRADS, state, PARAMS)
  out = stats(state, params=PARAMS)
  np.testing.assert_allclose(out["clip/norm_max"], np.sqrt(24), rtol=1e-6)
  np.testing.assert_allclose(out["clip/scale_min"], 3 / np.sqrt(24), rtol=1e-6)
  np.testing.assert_allclose(out["clip/clipped_fraction"], 0.5)
  np.testing.assert_allclose(out["clip/norm/layer1/kernel"], np.sqrt(24), rtol=1e-6)
  np.testing.assert_allclose(out["clip/norm/layer1/bias"], np.sqrt(3), rtol=1e-6)
  assert bool(out["clip/clipped/layer1/kernel"]) and not bool(out["clip/clipped/layer1/bias"])
  assert list(jax.jit(lambda s: stats(s, params=PARAMS))(state)) == list(out)


def test_adagc_per_tensor_names():
  opt = jaxclip.adagc(warmup_steps=1)
  out = _run_with_params(opt)
  assert {"clip/norm/layer1/kernel", "clip/threshold/layer1/bias", "clip/threshold_min"} <= set(out)


def _run_with_params(opt):
  state = opt.init(PARAMS)
  _, state = opt.update(GRADS, state, PARAMS)
  return stats(state, params=PARAMS)


def test_params_mismatch_raises():
  opt = jaxclip.clip_by_norm(1.0)
  state = opt.init(PARAMS)
  with pytest.raises(ValueError, match="floating leaves"):
    stats(state, params={"only": jnp.ones(2)})


@pytest.mark.parametrize(
  "tx, keys",
  [
    (jaxclip.clip_by_value(-1.0, 1.0), {"max_abs", "clipped_fraction"}),
    (jaxclip.autoclip(), {"global_norm", "threshold"}),
    (jaxclip.zclip(), {"zscore", "norm_mean", "norm_std", "spike"}),
    (jaxclip.quantile_clip(), {"fraction_below", "next_threshold"}),
    (record_norms(4), {"recorded", "count"}),
  ],
)
def test_every_record_type(tx, keys):
  assert keys <= _suffixes(_run(tx, jit=True))


def test_empty_state_and_prefix():
  assert stats(optax.adam(0.1).init(PARAMS)) == {}
  out = stats(jaxclip.clip_by_global_norm(1.0).init(PARAMS), prefix="train/grad")
  assert "train/grad/global_norm" in out


def _flax(module):
  return pytest.importorskip(module, reason="flax not installed: pip install 'jaxclip[flax]'")


def test_flax_train_state():
  train_state = _flax("flax.training.train_state")
  tx = optax.chain(jaxclip.clip_by_global_norm(1.0), optax.sgd(0.1))
  ts = train_state.TrainState.create(apply_fn=None, params=PARAMS, tx=tx)
  ts = jax.jit(lambda s: s.apply_gradients(grads=GRADS))(ts)
  for obj in (ts, ts.opt_state):
    np.testing.assert_allclose(stats(obj)["clip/global_norm"], NORM, rtol=1e-6)


def test_nnx_optimizer():
  nnx = _flax("flax.nnx")
  model = nnx.Linear(2, 3, rngs=nnx.Rngs(0))
  tx = optax.chain(jaxclip.clip_by_global_norm(1.0), optax.sgd(0.1))
  opt = nnx.Optimizer(model, tx, wrt=nnx.Param)

  @nnx.jit
  def step(model, opt):
    grads = nnx.grad(lambda m: jnp.sum(m(jnp.ones((1, 2))) ** 2))(model)
    opt.update(model, grads)
    return stats(opt)

  inside = step(model, opt)
  outside = stats(opt)
  assert list(inside) == list(outside) and set(outside) == {f"clip/{k}" for k in GLOBAL_KEYS}
  np.testing.assert_allclose(inside["clip/global_norm"], outside["clip/global_norm"])
  assert int(outside["clip/count"]) == 1
