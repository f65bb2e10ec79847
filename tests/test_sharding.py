"""Runs the multi-device checks on 8 host CPU devices, in a pytest of its own.

The device count must be set (XLA_FLAGS) before jax starts, which has already
happened in this session.
"""

import os
import pathlib
import re
import subprocess
import sys

import pytest

HERE = pathlib.Path(__file__).parent


@pytest.mark.multidevice
def test_multidevice_checks_pass():
  env = dict(os.environ)
  env["XLA_FLAGS"] = (
    env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
  ).strip()
  env["JAX_PLATFORMS"] = "cpu"
  result = subprocess.run(
    [
      sys.executable,
      "-m",
      "pytest",
      "-q",
      "-p",
      "no:cacheprovider",
      str(HERE / "multidevice" / "checks_multidevice.py"),
    ],
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
    cwd=HERE.parent,
  )
  assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
  assert " passed" in result.stdout and not re.search(r"\d+ (failed|error)", result.stdout)
