"""The documentation site: Sphinx builds it in strict mode (every warning is an error), offline, with an API page per
sub-package, every tutorial notebook rendered (not executed), and the "coming from TFF" page naming only things
that exist. The API pages link into JAX, NumPy, optax and Python's docs (local intersphinx inventories; every
reference into those projects must resolve), name public types only, and list NamedTuple fields once."""

from __future__ import annotations

import html as html_lib
import importlib
import pathlib
import pkgutil
import re
import subprocess
import sys

import pytest

import fedjax_lite

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
TFF_PAGE = (DOCS / "coming_from_tff.md").read_text()
SUBPACKAGES = sorted(module.name for module in pkgutil.iter_modules(fedjax_lite.__path__) if module.ispkg)


def _visible_text(page: pathlib.Path) -> str:
  return html_lib.unescape(re.sub(r"<[^>]*>", "", page.read_text()))


def test_docs_build_in_strict_mode(tmp_path):
  pytest.importorskip("sphinx")
  pytest.importorskip("myst_nb")
  pytest.importorskip("furo")
  html = tmp_path / "html"
  completed = subprocess.run(
      [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-b", "html", "-q", "-d", str(tmp_path / "doctrees"),
       str(DOCS), str(html)], capture_output=True, text=True, timeout=600, cwd=ROOT)
  assert completed.returncode == 0, completed.stdout[-5000:] + completed.stderr[-5000:]
  for name in SUBPACKAGES:  # the API reference: one page per sub-package, from the docstrings
    page = (html / "api" / f"{name}.html").read_text()
    module = importlib.import_module(f"fedjax_lite.{name}")
    documented = [public for public in module.__all__ if callable(getattr(module, public))]  # not constants
    for public in documented[:3]:
      assert public in page, (name, public)
  assert "robust_aggregator" in (html / "api" / "aggregators.html").read_text()
  for notebook in sorted((ROOT / "notebooks").glob("*.ipynb")):  # rendered with their stored plots
    page = (html / "tutorials" / f"{notebook.stem}.html").read_text()
    assert "What you learn" in page and "_images/" in page, notebook.name
  assert "build_weighted_fed_avg" in (html / "coming_from_tff.html").read_text()
  # A wide, maintained theme (alabaster clipped tables and code).
  assert "furo" in (html / "index.html").read_text()
  api_pages = sorted((html / "api").glob("*.html"))
  for page in api_pages:
    text = _visible_text(page)
    # Records' fields appear once (the class's Attributes), not again as "Alias for field number N".
    assert "Alias for field number" not in text, page.name
    # Public type names only: no private module paths of jax, optax, flax or dp_accounting.
    assert not re.search(r"jaxlib\._jax|\b_src\.|flax\.linen\.module\.|_Sentinel|flax\.core\.scope|"
                         r"dp_accounting\.privacy_accountant", text), (page.name, re.findall(r".{60}_src\..{20}", text))
  # training.distributed, which the README tells users to call, is in the reference.
  training = _visible_text(html / "api" / "training.html")
  for name in ("fedjax_lite.training.distributed", "global_client_mesh", "ProcessShard", "distribute_process"):
    assert name in training, name
  # Cross-references into JAX, NumPy, optax and Python resolve to their published pages.
  core, algorithms = (html / "api" / "core.html").read_text(), (html / "api" / "algorithms.html").read_text()
  assert 'href="https://docs.jax.dev/en/latest/_autosummary/jax.Array.html#jax.Array"' in core
  assert 'href="https://numpy.org/doc/stable/reference/generated/numpy.ndarray.html#numpy.ndarray"' in core
  assert ('href="https://optax.readthedocs.io/en/latest/api/transformations.html#optax.GradientTransformation"'
          in algorithms)
  assert 'href="https://docs.python.org/3/library/collections.abc.html#collections.abc.Callable"' in algorithms


def test_intersphinx_reads_local_inventories_only(tmp_path):
  """The build never downloads an inventory (it runs offline in CI): every mapping names a local file, written
  from the table in docs/external_inventories.py in Sphinx's inventory format."""
  sphinx_inventory = pytest.importorskip("sphinx.util.inventory")
  import importlib.util

  spec = importlib.util.spec_from_file_location("external_inventories", DOCS / "external_inventories.py")
  inventories = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(inventories)
  mapping = inventories.intersphinx_mapping(tmp_path)
  assert set(mapping) >= {"python", "numpy", "jax", "optax"}
  for project, (base_url, location) in mapping.items():
    assert base_url.startswith("https://") and pathlib.Path(location).is_file(), project
    with open(location, "rb") as stream:
      loaded = sphinx_inventory.InventoryFile.load(stream, base_url, lambda base, page: base + page)
    entries = loaded.data if hasattr(loaded, "data") else loaded  # Sphinx >= 8.2 returns an _Inventory
    names = {name for role in entries.values() for name in role}
    assert names == {name for role in inventories.INVENTORIES[project][1].values() for name in role}, project


def test_tff_page_names_only_existing_fedjax_lite_api():
  # Code spans that start with a fedjax_lite package (TFF's own names start with tff.).
  qualified = set(re.findall(r"`(core|aggregators|algorithms|privacy|training|models|datasets)\.(\w+)",
                             TFF_PAGE))
  assert len(qualified) > 20
  for package, name in sorted(qualified):
    assert hasattr(importlib.import_module(f"fedjax_lite.{package}"), name), f"{package}.{name}"
  # The aggregator table's right column names fedjax_lite.aggregators builders.
  section = TFF_PAGE.split("## Aggregator factories", 1)[1].split("\n## ", 1)[0]
  from fedjax_lite import aggregators

  builders = set()
  for row in section.splitlines():
    cells = row.split("|")
    if len(cells) > 3 and not set(cells[2].strip()) <= set("-"):
      builders.update(re.findall(r"`(\w+)\(", cells[2]))
  assert {"robust_aggregator", "zeroing", "gaussian_adaptive", "secure_sum"} <= builders
  for name in sorted(builders):
    assert hasattr(aggregators, name), name


def test_docs_name_the_readme_repository_url():
  readme_urls = set(re.findall(r"git\+(https://github\.com/[\w.-]+/[\w.-]+)", (ROOT / "README.md").read_text()))
  assert len(readme_urls) == 1
  for page in DOCS.glob("*.md"):
    for url in re.findall(r"git\+(https://[^\s\"')]+)", page.read_text()):
      assert url in readme_urls, (page.name, url)
