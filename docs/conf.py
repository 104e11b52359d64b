"""Sphinx configuration of the fedjax_lite documentation (``python -m sphinx -W -b html docs docs/_build/html``).

The API reference is generated from the docstrings (autodoc + napoleon for the Google-style sections): one page
per sub-package of ``fedjax_lite``, written into ``api/`` when the build starts, so a new sub-package appears
without editing the docs. The tutorial notebooks of ``../notebooks`` are copied into ``tutorials/`` and rendered
with their stored outputs by myst-nb, which never executes them here (the test suite does).
"""

from __future__ import annotations

import pathlib
import re
import pkgutil
import shutil
import sys

DOCS = pathlib.Path(__file__).resolve().parent
ROOT = DOCS.parent
sys.path.insert(0, str(ROOT))

import fedjax_lite  # noqa: E402

project = "fedjax_lite"
author = "the fedjax_lite authors"
copyright = "the fedjax_lite authors, Apache-2.0"  # noqa: A001 - Sphinx's name
release = fedjax_lite.__version__

extensions = ["sphinx.ext.autodoc", "sphinx.ext.napoleon", "sphinx.ext.mathjax", "myst_nb"]
exclude_patterns = ["_build", "**.ipynb_checkpoints", "README.md"]
source_suffix = {".rst": "restructuredtext", ".md": "myst-nb", ".ipynb": "myst-nb"}
html_theme = "alabaster"
html_title = f"fedjax_lite {release}"

# autodoc: members in each package's __all__ (re-exported from its modules), in source order.
autodoc_default_options = {"members": True, "imported-members": True, "member-order": "bysource"}
autodoc_typehints = "signature"
autodoc_preserve_defaults = True
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
napoleon_use_ivar = True  # Attributes: sections as fields, so NamedTuple fields are not described twice

# myst-nb: render the stored outputs, never execute.
nb_execution_mode = "off"
myst_enable_extensions = ["dollarmath"]
myst_heading_anchors = 3
suppress_warnings = ["mystnb.unknown_mime_type"]


def _write_if_changed(path: pathlib.Path, text: str) -> None:
  if not path.exists() or path.read_text() != text:
    path.write_text(text)


def _generate_api_pages() -> None:
  """``api/<package>.rst`` for every sub-package of fedjax_lite (regenerated at each build)."""
  api = DOCS / "api"
  api.mkdir(exist_ok=True)
  packages = sorted(module.name for module in pkgutil.iter_modules(fedjax_lite.__path__) if module.ispkg)
  for stale in api.glob("*.rst"):
    if stale.stem not in packages:
      stale.unlink()
  for name in packages:
    title = f"fedjax_lite.{name}"
    _write_if_changed(api / f"{name}.rst", f"{title}\n{'=' * len(title)}\n\n.. automodule:: {title}\n")
  _write_if_changed(api / "index.rst", "API reference\n=============\n\nOne page per sub-package: its public API "
                    "(the names in its ``__all__``) with the docstrings.\n\n.. toctree::\n   :maxdepth: 1\n\n"
                    + "".join(f"   {name}\n" for name in packages))


def _copy_notebooks() -> None:
  """The tutorials, copied from ``../notebooks`` (rendered with their stored outputs)."""
  tutorials = DOCS / "tutorials"
  tutorials.mkdir(exist_ok=True)
  notebooks = sorted((ROOT / "notebooks").glob("*.ipynb"))
  for stale in tutorials.glob("*.ipynb"):
    if not (ROOT / "notebooks" / stale.name).exists():
      stale.unlink()
  for notebook in notebooks:
    target = tutorials / notebook.name
    if not target.exists() or target.read_bytes() != notebook.read_bytes():
      shutil.copyfile(notebook, target)
  _write_if_changed(tutorials / "index.md", "# Tutorials\n\nThe notebooks of `notebooks/`, with the outputs of "
                    "their last full run. Each opens in Colab from its badge.\n\n```{toctree}\n:maxdepth: 1\n\n"
                    + "".join(f"{notebook.stem}\n" for notebook in notebooks) + "```\n")


_generate_api_pages()
_copy_notebooks()


_LITERAL_FOLLOWED_BY_LETTER = re.compile(r"(``[^`\s](?:[^`]*[^`\s])?``)(?=[A-Za-z0-9])")


def _escape_literal_suffixes(app, what, name, obj, options, lines):
  """``jax.Array``s (a plural written after an inline literal) is not valid reStructuredText: the literal's end
  must be followed by a space or punctuation. The docstrings use that plural often, so it is written here as
  ``jax.Array``\\ s, which renders the same without the warning."""
  del app, what, name, obj, options
  lines[:] = [_LITERAL_FOLLOWED_BY_LETTER.sub(r"\1\\ ", line) for line in lines]


def setup(app):
  app.connect("autodoc-process-docstring", _escape_literal_suffixes)
