"""The documentation site: every public name is on an API page, the code on the
hand-written pages runs, and `mkdocs build --strict` passes."""

import importlib
import importlib.util
import os
import pathlib
import re
import subprocess
import sys

import pytest

import jaxclip

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
# A mkdocstrings entry: `::: jaxclip.name` alone on its line.
DIRECTIVE = re.compile(r"^:::[ \t]+([\w.]+)[ \t]*$", re.MULTILINE)
COMPAT_MODULES = ("tf", "torch", "keras")
# Pages whose ```python blocks are self-contained and run top to bottom.
RUNNABLE_PAGES = ("index.md", "getting_started.md", "which_clipping.md")
DOCS_PACKAGES = ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers.python")


def installed(module: str) -> bool:
  try:
    return importlib.util.find_spec(module) is not None
  except ModuleNotFoundError:  # a parent package is missing
    return False


def documented(page: str) -> set[str]:
  return set(DIRECTIVE.findall((DOCS / page).read_text()))


def missing_message(page: str, missing: list[str]) -> str:
  entries = "\n".join(f"::: {name}" for name in missing)
  return (
    f"{len(missing)} public name(s) have no entry in docs/{page}: {', '.join(missing)}.\n"
    f"Add these lines under the right heading of docs/{page}:\n{entries}"
  )


def test_every_public_name_is_in_api_md():
  names = documented("api.md")
  missing = [f"jaxclip.{n}" for n in jaxclip.__all__ if f"jaxclip.{n}" not in names]
  assert not missing, missing_message("api.md", missing)


def test_every_compat_function_is_in_api_compat_md():
  names = documented("api_compat.md")
  missing = []
  for module in COMPAT_MODULES:
    mod = importlib.import_module(f"jaxclip.compat.{module}")
    missing += [f"{mod.__name__}.{n}" for n in mod.__all__ if f"{mod.__name__}.{n}" not in names]
  assert not missing, missing_message("api_compat.md", missing)


@pytest.mark.parametrize("page", ["api.md", "api_compat.md"])
def test_api_pages_list_only_public_names(page):
  """An entry for a name that is not public (renamed, removed, private) is stale."""
  public = {f"jaxclip.{n}" for n in jaxclip.__all__}
  for module in COMPAT_MODULES:
    mod = importlib.import_module(f"jaxclip.compat.{module}")
    public |= {mod.__name__} | {f"{mod.__name__}.{n}" for n in mod.__all__}
  stale = sorted(documented(page) - public)
  assert not stale, f"docs/{page} documents names that are not public: {', '.join(stale)}"


@pytest.mark.parametrize("page", RUNNABLE_PAGES)
def test_page_code_runs(page):
  """The Python blocks of a page run in order in one namespace, as a reader would."""
  blocks = re.findall(r"^```python\n(.*?)^```", (DOCS / page).read_text(), re.S | re.M)
  assert blocks, f"docs/{page} has no ```python block"
  namespace: dict = {"__name__": f"docs_{page}"}
  for i, block in enumerate(blocks):
    try:
      exec(compile(block, f"docs/{page} block {i + 1}", "exec"), namespace)
    except Exception as e:
      raise AssertionError(f"docs/{page}, python block {i + 1} failed:\n{block}") from e


def test_site_builds_strict(tmp_path):
  """`mkdocs build --strict`: a broken link, page or API reference fails it."""
  absent = [p for p in DOCS_PACKAGES if not installed(p)]
  if absent:
    pytest.skip(
      f"documentation tools not installed ({', '.join(absent)}): install the docs"
      " extra, `pip install -e '.[docs]'`, to build the site"
    )
  env = dict(os.environ, NO_MKDOCS_2_WARNING="1", JAX_PLATFORMS="cpu")
  result = subprocess.run(
    [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )
  log = "\n".join(
    line for line in result.stderr.splitlines() if "WARNING" in line or "ERROR" in line
  )
  assert result.returncode == 0, f"mkdocs build --strict failed:\n{log or result.stderr[-3000:]}"
  assert (tmp_path / "site" / "api" / "index.html").exists()
