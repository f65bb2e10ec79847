"""The collectives each transform's jitted update compiles to, and their bytes.

Every transform (and the guards) is lowered and compiled on the gradients of
a transformer-shaped tree split over (a) 8 host CPU devices of one process
(Explicit and Auto mesh axes) and (b) 2 processes of 2 host CPU devices each
(JAX's distributed runtime, gloo collectives over loopback). The collectives
are read from the compiled HLO text: per kind, the number of instructions and
the bytes of their operands (per device), from the operand shapes and dtypes,
apart for those that run at every step and those inside `lax.cond` branches,
which run only when taken. Only the partial norms should be all-reduced: no
all-gather, all-to-all, collective-permute or reduce-scatter.

Nothing is run and no gradient is allocated: the update is compiled for
abstract arrays (`jax.ShapeDtypeStruct` with shardings). The script re-launches
itself once per configuration, since the device count is fixed when a process
starts.

Usage: python benchmarks/bench_collectives.py
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import jaxclip

KINDS = ("all-reduce", "all-gather", "all-to-all", "collective-permute", "reduce-scatter")
_HEADER = re.compile(r"^(?:ENTRY\s+)?%?(?P<name>[\w.\-]+)\s+\(.*->.*\{\s*$")
_INSTRUCTION = re.compile(
  r"^\s*(?:ROOT\s+)?%?(?P<name>[\w.\-]+)\s*=\s*(?P<type>.+?)\s+(?P<op>[a-z][\w\-]*)"
  r"\((?P<args>[^)]*)\)(?P<attrs>.*)$"
)
_CALLEE = re.compile(
  r"(?:calls|to_apply|body|condition|true_computation|false_computation)=%?([\w.\-]+)"
  r"|branch_computations=\{([^}]*)\}"
)
_ARRAY = re.compile(r"\b(pred|[a-z]+\d+)\[([\d,]*)\]")
_ITEMSIZE = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2}
_ITEMSIZE.update({"f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8, "c64": 8, "c128": 16})


def _adam_guard(guard: Callable[..., Any], **kwargs: Any) -> Callable[[], Any]:
  return lambda: guard(optax.chain(jaxclip.clip_by_global_norm(1.0), optax.adam(1e-3)), **kwargs)


TRANSFORMS: dict[str, Callable[[], optax.GradientTransformation]] = {
  "clip_by_global_norm": lambda: jaxclip.clip_by_global_norm(1.0),
  "clip_by_norm": lambda: jaxclip.clip_by_norm(1.0),
  "clip_by_block_rms": lambda: jaxclip.clip_by_block_rms(1e-3),
  "clip": lambda: jaxclip.clip(1e-3),
  "clip_by_value": lambda: jaxclip.clip_by_value(-1e-3, 1e-3),
  "adaptive_grad_clip": lambda: jaxclip.adaptive_grad_clip(0.01),
  "autoclip": lambda: jaxclip.autoclip(),
  "zclip": lambda: jaxclip.zclip(),
  "adagc": lambda: jaxclip.adagc(),
  "quantile_clip": lambda: jaxclip.quantile_clip(),
  "record_norms": lambda: jaxclip.record_norms(100),
  "clip_by_global_norm + adam": lambda: optax.chain(
    jaxclip.clip_by_global_norm(1.0), optax.adam(1e-3)
  ),
  "skip_nonfinite(... + adam)": _adam_guard(jaxclip.skip_nonfinite),
  "skip_on_spike(... + adam)": _adam_guard(jaxclip.skip_on_spike),
  "skip_large_norm(... + adam)": _adam_guard(jaxclip.skip_large_norm, max_norm=100.0),
}


def transformer_layout(d_model: int = 256, layers: int = 4, vocab: int = 8192) -> dict[str, Any]:
  """Leaf shapes and specs of a Megatron-style tensor-parallel transformer:
  the embedding and row-parallel kernels split on axis 0, column-parallel
  kernels and their biases on axis 1 (axis 0 for biases), the other biases and
  the layer norms replicated. Leaves are ``(shape, spec)`` pairs."""
  col, row, rep = P(None, "d"), P("d", None), P()
  tree: dict[str, Any] = {
    "embed": ((vocab, d_model), row),
    "final_ln": {"scale": ((d_model,), rep), "bias": ((d_model,), rep)},
  }
  for i in range(layers):
    tree[f"layer_{i}"] = {
      "qkv": {"kernel": ((d_model, 3 * d_model), col), "bias": ((3 * d_model,), P("d"))},
      "out": {"kernel": ((d_model, d_model), row), "bias": ((d_model,), rep)},
      "mlp_in": {"kernel": ((d_model, 4 * d_model), col), "bias": ((4 * d_model,), P("d"))},
      "mlp_out": {"kernel": ((4 * d_model, d_model), row), "bias": ((d_model,), rep)},
      "ln1": {"scale": ((d_model,), rep), "bias": ((d_model,), rep)},
      "ln2": {"scale": ((d_model,), rep), "bias": ((d_model,), rep)},
    }
  return tree


def _is_pair(x: Any) -> bool:
  return isinstance(x, tuple) and len(x) == 2 and isinstance(x[1], P)


def abstract_tree(mesh: jax.sharding.Mesh) -> Any:
  """The tree as float32 `jax.ShapeDtypeStruct`s sharded over `mesh`."""
  return jax.tree.map(
    lambda pair: jax.ShapeDtypeStruct(pair[0], jnp.float32, sharding=NamedSharding(mesh, pair[1])),
    transformer_layout(),
    is_leaf=_is_pair,
  )


def describe_tree() -> dict[str, Any]:
  pairs = jax.tree.leaves(transformer_layout(), is_leaf=_is_pair)
  split = [tuple(s).index("d") if "d" in tuple(s) else None for _, s in pairs]
  return {
    "leaves": len(pairs),
    "params": sum(math.prod(shape) for shape, _ in pairs),
    "axis0": split.count(0),
    "axis1": split.count(1),
    "replicated": split.count(None),
  }


def _nbytes(types: str) -> int:
  """Bytes of every array type in `types` (a type, a tuple of them, or a list)."""
  return sum(
    _ITEMSIZE[dtype] * math.prod(int(d) for d in dims.split(",") if d)
    for dtype, dims in _ARRAY.findall(types)
  )


def _callees(attrs: str) -> list[str]:
  names = []
  for single, listed in _CALLEE.findall(attrs):
    names += [single] if single else [n.strip().lstrip("%") for n in listed.split(",")]
  return names


def _parse(hlo: str) -> tuple[dict[str, str], list[tuple[str, dict[str, str]]]]:
  """(type of every instruction, [(computation, instruction fields)])."""
  types, found, computation = {}, [], ""
  for line in hlo.splitlines():
    if header := _HEADER.match(line):
      computation = header["name"]
    elif inst := _INSTRUCTION.match(line):
      types[inst["name"]] = inst["type"]
      found.append((computation, inst.groupdict()))
  return types, found


def _in_branches(found: list[tuple[str, dict[str, str]]]) -> set[str]:
  """The computations run only by a `conditional` (its branches, and what they call)."""
  calls: dict[str, list[str]] = {}
  todo = []
  for computation, inst in found:
    callees = _callees(inst["attrs"])
    calls.setdefault(computation, []).extend(callees)
    if inst["op"] == "conditional":
      todo += callees
  seen: set[str] = set()
  while todo:
    name = todo.pop()
    if name not in seen:
      seen.add(name)
      todo += calls.get(name, [])
  return seen


def collectives(hlo: str) -> dict[str, dict[str, list[int]]]:
  """Per kind of collective in compiled HLO text, ``[instructions, operand
  bytes]`` of those run at every step and of those inside `lax.cond` branches.

  Async pairs are counted once (``*-start``); an operand's bytes come from its
  own type (the shard each device sends).
  """
  types, found = _parse(hlo)
  branches = _in_branches(found)
  out = {where: {kind: [0, 0] for kind in KINDS} for where in ("step", "branch")}
  for computation, inst in found:
    kind = inst["op"].removesuffix("-start")
    if kind not in KINDS:
      continue
    args = re.sub(r"/\*.*?\*/", "", inst["args"])  # /*index=5*/ comments
    names = re.findall(r"%([\w.\-]+)", args) or [a.strip() for a in args.split(",")]
    size = _nbytes(args) or sum(_nbytes(types[n]) for n in names if n in types)
    row = out["branch" if computation in branches else "step"][kind]
    row[0] += 1
    row[1] += size
  return out


def measure(axis_type: AxisType) -> dict[str, Any]:
  """Compiles every transform's update on this runtime's devices."""
  mesh = jax.make_mesh((jax.device_count(),), ("d",), axis_types=(axis_type,))
  rows = {}
  with jax.set_mesh(mesh):
    grads = abstract_tree(mesh)
    for name, make in TRANSFORMS.items():
      tx = make()
      state = jax.eval_shape(tx.init, grads)

      def step(grads, state, params, tx=tx):
        return tx.update(grads, state, params, loss=jnp.float32(1.0))

      hlo = jax.jit(step).lower(grads, state, grads).compile().as_text()
      rows[name] = collectives(hlo)
  return rows


def run_measurement(args: argparse.Namespace) -> None:
  if args.coordinator:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
      coordinator_address=args.coordinator, num_processes=2, process_id=args.process_id
    )
  out = {
    "devices": jax.device_count(),
    "processes": jax.process_count(),
    "tables": {t: measure(getattr(AxisType, t)) for t in args.axis_types.split(",")},
  }
  if jax.process_index() == 0:
    print("RESULT " + json.dumps(out), flush=True)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _launch(extra: list[list[str]], devices: int, axis_types: str, timeout: float) -> dict:
  """Runs one measurement (one process per entry of `extra`); process 0's result."""
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}"
  cmd = [sys.executable, __file__, "--measure", "--axis-types", axis_types]
  procs = [
    subprocess.Popen(cmd + e, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for e in extra
  ]
  try:
    outs = [p.communicate(timeout=timeout) for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
      p.wait()
  for p, (_, err) in zip(procs, outs):
    if p.returncode:
      raise RuntimeError(f"measurement failed (exit {p.returncode}):\n{err[-4000:]}")
  line = next(x for x in outs[0][0].splitlines() if x.startswith("RESULT "))
  return json.loads(line[len("RESULT ") :])


def _bytes(n: int) -> str:
  return f"{n} B" if n < 10_000 else f"{n / 1e3:.1f} kB"


def print_table(title: str, rows: dict[str, dict[str, dict[str, list[int]]]]) -> None:
  """One row per transform: all-reduces at every step and in `lax.cond`
  branches, and the other kinds of collectives (count, with their bytes below)."""
  print(f"\n{title}")
  others = KINDS[1:]
  print(f"{'':<30}{'all-reduce':^24}{'all-reduce in':^24}")
  print(f"{'transform':<30}{'every step':^24}{'lax.cond branches':^24}" + "  ".join(others))
  notes = []
  for name, found in rows.items():
    cells = [
      f"{found[w]['all-reduce'][0]:>3} x {_bytes(found[w]['all-reduce'][1]):>10}"
      for w in ("step", "branch")
    ]
    counts = []
    for kind in others:
      n = found["step"][kind][0] + found["branch"][kind][0]
      counts.append(f"{n:>{len(kind)}}")
      for where, label in (("step", "every step"), ("branch", "in lax.cond branches")):
        if found[where][kind][0]:
          k, b = found[where][kind]
          notes.append(f"  {name}: {k} {kind} of {_bytes(b)} in all, {label}")
    print(f"{name:<30}{cells[0]:^24}{cells[1]:^24}" + "  ".join(counts))
  for note in notes:
    print(note)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)
  parser.add_argument("--coordinator", default="", help=argparse.SUPPRESS)
  parser.add_argument("--process-id", type=int, default=0, help=argparse.SUPPRESS)
  parser.add_argument("--axis-types", default="Explicit", help=argparse.SUPPRESS)
  parser.add_argument("--timeout", type=float, default=1200.0)
  args = parser.parse_args()
  if args.measure:
    run_measurement(args)
    return
  start = time.perf_counter()
  tree = describe_tree()
  print(f"jax {jax.__version__}, optax {optax.__version__}, host CPU devices")
  print(
    f"tree: {tree['params'] / 1e6:.2f}M float32 parameters, {tree['leaves']} leaves"
    f" ({tree['axis0']} split on axis 0, {tree['axis1']} on axis 1,"
    f" {tree['replicated']} replicated): {tree['params'] * 4 / 1e6:.1f} MB of gradients"
  )
  print(
    "all-reduce: instructions x operand bytes per device, summed; 'lax.cond branches' run"
    " only when taken (the norm kernel's rescaling: a power sum overflowed or underflowed;"
    " record_norms' recording: the first num_steps steps)"
  )
  one = _launch([[]], 8, "Explicit,Auto", args.timeout)
  address = f"127.0.0.1:{_free_port()}"
  two = _launch(
    [["--coordinator", address, "--process-id", str(i)] for i in range(2)],
    2,
    "Explicit",
    args.timeout,
  )
  print_table("(a) 1 process x 8 devices, Explicit mesh axis", one["tables"]["Explicit"])
  print_table("(a') 1 process x 8 devices, Auto mesh axis", one["tables"]["Auto"])
  print_table("(b) 2 processes x 2 devices (gloo), Explicit mesh axis", two["tables"]["Explicit"])
  print(f"\n({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
  main()
