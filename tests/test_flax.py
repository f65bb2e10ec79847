"""jaxclip transforms inside Flax: Linen `TrainState` and NNX `nnx.Optimizer`."""

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

pytest.importorskip("flax", reason="flax not installed: pip install 'jaxclip[flax]'")

import flax.linen as nn
from flax import nnx, struct
from flax.linen.fp8_ops import OVERWRITE_WITH_GRADIENT
from flax.training import train_state

import jaxclip
from jaxclip import TrainState

# `nnx.as_pure` is named `nnx.pure` in flax 0.12.6.
as_pure = getattr(nnx, "as_pure", None) or nnx.pure

X = jax.random.normal(jax.random.key(0), (16, 5))
Y = jax.random.normal(jax.random.key(1), (16, 3))


class MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(3)(nn.tanh(nn.Dense(8)(x)))


def _linen_state(cls, tx):
  model = MLP()
  params = model.init(jax.random.key(2), X)["params"]
  return cls.create(apply_fn=model.apply, params=params, tx=tx)


def _loss_fn(params, state, scale=1.0):
  return jnp.mean((state.apply_fn({"params": params}, X) - scale * Y) ** 2)


def _grads(state, scale=1.0):
  return jax.value_and_grad(_loss_fn)(state.params, state, scale)


def _skip_tx():
  inner = optax.chain(jaxclip.clip_by_global_norm(1.0), optax.adamw(1e-2))
  return jaxclip.skip_on_spike(inner, window=8, n_sigma=3.0, min_history=4)


def _assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  jax.tree.map(np.testing.assert_array_equal, a, b)


# Linen


def test_flax_train_state_accepts_a_jaxclip_chain():
  tx = optax.chain(jaxclip.clip_by_global_norm(0.1), optax.adamw(1e-2))
  state = _linen_state(train_state.TrainState, tx)

  @jax.jit
  def step(state):
    _, grads = _grads(state)
    return state.apply_gradients(grads=grads), grads

  new, grads = step(state)
  clip_state = new.opt_state[0]
  assert isinstance(clip_state, jaxclip.ClipByGlobalNormState)
  np.testing.assert_allclose(clip_state.norm, jaxclip.global_norm(grads), rtol=1e-6)
  assert bool(clip_state.clipped) and int(new.step) == 1

  @jax.jit
  def by_hand(params, opt_state, grads):
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  params, opt_state = by_hand(state.params, state.opt_state, grads)
  _assert_trees_equal(new.params, params)
  _assert_trees_equal(new.opt_state, opt_state)


def test_flax_train_state_drops_the_loss():
  # Why jaxclip.TrainState exists: flax's apply_gradients never passes `loss=`
  # to tx.update, it tries to replace a field named `loss`.
  state = _linen_state(train_state.TrainState, _skip_tx())
  loss, grads = _grads(state)
  with pytest.raises(TypeError):
    state.apply_gradients(grads=grads, loss=loss)
  assert np.isnan(state.apply_gradients(grads=grads).opt_state.loss)


def test_matches_flax_without_extra_args():
  tx = optax.chain(jaxclip.clip_by_global_norm(0.1), optax.adamw(1e-2))
  ours, theirs = _linen_state(TrainState, tx), _linen_state(train_state.TrainState, tx)
  assert jax.tree.structure(ours.opt_state) == jax.tree.structure(theirs.opt_state)
  for _ in range(3):
    ours = jax.jit(lambda s: s.apply_gradients(grads=_grads(s)[1]))(ours)
    theirs = jax.jit(lambda s: s.apply_gradients(grads=_grads(s)[1]))(theirs)
  assert isinstance(ours, TrainState) and int(ours.step) == int(theirs.step) == 3
  _assert_trees_equal(ours.params, theirs.params)
  _assert_trees_equal(ours.opt_state, theirs.opt_state)


