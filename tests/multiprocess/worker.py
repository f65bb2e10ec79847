"""One of the two processes of the checks in tests/test_multiprocess.py.

Run as ``python worker.py COORDINATOR PROCESS_ID OUT_DIR`` with
``XLA_FLAGS=--xla_force_host_platform_device_count=2``: two such processes
form one JAX runtime of 4 CPU devices (gloo collectives over loopback). Each
runs every check once and pickles, for the pytest side to compare:

* the shards this process holds of every output of the sharded run (updates,
  optimizer state, `jaxclip.stats`), with their global indices;
* the same outputs of a reference run on one local device, on the full arrays.

Gradients of five steps: three ordinary ones, a spike (30x) and a step with
one NaN in a row that only process 1 holds.
"""

from __future__ import annotations

import functools
import math
import pickle
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import jaxclip

NUM_PROCESSES = 2
NUM_STEPS = 5
SPIKE_STEP, NAN_STEP = 3, 4
NAN_AT = (255, 3)  # in "embed", sharded on axis 0: the last device (process 1) holds it
LOSSES = (1.0, 1.1, 0.9, 1.0, 1.05)
CHECKPOINT_AT = 3  # the state after this many steps is saved and restored

shard_map = getattr(jax, "shard_map", None)
if shard_map is None:  # older jax
  from jax.experimental.shard_map import shard_map


def _guard(guard: Callable[..., Any], **kwargs: Any) -> Callable[[str | None], Any]:
  """`guard` around global-norm clipping and Adam, every part given `axis_name`."""

  def make(axis_name: str | None) -> optax.GradientTransformation:
    inner = optax.chain(jaxclip.clip_by_global_norm(1.0, axis_name=axis_name), optax.adam(1e-3))
    return guard(inner, axis_name=axis_name, **kwargs)

  return make


# Every transform, made for an `axis_name` (None under plain `jax.jit`); those
# without the argument ignore it and are only run under `jax.jit`.
CASES: dict[str, Callable[[str | None], optax.GradientTransformation]] = {
  "clip_by_global_norm": lambda ax: jaxclip.clip_by_global_norm(5.0, axis_name=ax),
  "clip_by_norm": lambda ax: jaxclip.clip_by_norm(2.0),
  "clip_by_block_rms": lambda ax: jaxclip.clip_by_block_rms(0.8),
  "clip": lambda ax: jaxclip.clip(1.5),
  "clip_by_value": lambda ax: jaxclip.clip_by_value(-1.0, 2.0),
  "adaptive_grad_clip": lambda ax: jaxclip.adaptive_grad_clip(0.3),
  "autoclip": lambda ax: jaxclip.autoclip(50.0, history_size=4, axis_name=ax),
  "zclip": lambda ax: jaxclip.zclip(warmup_steps=2, max_norm=20.0, axis_name=ax),
  "adagc": lambda ax: jaxclip.adagc(warmup_steps=2, warmup_max_norm=5.0, axis_name=ax),
  "quantile_clip": lambda ax: jaxclip.quantile_clip(initial_max_norm=5.0, axis_name=ax),
  "skip_nonfinite": _guard(jaxclip.skip_nonfinite),
  "skip_on_spike": _guard(jaxclip.skip_on_spike, window=4, n_sigma=3.0, min_history=3),
  "record_norms": lambda ax: jaxclip.record_norms(4),
}
# The transforms that take `axis_name`, also run inside `shard_map`.
SHARD_MAP_CASES = (
  "clip_by_global_norm",
  "autoclip",
  "zclip",
  "adagc",
  "quantile_clip",
  "skip_nonfinite",
  "skip_on_spike",
)
AXIS_TYPES = {"explicit": AxisType.Explicit, "auto": AxisType.Auto}
# Under Auto mesh axes (shardings decided after tracing), a few transforms.
AUTO_CASES = ("clip_by_global_norm", "skip_nonfinite")


def specs() -> dict[str, Any]:
  """How each leaf is split over the mesh axis "d" (4 devices, 2 processes)."""
  return {
    "embed": P("d", None),  # rows split: the last rows are on process 1 only
    "qkv": P(None, "d"),  # columns split
    "mlp": P(None, "d"),  # bf16
    "bias": P("d"),  # bf16
    "ln": P(),  # replicated
    "pos": P(),
  }


