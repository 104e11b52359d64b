"""An aggregator wrapper that lets a fraction of each round's clients attack before the inner aggregator runs.

``byzantine_aggregator(inner, attack, fraction=..., seed=...)`` is an :class:`~fedjax_lite.aggregators.Aggregator`
for any ``inner`` aggregator (mean, presets, median, trimmed mean, Krum, DP, ...). It stacks the clients' values
(``combine='stack'``: colluding attacks need every update) and its server part:

1. chooses the round's malicious slots with
   :func:`~fedjax_lite.attacks.selection.choose_malicious` from ``(seed, round, slot)``, the round counted in
   the wrapper's state (``{'round_num': int32, 'inner': inner state}``);
2. replaces their values with ``attack.apply(values, malicious, mask, fold_in(server_key, ATTACK_STREAM))``
   (weights are kept: an attacker reports its real example count);
3. runs the inner aggregator on the attacked values with the clients' own keys and the server key
   (:func:`~fedjax_lite.aggregators.aggregate_with_keys`), so an attacked run and a clean run draw the same
   aggregator randomness.

It works with ``fed_avg(..., aggregator=byzantine_aggregator(...))`` unchanged. The attack happens after ``fed_avg``'s client rule (a non-finite update becomes zeros with weight 0), i.e. it models
clients that send finite but malicious values. The upload bits and DP event are the inner aggregator's (the
attackers send the same payload; a DP guarantee holds for the honest clients' data whatever the others send).

Measurements: the inner aggregator's (a dict is extended, anything else is kept under ``'inner'``) plus
``'num_malicious_clients'`` (int32).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fedjax_lite.aggregators.base import STACK, Aggregator, aggregate_with_keys, client_upload_bits
from fedjax_lite.attacks.base import UpdateAttack
from fedjax_lite.attacks.selection import check_fraction, check_seed, choose_malicious
from fedjax_lite.core.process import MeasuredOutput
from fedjax_lite.core.tree import PyTree

ATTACK_STREAM = 0xA77AC  # the attack's key is fold_in(aggregation key, ATTACK_STREAM); the inner key is untouched


def byzantine_aggregator(inner: Aggregator, attack: UpdateAttack, *, fraction: float, seed: int = 0) -> Aggregator:
  """``inner`` aggregating values of which ``floor(fraction * n)`` real clients per round were corrupted.

  Args:
    inner: the aggregator under attack.
    attack: an :class:`~fedjax_lite.attacks.UpdateAttack` (e.g. ``sign_flip()``, ``a_little_is_enough()``).
    fraction: the malicious fraction of each round's real clients, in ``[0, 1)`` (``floor(fraction * n)``
      attackers per round).
    seed: the attack's seed (which slots attack each round), an int ``>= 0``.

  Example::

    aggregator = byzantine_aggregator(coordinate_median(), sign_flip(), fraction=0.2)
    process = fed_avg(model, client_learning_rate=0.1, aggregator=aggregator)
  """
  if not isinstance(inner, Aggregator):
    raise TypeError(f"inner must be a fedjax_lite Aggregator, got {type(inner).__name__}.")
  if not isinstance(attack, UpdateAttack):
    raise TypeError(f"attack must be an UpdateAttack (e.g. attacks.sign_flip()), got {type(attack).__name__}.")
  fraction = check_fraction(fraction)
  seed = check_seed(seed)

  def init(value_template: PyTree) -> dict:
    return {"round_num": jnp.zeros((), jnp.int32), "inner": inner.init(value_template)}

  def client(client_params, value, weight, rng) -> dict:
    # The client's own key travels with its value (a simulation detail, not uploaded: see upload_bits), so that
    # the inner aggregator's clients use the keys they would use without the attack.
    return {"value": value, "weight": weight, "key": jax.random.key_data(rng)}

  def server(state, combined, rng, context) -> MeasuredOutput:
    mask = combined["weight"] > 0
    malicious = choose_malicious(seed, state["round_num"], mask, fraction)
    attacked = attack.apply(combined["value"], malicious, mask, jax.random.fold_in(rng, ATTACK_STREAM))
    client_keys = jax.random.wrap_key_data(combined["key"])
    output = aggregate_with_keys(inner, state["inner"], attacked, combined["weight"], client_keys, rng, mask)
    count = jnp.sum(malicious, dtype=jnp.int32)
    if isinstance(output.measurements, dict):
      measurements = {**output.measurements, "num_malicious_clients": count}
    else:
      measurements = {"inner": output.measurements, "num_malicious_clients": count}
    return MeasuredOutput(state={"round_num": state["round_num"] + 1, "inner": output.state},
                          result=output.result, measurements=measurements)

  return Aggregator(init, lambda state: (), client, server, combine=STACK,
                    upload_bits=lambda template: client_upload_bits(inner, template), dp_event=inner.dp_event)
