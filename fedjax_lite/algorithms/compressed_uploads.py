"""Compressed uploads in the client work, with error feedback: the client part of a compressor given to a round.

``build_round(..., upload_compressor=compressor)`` -- and so ``fed_avg(upload_compressor=...)`` (with every builder
that takes FedAvg's options: FedProx, FedAdam, ...) and ``scaffold(upload_compressor=...)`` -- compresses each
client's update at the end of its client work (part 2 of the round), and the aggregator (part 3) receives the
decoded message and counts the encoded bits (:func:`~fedjax_lite.aggregators.compressed` with
``precompressed=True``). With a dict of aggregators, ``upload_compressor`` is a dict ``{key: Compressor}`` naming
the keys of the update it compresses (SCAFFOLD: ``{'delta': ...}``); the other keys are uploaded as they are. With
``compressor.error_feedback`` (Stich, Cordonnier & Jaggi 2018, "Sparsified SGD with Memory", NeurIPS; Karimireddy
et al. 2019, "Error Feedback Fixes SignSGD and other Gradient Compression Schemes", ICML) client ``i`` keeps a
residual ``e_i`` (zeros at first) in the round's client states and, in every round it takes part in::

  m_i = e_i + Delta_i          (the update plus what earlier rounds did not send)
  upload C(m_i)                 (the compressor's decoded message)
  e_i <- m_i - C(m_i)           (what was not sent, kept for the next round)

so everything a client computes is eventually sent (the biased top-k and sign compressors then converge at the
uncompressed rate). Clients that are not in a round, padding slots and clients rejected as non-finite keep their
residual (the round template's and the :class:`~fedjax_lite.core.ClientStateStore`'s rules). The client state
exists only with error feedback: without it the round's state is its own (or none) and the compression just moves
into the client work (its key ``fold_in(client key, COMPRESSION_STREAM)``, folded with the key's index among the
compressed keys when there are several; the training key is unchanged).

The client state. When the round has no client state of its own, a client's state is its residual (shaped like the
compressed part of the update: ``{key: residual}`` with a dict of compressors). When it has one -- SCAFFOLD's
control variate ``c_i``, the local parameters of a partitioned model (``labels=..., local_state=True``) -- ONE
record holds both, :class:`ErrorFeedbackState` ``(state, residual)``: the round's own client work sees ``state``
exactly as without compression, and the residual sits beside it in the same row of the client-state store. In a
partitioned round only the global part of the delta is uploaded, so compressed, and the residual covers the global
parameters only (``None`` at the others, like the update).

Shared masks (:func:`~fedjax_lite.aggregators.shared_random_k_compressor`): the round's support comes from the
aggregator's broadcast (the round number ``t`` it counts; :func:`~fedjax_lite.aggregators.shared_mask_key`), which
the client work reads in ``broadcast.aggregator``. With error feedback the client keeps ``m_i`` off the support as
its residual and uploads ``m_i`` on it; without, the aggregator alone gathers the ``k`` values. A driver that runs
the client work without the aggregators' broadcast (FedBuff's asynchronous arrivals) cannot use a shared mask.

Composition. Quantizing the kept values (the compressor's ``quantization_bits``) is part of ``C``, so the residual
includes the quantization error. A quantizing or secure-sum aggregator given as ``aggregator=`` runs on the
decoded, zero-filled DENSE message of a client-specific compressor on the server side of the upload: its error is
not in the residual, and ``upload_bits`` counts the sparse message, not the dense payload such an aggregator would
actually need (a secure sum masks every coordinate, so client-specific indices do not survive it). With a shared
mask the aggregator sees the ``k`` values only, so a secure sum or a quantizer composes exactly (its own bit widths,
``k`` values). Differential privacy on the server (``aggregator=aggregators.dp_aggregator(...)``) clips and noises
the compressed messages: each client's message is a function of its own data and residual, so the user-level
guarantee holds unchanged.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import flax.struct
import jax
import jax.numpy as jnp

from fedjax_lite.aggregators.base import Aggregator, as_template
from fedjax_lite.aggregators.sparsification import Compressor, compressed, shared_mask_key
from fedjax_lite.core.records import ClientOutput
from fedjax_lite.core.tree import PyTree

# The round template's client work, (broadcast, client_data, client_state, rng) -> ClientOutput (the template imports
# this module, so it is named here rather than imported).
ClientWork = Callable[[Any, PyTree, PyTree, jax.Array], ClientOutput]

COMPRESSION_STREAM = 0xC0E5  # the compression key is fold_in(client key, COMPRESSION_STREAM)


@flax.struct.dataclass
class ErrorFeedbackState:
  """ONE client's state in a round with error feedback whose client work keeps a state of its own.

  Attributes:
    state: the round's own client state (SCAFFOLD's control variate ``c_i``, a partitioned model's local
      parameters), which its client work sees and returns exactly as without compression.
    residual: the error-feedback residual ``e_i``, shaped like the compressed part of the update.
  """

  state: PyTree
  residual: PyTree


def residual_state(update_template: PyTree) -> PyTree:
  """ONE client's initial residual: zeros shaped like its update (``None`` leaves stay ``None``)."""
  return jax.tree.map(lambda t: jnp.zeros(jnp.shape(t), jnp.result_type(t.dtype)), as_template(update_template))


