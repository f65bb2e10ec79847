"""jaxclip states checkpointed with orbax: restored bit for bit, also in a new process."""

import json
import os
import pathlib
import runpy
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxclip

ocp = pytest.importorskip(
  "orbax.checkpoint", reason="orbax-checkpoint not installed: pip install 'jaxclip[test]'"
)

ROOT = pathlib.Path(__file__).resolve().parents[1]

# Run in this process (through runpy) and in a fresh one: a small regression
# trained with skip_on_spike(chain(clip_by_global_norm, zclip, adam)) on
# batches fixed by the step number, with loss spikes at steps 5 and 10.
SCRIPT = textwrap.dedent(
  """
  import json
  import sys

  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax
  import orbax.checkpoint as ocp

  import jaxclip

  SPIKES = (5, 10)


  def make_tx():
    inner = optax.chain(
      jaxclip.clip_by_global_norm(2.0), jaxclip.zclip(warmup_steps=3), optax.adam(1e-2)
    )
    return jaxclip.skip_on_spike(
      inner, window=8, n_sigma=3.0, min_history=4, record_skipped=False
    )


  TX = make_tx()


  def init():
    k1, k2 = jax.random.split(jax.random.key(0))
    params = {"w1": jax.random.normal(k1, (4, 16)) / 2, "b1": jnp.zeros(16),
              "w2": jax.random.normal(k2, (16, 1)) / 4, "b2": jnp.zeros(1)}
    return params, TX.init(params)


  def loss_fn(params, x, y):
    pred = jnp.tanh(x @ params["w1"] + params["b1"]) @ params["w2"] + params["b2"]
    return jnp.mean((pred - y) ** 2)


  @jax.jit
  def train_step(params, opt_state, step):
    x = jax.random.normal(jax.random.fold_in(jax.random.key(1), step), (32, 4))
    y = jnp.sin(x.sum(axis=1, keepdims=True))
    y = jnp.where(jnp.isin(step, jnp.asarray(SPIKES)), 30.0 * y, y)
    loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
    updates, opt_state = TX.update(grads, opt_state, params, loss=loss)
    return optax.apply_updates(params, updates), opt_state, loss


  def train(params, opt_state, start, stop):
    losses = []
    for step in range(start, stop):
      params, opt_state, loss = train_step(params, opt_state, step)
      losses.append(loss)
    return params, opt_state, losses


  def dump(tree, path):
    leaves = jax.tree.leaves_with_path(tree)
    np.savez(path, *[np.asarray(v) for _, v in leaves])
    with open(path + ".json", "w") as f:
      json.dump([jax.tree_util.keystr(k) for k, _ in leaves], f)


  if __name__ == "__main__":
    ckpt, start, stop, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    abstract = jax.eval_shape(lambda: dict(zip(("params", "opt_state"), init())))
    restored = ocp.StandardCheckpointer().restore(ckpt, abstract)
    state = restored["opt_state"]
    assert type(state).__name__ == "SkipOnSpikeState", type(state)
    assert type(state.inner_state[0]).__name__ == "ClipByGlobalNormState"
    assert type(state.inner_state[1]).__name__ == "ZClipState"
    dump(restored, out + "_restored")
    params, opt_state, losses = train(restored["params"], state, start, stop)
    dump({"params": params, "opt_state": opt_state, "losses": losses}, out + "_final")
  """
)

SAVE_AT, STOP = 7, 14


def _load(path):
  with np.load(path + ".npz") as data:
    leaves = [data[f"arr_{i}"] for i in range(len(data.files))]
  with open(path + ".json") as f:
    return json.load(f), leaves


def _assert_dumped_equals(path, tree):
  keys, leaves = _load(path)
  expected = jax.tree.leaves_with_path(tree)
  assert keys == [jax.tree_util.keystr(k) for k, _ in expected]
  for key, got, (_, want) in zip(keys, leaves, expected):
    assert got.dtype == np.asarray(want).dtype, key
    np.testing.assert_array_equal(got, want, err_msg=key)


