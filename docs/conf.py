"""Sphinx configuration of the fedjax_lite documentation (``python -m sphinx -W -b html docs docs/_build/html``).

The API reference is generated from the docstrings (autodoc + napoleon for the Google-style sections): one page
per sub-package of ``fedjax_lite``, written into ``api/`` when the build starts, so a new sub-package appears
without editing the docs; modules that users call by their own name (``training.distributed``) get a section on
their package's page. The tutorial notebooks of ``../notebooks`` are copied into ``tutorials/`` and rendered with
their stored outputs by myst-nb, which never executes them here (the test suite does).

Theme: furo (wide content area, tables and code scroll instead of being clipped). Cross-references into Python,
NumPy, JAX, optax, flax and matplotlib resolve through intersphinx inventories written from a table at each build
(``external_inventories.py``: the build never downloads, so it works offline), and every reference to those
projects must resolve (nitpicky mode for them; the library's own private helpers named in type hints are not
checked). Signatures name public types (``jax.Array``, not the class's private module path), and NamedTuple fields
are documented once, in the class's ``Attributes`` section.
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
sys.path.insert(0, str(DOCS))

import fedjax_lite  # noqa: E402

project = "fedjax_lite"
author = "the fedjax_lite authors"
copyright = "the fedjax_lite authors, Apache-2.0"  # noqa: A001 - Sphinx's name
release = fedjax_lite.__version__

extensions = ["sphinx.ext.autodoc", "sphinx.ext.napoleon", "sphinx.ext.mathjax", "sphinx.ext.intersphinx", "myst_nb"]
exclude_patterns = ["_build", "**.ipynb_checkpoints", "README.md"]
source_suffix = {".rst": "restructuredtext", ".md": "myst-nb", ".ipynb": "myst-nb"}
html_theme = "furo"
html_title = f"fedjax_lite {release}"

# intersphinx from local inventories (no network at build time); see external_inventories.py.
import external_inventories  # noqa: E402  (docs/, on sys.path above)

intersphinx_mapping = external_inventories.intersphinx_mapping(DOCS / "_inventories")
# Every reference into those projects must resolve (-W makes a miss an error). The library's own names in type
# hints (module-level aliases such as ``ClientFn``, private records) and napoleon's free-text "types" are not
# cross-reference targets of any inventory: they are not checked.
nitpicky = True
_EXTERNAL = r"(?:jax|jaxlib|numpy|np|optax|flax|matplotlib|collections|os|pathlib|typing)\b"
nitpick_ignore_regex = [(r"py:.*", rf"(?!{_EXTERNAL}).*")]

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


# Modules that the README tells users to call by their own name: a section on their package's page (their names are
# not in the package's ``__all__``).
MODULE_SECTIONS = {"training": ("distributed", "units")}


def _module_sections(package: str) -> str:
  sections = []
  for module in MODULE_SECTIONS.get(package, ()):
    title = f"fedjax_lite.{package}.{module}"
    sections.append(f"\n{title}\n{'-' * len(title)}\n\n.. automodule:: {title}\n")
  return "".join(sections)


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
    _write_if_changed(api / f"{name}.rst", f"{title}\n{'=' * len(title)}\n\n.. automodule:: {title}\n"
                      + _module_sections(name))
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


# Private module paths that autodoc prints for public types (the class's ``__module__``/``__qualname__``), and the
# public name each is documented under.
_PUBLIC_NAMES = (
    ("jax.jaxlib._jax.Array", "jax.Array"),
    ("jaxlib._jax.Array", "jax.Array"),
    ("jaxlib._jax.Device", "jax.Device"),
    ("jax._src.mesh.Mesh", "jax.sharding.Mesh"),
    ("jax._src.lax.lax.Precision", "jax.lax.Precision"),
    ("jax._src.sharding_impls.NamedSharding", "jax.sharding.NamedSharding"),
    ("jax._src.partition_spec.PartitionSpec", "jax.sharding.PartitionSpec"),
    ("optax._src.base.", "optax."),
    ("flax.linen.module.Module", "flax.linen.Module"),
    ("dp_accounting.privacy_accountant.", "dp_accounting."),
    ("dp_accounting.dp_event.", "dp_accounting."),
)
# Cross-reference targets written with an import alias (``np``) or a short alias of JAX's own hints (``jax.P``):
# the link goes to the public name, the text stays as written.
_TARGET_ALIASES = {"np.ndarray": "numpy.ndarray", "jax.P": "jax.sharding.PartitionSpec"}
# flax modules' dataclass fields every module has (its place in a parent module), with flax's private types.
_FLAX_MODULE_FIELDS = re.compile(r",?\s*\*?,?\s*\b(parent|name)\s*:[^,()]*(\([^()]*\)[^,()]*)*(=\s*[^,()]*)?(?=[,)])")


def _public_signature(text: str | None) -> str | None:
  if text is None:
    return None
  for private, public in _PUBLIC_NAMES:
    text = text.replace(private, public)
  return text


def _publish_signature(app, what, name, obj, options, signature, return_annotation):
  """Signatures with public type names; flax modules without flax's own ``parent``/``name`` fields."""
  del app, name, options
  signature, return_annotation = _public_signature(signature), _public_signature(return_annotation)
  if what == "class" and signature and _is_flax_module(obj):
    signature = _FLAX_MODULE_FIELDS.sub("", signature).replace("(, ", "(")
    # Defaults printed as reprs (<class 'jax.numpy.float32'>, <function zeros>) do not parse as Python: written as
    # the expressions they come from, so that the signature renders with linked, short type names.
    signature = re.sub(r"<class '([\w.]+)'>", r"\1", signature)
    signature = re.sub(r"<function ([\w]+)\.<locals>\.\w+>", r"\1(...)", signature)
    signature = re.sub(r"<function ([\w.]+)>", r"\1", signature)
  return signature, return_annotation