def shard_map_specs() -> dict[str, Any]:
  """Inside `shard_map`, every leaf split over "d": `axis_name` sums the
  partial norms of every leaf, so a replicated leaf would count once per
  device."""
  return {**specs(), "ln": P("d"), "pos": P("d", None)}


def host_tree(seed: int) -> dict[str, Any]:
  """The full arrays of one tree, the same in every process."""
  rng = np.random.default_rng(seed)

  def normal(*shape: int, dtype: Any = np.float32) -> np.ndarray:
    return rng.standard_normal(shape, dtype=np.float32).astype(dtype)

  return {
    "embed": normal(256, 96),
    "qkv": normal(32, 96),
    "mlp": normal(32, 128, dtype=jnp.bfloat16),
    "bias": normal(128, dtype=jnp.bfloat16),
    "ln": normal(32),
    "pos": normal(8, 16),
  }


def gradient_steps() -> dict[str, Any]:
  """Host gradients of every step, stacked on a leading axis: growing, then
  a spike, then one NaN."""
  factors = np.asarray([30.0 if s == SPIKE_STEP else 1.0 + 0.25 * s for s in range(NUM_STEPS)])

  def steps(x: np.ndarray) -> np.ndarray:
    f = factors.reshape((-1,) + (1,) * x.ndim).astype(np.float32)
    return (x.astype(np.float32)[None] * f).astype(x.dtype)

  grads = jax.tree.map(steps, host_tree(0))
  grads["embed"][(NAN_STEP, *NAN_AT)] = np.nan
  return grads


def step_of(stacked_tree: Any, step: int) -> Any:
  return jax.tree.map(lambda x: x[step], stacked_tree)


def stacked(spec_tree: Any) -> Any:
  """The specs of leaves stacked on a new leading (step) axis."""
  return jax.tree.map(lambda s: P(None, *s), spec_tree, is_leaf=lambda s: isinstance(s, P))


def to_global(tree: Any, mesh: jax.sharding.Mesh, spec_tree: Any) -> Any:
  """Global arrays over `mesh`, each process supplying the shards it holds."""

  def put(x: np.ndarray, spec: P) -> jax.Array:
    return jax.make_array_from_callback(x.shape, NamedSharding(mesh, spec), lambda i: x[i])

  return jax.tree.map(put, tree, spec_tree)


def to_local(tree: Any) -> Any:
  """The full arrays on this process's first device (the reference run)."""
  return jax.device_put(tree, jax.local_devices()[0])


def _step(tx: optax.GradientTransformation, grads, state, params, loss):
  updates, state = tx.update(grads, state, params, loss=loss)
  return updates, state, jaxclip.stats(state)


def scan_steps(tx: optax.GradientTransformation, stacked_grads, params, losses) -> dict[str, Any]:
  """From `init`, one step per entry of the leading axis of `stacked_grads`;
  the updates, state and stats of every step, stacked the same way."""

  def body(state, xs):
    grads, loss = xs
    updates, state, stats = _step(tx, grads, state, params, loss)
    return state, {"updates": updates, "state": state, "stats": stats}

  return jax.lax.scan(body, tx.init(params), (stacked_grads, losses))[1]


def run_jit(names: tuple[str, ...], stacked_grads, params) -> dict[str, Any]:
  """The steps of every transform named, in one jitted program (one compilation)."""
  txs = {name: CASES[name](None) for name in names}

  def run(stacked_grads, params, losses):
    return {name: scan_steps(tx, stacked_grads, params, losses) for name, tx in txs.items()}

  return jax.jit(run)(stacked_grads, params, np.asarray(LOSSES, np.float32))


def run_shard_map(names: tuple[str, ...], mesh, stacked_grads, params) -> dict[str, Any]:
  """The steps of every transform named, made with ``axis_name="d"``, inside
  one `shard_map` over "d" (every leaf split, see `shard_map_specs`)."""
  spec_tree = shard_map_specs()
  losses = np.asarray(LOSSES, np.float32)

  def run(make_axis, stacked_grads, params, losses):
    out = {n: scan_steps(CASES[n](make_axis), stacked_grads, params, losses) for n in names}
    return {n: {"updates": o["updates"], "stats": o["stats"]} for n, o in out.items()}

  # The keys of the stats, from a trace without the mesh axis.
  shapes = jax.eval_shape(functools.partial(run, None), stacked_grads, params, losses)
  out_specs = {
    n: {"updates": stacked(spec_tree), "stats": {k: P() for k in o["stats"]}}
    for n, o in shapes.items()
  }
  fn = shard_map(
    functools.partial(run, "d"),
    mesh=mesh,
    in_specs=(stacked(spec_tree), spec_tree, P()),
    out_specs=out_specs,
  )
  return jax.jit(fn)(stacked_grads, params, losses)


