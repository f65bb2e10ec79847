"""Checks that keep the repository's own instructions truthful."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _readme_commands():
  text = (ROOT / "README.md").read_text()
  return re.findall(r"```bash\n(.*?)\n```", text, re.S)


def test_ci_runs_the_readme_test_command():
  test_command = next(c for c in _readme_commands() if "pytest" in c and "venv" in c)
  assert test_command.strip() in (ROOT / ".ci" / "run").read_text()


def test_readme_demo_command_runs_the_quickstart():
  demo = next(c for c in _readme_commands() if "quickstart.py" in c)
  assert "pip install" in demo and (ROOT / "examples" / "quickstart.py").exists()
