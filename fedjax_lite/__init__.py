"""fedjax_lite: federated-learning algorithms as pure JAX functions over pytrees.

Layers, bottom first, each importing only the layers below it (:data:`fedjax_lite.layers.LAYERS` states the
order; a test checks every module's imports against it): {layers}. Import the sub-packages, e.g.::

  from fedjax_lite import algorithms, aggregators, core, datasets, models

On CPU, call ``fedjax_lite.configure_cpu()`` first (one device per core; see :mod:`fedjax_lite.core.cpu`).
"""

from fedjax_lite import layers
from fedjax_lite import aggregators, algorithms, analytics, attacks, core, datasets, models, systems
from fedjax_lite.core.cpu import configure_cpu

if __doc__:  # None under ``python -OO``
  __doc__ = __doc__.format(layers=layers.describe())

__version__ = "0.1.0"

__all__ = ["aggregators", "algorithms", "analytics", "attacks", "configure_cpu", "core", "datasets", "layers",
           "models", "systems", "__version__"]
