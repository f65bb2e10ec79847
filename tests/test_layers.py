"""Stacked layers (`layer_axes`): each layer slice of a stacked leaf is a tensor."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxclip
from jaxclip import _layers

L = 3


def _stacked(num_small: int = 0):
  ks = jax.random.split(jax.random.key(0), 6 + num_small)
  blocks = {
    "attn": {"qkv": {"kernel": 2.0 * jax.random.normal(ks[0], (L, 8, 12))}},
    "mlp": {
      "kernel": jax.random.normal(ks[1], (L, 8, 16)),
      "bias": jax.random.normal(ks[2], (L, 16)),
    },
    "scale": 0.1 * jax.random.normal(ks[3], (L, 8)),
  }
  # Many small leaves, so that the norm kernel groups them.
  for i in range(num_small):
    blocks[f"s{i:02d}"] = (i + 1) * 0.1 * jax.random.normal(ks[6 + i], (L, 4, 3))
  return {"blocks": blocks, "embed": jax.random.normal(ks[4], (10, 8))}


def _unstacked(tree):
  blocks = tree["blocks"]
  return {
    "blocks": [jax.tree.map(lambda x, i=i: x[i], blocks) for i in range(L)],
    "embed": tree["embed"],
  }


def _restack(tree):
  return {
    "blocks": jax.tree.map(lambda *xs: jnp.stack(xs), *tree["blocks"]),
    "embed": tree["embed"],
  }


def _grads(params, step):
  return jax.tree.map(lambda x: (1.0 + 3.0 * (step % 2)) * x * (1.0 + 0.1 * step), params)


def _per_tensor(state, tree, layer_axes):
  """The state's per-tensor fields as {name: value}."""
  names = _layers.tensor_names(tree, layer_axes)
  return {f: dict(zip(names, np.asarray(getattr(state, f)))) for f in ("norm", "scale", "clipped")}


TRANSFORMS = {
  "clip_by_norm": lambda la: jaxclip.clip_by_norm(1.5, layer_axes=la),
  "clip_by_norm_axis": lambda la: jaxclip.clip_by_norm(0.7, axis=0, layer_axes=la),
  "clip_by_block_rms": lambda la: jaxclip.clip_by_block_rms(0.5, layer_axes=la),
  "adaptive_grad_clip": lambda la: jaxclip.adaptive_grad_clip(0.05, layer_axes=la),
  "adagc": lambda la: jaxclip.adagc(warmup_steps=2, warmup_max_norm=3.0, layer_axes=la),
}


@pytest.mark.parametrize("num_small", [0, 40])
@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_stacked_equals_unstacked(name, num_small):
  params = _stacked(num_small)
  flat = _unstacked(params)
  stacked_tx = TRANSFORMS[name]({"blocks": 1})
  plain_tx = TRANSFORMS[name](None)
  s_state, p_state = stacked_tx.init(params), plain_tx.init(flat)
  update_s, update_p = jax.jit(stacked_tx.update), jax.jit(plain_tx.update)
  for step in range(4):
    g = _grads(params, step)
    out_s, s_state = update_s(g, s_state, params)
    out_p, p_state = update_p(_unstacked(g), p_state, flat)
    jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), out_s, _restack(out_p)
    )
    mine = _per_tensor(s_state, params, {"blocks": 1})
    reference = _per_tensor(p_state, flat, None)
    assert mine.keys() == reference.keys()
    for field in mine:
      assert mine[field].keys() == reference[field].keys()
      for key, value in reference[field].items():
        np.testing.assert_allclose(mine[field][key], value, rtol=1e-6, err_msg=f"{field} {key}")
  assert np.any(np.asarray(s_state.clipped))  # the comparison covers clipped tensors


def test_without_layer_axes_a_stacked_leaf_is_one_tensor():
  params = _stacked()
  g = _grads(params, 1)
  tx = jaxclip.clip_by_norm(1.5)
  out, state = tx.update(g, tx.init(params))
  assert state.norm.shape == (len(jax.tree.leaves(params)),)
  kernel = g["blocks"]["attn"]["qkv"]["kernel"]
  np.testing.assert_allclose(
    out["blocks"]["attn"]["qkv"]["kernel"], kernel * 1.5 / jnp.linalg.norm(kernel), rtol=1e-6
  )