def _compressors(upload_compressor: Any) -> dict[str | None, Compressor]:
  """``{key: Compressor}``, the key None for a single compressor (of a single aggregator's update)."""
  if isinstance(upload_compressor, Compressor):
    return {None: upload_compressor}
  if isinstance(upload_compressor, Mapping) and upload_compressor:
    for key, value in upload_compressor.items():
      if not isinstance(key, str) or not isinstance(value, Compressor):
        raise TypeError(f"upload_compressor must be a Compressor or a dict of str -> Compressor, got an entry "
                        f"{key!r}: {type(value).__name__}.")
    return {key: upload_compressor[key] for key in sorted(upload_compressor)}
  raise TypeError(f"upload_compressor must be an aggregators.Compressor (e.g. aggregators.top_k_compressor(k=100, "
                  f"error_feedback=True)) or a dict of them by update key, got {type(upload_compressor).__name__}.")


def _pick(tree: PyTree, key: str | None) -> PyTree:
  return tree if key is None else tree[key]


def _put(tree: PyTree, key: str | None, value: PyTree) -> PyTree:
  return value if key is None else {**tree, key: value}


def compressing_work(client_work: ClientWork, compressor: Compressor | Mapping[str, Compressor], *,
                     stateful: bool = False) -> ClientWork:
  """``client_work`` whose update (or the keys of it named by a dict of compressors) is compressed (module
  docstring); with error feedback its client state holds the residual ``e_i`` and its update is ``C(e_i +
  Delta_i)``. ``stateful``: ``client_work`` keeps a client state of its own, which then sits beside the residual in
  an :class:`ErrorFeedbackState` (with error feedback) or is passed through unchanged (without); a stateless client
  work (the default) must return ``new_state=None``.
  """
  compressors = _compressors(compressor)
  feedback = [key for key, c in compressors.items() if c.error_feedback]
  single = None in compressors

  def work(broadcast: Any, client_data: PyTree, client_state: PyTree, rng: jax.Array) -> ClientOutput:
    if feedback:
      own_state, residuals = ((client_state.state, client_state.residual) if stateful else (None, client_state))
    else:
      own_state, residuals = client_state, None
    output = client_work(broadcast, client_data, own_state if stateful else None, rng)
    if not stateful and output.new_state is not None:
      raise ValueError("upload_compressor here needs a stateless client work (the residual of error feedback is the "
                       "client state); a round with a client state of its own keeps both (build_round's "
                       "client_state=).")
    compression_key = jax.random.fold_in(rng, COMPRESSION_STREAM)
    update, new_residuals = output.update, {}
    for index, (key, c) in enumerate(compressors.items()):
      value = _pick(update, key)
      if c.shared is not None:
        received = broadcast.aggregator
        aggregator_params = None if isinstance(received, tuple) and not received else _pick(received, key)
        if not isinstance(aggregator_params, Mapping) or "round" not in aggregator_params:
          raise ValueError(f"the {c.name} compressor draws the round's mask from the aggregator's broadcast, which "
                           "this client work did not receive (broadcast.aggregator): a shared mask needs a "
                           "synchronous round built by build_round, not asynchronous arrivals (FedBuff).")
        key_for_value = shared_mask_key(c.shared.seed, aggregator_params["round"])
      else:
        key_for_value = compression_key if single else jax.random.fold_in(compression_key, index)
      if c.error_feedback:
        message = jax.tree.map(jnp.add, _pick(residuals, key), value)
        sent = c.compress(message, key_for_value)
        new_residuals[key] = jax.tree.map(jnp.subtract, message, sent)
      elif c.shared is not None:
        sent = value  # the aggregator gathers the k values at the round's support itself
      else:
        sent = c.compress(value, key_for_value)
      update = _put(update, key, sent)
    if not feedback:
      return output._replace(update=update)
    residual = new_residuals[None] if single else new_residuals
    new_state = ErrorFeedbackState(state=output.new_state, residual=residual) if stateful else residual
    return output._replace(update=update, new_state=new_state)

  return work