def test_resume_in_a_fresh_process_is_bitwise_identical(tmp_path):
  script = tmp_path / "train.py"
  script.write_text(SCRIPT)
  m = runpy.run_path(str(script))
  params, opt_state = m["init"]()
  full = m["train"](params, opt_state, 0, STOP)
  params, opt_state, _ = m["train"](params, opt_state, 0, SAVE_AT)
  # The statistics to round-trip are not trivial at the checkpoint.
  assert int(opt_state.total_skipped) == 1 and int(opt_state.filled) == SAVE_AT - 1
  assert int(opt_state.inner_state[1].filled) == 3 and bool(opt_state.inner_state[0].clipped)

  ckpt = tmp_path / "ckpt"
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(ckpt, {"params": params, "opt_state": opt_state})
  checkpointer.wait_until_finished()

  out = str(tmp_path / "out")
  env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
  result = subprocess.run(
    [sys.executable, str(script), str(ckpt), str(SAVE_AT), str(STOP), out],
    env=env,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  _assert_dumped_equals(out + "_restored", {"params": params, "opt_state": opt_state})
  full_params, full_state, full_losses = full
  assert int(full_state.total_skipped) == 2  # the second spike came after the restore
  _assert_dumped_equals(
    out + "_final",
    {"params": full_params, "opt_state": full_state, "losses": full_losses[SAVE_AT:]},
  )


# Flax states (the tests below skip without flax, the `flax` extra).


def _flax(module):
  return pytest.importorskip(module, reason="flax not installed: pip install 'jaxclip[flax]'")


def test_linen_train_state_round_trip(tmp_path):
  nn = _flax("flax.linen")
  TrainState = jaxclip.TrainState

  class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(2)(nn.relu(nn.Dense(8)(x)))

  model, x = MLP(), jnp.ones((4, 3))
  tx = jaxclip.skip_on_spike(
    optax.chain(jaxclip.clip_by_global_norm(0.5), optax.adamw(1e-2)), window=8, min_history=4
  )
  state = TrainState.create(
    apply_fn=model.apply, params=model.init(jax.random.key(0), x)["params"], tx=tx
  )

  @jax.jit
  def step(state):
    loss_fn = lambda p: jnp.mean(state.apply_fn({"params": p}, x) ** 2)
    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    return state.apply_gradients(grads=grads, loss=loss)

  for _ in range(3):
    state = step(state)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(tmp_path / "state", state)
  checkpointer.wait_until_finished()
  # The abstract target gives back the types (TrainState, NamedTuple states).
  fresh = TrainState.create(apply_fn=model.apply, params=state.params, tx=tx)
  restored = checkpointer.restore(tmp_path / "state", jax.eval_shape(lambda: fresh))
  assert isinstance(restored, TrainState) and restored.tx is tx
  assert isinstance(restored.opt_state, jaxclip.SkipOnSpikeState)
  assert isinstance(restored.opt_state.inner_state[0], jaxclip.ClipByGlobalNormState)
  assert jax.tree.structure(restored) == jax.tree.structure(state)
  jax.tree.map(np.testing.assert_array_equal, restored, state)
  assert int(restored.step) == 3 and float(restored.opt_state.loss) == float(state.opt_state.loss)
  jax.tree.map(np.testing.assert_array_equal, step(restored), step(state))


def test_flax_train_state_round_trip(tmp_path):
  train_state = _flax("flax.training.train_state")
  tx = optax.chain(jaxclip.zclip(warmup_steps=2), optax.sgd(0.1))
  params = {"w": jnp.arange(3.0)}
  state = train_state.TrainState.create(apply_fn=None, params=params, tx=tx)
  for _ in range(3):
    state = state.apply_gradients(grads={"w": state.params["w"] + 1})
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(tmp_path / "state", state)
  with ocp.StandardCheckpointer() as checkpointer:
    restored = checkpointer.restore(tmp_path / "state", jax.eval_shape(lambda: state))
  assert isinstance(restored.opt_state[0], jaxclip.ZClipState)
  jax.tree.map(np.testing.assert_array_equal, restored, state)


def test_nnx_optimizer_round_trip(tmp_path):
  nnx = _flax("flax.nnx")
  as_pure = getattr(nnx, "as_pure", None) or nnx.pure  # named nnx.pure in flax 0.12.6

  class NNXLinear(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
      self.linear = nnx.Linear(3, 2, rngs=rngs)

    def __call__(self, x):
      return self.linear(x)

  tx = jaxclip.skip_on_spike(
    optax.chain(jaxclip.clip_by_global_norm(0.1), optax.adam(1e-2)), window=4, min_history=2
  )
  make = lambda: nnx.Optimizer(NNXLinear(nnx.Rngs(0)), tx, wrt=nnx.Param)
  model = NNXLinear(nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  x = jnp.ones((4, 3))

  @nnx.jit
  def step(model, optimizer):
    loss, grads = nnx.value_and_grad(lambda m: jnp.mean(m(x) ** 2))(model)
    optimizer.update(model, grads, loss=loss)

  for _ in range(3):
    step(model, optimizer)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(tmp_path / "opt", nnx.state(optimizer))
  checkpointer.wait_until_finished()
  restored = make()
  nnx.update(restored, checkpointer.restore(tmp_path / "opt", nnx.state(nnx.eval_shape(make))))
  assert int(restored.step[...]) == 3
  assert bool(restored.opt_state.inner_state[0].clipped[...])
  jax.tree.map(
    np.testing.assert_array_equal,
    as_pure(nnx.state(restored)),
    as_pure(nnx.state(optimizer)),
  )
