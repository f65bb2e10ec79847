"""How do clipping thresholds and methods compare? Four small tasks, measured.

For each task (an LSTM on the adding problem, a tiny transformer language
model at a high learning rate without warmup, a CNN on scikit-learn's digits
at a high learning rate, an MLP regression with heavy-tailed label noise) and
each seed, the script trains:

* without clipping, recording the norms (`jaxclip.record_norms`) and the
  largest gradient entry of every step;
* with `clip_by_global_norm`, `clip_by_norm` (per tensor) and `clip` (by
  value) at 8 thresholds on a log grid around the median of the recorded
  global norm, per-tensor norm and largest entry (1/8x to 16x);
* with the threshold `suggest_max_norm` proposes from the first
  `--record-fraction` of the unclipped run (the workflow of
  docs/choosing_threshold.md), by its default rule and at the 90th
  percentile;
* with every adaptive clipper and guard at its defaults.

Each run is a `lax.scan` over the steps, vmapped over seeds and thresholds,
so a method costs one compilation. It prints a table per task (final loss on
held-out data, loss spikes, divergent runs) and, with `--plots DIR`, saves a
plot per task of final loss against threshold with the suggestion and the
recorded norm percentiles marked. `--smoke` runs a few steps of every task,
for CI.

Usage: python benchmarks/threshold_study.py [--seeds 3] [--plots docs/img] [--smoke]
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import pathlib
import sys
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jaxclip  # noqa: E402

GRID = 2.0 ** np.arange(-3, 5)  # 1/8x to 16x the recorded median


class Task(NamedTuple):
  name: str
  arch: str
  init: Callable[[jax.Array], Any]  # key -> params
  loss: Callable[[Any, Any], jax.Array]  # (params, batch) -> scalar
  batches: Callable[[jax.Array, int], Any]  # (key, steps) -> batches, step axis first
  eval_batch: Any
  optimizer: optax.GradientTransformation
  steps: int


# ---------------------------------------------------------------- tasks


def _dense(key, n_in, n_out, scale=1.0):
  return {
    "w": scale * jax.random.normal(key, (n_in, n_out)) / math.sqrt(n_in),
    "b": jnp.zeros(n_out),
  }


def _apply(p, x):
  return x @ p["w"] + p["b"]


def lstm_task(steps: int) -> Task:
  """The adding problem (Hochreiter & Schmidhuber): a sequence of 60 random
  values, two of them marked; predict the sum of the marked ones."""
  length, hidden, batch = 60, 32, 32

  def init(key):
    k = jax.random.split(key, 3)
    return {
      "wx": jax.random.normal(k[0], (2, 4 * hidden)) * 0.5,
      "wh": jax.random.normal(k[1], (hidden, 4 * hidden)) / math.sqrt(hidden),
      "b": jnp.zeros(4 * hidden),
      "out": _dense(k[2], hidden, 1),
    }

  def loss(p, data):
    x, y = data

    def cell(carry, xt):
      h, c = carry
      z = xt @ p["wx"] + h @ p["wh"] + p["b"]
      i, f, g, o = jnp.split(z, 4, axis=-1)
      c = jax.nn.sigmoid(f + 1.0) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
      h = jax.nn.sigmoid(o) * jnp.tanh(c)
      return (h, c), None

    zeros = jnp.zeros((x.shape[0], hidden))
    (h, _), _ = jax.lax.scan(cell, (zeros, zeros), jnp.swapaxes(x, 0, 1))
    return jnp.mean((_apply(p["out"], h)[:, 0] - y) ** 2)

  def make(key, n):
    kv, km = jax.random.split(key)
    values = jax.random.uniform(kv, (n, length))
    first = jax.random.randint(km, (n,), 0, length // 2)
    second = jax.random.randint(jax.random.fold_in(km, 1), (n,), length // 2, length)
    marks = jax.nn.one_hot(first, length) + jax.nn.one_hot(second, length)
    return jnp.stack([values, marks], -1), jnp.sum(values * marks, -1)

  def batches(key, n_steps):
    x, y = make(key, n_steps * batch)
    return x.reshape(n_steps, batch, length, 2), y.reshape(n_steps, batch)

  return Task(
    "lstm_adding", "recurrent", init, loss, batches, make(jax.random.key(99), 512),
    optax.adam(3e-2), steps,
  )  # fmt: skip


def _text() -> np.ndarray:
  """Characters of Python's own `json` and `textwrap` sources: a corpus every
  Python ships with."""
  import json as json_module
  import textwrap

  text = inspect.getsource(json_module) + inspect.getsource(textwrap)
  return np.frombuffer(text.encode("ascii", "replace"), np.uint8).astype(np.int32)


def transformer_task(steps: int) -> Task:
  """A 2-layer character transformer trained at a high learning rate with no
  warmup."""
  text = _text()
  vocab, seq, d, heads, batch = 128, 32, 48, 4, 16
  split = int(0.9 * len(text))
  train, held = text[:split], text[split:]

  def init(key):
    k = jax.random.split(key, 8)
    layer = lambda kk: {  # noqa: E731
      "qkv": _dense(kk[0], d, 3 * d), "out": _dense(kk[1], d, d),
      "up": _dense(kk[2], d, 4 * d), "down": _dense(kk[3], 4 * d, d),
      "ln1": jnp.ones(d), "ln2": jnp.ones(d),
    }  # fmt: skip
    return {
      "embed": jax.random.normal(k[0], (vocab, d)) * 0.1,
      "pos": jax.random.normal(k[1], (seq, d)) * 0.1,
      "layers": [layer(jax.random.split(k[2 + i], 4)) for i in range(2)],
      "ln": jnp.ones(d),
    }

  def norm(x, scale):
    return scale * (x - x.mean(-1, keepdims=True)) / jnp.sqrt(x.var(-1, keepdims=True) + 1e-5)

  def loss(p, tokens):
    x = p["embed"][tokens[:, :-1]] + p["pos"][: seq - 1]
    mask = jnp.tril(jnp.ones((seq - 1, seq - 1), bool))
    for layer in p["layers"]:
      q, k, v = jnp.split(_apply(layer["qkv"], norm(x, layer["ln1"])), 3, -1)
      split_heads = lambda t: t.reshape(*t.shape[:-1], heads, d // heads)  # noqa: E731
      att = jnp.einsum("bqhd,bkhd->bhqk", split_heads(q), split_heads(k)) / math.sqrt(d // heads)
      att = jax.nn.softmax(jnp.where(mask, att, -1e9), -1)
      o = jnp.einsum("bhqk,bkhd->bqhd", att, split_heads(v)).reshape(x.shape)
      x = x + _apply(layer["out"], o)
      x = x + _apply(layer["down"], jax.nn.gelu(_apply(layer["up"], norm(x, layer["ln2"]))))
    logits = norm(x, p["ln"]) @ p["embed"].T
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]))

  def windows(source, key, n):
    starts = jax.random.randint(key, (n,), 0, len(source) - seq)
    return jnp.asarray(source)[starts[:, None] + jnp.arange(seq)]

  def batches(key, n_steps):
    return windows(train, key, n_steps * batch).reshape(n_steps, batch, seq)

  return Task(
    "transformer_lm", "attention", init, loss, batches,
    windows(held, jax.random.key(99), 256), optax.adam(1e-2), steps,
  )  # fmt: skip


def cnn_task(steps: int) -> Task:
  """A small CNN on scikit-learn's 8x8 digits, SGD with momentum at a high
  learning rate."""
  from sklearn.datasets import load_digits

  images, labels = load_digits(return_X_y=True)
  images = (images / 16.0).reshape(-1, 8, 8, 1).astype(np.float32)
  order = np.random.default_rng(0).permutation(len(images))
  train, held = order[:1500], order[1500:]
  batch = 64

  def init(key):
    k = jax.random.split(key, 3)
    return {
      "c1": jax.random.normal(k[0], (3, 3, 1, 16)) / 3.0,
      "c2": jax.random.normal(k[1], (3, 3, 16, 32)) / 12.0,
      "head": _dense(k[2], 4 * 4 * 32, 10),
    }

  def loss(p, data):
    x, y = data
    conv = lambda v, w, s: jax.lax.conv_general_dilated(  # noqa: E731
      v, w, (s, s), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    h = jax.nn.relu(conv(x, p["c1"], 1))
    h = jax.nn.relu(conv(h, p["c2"], 2))
    logits = _apply(p["head"], h.reshape(h.shape[0], -1))
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))

  def batches(key, n_steps):
    idx = jax.random.choice(key, jnp.asarray(train), (n_steps, batch))
    return jnp.asarray(images)[idx], jnp.asarray(labels)[idx]

  return Task(
    "cnn_digits", "convolutional", init, loss, batches,
    (jnp.asarray(images[held]), jnp.asarray(labels[held])), optax.sgd(0.5, momentum=0.9), steps,
  )  # fmt: skip


def mlp_task(steps: int) -> Task:
  """An MLP regression whose training labels carry Student-t noise (1.5
  degrees of freedom: infinite variance); evaluated on clean labels."""
  dim, batch = 8, 32
  w_true = jax.random.normal(jax.random.key(7), (dim,))

  def target(x):
    return jnp.sin(x @ w_true) + 0.5 * jnp.tanh(x[:, 0] * x[:, 1])

  def init(key):
    k = jax.random.split(key, 3)
    return {"l1": _dense(k[0], dim, 64), "l2": _dense(k[1], 64, 64), "l3": _dense(k[2], 64, 1)}

  def loss(p, data):
    x, y = data
    h = jnp.tanh(_apply(p["l2"], jnp.tanh(_apply(p["l1"], x))))
    return jnp.mean((_apply(p["l3"], h)[:, 0] - y) ** 2)

  def batches(key, n_steps):
    kx, kn = jax.random.split(key)
    x = jax.random.normal(kx, (n_steps, batch, dim))
    noise = jax.random.t(kn, 1.5, (n_steps, batch))
    return x, jax.vmap(target)(x) + noise

  x_eval = jax.random.normal(jax.random.key(99), (1024, dim))
  return Task(
    "mlp_heavy_tail", "feed-forward", init, loss, batches, (x_eval, target(x_eval)),
    optax.sgd(0.05), steps,
  )  # fmt: skip


TASKS = {"lstm_adding": lstm_task, "transformer_lm": transformer_task, "cnn_digits": cnn_task,
         "mlp_heavy_tail": mlp_task}  # fmt: skip
DEFAULT_STEPS = {
  "lstm_adding": 600,
  "transformer_lm": 500,
  "cnn_digits": 400,
  "mlp_heavy_tail": 800,
}


# ---------------------------------------------------------------- runs


def _train(task: Task, make_tx: Callable[[Any], optax.GradientTransformationExtraArgs]):
  """A jitted function (seed, threshold) -> (train losses, final held-out
  loss, final optimizer state), vmapped over both. The final loss is the
  held-out loss averaged over the last tenth of the steps: a single
  evaluation at the last step varied by up to 1.9x between neighbouring
  thresholds on the CNN."""

  def run(seed, threshold):
    k_init, k_data = jax.random.split(jax.random.key(seed))
    params = task.init(k_init)
    tx = make_tx(threshold)

    def step(carry, batch):
      params, state = carry
      loss, grads = jax.value_and_grad(task.loss)(params, batch)
      updates, state = tx.update(grads, state, params, loss=loss)
      largest = jnp.max(jnp.stack([jnp.max(jnp.abs(g)) for g in jax.tree.leaves(grads)]))
      return (optax.apply_updates(params, updates), state), (loss, largest)

    def evaluated(carry, batch):
      carry, out = step(carry, batch)
      return carry, (*out, task.loss(carry[0], task.eval_batch))

    batches = task.batches(k_data, task.steps)
    tail = max(task.steps // 10, 1)
    (params, state), (losses, largest) = jax.lax.scan(
      step, (params, tx.init(params)), jax.tree.map(lambda b: b[:-tail], batches)
    )
    (params, state), (last, last_largest, held_out) = jax.lax.scan(
      evaluated, (params, state), jax.tree.map(lambda b: b[-tail:], batches)
    )
    losses = jnp.concatenate([losses, last])
    largest = jnp.concatenate([largest, last_largest])
    return losses, jnp.mean(held_out), state, largest

  return jax.jit(jax.vmap(jax.vmap(run, (None, 0)), (0, None)))


def _measure(task: Task, seeds: np.ndarray, record_steps: int):
  """The unclipped run, recording norms: its losses, held-out loss, the
  recorder state per seed, and per-step largest gradient entries."""

  def make(_):
    return optax.chain(jaxclip.record_norms(record_steps), task.optimizer)

  losses, final, state, largest = _train(task, make)(seeds, jnp.zeros(1))
  state = jax.tree.map(lambda x: x[:, 0], state)
  return losses[:, 0], final[:, 0], state, largest[:, 0, :record_steps]


def _spikes(losses: np.ndarray) -> int:
  """Steps whose loss exceeds 3x the median of the 20 steps before."""
  n = 0
  for t in range(20, len(losses)):
    if not np.isfinite(losses[t]) or losses[t] > 3 * np.median(losses[t - 20 : t]):
      n += 1
  return n


def _summary(losses: np.ndarray, final: np.ndarray) -> dict:
  """Per method: median final held-out loss over seeds, spikes, divergent runs."""
  start = np.mean(losses[..., :5], -1)
  divergent = ~np.isfinite(final) | (final > start)
  return {
    "final": float(np.median(np.where(np.isfinite(final), final, np.inf))),
    "final_all": [float(f) for f in final.ravel()],
    "spikes": int(sum(_spikes(row) for row in losses.reshape(-1, losses.shape[-1]))),
    "divergent": int(divergent.sum()),
    "runs": int(final.size),
  }


ADAPTIVE = {
  "autoclip": lambda opt: optax.chain(jaxclip.autoclip(), opt),
  "zclip": lambda opt: optax.chain(jaxclip.zclip(), opt),
  "adagc": lambda opt: optax.chain(jaxclip.adagc(), opt),
  "quantile_clip": lambda opt: optax.chain(jaxclip.quantile_clip(), opt),
  "skip_on_spike": lambda opt: jaxclip.skip_on_spike(opt),
  "skip_nonfinite": lambda opt: jaxclip.skip_nonfinite(opt),
}


def study(task: Task, seeds: np.ndarray, record_fraction: float) -> dict:
  record_steps = max(int(record_fraction * task.steps), 3)
  losses, final, recorder, largest = _measure(task, seeds, record_steps)
  rec = np.asarray(recorder[0].global_norm)  # (seeds, record_steps)
  per = np.asarray(recorder[0].norms)  # (seeds, record_steps, tensors)
  result = {"task": task.name, "arch": task.arch, "steps": task.steps, "record_steps": record_steps}
  result["none"] = _summary(losses[:, None], final[:, None])
  percentiles = {f"p{q}": float(np.percentile(rec[np.isfinite(rec)], q)) for q in (10, 50, 90, 99)}
  result["percentiles"] = percentiles
  medians = {
    "global": percentiles["p50"],
    "per_tensor": float(np.median(per[np.isfinite(per)])),
  }
  medians["value"] = float(np.median(np.asarray(largest)))  # largest entry per step
  result["medians"] = medians
  sweeps = {
    "global": lambda t: optax.chain(jaxclip.clip_by_global_norm(t), task.optimizer),
    "per_tensor": lambda t: optax.chain(jaxclip.clip_by_norm(t), task.optimizer),
    "value": lambda t: optax.chain(jaxclip.clip(t), task.optimizer),
  }
  result["sweeps"] = {}
  for name, make in sweeps.items():
    grid = medians[name] * GRID
    sweep_losses, sweep_final, _, _ = _train(task, make)(seeds, jnp.asarray(grid, jnp.float32))
    result["sweeps"][name] = [
      {
        "threshold": float(t),
        **_summary(np.asarray(sweep_losses[:, i]), np.asarray(sweep_final[:, i])),
      }
      for i, t in enumerate(grid)
    ]
  # The documented workflow: record the first steps unclipped, then suggest
  # (the default rule, and the 90th percentile for comparison).
  for key, percentile in (("suggested", None), ("suggested_p90", 90.0)):
    found = [
      jaxclip.suggest_max_norm(rec[i][np.isfinite(rec[i])], percentile, min_steps=2)
      for i in range(len(seeds))
    ]
    thresholds = jnp.asarray([f.max_norm for f in found], jnp.float32)
    # One compilation: every seed with every suggestion, then each seed's own.
    s_out, s_fin, _, _ = _train(task, sweeps["global"])(seeds, thresholds)
    idx = np.arange(len(seeds))
    s_losses, s_final = np.asarray(s_out)[idx, idx], np.asarray(s_fin)[idx, idx]
    result[key] = {
      "thresholds": [f.max_norm for f in found],
      "factors": [f.factor for f in found],
      **_summary(s_losses[:, None], s_final[:, None]),
    }
  result["adaptive"] = {}
  for name, wrap in ADAPTIVE.items():
    a_losses, a_final, _, _ = _train(task, lambda t, w=wrap: w(task.optimizer))(seeds, jnp.zeros(1))
    result["adaptive"][name] = _summary(np.asarray(a_losses), np.asarray(a_final))
  return result


# ---------------------------------------------------------------- report


def report(result: dict) -> str:
  lines = [
    f"## {result['task']} ({result['arch']}, {result['steps']} steps, norms recorded over"
    f" the first {result['record_steps']})",
    "",
    "recorded global norm: "
    + ", ".join(f"{k} {v:.4g}" for k, v in result["percentiles"].items())
    + "; medians: "
    + ", ".join(f"{k} {v:.4g}" for k, v in result["medians"].items()),
    "",
    "| method | threshold | final loss (median) | spikes | divergent |",
    "|---|---|---|---|---|",
  ]
  row = lambda name, t, s: (
    f"| {name} | {t} | {s['final']:.4g} | {s['spikes']} | {s['divergent']}/{s['runs']} |"
  )  # noqa: E731
  lines.append(row("none", "-", result["none"]))
  for name, sweep in result["sweeps"].items():
    for point in sweep:
      lines.append(row(name, f"{point['threshold']:.3g}", point))
  sugg = result["suggested"]
  for key, label in (
    ("suggested", "suggested (default rule)"),
    ("suggested_p90", "suggested (p90)"),
  ):
    lines.append(row(label, "/".join(f"{t:.3g}" for t in result[key]["thresholds"]), result[key]))
  for name, s in result["adaptive"].items():
    lines.append(row(name, "default", s))
  best = min(result["sweeps"]["global"], key=lambda p: p["final"])
  ratio = sugg["final"] / best["final"] if best["final"] > 0 else float("nan")
  lines += ["", f"best global threshold {best['threshold']:.3g} (loss {best['final']:.4g});"
            f" suggested/best final loss: {ratio:.3f}"]  # fmt: skip
  return "\n".join(lines)


def plot(result: dict, directory: pathlib.Path) -> pathlib.Path:
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  fig = Figure(figsize=(7, 4), layout="constrained")
  FigureCanvasAgg(fig)
  ax = fig.subplots()
  for name, sweep in result["sweeps"].items():
    ratio = [p["threshold"] / result["medians"][name] for p in sweep]
    ax.plot(ratio, [p["final"] for p in sweep], marker="o", label=f"{name} (x its median)")
  ax.axhline(result["none"]["final"], color="gray", ls=":", label="no clipping")
  for key, style in (("suggested", "--"), ("suggested_p90", ":")):
    for t in result[key]["thresholds"]:
      ax.axvline(t / result["medians"]["global"], color="C0", ls=style, lw=0.8)
  for k, v in result["percentiles"].items():
    ax.annotate(k, (v / result["medians"]["global"], ax.get_ylim()[1]), fontsize=7, color="C0")
  ax.set_xscale("log")
  ax.set_yscale("log")
  ax.set_xlabel("threshold / recorded median (suggest_max_norm: dashed, default; dotted, p90)")
  ax.set_ylabel("final held-out loss (median of seeds)")
  ax.set_title(f"{result['task']} ({result['arch']})")
  ax.legend(fontsize=7)
  directory.mkdir(parents=True, exist_ok=True)
  out = directory / f"study_{result['task']}.png"
  fig.savefig(out, dpi=110)
  return out


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--seeds", type=int, default=3)
  parser.add_argument("--tasks", nargs="*", default=None, help=f"any of {list(TASKS)}")
  parser.add_argument("--record-fraction", type=float, default=0.2)
  parser.add_argument("--plots", type=pathlib.Path, default=None)
  parser.add_argument("--json", type=pathlib.Path, default=None)
  parser.add_argument(
    "--smoke", action="store_true", help="CI: 5 steps, one seed, the MLP task unless --tasks"
  )
  args = parser.parse_args()
  print(f"device: {jax.devices()[0].platform}, jax {jax.__version__}, optax {optax.__version__}")
  seeds = np.arange(args.seeds if not args.smoke else 1)
  tasks = args.tasks if args.tasks or not args.smoke else ["mlp_heavy_tail"]
  results = []
  for name in tasks or list(TASKS):
    start = time.perf_counter()
    task = TASKS[name](5 if args.smoke else DEFAULT_STEPS[name])
    result = study(task, seeds, args.record_fraction)
    results.append(result)
    print(report(result))
    print(f"({time.perf_counter() - start:.0f} s)\n", flush=True)
    if args.plots:
      print(f"plot: {plot(result, args.plots)}")
  if args.json:
    args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
  main()
