"""Gradient accumulation: clipping, statistics and guards see the accumulated step."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxclip

K = 4  # microbatches per step


def _params():
  ks = jax.random.split(jax.random.key(1), 2)
  return {"w": jax.random.normal(ks[0], (6, 5)), "b": jax.random.normal(ks[1], (5,))}


def _micro_grads(step):
  """K microbatch gradients of one step; their sizes differ a lot, so that
  clipping each one would give a different result from clipping their mean."""
  params = _params()
  out = []
  for i in range(K):
    factor = (5.0 if i == 0 else 0.2) * (1.0 + step)
    key = jax.random.fold_in(jax.random.key(2), 10 * step + i)
    noise = jax.tree.map(lambda x, k=key: jax.random.normal(k, x.shape), params)
    out.append(jax.tree.map(lambda n, f=factor: f * n, noise))
  return out


def _mean(trees):
  return jax.tree.map(lambda *xs: sum(xs) / len(xs), *trees)


CLIPPERS = {
  "clip_by_global_norm": lambda: jaxclip.clip_by_global_norm(1.0),
  "clip_by_norm": lambda: jaxclip.clip_by_norm(0.8),
  "adaptive_grad_clip": lambda: jaxclip.adaptive_grad_clip(0.1),
  "autoclip": lambda: jaxclip.autoclip(50.0, history_size=8),
  "zclip": lambda: jaxclip.zclip(warmup_steps=1, max_norm=1.0),
  "adagc": lambda: jaxclip.adagc(warmup_steps=1, warmup_max_norm=1.0),
}


@pytest.mark.parametrize("name", list(CLIPPERS))
def test_multisteps_clips_the_accumulated_gradient(name):
  params = _params()
  opt = lambda: optax.chain(CLIPPERS[name](), optax.sgd(0.1))  # noqa: E731
  accumulated = optax.MultiSteps(opt(), K)
  reference = opt()
  acc_state, ref_state = accumulated.init(params), reference.init(params)
  acc_update, ref_update = jax.jit(accumulated.update), jax.jit(reference.update)
  for step in range(3):
    micro = _micro_grads(step)
    for i, g in enumerate(micro):
      updates, acc_state = acc_update(g, acc_state, params)
      if i < K - 1:  # MultiSteps emits zeros until the last microbatch
        assert all(float(jnp.abs(u).max()) == 0 for u in jax.tree.leaves(updates))
    want, ref_state = ref_update(_mean(micro), ref_state, params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-7), updates, want)
    # The statistics report the accumulated step, once per K microbatches.
    got_stats, want_stats = jaxclip.stats(acc_state), jaxclip.stats(ref_state)
    assert got_stats.keys() == want_stats.keys()
    for key in want_stats:
      np.testing.assert_allclose(got_stats[key], want_stats[key], rtol=2e-5, err_msg=key)
    assert int(got_stats["clip/count"]) == step + 1
  assert bool(jaxclip.stats(ref_state)["clip/clipped"])


def _run_nonfinite(**multisteps_kwargs):
  """Three accumulated steps of skip_nonfinite(clip + adam); a NaN in one
  microbatch of step 1. Returns the stats and inner states after each step."""
  params = _params()
  inner = optax.chain(jaxclip.clip_by_global_norm(1.0), optax.adam(1e-2))
  opt = optax.MultiSteps(jaxclip.skip_nonfinite(inner), K, **multisteps_kwargs)
  state = opt.init(params)
  update = jax.jit(opt.update)
  stats, inner_states = [], [state.inner_opt_state.inner_state]
  for step in range(3):
    micro = _micro_grads(step)
    if step == 1:
      micro[2] = jax.tree.map(lambda x: x.at[0].set(jnp.nan), micro[2])
    for g in micro:
      updates, state = update(g, state, params)
    stats.append(jaxclip.stats(state))
    inner_states.append(state.inner_opt_state.inner_state)
  return stats, inner_states


def test_guards_judge_the_accumulated_step():
  stats, inner = _run_nonfinite()
  assert [int(s["clip/skip_nonfinite/count"]) for s in stats] == [1, 2, 3]
  assert not bool(stats[0]["clip/skip_nonfinite/nonfinite"])
  # The accumulated step holding the NaN microbatch is skipped as one step,
  # and the inner optimizer's state is left as it was.
  assert bool(stats[1]["clip/skip_nonfinite/nonfinite"])
  jax.tree.map(np.testing.assert_array_equal, inner[2], inner[1])
  # optax.MultiSteps' running mean keeps the NaN in its accumulator
  # (acc + (g - acc) / 1 is NaN), so every later step is non-finite too and
  # skipped: the pitfall docs/scaling.md describes.
  assert bool(stats[2]["clip/skip_nonfinite/nonfinite"])
  assert int(stats[2]["clip/skip_nonfinite/total_skipped"]) == 2


def test_dropping_nonfinite_microbatches_keeps_training():
  # The fix: MultiSteps drops a non-finite microbatch before accumulating it;
  # the guard then sees finite accumulated steps only.
  stats, inner = _run_nonfinite(should_skip_update_fn=optax.skip_not_finite)
  assert [bool(s["clip/skip_nonfinite/nonfinite"]) for s in stats] == [False, False, False]
  assert int(stats[2]["clip/skip_nonfinite/total_skipped"]) == 0
  # The dropped microbatch does not count towards the K of a step: after 12
  # microbatches, one of them dropped, 2 steps were applied.
  assert int(stats[2]["clip/skip_nonfinite/count"]) == 2
  assert int(stats[2]["clip/clip_by_global_norm/count"]) == 2


def test_spike_guard_counts_accumulated_steps():
  params = _params()
  inner = optax.chain(jaxclip.clip_by_global_norm(1e6), optax.sgd(0.1))
  opt = optax.MultiSteps(jaxclip.skip_on_spike(inner, window=8, min_history=4), K)
  state = opt.init(params)
  update = jax.jit(opt.update)
  for step in range(7):
    micro = _micro_grads(0)
    if step == 6:  # one microbatch spikes: the accumulated step spikes
      micro[1] = jax.tree.map(lambda x: 1e4 * x, micro[1])
    for g in micro:
      updates, state = update(g, state, params)
  s = jaxclip.stats(state)
  assert int(s["clip/skip_on_spike/count"]) == 7
  assert bool(s["clip/skip_on_spike/skipped"])
  assert int(s["clip/skip_on_spike/total_skipped"]) == 1
  assert all(float(jnp.abs(u).max()) == 0 for u in jax.tree.leaves(updates))


def _loss(params, batch):
  x, y = batch
  return jnp.mean((jnp.tanh(x @ params["w"] + params["b"]) - y) ** 2)


def test_scan_recipe_equals_clipping_the_mean_gradient():
  """The recipe of docs/scaling.md: accumulate inside one jitted step with
  `lax.scan`, then clip and apply once."""
  params = _params()
  opt = optax.chain(jaxclip.clip_by_global_norm(0.05), optax.adamw(1e-2))
  ks = jax.random.split(jax.random.key(3), 2)
  xs = jax.random.normal(ks[0], (K, 8, 6))  # K microbatches of 8 examples
  ys = jax.random.normal(ks[1], (K, 8, 5))

  @jax.jit
  def train_step(params, opt_state, xs, ys):
    def micro(acc, batch):
      loss, grads = jax.value_and_grad(_loss)(params, batch)
      return jax.tree.map(jnp.add, acc, grads), loss

    zeros = jax.tree.map(jnp.zeros_like, params)
    summed, losses = jax.lax.scan(micro, zeros, (xs, ys))
    grads = jax.tree.map(lambda g: g / K, summed)
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, jnp.mean(losses)

  new_params, state, _ = train_step(params, opt.init(params), xs, ys)
  # Reference: the mean of the microbatch gradients, clipped once.
  grads = _mean([jax.grad(_loss)(params, (xs[i], ys[i])) for i in range(K)])
  updates, ref_state = opt.update(grads, opt.init(params), params)
  want = optax.apply_updates(params, updates)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), new_params, want
  )
  np.testing.assert_allclose(
    jaxclip.stats(state)["clip/global_norm"], jaxclip.global_norm(grads), rtol=1e-5
  )
  assert bool(jaxclip.stats(state)["clip/clipped"])
  # It is also what optax.MultiSteps gives, one microbatch at a time.
  multi = optax.MultiSteps(opt, K)
  m_state = multi.init(params)
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # no state-copy warning on this path
    for i in range(K):
      m_updates, m_state = multi.update(jax.grad(_loss)(params, (xs[i], ys[i])), m_state, params)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
    optax.apply_updates(params, m_updates),
    want,
  )


def test_clipping_before_a_partition_uses_the_whole_norm():
  params = _params()
  g = _micro_grads(0)[0]
  labels = {"w": "a", "b": "b"}
  before = optax.chain(
    jaxclip.clip_by_global_norm(1.0),
    optax.multi_transform({"a": optax.sgd(1.0), "b": optax.sgd(1.0)}, labels),
  )
  inside = optax.multi_transform(
    {
      "a": optax.chain(jaxclip.clip_by_global_norm(1.0), optax.sgd(1.0)),
      "b": optax.chain(jaxclip.clip_by_global_norm(1.0), optax.sgd(1.0)),
    },
    labels,
  )
  u_before, _ = before.update(g, before.init(params), params)
  u_inside, _ = inside.update(g, inside.init(params), params)
  # Before the partition: one scale for the whole tree, norm 1 in all.
  np.testing.assert_allclose(jaxclip.global_norm(u_before), 1.0, rtol=1e-6)
  ratio = jax.tree.map(lambda u, x: u / -x, u_before, g)
  np.testing.assert_allclose(ratio["w"], float(ratio["b"][0]), rtol=1e-5)
  # Inside: each group is clipped by its own norm (norm 1 per group).
  np.testing.assert_allclose(jaxclip.global_norm(u_inside["w"]), 1.0, rtol=1e-6)
  np.testing.assert_allclose(jaxclip.global_norm(u_inside["b"]), 1.0, rtol=1e-6)