def test_loss_reaches_skip_on_spike_under_jit():
  state = _linen_state(TrainState, _skip_tx())

  @jax.jit
  def step(state, scale):
    loss, grads = _grads(state, scale)
    return state.apply_gradients(grads=grads, loss=loss), loss

  for _ in range(6):
    state, loss = step(state, 1.0)
    assert float(state.opt_state.loss) == float(loss)
  assert int(state.opt_state.filled) == 6 and not bool(state.opt_state.skipped)

  spiked, loss = step(state, 100.0)  # a loss far above the recent ones
  assert bool(spiked.opt_state.skipped) and int(spiked.opt_state.total_skipped) == 1
  assert float(spiked.opt_state.loss) == float(loss)
  assert int(spiked.step) == 7  # the step still counts, as in flax
  _assert_trees_equal(spiked.params, state.params)
  _assert_trees_equal(spiked.opt_state.inner_state, state.opt_state.inner_state)


def test_plain_transforms_ignore_extra_args():
  state = _linen_state(TrainState, optax.sgd(0.1))  # no extra-args support
  reference = _linen_state(train_state.TrainState, optax.sgd(0.1))
  loss, grads = _grads(state)
  _assert_trees_equal(
    state.apply_gradients(grads=grads, loss=loss).params,
    reference.apply_gradients(grads=grads).params,
  )


@pytest.mark.parametrize("wrap", [lambda ms: ms, lambda ms: ms.gradient_transformation()])
def test_loss_reaches_a_guard_inside_multisteps(wrap):
  # optax.MultiSteps is not a GradientTransformationExtraArgs, but its update
  # takes keyword arguments: they must reach the guard it wraps.
  state = _linen_state(TrainState, wrap(optax.MultiSteps(_skip_tx(), every_k_schedule=1)))
  loss, grads = _grads(state)
  state = state.apply_gradients(grads=grads, loss=loss)
  assert float(state.opt_state.inner_opt_state.loss) == float(loss)


class BatchStatsState(TrainState):
  batch_stats: Any = struct.field(default=None)


def test_fields_are_replaced_and_the_rest_forwarded():
  state = _linen_state(BatchStatsState, _skip_tx())
  state = state.replace(batch_stats={"mean": jnp.zeros(3)})
  loss, grads = _grads(state)
  new = state.apply_gradients(grads=grads, loss=loss, batch_stats={"mean": jnp.ones(3)})
  assert isinstance(new, BatchStatsState)
  np.testing.assert_array_equal(new.batch_stats["mean"], jnp.ones(3))
  assert float(new.opt_state.loss) == float(loss)


@pytest.mark.parametrize("name", ["step", "params", "opt_state"])
def test_fields_set_by_apply_gradients_are_refused(name):
  state = _linen_state(TrainState, _skip_tx())
  _, grads = _grads(state)
  with pytest.raises(TypeError, match=f"{name}="):
    state.apply_gradients(grads=grads, **{name: getattr(state, name)})


def test_overwrite_with_gradient_as_in_flax():
  params = {"params": {"w": jnp.ones(3)}, OVERWRITE_WITH_GRADIENT: {"scale": jnp.ones(())}}
  grads = {"params": {"w": jnp.full(3, 2.0)}, OVERWRITE_WITH_GRADIENT: {"scale": jnp.full((), 5.0)}}
  tx = optax.chain(jaxclip.clip_by_global_norm(1.0), optax.sgd(1.0))
  ours = TrainState.create(apply_fn=None, params=params, tx=tx).apply_gradients(grads=grads)
  theirs = train_state.TrainState.create(apply_fn=None, params=params, tx=tx)
  theirs = theirs.apply_gradients(grads=grads)
  _assert_trees_equal(ours.params, theirs.params)
  _assert_trees_equal(ours.opt_state, theirs.opt_state)
  assert float(ours.params[OVERWRITE_WITH_GRADIENT]["scale"]) == 5.0


# NNX


