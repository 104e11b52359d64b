"""fedjax_lite: federated-learning algorithms as pure JAX functions over pytrees.

Layers: ``core`` (records, process template, data, runner) -> ``systems`` (client systems, simulated clock) ->
``aggregators`` -> ``privacy`` -> ``algorithms``
-> ``datasets``/``models`` -> ``training``; ``analytics`` (federated statistics) and ``attacks`` (Byzantine
clients) sit beside ``algorithms``. Import the sub-packages, e.g.::

  from fedjax_lite import algorithms, aggregators, core, datasets, models

On CPU, call ``fedjax_lite.configure_cpu()`` first (one device per core; see :mod:`fedjax_lite.core.cpu`).
"""

from fedjax_lite import aggregators, algorithms, analytics, attacks, core, datasets, models, systems
from fedjax_lite.core.cpu import configure_cpu

__version__ = "0.1.0"

__all__ = ["aggregators", "algorithms", "analytics", "attacks", "configure_cpu", "core", "datasets", "models",
           "systems", "__version__"]