def run_per_call(step, grads_steps, state, params, losses) -> tuple[list[dict[str, Any]], Any]:
  """One call of the jitted `step` per step, the state passed from call to call."""
  out = []
  for grads, loss in zip(grads_steps, losses, strict=True):
    updates, state, stats = step(grads, state, params, np.float32(loss))
    out.append({"updates": updates, "state": state, "stats": stats})
  return out, state


def _plain(x: jax.Array) -> jax.Array:
  return jax.random.key_data(x) if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else x


def _bounds(index: tuple[slice, ...], shape: tuple[int, ...]) -> tuple[tuple[int, int], ...]:
  return tuple(s.indices(n)[:2] for s, n in zip(index, shape))


def _flat(tree: Any) -> list[tuple[str, Any]]:
  return [(jax.tree_util.keystr(k), v) for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]]


def record_global(outputs: Any) -> list[tuple[str, dict[str, Any]]]:
  """Each leaf of `outputs` as the shards this process holds, with their
  global bounds and devices."""

  def shards(x: jax.Array) -> dict[str, Any]:
    x = _plain(x)
    held = [
      (_bounds(s.index, x.shape), s.device.id, np.asarray(s.data)) for s in x.addressable_shards
    ]
    return {"shape": tuple(x.shape), "dtype": np.dtype(x.dtype), "shards": held}

  return [(k, shards(v)) for k, v in _flat(outputs)]


def record_local(outputs: Any) -> list[tuple[str, np.ndarray]]:
  return _flat(jax.device_get(jax.tree.map(_plain, outputs)))


def check_checkpoint(mesh, host_grads, params, directory: str) -> dict[str, Any]:
  """Saves the state after `CHECKPOINT_AT` steps from both processes,
  restores it into the same shardings and runs the remaining steps, one
  jitted call per step as a training loop does."""
  import orbax.checkpoint as ocp  # only this check needs it

  tx = CASES["skip_on_spike"](None)
  step = jax.jit(functools.partial(_step, tx))
  grads = [to_global(step_of(host_grads, s), mesh, specs()) for s in range(NUM_STEPS)]
  first, state = run_per_call(
    step, grads[:CHECKPOINT_AT], jax.jit(tx.init)(params), params, LOSSES[:CHECKPOINT_AT]
  )
  start = time.perf_counter()
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(directory, state)
    checkpointer.wait_until_finished()
  save_seconds = time.perf_counter() - start
  rest = (grads[CHECKPOINT_AT:], params, LOSSES[CHECKPOINT_AT:])
  uninterrupted, _ = run_per_call(step, rest[0], state, *rest[1:])
  target = jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state
  )
  start = time.perf_counter()
  with ocp.StandardCheckpointer() as checkpointer:
    restored = checkpointer.restore(directory, target)
  restore_seconds = time.perf_counter() - start
  resumed, _ = run_per_call(step, rest[0], restored, *rest[1:])
  return {
    "saved": record_global(state),
    "restored": record_global(restored),
    "same_sharding": all(
      a.sharding.is_equivalent_to(b.sharding, a.ndim)
      for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state), strict=True)
    ),
    "same_structure": jax.tree.structure(restored) == jax.tree.structure(state),
    "uninterrupted": record_global(uninterrupted),
    "resumed": record_global(resumed),
    "first": record_global(first),
    "seconds": {"save": save_seconds, "restore": restore_seconds},
  }


def check_nan_in_max(mesh) -> dict[str, list[float]]:
  """Statistics that take a maximum across devices, of a gradient with one
  NaN held by each device in turn (columns split over "d"): a single device
  gives NaN for each."""
  value, agc = jaxclip.clip_by_value(-1.0, 1.0), jaxclip.adaptive_grad_clip(0.1)

  @jax.jit
  def measure(g):
    return {
      "global_norm(ord=inf)": jaxclip.global_norm(g, math.inf),
      "clip_by_value max_abs": value.update(g, value.init(g))[1].max_abs,
      "adaptive_grad_clip norm": agc.update(g, agc.init(g), g)[1].norm[0],
      "global_norm(ord=2)": jaxclip.global_norm(g),
    }

  out: dict[str, list[float]] = {}
  for device in range(4):
    x = np.arange(1.0, 65.0, dtype=np.float32).reshape(4, 16)
    x[1, 4 * device] = np.nan
    for key, v in measure(to_global(x, mesh, P(None, "d"))).items():
      out.setdefault(key, []).append(float(np.asarray(v.addressable_data(0))))
  return out


