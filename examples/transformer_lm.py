"""A tiny character-level transformer language model, clipped and observed.

The model learns to continue the source code of Python's `textwrap` module
(it ships with Python, so nothing is downloaded). The optimizer is
``optax.chain(jaxclip.clip_by_global_norm(1.0), optax.adamw(...))`` and every
few steps the clipping measurements, read from the optimizer state by
`jaxclip.stats` inside the jitted step, are printed: the gradient norm before
clipping (``clip/global_norm``), the scale applied and whether it clipped, and
the norm after clipping that follows from them.

Run: python examples/transformer_lm.py [--steps 300] [--fast]
"""

from __future__ import annotations

import argparse
import inspect
import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

from jaxclip import clip_by_global_norm, stats

SEQ, BATCH, WIDTH, HEADS, LAYERS = 64, 32, 64, 4, 2


class Block(nn.Module):
  @nn.compact
  def __call__(self, x):
    mask = nn.make_causal_mask(jnp.ones(x.shape[:2]))
    h = nn.LayerNorm()(x)
    x = x + nn.MultiHeadDotProductAttention(num_heads=HEADS)(h, h, mask=mask)
    h = nn.LayerNorm()(x)
    return x + nn.Dense(WIDTH)(nn.gelu(nn.Dense(4 * WIDTH)(h)))


class TinyLM(nn.Module):
  vocab: int

  @nn.compact
  def __call__(self, tokens):
    x = nn.Embed(self.vocab, WIDTH)(tokens)
    x = x + self.param("position", nn.initializers.normal(0.02), (SEQ, WIDTH))
    for _ in range(LAYERS):
      x = Block()(x)
    return nn.Dense(self.vocab)(nn.LayerNorm()(x))


def corpus():
  text = inspect.getsource(textwrap)
  chars = sorted(set(text))
  ids = np.asarray([chars.index(c) for c in text], np.int32)
  return ids, chars


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=300)
  parser.add_argument("--log-every", type=int, default=50)
  parser.add_argument("--fast", action="store_true", help="few steps, for CI")
  args = parser.parse_args()
  steps, log_every = (30, 10) if args.fast else (args.steps, args.log_every)

  ids, chars = corpus()
  model = TinyLM(vocab=len(chars))
  params = model.init(jax.random.key(0), jnp.zeros((1, SEQ), jnp.int32))["params"]
  schedule = optax.warmup_cosine_decay_schedule(0.0, 3e-3, steps // 10 + 1, steps)
  tx = optax.chain(clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=0.01))
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state, batch):
    def loss_fn(p):
      logits = model.apply({"params": p}, batch[:, :-1])
      return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss, stats(opt_state)

  rng = np.random.default_rng(0)
  clipped, first_loss = 0, None
  bar = tqdm(range(1, steps + 1), desc="training", leave=False, disable=None)
  for i in bar:
    starts = rng.integers(0, len(ids) - SEQ - 1, BATCH)
    batch = np.stack([ids[s : s + SEQ + 1] for s in starts])
    params, opt_state, loss, logs = step(params, opt_state, batch)
    clipped += bool(logs["clip/clipped"])
    first_loss = float(loss) if first_loss is None else first_loss
    if i % log_every == 0 or i == steps:
      before = float(logs["clip/global_norm"])
      after = before * float(logs["clip/scale"])
      shown = ", ".join(f"{k}={float(v):.3g}" for k, v in logs.items())
      tqdm.write(
        f"step {i:4d}  loss {float(loss):.3f}  grad norm {before:.3g} before clipping,"
        f" {after:.3g} after  ({shown})"
      )

  print(
    f"\n{steps} steps: loss {first_loss:.3f} -> {float(loss):.3f} (uniform guess"
    f" {np.log(len(chars)):.3f}); clip_by_global_norm(1.0) clipped {clipped}/{steps}"
    f" steps ({100 * clipped / steps:.0f}%)."
  )


if __name__ == "__main__":
  main()