def _publish_type_names(app, doctree):
  """The same renaming in the rest of the API pages (attribute types, field lists): cross-reference targets and
  text."""
  from docutils import nodes  # pylint: disable=import-outside-toplevel
  from sphinx import addnodes  # pylint: disable=import-outside-toplevel

  if not app.env.docname.startswith("api/"):
    return
  for reference in doctree.findall(addnodes.pending_xref):
    target = _public_signature(reference.get("reftarget"))
    reference["reftarget"] = _TARGET_ALIASES.get(target, target)
  for text in list(doctree.findall(nodes.Text)):
    renamed = _public_signature(str(text))
    if renamed != str(text):
      text.parent.replace(text, nodes.Text(renamed))


def _is_flax_module(obj) -> bool:
  try:
    import flax.linen  # pylint: disable=import-outside-toplevel

    return isinstance(obj, type) and issubclass(obj, flax.linen.Module)
  except ImportError:
    return False


def _skip_named_tuple_field_aliases(app, what, name, obj, skip, options):
  """A NamedTuple's fields are documented by its class docstring (``Attributes:``); the generated accessor
  (docstring "Alias for field number N") would list each field a second time."""
  del app, what, name, options
  if (obj.__doc__ or "").startswith("Alias for field number"):
    return True
  return skip


_LITERAL_FOLLOWED_BY_LETTER = re.compile(r"(``[^`\s](?:[^`]*[^`\s])?``)(?=[A-Za-z0-9])")


def _escape_literal_suffixes(app, what, name, obj, options, lines):
  """``jax.Array``s (a plural written after an inline literal) is not valid reStructuredText: the literal's end
  must be followed by a space or punctuation. The docstrings use that plural often, so it is written here as
  ``jax.Array``\\ s, which renders the same without the warning."""
  del app, what, name, obj, options
  lines[:] = [_LITERAL_FOLLOWED_BY_LETTER.sub(r"\1\\ ", line) for line in lines]


def setup(app):
  app.connect("autodoc-process-docstring", _escape_literal_suffixes)
  app.connect("autodoc-process-signature", _publish_signature)
  app.connect("autodoc-skip-member", _skip_named_tuple_field_aliases)
  app.connect("doctree-read", _publish_type_names)
