"""Runs every example in its fast mode, as a user would from the shell."""

import ast
import importlib.util
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
# name -> arguments of its fast mode (quickstart.py has a test of its own below)
EXAMPLES: dict[str, list[str]] = {
  "spikes.py": ["--fast"],
  "dp_sgd.py": ["--fast"],
  "choose_threshold.py": ["--fast"],
  "transformer_lm.py": ["--fast"],
  "flax_linen_trainstate.py": ["--fast"],
  "flax_nnx.py": ["--fast"],
  "lstm_exploding.py": ["--fast"],
}


def _skip_without_its_packages(name: str) -> None:
  """Skips when a package the example imports is missing (the `examples` extra has them)."""
  top_level = set()
  for node in ast.walk(ast.parse((ROOT / "examples" / name).read_text())):
    if isinstance(node, ast.Import):
      top_level |= {alias.name.split(".")[0] for alias in node.names}
    elif isinstance(node, ast.ImportFrom) and node.level == 0:
      top_level.add(node.module.split(".")[0])
  missing = sorted(m for m in top_level if importlib.util.find_spec(m) is None)
  if missing:
    pytest.skip(f"examples/{name} needs {', '.join(missing)}: pip install -e '.[examples]'")


def test_every_example_is_run():
  on_disk = {p.name for p in (ROOT / "examples").glob("*.py")}
  assert on_disk == {*EXAMPLES, "quickstart.py"}


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_example_runs(name):
  _skip_without_its_packages(name)
  env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
  result = subprocess.run(
    [sys.executable, str(ROOT / "examples" / name), *EXAMPLES[name]],
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.strip(), "the example printed nothing"


def test_quickstart_shows_clipping_helps():
  _skip_without_its_packages("quickstart.py")
  env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
  out = subprocess.run(
    [sys.executable, str(ROOT / "examples" / "quickstart.py"), "--fast"],
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
    check=True,
  ).stdout
  line = next(row for row in out.splitlines() if row.startswith("final loss"))
  plain, clipped = (float(part.split(":")[-1].strip().rstrip(";")) for part in line.split(";"))
  assert clipped < plain
