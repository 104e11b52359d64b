"""The documentation site: Sphinx builds it in strict mode (every warning is an error), with an API page per
sub-package, every tutorial notebook rendered (not executed), and the "coming from TFF" page naming only things
that exist."""

from __future__ import annotations

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


def test_docs_build_in_strict_mode(tmp_path):
  pytest.importorskip("sphinx")
  pytest.importorskip("myst_nb")
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
