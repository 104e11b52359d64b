"""Compressed uploads in the client work, with error feedback: the client part of a compressor given to an algorithm.

``fed_avg(..., upload_compressor=compressor)`` (and every builder that takes FedAvg's options: FedProx, FedAdam,
...) compresses each client's update at the end of its client work (part 2 of the round), and the aggregator
(part 3) receives the decoded message and counts the encoded bits
(:func:`~fedjax_lite.aggregators.compressed` with ``precompressed=True``). With ``compressor.error_feedback``
(Stich, Cordonnier & Jaggi 2018, "Sparsified SGD with Memory", NeurIPS; Karimireddy et al. 2019, "Error Feedback
Fixes SignSGD and other Gradient Compression Schemes", ICML) client ``i`` keeps a residual ``e_i`` (zeros at
first) in the round's client states and, in every round it takes part in::

  m_i = e_i + Delta_i          (the update plus what earlier rounds did not send)
  upload C(m_i)                 (the compressor's decoded message)
  e_i <- m_i - C(m_i)           (what was not sent, kept for the next round)

so everything a client computes is eventually sent (the biased top-k and sign compressors then converge at the
uncompressed rate). Clients that are not in a round, padding slots and clients rejected as non-finite keep their
residual (the round template's and the :class:`~fedjax_lite.core.ClientStateStore`'s rules). The client state
exists only with error feedback: without it the round is stateless and the compression just moves into the client
work (its key ``fold_in(client key, COMPRESSION_STREAM)``; the training key is unchanged).

Composition. Quantizing the kept values (the compressor's ``quantization_bits``) is part of ``C``, so the residual
includes the quantization error. A quantizing or secure-sum aggregator given as ``aggregator=`` runs on the
decoded, zero-filled DENSE message on the server side of the upload: its error is not in the residual, and
``upload_bits`` counts the sparse message, not the dense payload such an aggregator would actually need (a secure
sum masks every coordinate, so a sparse message does not survive it: use sparsification OR a secure sum's dense
upload, not both). Differential privacy on the server (``aggregator=aggregators.dp_aggregator(...)``) clips and
noises the compressed messages: each client's message is a function of its own data and residual, so the
user-level guarantee holds unchanged.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fedjax_lite.aggregators.base import Aggregator
from fedjax_lite.aggregators.sparsification import Compressor, compressed
from fedjax_lite.algorithms.template import Broadcast, ClientWork
from fedjax_lite.core.records import ClientOutput
from fedjax_lite.core.tree import PyTree

COMPRESSION_STREAM = 0xC0E5  # the compression key is fold_in(client key, COMPRESSION_STREAM)


def residual_state(update_template: PyTree) -> PyTree:
  """ONE client's initial residual: zeros shaped like its update (float32 for every floating leaf)."""
  return jax.tree.map(lambda t: jnp.zeros(jnp.shape(t), jnp.result_type(t)), update_template)


def compressing_work(client_work: ClientWork, compressor: Compressor) -> ClientWork:
  """``client_work`` whose update is compressed by ``compressor`` (module docstring); with
  ``compressor.error_feedback`` its client state is the residual ``e_i`` and its update ``C(e_i + Delta_i)``.

  ``client_work`` must be stateless (its own ``client_state`` is None): the residual takes the client state.
  """
  if not isinstance(compressor, Compressor):
    raise TypeError(f"upload_compressor must be an aggregators.Compressor (e.g. aggregators.top_k_compressor(k=100, "
                    f"error_feedback=True)), got {type(compressor).__name__}.")

  def work(broadcast: Broadcast, client_data: PyTree, client_state: PyTree, rng: jax.Array) -> ClientOutput:
    output = client_work(broadcast, client_data, None, rng)
    if output.new_state is not None:
      raise ValueError("upload_compressor needs a stateless client work (the residual of error feedback is the "
                       "client state).")
    key = jax.random.fold_in(rng, COMPRESSION_STREAM)
    if not compressor.error_feedback:
      return output._replace(update=compressor.compress(output.update, key))
    message = jax.tree.map(jnp.add, client_state, output.update)
    sent = compressor.compress(message, key)
    return output._replace(update=sent, new_state=jax.tree.map(jnp.subtract, message, sent))

  return work


def compress_uploads(client_work: ClientWork, aggregator: Aggregator, compressor: Compressor
                     ) -> tuple[ClientWork, Aggregator, object]:
  """``(client work, aggregator, client_state)`` for :func:`~fedjax_lite.algorithms.build_round` with uploads
  compressed by ``compressor``: the compressing client work, ``aggregator`` behind a message-counting
  :func:`~fedjax_lite.aggregators.compressed` (``precompressed``), and ``residual_state`` when the compressor has
  error feedback (None otherwise: no client state)."""
  work = compressing_work(client_work, compressor)
  return (work, compressed(compressor, aggregator, precompressed=True),
          residual_state if compressor.error_feedback else None)
