"""Runs every example in its fast mode, as a user would from the shell."""

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


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_example_runs(name):
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
