"""The threshold study (benchmarks/threshold_study.py) runs end to end, in smoke mode."""

import json
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_threshold_study_smoke(tmp_path):
  out = tmp_path / "study.json"
  result = subprocess.run(
    [
      sys.executable,
      str(ROOT / "benchmarks" / "threshold_study.py"),
      "--smoke",
      "--json",
      str(out),
    ],
    capture_output=True,
    text=True,
    timeout=600,
    cwd=ROOT,
  )
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  assert "| global |" in result.stdout and "suggested/best final loss" in result.stdout
  (task,) = json.loads(out.read_text())
  assert len(task["sweeps"]["global"]) == 8
  assert set(task["adaptive"]) >= {"autoclip", "zclip", "adagc", "quantile_clip"}
  assert all(point["runs"] == 1 for point in task["sweeps"]["value"])