def compress_uploads(client_work: ClientWork, aggregator: Aggregator | Mapping[str, Aggregator],
                     compressor: Compressor | Mapping[str, Compressor], *,
                     client_state: Callable[[PyTree], PyTree] | None = None,
                     update_template: Callable[[PyTree], PyTree] | None = None,
                     ) -> tuple[ClientWork, Aggregator | dict[str, Aggregator], Callable[[PyTree], PyTree] | None]:
  """``(client work, aggregator, client_state)`` of a round whose uploads are compressed by ``compressor`` (what
  :func:`~fedjax_lite.algorithms.build_round` does with ``upload_compressor=``).

  Args:
    client_work: the round's client work.
    aggregator: its aggregator, or dict of aggregators (then ``compressor`` is a dict whose keys are among theirs).
    compressor: a :class:`~fedjax_lite.aggregators.Compressor`, or ``{update key: Compressor}``.
    client_state: the round's own ``params -> ONE client's state`` (None: stateless).
    update_template: ``params -> ONE client's update`` (default the params' shapes), for the residual's shape.

  Returns:
    the compressing client work (:func:`compressing_work`), the compressed keys' aggregators behind a
    message-counting :func:`~fedjax_lite.aggregators.compressed` (``precompressed``), and the client state: the
    residual (no state of its own), an :class:`ErrorFeedbackState` (both), or ``client_state`` unchanged (no error
    feedback).
  """
  compressors = _compressors(compressor)
  if isinstance(aggregator, Aggregator):
    if None not in compressors:
      raise ValueError(f"upload_compressor is a dict (keys {sorted(compressors)}) but the round has one aggregator: "
                       "give one Compressor.")
    aggregators = compressed(compressors[None], aggregator, precompressed=True)
  elif isinstance(aggregator, Mapping):
    if None in compressors:
      raise ValueError(f"the round has a dict of aggregators (keys {sorted(aggregator)}): give upload_compressor as "
                       f"a dict {{key: Compressor}} naming the update keys to compress.")
    unknown = sorted(set(compressors) - set(aggregator))
    if unknown:
      raise ValueError(f"upload_compressor names the keys {unknown}, which the round's aggregators "
                       f"{sorted(aggregator)} do not have.")
    aggregators = {key: compressed(compressors[key], agg, precompressed=True) if key in compressors else agg
                   for key, agg in aggregator.items()}
  else:
    raise TypeError(f"aggregator must be an Aggregator or a dict of them, got {type(aggregator).__name__}.")
  stateful = client_state is not None
  work = compressing_work(client_work, compressor, stateful=stateful)
  if not any(c.error_feedback for c in compressors.values()):
    return work, aggregators, client_state
  update_template = update_template or as_template

  def residuals(params: PyTree) -> PyTree:
    template = update_template(params)
    if None in compressors:
      return residual_state(template)
    return {key: residual_state(template[key]) for key, c in compressors.items() if c.error_feedback}

  if not stateful:
    return work, aggregators, residuals
  return work, aggregators, lambda params: ErrorFeedbackState(state=client_state(params), residual=residuals(params))
