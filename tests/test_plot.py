"""plot_norms writes a PNG (skipped without matplotlib)."""

import builtins

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxclip._recorder import record_norms, suggest_max_norm

pytest.importorskip("matplotlib", reason="plot_norms needs the optional matplotlib extra")

from jaxclip._plot import plot_norms  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _check_png(path):
  data = path.read_bytes()
  assert path.exists() and len(data) > 1000 and data[:8] == PNG_MAGIC


def test_plot_from_recorder_state(tmp_path):
  params = {"w": jnp.zeros((4, 3)), "b": jnp.zeros(3)}
  tx = optax.chain(record_norms(30), optax.sgd(0.1))
  state = tx.init(params)
  update = jax.jit(tx.update)
  rng = np.random.default_rng(0)
  for _ in range(30):
    g = {"w": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32), "b": jnp.ones(3)}
    _, state = update(g, state)
  s = suggest_max_norm(state)
  out = plot_norms(state, s, tmp_path / "sub" / "norms.png", params=params)
  _check_png(out)


def test_plot_plain_norms_without_panel(tmp_path):
  g = np.r_[np.linspace(1, 3, 40), np.nan]
  _check_png(plot_norms(g, threshold=2.0, path=tmp_path / "a.png", per_layer=False))
  _check_png(plot_norms(np.ones((10, 12)), path=tmp_path / "b.png"))


def test_plot_errors(tmp_path):
  with pytest.raises(ValueError, match="No steps"):
    plot_norms(np.zeros(0), path=tmp_path / "x.png")
  with pytest.raises(ValueError, match="floating leaves"):
    plot_norms(np.ones((5, 2)), path=tmp_path / "x.png", params={"a": jnp.ones(1)})


def test_missing_matplotlib_names_the_extra(monkeypatch, tmp_path):
  real_import = builtins.__import__

  def fake_import(name, *args, **kwargs):
    if name.startswith("matplotlib"):
      raise ImportError("no matplotlib")
    return real_import(name, *args, **kwargs)

  monkeypatch.setattr(builtins, "__import__", fake_import)
  with pytest.raises(ImportError, match=r"jaxclip\[plot\]"):
    plot_norms(np.ones(5), path=tmp_path / "x.png")
