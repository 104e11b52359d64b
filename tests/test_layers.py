"""The layout tells the truth: every module's imports follow :data:`fedjax_lite.layers.LAYERS` (no upward or
sideways import between sub-packages, no import cycle between modules), and the package docstring and the README's
architecture table state the same order.

Imports are read with ``ast`` from the source (nothing is imported), including those inside functions (lazy imports
are dependencies too). ``from X import y`` depends on the module ``X.y`` when there is one, else on ``X`` itself.
"""

from __future__ import annotations

import ast
import pathlib
import re

import pytest

import fedjax_lite
from fedjax_lite import layers

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "fedjax_lite"


def module_name(path: pathlib.Path, package_dir: pathlib.Path) -> str:
  parts = list(path.relative_to(package_dir.parent).with_suffix("").parts)
  if parts[-1] == "__init__":
    parts.pop()
  return ".".join(parts)


def imports_of(source: str, module: str, is_package: bool, modules: set[str]) -> list[tuple[str, int]]:
  """``(imported module, line)`` for every import statement of ``source`` (the module ``module``)."""
  found = []
  for node in ast.walk(ast.parse(source)):
    if isinstance(node, ast.Import):
      found += [(alias.name, node.lineno) for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:  # relative: resolved against this module's package
        package = module.split(".") if is_package else module.split(".")[:-1]
        package = package[:len(package) - (node.level - 1)]
        base = ".".join(package + ([base] if base else []))
      for alias in node.names:
        candidate = f"{base}.{alias.name}"
        found.append((candidate if candidate in modules else base, node.lineno))
  return found


class ImportGraph(dict):
  """Module name -> ``[(imported module of the package, line), ...]``; ``packages`` holds the sub-packages' names."""

  packages: frozenset[str] = frozenset()


def import_graph(package_dir: pathlib.Path) -> ImportGraph:
  """The imports between the modules of the package in ``package_dir`` (with the line of each import)."""
  paths = {module_name(path, package_dir): path for path in sorted(package_dir.rglob("*.py"))}
  root = package_dir.name
  graph = ImportGraph()
  graph.packages = frozenset(path.parent.name for path in package_dir.glob("*/__init__.py"))
  for name, path in paths.items():
    edges = imports_of(path.read_text(), name, path.name == "__init__.py", set(paths))
    graph[name] = [(target, line) for target, line in edges if target == root or target.startswith(root + ".")]
  return graph


def layering_violations(graph: ImportGraph, layer_list) -> list[str]:
  """Every import that goes up a layer, sideways to another sub-package of the same layer, or into the top-level
  package (which imports every layer), named by module, line and import. A top-level module other than the
  package's ``__init__`` (``layers``) imports no layer."""
  rank = {package: index for index, packages in enumerate(layer_list) for package in packages}
  problems = []
  for module, edges in sorted(graph.items()):
    parts = module.split(".")
    if len(parts) == 1:  # the top-level package: it imports every layer
      continue
    importer = parts[1]
    for target, line in edges:
      where = f"{module} (line {line}) imports {target}"
      target_parts = target.split(".")
      if importer not in graph.packages:
        problems.append(f"{where}: a top-level module imports no layer")
      elif len(target_parts) == 1 or target_parts[1] not in graph.packages:
        problems.append(f"{where}: the top-level package and its modules import no layer's module back")
      elif importer not in rank:
        problems.append(f"{where}: fedjax_lite.{importer} is in no layer of fedjax_lite.layers.LAYERS")
      elif target_parts[1] == importer:
        continue
      elif target_parts[1] not in rank:
        problems.append(f"{where}: fedjax_lite.{target_parts[1]} is in no layer of fedjax_lite.layers.LAYERS")
      elif rank[target_parts[1]] > rank[importer]:
        problems.append(f"{where}: an upward import (layer {rank[target_parts[1]]} above layer {rank[importer]})")
      elif rank[target_parts[1]] == rank[importer]:
        problems.append(f"{where}: a sideways import within layer {rank[importer]} {layer_list[rank[importer]]}")
  return problems


def import_cycles(graph: ImportGraph) -> list[str]:
  """Each import cycle once, as ``a (line) -> b (line) -> ... -> a`` (depth-first search for back edges)."""
  cycles, state, stack = [], {}, []

  def visit(module):
    state[module] = "open"
    for target, line in graph.get(module, []):
      if target == module:
        continue
      stack.append((module, line))
      if state.get(target) == "open":
        start = next(i for i, (name, _) in enumerate(stack) if name == target)
        cycles.append(" -> ".join(f"{name} (line {at})" for name, at in stack[start:]) + f" -> {target}")
      elif target not in state:
        visit(target)
      stack.pop()
    state[module] = "done"

  for module in sorted(graph):
    if module not in state:
      visit(module)
  return cycles


def sub_packages() -> list[str]:
  return sorted(path.parent.name for path in PACKAGE.glob("*/__init__.py"))


# --- the library --------------------------------------------------------------------------------------------------

def test_every_sub_package_has_a_layer():
  listed = [package for packages in layers.LAYERS for package in packages]
  assert len(listed) == len(set(listed)), f"a package is listed twice in LAYERS: {layers.LAYERS}"
  for package in sub_packages():
    layers.layer_of(package)  # KeyError naming the package otherwise


def test_no_upward_or_sideways_import():
  assert layering_violations(import_graph(PACKAGE), layers.LAYERS) == []


def test_no_import_cycle():
  assert import_cycles(import_graph(PACKAGE)) == []


def test_package_docstring_states_the_order():
  assert layers.describe() in " ".join(fedjax_lite.__doc__.split())
  assert re.search(r"\bprivacy\b.*\baggregators\b", layers.describe())  # privacy sits below the aggregators


def test_readme_architecture_table_follows_the_layers():
  """The table under "## Architecture" lists the layers in order, one row each (packages named fedjax_lite.X)."""
  section = (ROOT / "README.md").read_text().split("\n## Architecture", 1)[1].split("\n## ", 1)[0]
  rows = [row for row in section.splitlines() if re.match(r"\|\s*\d+\s*\|", row)]
  table = [tuple(re.findall(r"`fedjax_lite\.(\w+)`", row.split("|")[2])) for row in rows]
  existing = set(sub_packages())
  expected = [tuple(p for p in packages if p in existing) for packages in layers.LAYERS]
  assert table == [packages for packages in expected if packages], (
      "README's architecture table and fedjax_lite/layers.py disagree")


# --- the checks themselves catch what they claim ------------------------------------------------------------------

def write_package(root: pathlib.Path, files: dict[str, str]) -> pathlib.Path:
  for relative, source in files.items():
    path = root / "fedjax_lite" / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(source)
  return root / "fedjax_lite"


TOY_LAYERS = (("core",), ("privacy",), ("aggregators",), ("algorithms", "analytics"))


def test_an_upward_import_is_named(tmp_path):
  package = write_package(tmp_path, {
      "__init__.py": "from fedjax_lite import core, privacy\n",
      "core/__init__.py": "",
      "core/tree.py": "import jax\n",
      "core/runner.py": "from fedjax_lite.core import tree\n\n\ndef f():\n  from fedjax_lite.privacy import noise\n",
      "privacy/__init__.py": "",
      "privacy/noise.py": "from fedjax_lite.core.tree import x\n",
  })
  problems = layering_violations(import_graph(package), TOY_LAYERS)
  assert problems == ["fedjax_lite.core.runner (line 5) imports fedjax_lite.privacy.noise: an upward import "
                      "(layer 1 above layer 0)"]


def test_a_sideways_import_and_imports_of_the_top_level_are_named(tmp_path):
  package = write_package(tmp_path, {
      "__init__.py": "",
      "algorithms/__init__.py": "",
      "algorithms/fed_avg.py": "from fedjax_lite.analytics import histogram\n",
      "analytics/__init__.py": "",
      "analytics/histogram.py": "import fedjax_lite\n",
      "layers.py": "from fedjax_lite.algorithms import fed_avg\n",
  })
  problems = layering_violations(import_graph(package), TOY_LAYERS)
  assert len(problems) == 3
  assert "fedjax_lite.algorithms.fed_avg (line 1) imports fedjax_lite.analytics.histogram: a sideways" in problems[0]
  assert "fedjax_lite.analytics.histogram (line 1) imports fedjax_lite: the top-level package" in problems[1]
  assert problems[2] == ("fedjax_lite.layers (line 1) imports fedjax_lite.algorithms.fed_avg: a top-level module "
                         "imports no layer")


def test_a_package_in_no_layer_is_named(tmp_path):
  package = write_package(tmp_path, {
      "__init__.py": "", "systems/__init__.py": "", "systems/clock.py": "from fedjax_lite.core import tree\n",
      "core/__init__.py": "", "core/tree.py": "",
  })
  problems = layering_violations(import_graph(package), TOY_LAYERS)
  assert problems == ["fedjax_lite.systems.clock (line 1) imports fedjax_lite.core.tree: fedjax_lite.systems is "
                      "in no layer of fedjax_lite.layers.LAYERS"]
  # Adding the layer is one line: the same tree then passes.
  with_systems = TOY_LAYERS[:1] + (("systems",),) + TOY_LAYERS[1:]
  assert layering_violations(import_graph(package), with_systems) == []


def test_a_cycle_is_named_with_its_imports(tmp_path):
  package = write_package(tmp_path, {
      "__init__.py": "",
      "core/__init__.py": "from fedjax_lite.core.runner import run\n",
      "core/runner.py": "from . import packing\n",
      "core/packing.py": "import numpy\nfrom fedjax_lite.core import run\n",  # `run` is no module: the package
  })
  cycles = import_cycles(import_graph(package))
  assert cycles == ["fedjax_lite.core (line 1) -> fedjax_lite.core.runner (line 1) -> fedjax_lite.core.packing "
                    "(line 2) -> fedjax_lite.core"]
  assert layering_violations(import_graph(package), TOY_LAYERS) == []  # within one package: only the cycle check


def test_relative_imports_resolve_against_the_package(tmp_path):
  package = write_package(tmp_path, {
      "__init__.py": "", "core/__init__.py": "from .tree import x\nfrom . import runner\n",
      "core/tree.py": "", "core/runner.py": "from ..privacy import noise\nfrom .tree import y\n",
      "privacy/__init__.py": "", "privacy/noise.py": "",
  })
  graph = import_graph(package)
  assert graph["fedjax_lite.core"] == [("fedjax_lite.core.tree", 1), ("fedjax_lite.core.runner", 2)]
  assert graph["fedjax_lite.core.runner"] == [("fedjax_lite.privacy.noise", 1), ("fedjax_lite.core.tree", 2)]


@pytest.mark.parametrize("package", ["core", "training"])
def test_layer_of_names_a_missing_package(package):
  assert layers.layer_of(package) in range(len(layers.LAYERS))
  with pytest.raises(KeyError, match="fedjax_lite.nowhere is in no layer"):
    layers.layer_of("nowhere")