def test_agc_units_never_span_layers():
  # (L, in, out) without layer_axes is a rank-3 leaf whose units span axis 0:
  # the layer axis. With layer_axes each unit lies inside one layer.
  w = jnp.stack([jnp.ones((2, 3)), 100.0 * jnp.ones((2, 3))])
  g = jnp.ones((2, 2, 3))
  tx = jaxclip.adaptive_grad_clip(0.01, layer_axes=1)
  out, _ = tx.update(g, tx.init(w), w)
  # layer 0: unit norm of w sqrt(2), of g sqrt(2): ratio 1 > 0.01, scaled to 0.01.
  np.testing.assert_allclose(out[0], 0.01 * g[0], rtol=1e-6)
  # layer 1: ratio 0.01: not clipped.
  np.testing.assert_allclose(out[1], g[1], rtol=1e-6)


def test_int_layer_axes_covers_every_leaf():
  tree = {"a": jnp.arange(6.0).reshape(2, 3), "b": jnp.ones((2, 4))}
  tx = jaxclip.clip_by_norm(1.0, layer_axes=1)
  _, state = tx.update(tree, tx.init(tree))
  np.testing.assert_allclose(
    state.norm, [np.linalg.norm([0, 1, 2]), np.linalg.norm([3, 4, 5]), 2.0, 2.0], rtol=1e-6
  )
  assert _layers.tensor_names(tree, 1) == ["0/a", "1/a", "0/b", "1/b"]


def test_names():
  params = _stacked()
  names = _layers.tensor_names(params, {"blocks": 1})
  assert names[:3] == [
    "blocks/0/attn/qkv/kernel",
    "blocks/1/attn/qkv/kernel",
    "blocks/2/attn/qkv/kernel",
  ]
  assert names[-1] == "embed"
  assert len(names) == 4 * L + 1
  # A fragment of several components, and two layer axes.
  tree = {"model": {"decoder": {"layers": {"w": jnp.ones((2, 3, 4))}}, "head": jnp.ones(4)}}
  assert _layers.tensor_names(tree, {"decoder/layers": 2}) == [
    *[f"model/decoder/layers/{i}/{j}/w" for i in range(2) for j in range(3)],
    "model/head",
  ]


def test_stats_and_suggestion_name_layers():
  params = _stacked()
  la = {"blocks": 1}
  opt = optax.chain(
    jaxclip.record_norms(30, layer_axes=la), jaxclip.clip_by_norm(1.0, layer_axes=la)
  )
  state = opt.init(params)
  update = jax.jit(opt.update)
  for step in range(25):
    _, state = update(_grads(params, step), state, params)
  keys = jaxclip.stats(state, params=params, layer_axes=la)
  assert "clip/per_tensor/norm/blocks/2/attn/qkv/kernel" in keys
  last = _grads(params, 24)["blocks"]["attn"]["qkv"]["kernel"][2]
  np.testing.assert_allclose(
    keys["clip/per_tensor/norm/blocks/2/attn/qkv/kernel"], jnp.linalg.norm(last), rtol=1e-6
  )
  suggestion = jaxclip.suggest_max_norm(state, params=params, layer_axes=la)
  dominant = dict(suggestion.dominant)
  assert all(name.startswith(("blocks/", "embed")) for name in dominant)
  assert any(name.startswith("blocks/") and name.endswith("attn/qkv/kernel") for name in dominant)
  with pytest.raises(ValueError, match="layer_axes"):
    jaxclip.suggest_max_norm(state, params=params)  # names without the layer axes


