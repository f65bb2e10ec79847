"""Packaging: jaxclip imports without its optional dependencies, and the extras
in pyproject.toml cover what the examples import."""

import ast
import importlib.util
import inspect
import json
import os
import pathlib
import subprocess
import sys
import textwrap
import tomllib

import pytest

import jaxclip

ROOT = pathlib.Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
# Top-level modules the examples import -> the distribution that provides them.
DISTRIBUTIONS = {"sklearn": "scikit-learn"}


def _requirement_name(requirement: str) -> str:
  name = requirement.split(";")[0]
  for sep in "<>=!~[ ":
    name = name.split(sep)[0]
  return name.strip().lower()


def _extra(name: str) -> set[str]:
  """The distributions an extra installs, following `jaxclip[...]` references."""
  names = set()
  for requirement in PYPROJECT["project"]["optional-dependencies"][name]:
    if requirement.startswith("jaxclip["):
      for extra in requirement[len("jaxclip[") : requirement.index("]")].split(","):
        names |= _extra(extra.strip())
    else:
      names.add(_requirement_name(requirement))
  return names


def test_core_dependencies_are_jax_and_optax_with_no_upper_bound():
  deps = PYPROJECT["project"]["dependencies"]
  assert sorted(_requirement_name(d) for d in deps) == ["jax", "optax"]
  assert not [d for d in deps if "<" in d], "CI tests the newest releases: no upper bound"


def test_oldest_constraints_pin_the_declared_lower_bounds():
  flax_extra = PYPROJECT["project"]["optional-dependencies"]["flax"]
  declared = {}
  for requirement in [*PYPROJECT["project"]["dependencies"], *flax_extra]:
    name, _, version = requirement.partition(">=")
    declared[name.strip()] = version.strip()
  pinned = {}
  for line in (ROOT / ".ci" / "oldest.txt").read_text().splitlines():
    line = line.split("#")[0].strip()
    if line:
      name, _, version = line.partition("==")
      pinned[name.strip()] = version.strip()
  for name, version in declared.items():
    assert pinned.get(name) == version, f".ci/oldest.txt must pin {name}=={version}"


@pytest.mark.parametrize("example", sorted(p.name for p in (ROOT / "examples").glob("*.py")))
def test_examples_extra_covers_every_import(example):
  tree = ast.parse((ROOT / "examples" / example).read_text())
  modules = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      modules |= {alias.name.split(".")[0] for alias in node.names}
    elif isinstance(node, ast.ImportFrom) and node.level == 0:
      modules.add(node.module.split(".")[0])
  third_party = modules - set(sys.stdlib_module_names) - {"__future__", "jaxclip"}
  core = {_requirement_name(d) for d in PYPROJECT["project"]["dependencies"]} | {"numpy"}
  needed = {DISTRIBUTIONS.get(m, m) for m in third_party} - core
  missing = sorted(needed - _extra("examples"))
  assert not missing, f"examples/{example} imports {missing}, not in the `examples` extra"


def test_every_public_name_loads_and_is_listed():
  pytest.importorskip("flax", reason="flax not installed: pip install 'jaxclip[flax]'")
  listed = dir(jaxclip)
  for name in jaxclip.__all__:
    assert name in listed
    assert getattr(jaxclip, name) is not None
  members = dict(inspect.getmembers(jaxclip))
  assert members["TrainState"] is jaxclip.TrainState
  assert inspect.isclass(jaxclip.TrainState)
  assert jaxclip.TrainState.__module__.startswith("jaxclip")
  with pytest.raises(AttributeError, match="no_such_name"):
    jaxclip.no_such_name  # noqa: B018


# Run with flax made unimportable (None in sys.modules stops an import).
WITHOUT_FLAX = textwrap.dedent(
  """
  import json
  import sys

  for name in ("flax", "flax.linen", "flax.training", "flax.nnx", "flax.struct"):
    sys.modules[name] = None

  import jax.numpy as jnp
  import optax

  import jaxclip

  loaded = sorted(n for n in jaxclip.__all__ if n != "TrainState" and getattr(jaxclip, n))
  tx = optax.chain(jaxclip.clip_by_global_norm(1.0), optax.sgd(0.1))
  params = {"w": jnp.ones(3)}
  _, state = tx.update({"w": jnp.full(3, 4.0)}, tx.init(params), params)
  errors = []
  for access in ("jaxclip.TrainState", "from jaxclip import TrainState"):
    try:
      exec(access)
    except ImportError as e:
      errors.append(str(e))
  print(json.dumps({
    "loaded": loaded,
    "dir_lists_it": "TrainState" in dir(jaxclip),
    "norm": float(state[0].norm),
    "errors": errors,
    "flax_loaded": "flax" in sys.modules and sys.modules["flax"] is not None,
  }))
  """
)


