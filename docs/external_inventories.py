"""The cross-references from the API reference into the docs of Python, NumPy, JAX, optax, flax and matplotlib.

Sphinx's intersphinx normally downloads each project's ``objects.inv`` when the docs build; the build must work
offline (CI and the test suite run without network), so the inventories are written here, at each build, from the
table below into ``_inventories/`` (git-ignored) and intersphinx reads those local files. Each entry is a public
name and its page in that project's published docs (``$`` stands for the name, as in Sphinx's inventory format).
A name the docstrings or type hints use that is missing here makes the strict build fail with "reference target not
found": add it to the table, with the page that documents it.
"""

from __future__ import annotations

import pathlib
import zlib

# project: (base URL of its docs, {role: {name: page relative to the base URL}})
INVENTORIES = {
    "python": ("https://docs.python.org/3/", {
        "py:class": {
            "collections.abc.Callable": "library/collections.abc.html#$",
            "collections.abc.Iterable": "library/collections.abc.html#$",
            "collections.abc.Iterator": "library/collections.abc.html#$",
            "collections.abc.Mapping": "library/collections.abc.html#$",
            "collections.abc.Sequence": "library/collections.abc.html#$",
            "os.PathLike": "library/os.html#$",
            "pathlib.Path": "library/pathlib.html#$",
            "typing.Any": "library/typing.html#$",
            "typing.Protocol": "library/typing.html#$",
            "typing.NamedTuple": "library/typing.html#$",
            "Exception": "library/exceptions.html#$",
            "ValueError": "library/exceptions.html#$",
            "TypeError": "library/exceptions.html#$",
            "RuntimeError": "library/exceptions.html#$",
            "ImportError": "library/exceptions.html#$",
            "FileNotFoundError": "library/exceptions.html#$",
            "KeyboardInterrupt": "library/exceptions.html#$",
        },
    }),
    "numpy": ("https://numpy.org/doc/stable/", {
        "py:class": {
            "numpy.ndarray": "reference/generated/numpy.ndarray.html#$",
            "numpy.dtype": "reference/generated/numpy.dtype.html#$",
            "numpy.number": "reference/arrays.scalars.html#$",
            "numpy.bool": "reference/arrays.scalars.html#$",
            "numpy.float32": "reference/arrays.scalars.html#$",
            "numpy.int32": "reference/arrays.scalars.html#$",
            "numpy.random.Generator": "reference/random/generator.html#$",
        },
    }),
    "jax": ("https://docs.jax.dev/en/latest/", {
        "py:class": {
            "jax.Array": "_autosummary/jax.Array.html#$",
            "jax.Device": "_autosummary/jax.Device.html#$",
            "jax.ShapeDtypeStruct": "_autosummary/jax.ShapeDtypeStruct.html#$",
            "jax.lax.Precision": "jax.lax.html#$",
            "jax.sharding.Mesh": "jax.sharding.html#$",
            "jax.sharding.NamedSharding": "jax.sharding.html#$",
            "jax.sharding.PartitionSpec": "jax.sharding.html#$",
            "jax.nn.initializers.Initializer": "_autosummary/jax.nn.initializers.Initializer.html#$",
            "jax.numpy.float32": "_autosummary/jax.numpy.float32.html#$",
            # Not a JAX class: the type hints' name for a nested structure of arrays (JAX's pytree guide).
            "PyTree": "pytrees.html",
        },
    }),
    "optax": ("https://optax.readthedocs.io/en/latest/", {
        "py:class": {
            "optax.GradientTransformation": "api/transformations.html#$",
            "optax.GradientTransformationExtraArgs": "api/transformations.html#$",
            "optax.OptState": "api/transformations.html#$",
            "optax.Params": "api/transformations.html#$",
            "optax.Updates": "api/transformations.html#$",
            "optax.Schedule": "api/optimizer_schedules.html#$",
        },
    }),
    "flax": ("https://flax.readthedocs.io/en/latest/", {
        "py:class": {
            "flax.linen.Module": "api_reference/flax.linen/module.html#$",
        },
    }),
    "matplotlib": ("https://matplotlib.org/stable/", {
        "py:class": {
            "matplotlib.figure.Figure": "api/_as_gen/matplotlib.figure.Figure.html#$",
        },
    }),
}


def write_inventory(path: pathlib.Path, project: str, entries: dict[str, dict[str, str]]) -> None:
  """Writes a Sphinx version-2 inventory (the ``objects.inv`` format) of ``entries`` to ``path``."""
  lines = [f"{name} {role} 1 {page} -"
           for role, names in sorted(entries.items()) for name, page in sorted(names.items())]
  header = (f"# Sphinx inventory version 2\n# Project: {project}\n# Version: \n"
            "# The remainder of this file is compressed using zlib.\n")
  data = header.encode() + zlib.compress(("\n".join(lines) + "\n").encode())
  if not path.exists() or path.read_bytes() != data:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def intersphinx_mapping(directory: pathlib.Path) -> dict[str, tuple[str, str]]:
  """Writes every inventory into ``directory``; the ``intersphinx_mapping`` that reads them (no download)."""
  mapping = {}
  for project, (base_url, entries) in INVENTORIES.items():
    path = directory / f"{project}.inv"
    write_inventory(path, project, entries)
    mapping[project] = (base_url, str(path))
  return mapping