def test_recorded_rows_equal_unstacked_run():
  params = _stacked()
  la = {"blocks": 1}
  rec_s, rec_p = jaxclip.record_norms(3, layer_axes=la), jaxclip.record_norms(3)
  s, p = rec_s.init(params), rec_p.init(_unstacked(params))
  update_s, update_p = jax.jit(rec_s.update), jax.jit(rec_p.update)
  for step in range(3):
    g = _grads(params, step)
    _, s = update_s(g, s)
    _, p = update_p(_unstacked(g), p)
  np.testing.assert_allclose(s.global_norm, p.global_norm, rtol=1e-6)
  mine = dict(zip(_layers.tensor_names(params, la), np.asarray(s.norms).T))
  reference = dict(zip(_layers.tensor_names(_unstacked(params)), np.asarray(p.norms).T))
  assert mine.keys() == reference.keys()
  for key in mine:
    np.testing.assert_allclose(mine[key], reference[key], rtol=1e-6)


@pytest.mark.parametrize(
  "layer_axes, error, match",
  [
    (-1, ValueError, ">= 0"),
    (True, TypeError, "int or a mapping"),
    ("blocks", TypeError, "int or a mapping"),
    ({"": 1}, ValueError, "path fragments"),
    ({3: 1}, ValueError, "path fragments"),
    ({"blocks": -2}, ValueError, r"layer_axes\['blocks'\]"),
    ({"blocks": 1.0}, ValueError, r"layer_axes\['blocks'\]"),
  ],
)
def test_bad_layer_axes(layer_axes, error, match):
  with pytest.raises(error, match=match):
    jaxclip.clip_by_norm(1.0, layer_axes=layer_axes)


def test_more_layer_axes_than_a_leaf_has():
  tree = {"blocks": {"b": jnp.ones(3)}}
  tx = jaxclip.clip_by_block_rms(1.0, layer_axes={"blocks": 2})
  with pytest.raises(ValueError, match="blocks/b .* 2 leading layer axes"):
    tx.init(tree)


def test_flax_linen_scan_stack():
  nn = pytest.importorskip("flax.linen")

  class Block(nn.Module):
    @nn.compact
    def __call__(self, x, _):
      return nn.LayerNorm()(x + nn.Dense(8)(jnp.tanh(x))), None

  class Model(nn.Module):
    @nn.compact
    def __call__(self, x):
      blocks = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=L)
      x, _ = blocks(name="blocks")(x, None)
      return nn.Dense(2, name="head")(x)

  model = Model()
  x = jax.random.normal(jax.random.key(0), (4, 8))
  params = model.init(jax.random.key(1), x)
  grads = jax.grad(lambda p: jnp.sum(model.apply(p, x) ** 2))(params)
  la = {"blocks": 1}
  tx = jaxclip.clip_by_norm(0.1, layer_axes=la)
  clipped, state = tx.update(grads, tx.init(params))
  names = _layers.tensor_names(params, la)
  assert "params/blocks/2/Dense_0/kernel" in names and "params/head/kernel" in names
  assert len(names) == state.norm.shape[0] == 4 * L + 2
  kernel = grads["params"]["blocks"]["Dense_0"]["kernel"]
  want = np.asarray([np.linalg.norm(kernel[i]) for i in range(L)])
  got = dict(zip(names, np.asarray(state.norm)))
  np.testing.assert_allclose(
    [got[f"params/blocks/{i}/Dense_0/kernel"] for i in range(L)], want, rtol=1e-6
  )
  for i in range(L):
    np.testing.assert_allclose(
      jnp.linalg.norm(clipped["params"]["blocks"]["Dense_0"]["kernel"][i]),
      min(0.1, want[i]),
      rtol=1e-5,
    )


def test_plot_names_layers(tmp_path):
  pytest.importorskip("matplotlib")
  params = _stacked()
  la = {"blocks": 1}
  rec = jaxclip.record_norms(5, layer_axes=la)
  state = rec.init(params)
  update = jax.jit(rec.update)
  for step in range(5):
    _, state = update(_grads(params, step), state)
  out = jaxclip.plot_norms(state, params=params, layer_axes=la, path=tmp_path / "n.png")
  assert out.read_bytes()[:4] == b"\x89PNG"
  with pytest.raises(ValueError, match="layer_axes"):
    jaxclip.plot_norms(state, params=params, path=tmp_path / "m.png")