class NNXMLP(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.hidden = nnx.Linear(5, 8, rngs=rngs)
    self.out = nnx.Linear(8, 3, rngs=rngs)

  def __call__(self, x):
    return self.out(nnx.tanh(self.hidden(x)))


def _nnx_loss(model, scale=1.0):
  return jnp.mean((model(X) - scale * Y) ** 2)


def test_nnx_optimizer_records_the_clipping_state():
  model = NNXMLP(nnx.Rngs(0))
  tx = optax.chain(jaxclip.clip_by_global_norm(0.1), optax.adamw(1e-2))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  params = as_pure(nnx.state(model, nnx.Param))  # a copy, not the live Variables
  opt_state = tx.init(params)

  @nnx.jit
  def step(model, optimizer):
    loss, grads = nnx.value_and_grad(_nnx_loss)(model)
    optimizer.update(model, grads)
    return loss, grads

  for _ in range(3):
    _, grads = step(model, optimizer)
    grads = as_pure(grads)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
  clip_state = optimizer.opt_state[0]
  assert isinstance(clip_state, jaxclip.ClipByGlobalNormState)
  assert int(clip_state.count[...]) == 3 and bool(clip_state.clipped[...])
  np.testing.assert_allclose(clip_state.norm[...], jaxclip.global_norm(grads), rtol=1e-6)
  # The same numbers as optax by hand on the same parameters.
  np.testing.assert_allclose(clip_state.norm[...], opt_state[0].norm, rtol=1e-6)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
    as_pure(nnx.state(model, nnx.Param)),
    params,
  )


def test_nnx_optimizer_forwards_the_loss():
  model = NNXMLP(nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, _skip_tx(), wrt=nnx.Param)

  @nnx.jit
  def step(model, optimizer, scale):
    loss, grads = nnx.value_and_grad(_nnx_loss)(model, scale)
    optimizer.update(model, grads, loss=loss)
    return loss

  for _ in range(6):
    loss = step(model, optimizer, 1.0)
    assert float(optimizer.opt_state.loss[...]) == float(loss)
  before = as_pure(nnx.state(model, nnx.Param))
  loss = step(model, optimizer, 100.0)
  assert bool(optimizer.opt_state.skipped[...])
  assert int(optimizer.opt_state.total_skipped[...]) == 1
  assert float(optimizer.opt_state.loss[...]) == float(loss)
  assert int(optimizer.step[...]) == 7
  _assert_trees_equal(as_pure(nnx.state(model, nnx.Param)), before)


def test_nnx_tensor_names_end_at_the_variable():
  # Each nnx.Param is one tensor: names are its path (`linear1/kernel`),
  # without the Variable's own `value` field.
  model = NNXMLP(nnx.Rngs(0))
  optimizer = nnx.Optimizer(
    model, optax.chain(jaxclip.clip_by_norm(0.1), optax.sgd(0.1)), wrt=nnx.Param
  )
  grads = nnx.grad(_nnx_loss)(model)
  optimizer.update(model, grads)
  want = sorted(
    "/".join(str(getattr(k, "key", k)) for k in path)
    for path, _ in jax.tree_util.tree_flatten_with_path(as_pure(nnx.state(model, nnx.Param)))[0]
  )
  for tree in (nnx.state(model, nnx.Param), grads):
    names = sorted(
      k[len("clip/norm/") :]
      for k in jaxclip.stats(optimizer, params=tree)
      if k.startswith("clip/norm/")
    )
    assert names == want and not any(n.endswith("value") for n in names)


def test_nnx_names_of_subclassed_and_tree_valued_variables():
  class LoRAParam(nnx.Param):  # a user's Variable type
    pass

  class Model(nnx.Module):
    def __init__(self):
      self.w = nnx.Param(jnp.ones((2, 3)))
      self.lora = LoRAParam(jnp.ones(3))
      self.pair = nnx.Param({"a": jnp.ones(4), "b": jnp.ones(5)})

  state = nnx.state(Model(), nnx.Param)
  tx = jaxclip.clip_by_norm(0.1)
  _, clip_state = tx.update(state, tx.init(state))
  names = sorted(k for k in jaxclip.stats(clip_state, params=state) if k.startswith("clip/norm/"))
  assert names == ["clip/norm/lora", "clip/norm/pair/a", "clip/norm/pair/b", "clip/norm/w"]