def test_import_without_flax():
  env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
  result = subprocess.run(
    [sys.executable, "-c", WITHOUT_FLAX], env=env, capture_output=True, text=True, timeout=120
  )
  assert result.returncode == 0, result.stderr[-3000:]
  out = json.loads(result.stdout.strip().splitlines()[-1])
  assert out["loaded"] == sorted(n for n in jaxclip.__all__ if n != "TrainState")
  assert out["dir_lists_it"] and not out["flax_loaded"]
  assert out["norm"] == pytest.approx(4.0 * 3**0.5)
  assert len(out["errors"]) == 2
  for error in out["errors"]:
    assert "jaxclip.TrainState needs Flax" in error
    assert "pip install 'jaxclip[flax]'" in error


def _root_conftest():
  spec = importlib.util.spec_from_file_location("jaxclip_root_conftest", ROOT / "conftest.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_doctests_that_need_an_extra_name_a_known_one():
  conftest = _root_conftest()
  needs = {
    extra
    for path in (ROOT / "jaxclip").glob("*.py")
    for extra in conftest.NEEDS_EXTRA.findall(path.read_text())
  }
  assert needs >= {"dp", "plot"}  # dp_epsilon, plot_norms
  assert needs <= set(conftest.EXTRA_MODULES)
  # Each extra installs the module that stands for it.
  distribution = {"dp_accounting": "dp-accounting"}
  for extra, module in conftest.EXTRA_MODULES.items():
    assert distribution.get(module, module) in _extra(extra)


def test_a_doctest_is_skipped_only_when_its_extra_is_missing(monkeypatch):
  conftest = _root_conftest()
  doc = "Does something.\n\n  Needs the `dp` extra: ``pip install 'jaxclip[dp]'``.\n"
  monkeypatch.setitem(conftest.EXTRA_MODULES, "dp", "a_module_that_is_not_installed")
  assert conftest.missing_extra(doc) == "dp"
  monkeypatch.setitem(conftest.EXTRA_MODULES, "dp", "json")  # always importable
  assert conftest.missing_extra(doc) is None
  assert conftest.missing_extra("No extra needed.") is None
  assert conftest.missing_extra(None) is None
  with pytest.raises(ValueError, match="unknown extra 'nope'"):
    conftest.missing_extra("Needs the `nope` extra.")


# Top-level modules of distributions whose name differs from the module's.
MODULES = {"orbax-checkpoint": "orbax"}


def _lean_modules() -> set[str]:
  """What a test module may import at its top level: the standard library,
  jaxclip's dependencies, the `test` extra and the tests' own modules.
  Anything else comes from another extra, and the lean install
  (`pip install -e ".[test]"`) has to skip the tests that need it."""
  distributions = {_requirement_name(r) for r in PYPROJECT["project"]["dependencies"]}
  distributions |= _extra("test")
  modules = {MODULES.get(d, d.replace("-", "_")) for d in distributions}
  local = {p.stem for p in (ROOT / "tests").glob("*.py")}
  return set(sys.stdlib_module_names) | modules | local | {"jaxclip", "tests"}


def _is_importorskip(node: ast.stmt) -> bool:
  """Whether a top-level statement calls `pytest.importorskip` (which skips the
  whole module, so that the imports after it need not be guarded)."""
  value = getattr(node, "value", None)
  func = getattr(value, "func", None)
  return isinstance(value, ast.Call) and getattr(func, "attr", None) == "importorskip"


@pytest.mark.parametrize("path", sorted((ROOT / "tests").glob("*.py")), ids=lambda p: p.name)
def test_test_modules_import_optional_packages_only_when_present(path):
  imported = set()
  for node in ast.parse(path.read_text()).body:  # top level only
    if _is_importorskip(node):
      break
    if isinstance(node, ast.Import):
      imported |= {alias.name.split(".")[0] for alias in node.names}
    elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
      imported.add(node.module.split(".")[0])
  optional = imported - _lean_modules()
  assert not optional, (
    f"{path.name} imports {sorted(optional)} at its top level: use"
    " pytest.importorskip so that the lean install (`.[test]`) skips it."
  )
