"""Every docstring example of the library runs as written (doctest), so the API reference never shows a broken one.

Each module of ``fedjax_lite`` whose docstrings hold ``>>>`` examples is a test case: its examples run with
:mod:`doctest` (``ELLIPSIS`` and ``NORMALIZE_WHITESPACE`` on). An example that cannot run here (it downloads
data, needs an accelerator, or is slow) is written without the ``>>>`` prompt (an ``Example::`` literal block) or
marked ``# doctest: +SKIP``.
"""

from __future__ import annotations

import doctest
import importlib
import pathlib
import pkgutil

import pytest

import fedjax_lite

PACKAGE_DIR = pathlib.Path(fedjax_lite.__file__).parent


def modules_with_examples() -> list[str]:
  names = []
  for module in pkgutil.walk_packages([str(PACKAGE_DIR)], prefix="fedjax_lite."):
    relative = module.name.split(".")[1:]
    path = PACKAGE_DIR.joinpath(*relative)
    file = path / "__init__.py" if module.ispkg else path.with_suffix(".py")
    if file.is_file() and ">>>" in file.read_text():
      names.append(module.name)
  return sorted(names)


MODULES = modules_with_examples()


def test_some_modules_have_examples():
  assert "fedjax_lite.training.tracking" in MODULES


@pytest.mark.parametrize("module_name", MODULES)
def test_docstring_examples_run(module_name):
  module = importlib.import_module(module_name)
  finder = doctest.DocTestFinder(exclude_empty=True)
  runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
  tests = [test for test in finder.find(module, module_name) if test.examples]
  # Only the module's own objects: re-exported ones are tested in the module that defines them.
  tests = [test for test in tests if test.filename is None or pathlib.Path(test.filename).resolve()
           == pathlib.Path(module.__file__).resolve()]
  assert tests, f"{module_name} has '>>>' in its source but no runnable docstring example"
  failures = []
  for test in tests:
    result = runner.run(test, out=failures.append, clear_globs=True)
    del result
  assert runner.failures == 0, "".join(failures)
