"""jaxclip across processes: two workers on JAX's distributed runtime.

Two processes on loopback (gloo collectives), 2 host CPU devices each, run
every transform on gradients split across all 4 devices
(tests/multiprocess/worker.py). Each writes the shards it holds of every
output, and a single-device reference run on the full arrays; this side puts
the shards together, checks that wherever two devices hold the same entries
they hold the same bits, and compares with the reference to float rounding.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import pickle
import socket
import subprocess
import sys
import time
from typing import Any

import jax.numpy as jnp
import numpy as np
import pytest

HERE = pathlib.Path(__file__).parent
WORKER = HERE / "multiprocess" / "worker.py"
TIMEOUT_S = 300.0


def _load_worker():
  """The worker module, for its case names and constants (it runs nothing on import)."""
  spec = importlib.util.spec_from_file_location("jaxclip_multiprocess_worker", WORKER)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


worker = _load_worker()

pytestmark = pytest.mark.multidevice


def _free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _child_env() -> dict[str, str]:
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  # The programs are tiny: XLA's backend optimisations would only cost compile time.
  flags = "--xla_force_host_platform_device_count=2 --xla_backend_optimization_level=0"
  env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {flags}".strip()
  env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE.parent), env.get("PYTHONPATH")]))
  return env


def _wait(procs: list[subprocess.Popen], deadline: float) -> str | None:
  """Waits until every process has exited, one has failed or time is up;
  returns what went wrong, if anything."""
  while time.monotonic() < deadline:
    codes = [p.poll() for p in procs]
    if any(c not in (None, 0) for c in codes):
      return f"a worker failed (exit codes {codes})"
    if all(c == 0 for c in codes):
      return None
    time.sleep(0.1)
  return f"timed out after {TIMEOUT_S:.0f} s"


def _launch(out: pathlib.Path) -> list[dict[str, Any]]:
  """Runs both workers; they are always killed and reaped before this returns."""
  address = f"127.0.0.1:{_free_port()}"
  logs = [out / f"log_{i}.txt" for i in range(worker.NUM_PROCESSES)]
  procs: list[subprocess.Popen] = []
  try:
    for i, log in enumerate(logs):
      with open(log, "w") as f:
        procs.append(
          subprocess.Popen(
            [sys.executable, str(WORKER), address, str(i), str(out)],
            env=_child_env(),
            stdout=f,
            stderr=subprocess.STDOUT,
            cwd=HERE.parent,
          )
        )
    problem = _wait(procs, time.monotonic() + TIMEOUT_S)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
    for p in procs:
      p.wait()
  if problem is not None:
    tails = "\n".join(
      f"--- worker {i} ---\n{log.read_text()[-4000:]}" for i, log in enumerate(logs)
    )
    pytest.fail(f"{problem}\n{tails}")
  results = []
  for i in range(worker.NUM_PROCESSES):
    with open(out / f"process_{i}.pkl", "rb") as f:
      results.append(pickle.load(f))
  return results


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> list[dict[str, Any]]:
  return _launch(tmp_path_factory.mktemp("multiprocess"))


def _outputs(results: list[dict[str, Any]], check: str) -> Any:
  """What every process recorded for `check`, failing on a worker error."""
  for i, r in enumerate(results):
    if check in r["errors"]:
      pytest.fail(f"process {i}, {check}:\n{r['errors'][check]}")
  return [r["cases"][check] for r in results]


def _same_bits(a: np.ndarray, b: np.ndarray) -> bool:
  return a.shape == b.shape and a.dtype == b.dtype and a.tobytes() == b.tobytes()


def _assemble(records: list[dict[str, Any]], what: str) -> np.ndarray:
  """The global array from the shards of every process. Where devices hold
  the same entries (replicated leaves and statistics), they hold the same bits."""
  shape, dtype = records[0]["shape"], records[0]["dtype"]
  full, seen = np.zeros(shape, dtype), np.zeros(shape, bool)
  for r in records:
    assert (r["shape"], r["dtype"]) == (shape, dtype), what
    for bounds, device, data in r["shards"]:
      at = tuple(slice(a, b) for a, b in bounds)
      if seen[at].any():
        assert _same_bits(full[at], data), f"{what}: device {device} differs from another"
      full[at], seen[at] = data, True
  assert seen.all(), f"{what}: entries no device holds"
  return full


def _assembled(per_process: list[list[tuple[str, dict]]], what: str) -> dict[str, np.ndarray]:
  keys = [[k for k, _ in p] for p in per_process]
  assert all(k == keys[0] for k in keys), f"{what}: the processes output different trees"
  return {k: _assemble([dict(p)[k] for p in per_process], f"{what} {k}") for k in keys[0]}


def _assert_close(got: np.ndarray, want: np.ndarray, what: str) -> None:
  """Equal up to float rounding: a float32 sum of thousands of terms taken in
  another order (per shard, then across devices) differs by about sqrt(n)
  ulps, so float32 to 5e-6 relative; a bf16 leaf, rounded from float32 at the
  end, to one bf16 ulp. Integers and booleans exactly."""
  assert got.shape == want.shape and got.dtype == want.dtype, (what, got.dtype, want.dtype)
  if not jnp.issubdtype(got.dtype, jnp.inexact):
    np.testing.assert_array_equal(got, want, err_msg=what)
    return
  rtol = 2.0**-8 if got.dtype == jnp.bfloat16 else 5e-6
  np.testing.assert_allclose(
    got.astype(np.float64), want.astype(np.float64), rtol=rtol, atol=1e-30, err_msg=what
  )


def _reference(results: list[dict[str, Any]], name: str) -> dict[str, np.ndarray]:
  """The single-device run of `name` (each process ran half of them)."""
  check = f"reference/{name}"
  owners = [r for r in results if check in r["cases"] or check in r["errors"]]
  assert len(owners) == 1, check
  if check in owners[0]["errors"]:
    pytest.fail(f"{check}:\n{owners[0]['errors'][check]}")
  return dict(owners[0]["cases"][check])


def _sharded_checks() -> list[str]:
  return (
    [f"jit/explicit/{n}" for n in worker.CASES]
    + [f"jit/auto/{n}" for n in worker.AUTO_CASES]
    + [f"shard_map/{n}" for n in worker.SHARD_MAP_CASES]
  )


# Statistics that take a maximum across devices lose a NaN that a device
# other than the first holds (test_a_nan_on_any_device_reaches_max_statistics).
MAX_OF_NAN_STEP = ("['state'].max_abs", "['stats']['clip/max_abs']")


@pytest.mark.parametrize("check", _sharded_checks())
def test_sharded_run_matches_single_process(results, check):
  """Every step's updates, `jaxclip.stats` (and, under jit, the whole
  optimizer state) equal the single-device run; devices holding the same
  entries agree bit for bit, across processes too."""
  got = _assembled(_outputs(results, check), check)
  want = _reference(results, check.rsplit("/", 1)[1])
  if check.startswith("shard_map/"):  # the state stays inside shard_map
    want = {k: v for k, v in want.items() if not k.startswith("['state']")}
  assert list(got) == list(want), check
  for key in want:
    steps = [
      s for s in range(worker.NUM_STEPS) if not (key in MAX_OF_NAN_STEP and s == worker.NAN_STEP)
    ]
    _assert_close(got[key][steps], want[key][steps], f"{check} {key}")


def test_each_process_holds_two_devices_and_only_one_the_nan(results):
  devices = [set(r["devices"]) for r in results]
  assert [len(d) for d in devices] == [2, 2] and not devices[0] & devices[1]
  assert [r["nan_held_here"] for r in results] == [False, True]


@pytest.mark.parametrize("check", [c for c in _sharded_checks() if "/skip_" in c])
def test_guards_skip_on_every_process(results, check):
  """The spike and the NaN that only process 1 holds are skipped by all:
  zero updates on every device (the run matches the reference above)."""
  got = _assembled(_outputs(results, check), check)
  skipped = {"skip_nonfinite": [0, 0, 0, 0, 1], "skip_on_spike": [0, 0, 0, 1, 2]}
  name = check.rsplit("/", 1)[1]
  total = [v for k, v in got.items() if k.endswith(f"/{name}/total_skipped']")]
  assert len(total) == 1 and total[0].tolist() == skipped[name], (check, total)
  for step in np.flatnonzero(np.diff([0, *skipped[name]])):
    updates = [v[step] for k, v in got.items() if k.startswith("['updates']")]
    assert not any(np.any(u) for u in updates), (check, step)


def _nan_in_max(results) -> dict[str, list[float]]:
  out = _outputs(results, "nan_in_max")
  assert out[0].keys() == out[1].keys()
  for key in out[0]:  # the processes agree, NaN or not
    assert _same_bits(np.asarray(out[0][key]), np.asarray(out[1][key])), key
  return out[0]


def test_a_nan_on_any_device_reaches_the_global_norm(results):
  assert np.isnan(_nan_in_max(results)["global_norm(ord=2)"]).all()


def test_a_nan_on_any_device_reaches_max_statistics(results):
  """A NaN held by any one device makes every statistic of the gradient NaN,
  as on one device: maxima too (XLA:CPU's max all-reduce may drop a NaN held
  by another device; the kernel adds a sum that keeps it)."""
  for key, values in _nan_in_max(results).items():
    assert np.isnan(values).all(), (key, values)


def test_checkpoint_restores_and_resumes_identically(results):
  """The guarded Adam state saved by both processes with orbax restores bit
  for bit into the same shardings, and the next steps equal those of the
  uninterrupted run, bit for bit."""
  out = _outputs(results, "checkpoint")
  assert all(o["same_sharding"] and o["same_structure"] for o in out)
  saved = _assembled([o["saved"] for o in out], "saved")
  restored = _assembled([o["restored"] for o in out], "restored")
  assert saved.keys() == restored.keys()
  for key in saved:
    assert _same_bits(restored[key], saved[key]), key
  uninterrupted = _assembled([o["uninterrupted"] for o in out], "uninterrupted")
  resumed = _assembled([o["resumed"] for o in out], "resumed")
  assert resumed.keys() == uninterrupted.keys()
  for key in resumed:
    assert _same_bits(resumed[key], uninterrupted[key]), key
  assert int(saved[".filled"]) == worker.CHECKPOINT_AT  # a non-trivial history was restored


def test_step_by_step_calls_match_the_reference(results):
  """The checkpoint check calls one jitted step at a time, the state going
  from call to call: every step equals the reference (a scan over steps)."""
  out = _outputs(results, "checkpoint")
  first = _assembled([o["first"] for o in out], "first steps")
  rest = _assembled([o["uninterrupted"] for o in out], "last steps")
  for key, want in _reference(results, "skip_on_spike").items():
    for step in range(worker.NUM_STEPS):
      got = first if step < worker.CHECKPOINT_AT else rest
      index = step if step < worker.CHECKPOINT_AT else step - worker.CHECKPOINT_AT
      _assert_close(got[f"[{index}]{key}"], want[step], f"step {step} {key}")