def _timed(results: dict[str, Any], name: str, fn: Callable[[], Any]) -> None:
  """Runs one check; its output, or its error (the others still run), and time."""
  start = time.perf_counter()
  try:
    results["cases"][name] = fn()
  except Exception:  # reported by the pytest side, naming the check
    results["errors"][name] = traceback.format_exc()
  results["seconds"][name] = time.perf_counter() - start


def _grouped(results: dict[str, Any], prefix: str, names: tuple[str, ...], fn) -> None:
  """The checks `prefix/name` of `names`, from ``fn(names) -> {name: output}``:
  all in one program (compiling one program is much faster than compiling
  each), or, when that fails, each on its own to tell which fails."""
  start = time.perf_counter()
  try:
    for name, out in fn(names).items():
      results["cases"][f"{prefix}/{name}"] = out
  except Exception:
    for name in names:
      _timed(results, f"{prefix}/{name}", lambda n=name: fn((n,))[n])
  results["seconds"][prefix] = time.perf_counter() - start


def _recorded(run: Callable[..., dict[str, Any]], record: Callable[[Any], Any]):
  return lambda names: {name: record(out) for name, out in run(names).items()}


def run_sharded(results, kind: str, mesh, host_grads, host_params, checkpoint_dir: str) -> None:
  """The checks on global arrays over `mesh`, which spans both processes."""
  grads = to_global(host_grads, mesh, stacked(specs()))
  params = to_global(host_params, mesh, specs())
  names = tuple(CASES) if kind == "explicit" else AUTO_CASES
  run = functools.partial(run_jit, stacked_grads=grads, params=params)
  _grouped(results, f"jit/{kind}", names, _recorded(run, record_global))
  if kind != "explicit":
    return
  results["nan_held_here"] = any(
    bool(np.isnan(np.asarray(s.data)).any()) for s in grads["embed"].addressable_shards
  )
  grads = to_global(host_grads, mesh, stacked(shard_map_specs()))
  params = to_global(host_params, mesh, shard_map_specs())
  run = functools.partial(run_shard_map, mesh=mesh, stacked_grads=grads, params=params)
  _grouped(results, "shard_map", SHARD_MAP_CASES, _recorded(run, record_global))
  _timed(results, "nan_in_max", lambda: check_nan_in_max(mesh))
  params = to_global(host_params, mesh, specs())
  _timed(results, "checkpoint", lambda: check_checkpoint(mesh, host_grads, params, checkpoint_dir))


def run_all(process_id: int, checkpoint_dir: str) -> dict[str, Any]:
  """Every check; the reference runs are shared out between the processes."""
  host_grads, host_params = gradient_steps(), host_tree(1)
  results: dict[str, Any] = {"cases": {}, "errors": {}, "seconds": {}}
  results["devices"] = [d.id for d in jax.local_devices()]
  for kind, axis_type in AXIS_TYPES.items():
    mesh = jax.make_mesh((4,), ("d",), axis_types=(axis_type,))
    with jax.set_mesh(mesh):  # `jax.jit(tx.init)` lays the state out on the mesh
      run_sharded(results, kind, mesh, host_grads, host_params, checkpoint_dir)
  run = functools.partial(run_jit, stacked_grads=to_local(host_grads), params=to_local(host_params))
  mine = tuple(CASES)[process_id::NUM_PROCESSES]
  _grouped(results, "reference", mine, _recorded(run, record_local))
  return results


def main(coordinator: str, process_id: int, out_dir: str) -> None:
  start = time.perf_counter()
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(
    coordinator_address=coordinator, num_processes=NUM_PROCESSES, process_id=process_id
  )
  assert jax.process_count() == NUM_PROCESSES and jax.device_count() == 4, jax.devices()
  results = run_all(process_id, f"{out_dir}/checkpoint")
  results["seconds"]["total"] = time.perf_counter() - start
  with open(f"{out_dir}/process_{process_id}.pkl", "wb") as f:
    pickle.dump(results, f)
  jax.distributed.shutdown()


if __name__ == "__main__":
  main(sys.argv[1], int(sys.argv[2]), sys.argv[3])
