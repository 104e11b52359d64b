"""How the training outputs number rounds and count communication: one convention for all of them.

Where this sits: read by the training loop's progress bar, the CLI's ``summary.json`` and the run's plot
(:mod:`fedjax_lite.training.plotting`), so that every output a person reads agrees.

* **Rounds are numbered from 0** wherever a round is named: ``round`` in ``metrics.jsonl``, ``metrics.csv``, the
  TensorBoard and Weights & Biases step, the x axis of ``training.png``, messages such as ``round 3: ...``, and the
  ``round_num`` that samplers, :meth:`~fedjax_lite.core.ClientSpec.pack` and the round's key
  ``fold_in(key(seed), round_num)`` take -- so the record with ``round`` r is reproduced by ``round_num=r``. Counts
  are counts: the progress bar's ``n/N`` and ``rounds`` in ``summary.json`` are rounds completed (round r is the
  (r+1)-th).
* **Communication is counted in bits** in the files (``broadcasted_bits``, ``aggregated_bits`` and their
  ``cumulative_*`` totals: exact integers) and shown to people in **mebibits**, 1 Mibit = 2**20 bits, one figure
  per direction: ``down`` is the broadcast (server to clients, ``broadcasted_bits``), ``up`` the upload (clients
  to server, ``aggregated_bits``). The progress bar shows ``down_Mibit``/``up_Mibit`` so far, ``summary.json``
  has ``broadcasted_mebibits``/``aggregated_mebibits``, and the notebooks print Mibit. (Network bandwidths of
  simulated client systems are rates, quoted in Mbit/s = 10**6 bits per second as links are measured.)
"""

from __future__ import annotations

__all__ = ["FIRST_ROUND", "BITS_PER_MEBIBIT", "mebibits", "communication_postfix"]

FIRST_ROUND = 0  # the number of the first round in every output
BITS_PER_MEBIBIT = 2**20


def mebibits(bits: int | float) -> float:
  """``bits / 2**20``: the Mibit shown to people for an exact bit count."""
  return float(bits) / BITS_PER_MEBIBIT


def communication_postfix(broadcasted_bits: int, aggregated_bits: int) -> dict[str, str]:
  """The progress bar's communication so far: ``{'down_Mibit': '12.50', 'up_Mibit': '3.13'}`` (fixed notation,
  thousands separated, two decimals)."""
  return {"down_Mibit": f"{mebibits(broadcasted_bits):,.2f}", "up_Mibit": f"{mebibits(aggregated_bits):,.2f}"}
