"""The attack contract: an :class:`UpdateAttack` transforms the stacked client updates of a round.

An attack sees the round's updates with their leading client axis, the malicious mask of
:func:`~fedjax_lite.attacks.selection.choose_malicious`, the real-client mask and a key, and returns updates of the
same structure in which ONLY the malicious slots changed:

``apply(updates, malicious, client_mask, rng) -> updates``.

Attacks of a single client (sign flip, scaling, Gaussian noise) also expose ``client_fn(update, rng) -> update``
for ONE client, so they can be applied where a client's update is made (:func:`corrupt_client_output` on a
:class:`~fedjax_lite.core.records.ClientOutput`); their ``apply`` maps ``client_fn`` over the malicious slots with
key ``fold_in(rng, slot)``. Colluding attacks ("a little is enough", inner-product manipulation) need the honest
clients' statistics, so they exist only as transformations of the stacked updates (``client_fn`` is None): an
omniscient adversary who sees every honest update of the round before the server aggregates, the threat model of
the papers that introduced them. :func:`~fedjax_lite.attacks.byzantine_aggregator` applies an attack before an
aggregator's ``next``.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from fedjax_lite.core.records import ClientOutput
from fedjax_lite.core.tree import PyTree, tree_select

ApplyFn = Callable[[PyTree, jax.Array, jax.Array, jax.Array], PyTree]
ClientFn = Callable[[PyTree, jax.Array], PyTree]


class UpdateAttack(NamedTuple):
  """A Byzantine transformation of a round's stacked client updates.

  Attributes:
    name: a short label (for tables and plots).
    apply: ``(updates, malicious, client_mask, rng) -> updates``; only malicious slots change.
    client_fn: ``(update, rng) -> update`` for ONE client, for attacks that need no other client; else None.
  """

  name: str
  apply: ApplyFn
  client_fn: ClientFn | None = None


def select_clients(malicious: jax.Array, attacked: PyTree, updates: PyTree) -> PyTree:
  """Leaf-wise: the ``attacked`` value for malicious slots, the original ``updates`` elsewhere."""

  def one_leaf(bad, good):
    chosen = malicious.reshape((malicious.shape[0],) + (1,) * (good.ndim - 1))
    return jnp.where(chosen, bad.astype(good.dtype), good)

  return jax.tree.map(one_leaf, attacked, updates)


def per_client_attack(name: str, client_fn: ClientFn) -> UpdateAttack:
  """An :class:`UpdateAttack` applying ``client_fn(update, fold_in(rng, slot))`` to every malicious slot."""

  def apply(updates, malicious, client_mask, rng):
    del client_mask  # malicious slots are real by construction
    num_slots = malicious.shape[0]
    keys = jax.vmap(lambda slot: jax.random.fold_in(rng, slot))(jnp.arange(num_slots, dtype=jnp.int32))
    return select_clients(malicious, jax.vmap(client_fn)(updates, keys), updates)

  return UpdateAttack(name=name, apply=apply, client_fn=client_fn)


def corrupt_client_output(attack: UpdateAttack, output: ClientOutput, is_malicious: jax.Array,
                          rng: jax.Array) -> ClientOutput:
  """ONE client's output with its update replaced by ``attack.client_fn(update, rng)`` when ``is_malicious``.

  The weight and metrics are kept (an attacker reports its real example count). Only attacks that need no other
  client have a ``client_fn``; a colluding attack raises a ValueError here (use ``attack.apply`` on the stacked
  updates, e.g. through :func:`~fedjax_lite.attacks.byzantine_aggregator`).
  """
  if not isinstance(attack, UpdateAttack):
    raise TypeError(f"attack must be an UpdateAttack, got {type(attack).__name__}.")
  if attack.client_fn is None:
    raise ValueError(f"the {attack.name!r} attack needs the honest clients' statistics; apply it to the stacked "
                     "updates (attack.apply or byzantine_aggregator), not to one ClientOutput.")
  attacked = attack.client_fn(output.update, rng)
  return output._replace(update=tree_select(jnp.asarray(is_malicious, bool), attacked, output.update))
