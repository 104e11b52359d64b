"""The tutorial notebooks: stored as valid nbformat-4 JSON with their outputs, and runnable end to end.

Each notebook is executed here in fast mode (``FEDJAX_LITE_FAST=1``: fewer rounds), every code cell in order in
one namespace with matplotlib's Agg backend, and the facts its text establishes are checked on the namespace it
leaves behind.
"""

from __future__ import annotations

import json
import math
import pathlib

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

NOTEBOOKS = pathlib.Path(__file__).resolve().parents[1] / "notebooks"
NAMES = ("01_fedavg_from_scratch.ipynb", "02_aggregators.ipynb", "03_differential_privacy.ipynb")


def load(name: str) -> dict:
  return json.loads((NOTEBOOKS / name).read_text())


def source(cell: dict) -> str:
  text = cell["source"]
  return text if isinstance(text, str) else "".join(text)


def run_notebook(name: str, monkeypatch) -> dict:
  """Executes every code cell of ``name`` in order in one namespace (fast mode); returns the namespace."""
  monkeypatch.setenv("FEDJAX_LITE_FAST", "1")
  namespace: dict = {"__name__": "__main__"}
  code_cells = [source(cell) for cell in load(name)["cells"] if cell["cell_type"] == "code"]
  try:
    for index, code in enumerate(code_cells):
      exec(compile(code, f"{name} [code cell {index + 1}]", "exec"), namespace)  # noqa: S102
      plt.close("all")
  finally:
    plt.close("all")
  return namespace


@pytest.mark.parametrize("name", NAMES)
def test_notebook_is_valid_nbformat_4_with_stored_outputs(name):
  notebook = load(name)
  assert notebook["nbformat"] == 4 and notebook["nbformat_minor"] >= 4
  assert notebook["metadata"]["kernelspec"]["language"] == "python"
  cells = notebook["cells"]
  assert all({"cell_type", "metadata", "source"} <= set(cell) for cell in cells)
  assert len({cell["id"] for cell in cells}) == len(cells)
  assert cells[0]["cell_type"] == "markdown" and "What you learn" in source(cells[0])
  assert cells[1]["cell_type"] == "markdown" and "%pip install" in source(cells[1])
  code_cells = [cell for cell in cells if cell["cell_type"] == "code"]
  # Executed top to bottom, without errors, and every cell is plain Python (no IPython magics or shell escapes).
  assert [cell["execution_count"] for cell in code_cells] == list(range(1, len(code_cells) + 1))
  for cell in code_cells:
    compile(source(cell), name, "exec")
    assert not any(line.lstrip().startswith(("%", "!")) for line in source(cell).splitlines())
    assert all(output["output_type"] != "error" for output in cell["outputs"])
  images = [output for cell in code_cells for output in cell["outputs"] if "image/png" in output.get("data", {})]
  assert images, "the notebook stores no plot"
  assert sum(bool(cell["outputs"]) for cell in code_cells) >= len(code_cells) - 2


@pytest.mark.slow
def test_01_fedavg_from_scratch(monkeypatch):
  namespace = run_notebook("01_fedavg_from_scratch.ipynb", monkeypatch)
  # The hand-written round (broadcast, map_clients, federated_mean, SGD(1.0)) IS fed_avg's round.
  assert namespace["largest_change"] > 1e-3
  assert namespace["max_difference"] < 1e-6
  # The default split is non-IID; training on it learns, and more slowly than on the IID split.
  counts = namespace["label_counts"](namespace["train"])
  assert (counts > 0).sum(axis=1).mean() < 2.5
  histories = namespace["histories"]
  assert len(histories["shards (default)"]) == namespace["num_rounds"] == 8
  assert namespace["final_test_accuracy"] > 0.3
  assert histories["IID"][-1]["evaluation/accuracy"] > namespace["final_test_accuracy"]
  # The runner strategies compute the same model.
  assert set(namespace["runner_seconds"]) == {"sequential", "vmap"}
  assert namespace["runner_difference"] < 1e-5


@pytest.mark.slow
def test_02_aggregators(monkeypatch):
  namespace = run_notebook("02_aggregators.ipynb", monkeypatch)
  aggregators, template = namespace["aggregators"], namespace["template"]
  robust_history, compression_history = namespace["robust_history"], namespace["compression_history"]
  # Exact upload bits: the compressed upload is > 3x smaller, and per round it is 10 clients' static count.
  assert namespace["upload_ratio"] > 3
  per_client = aggregators.client_upload_bits(aggregators.compression_aggregator(), template)
  assert compression_history[0]["aggregated_bits"] == 10 * per_client
  assert aggregators.client_upload_bits(aggregators.mean(), template) == 32 * 66_762 + 32
  assert robust_history[0]["aggregated_bits"] > 10 * (32 * 66_762 + 32)
  assert compression_history[0]["broadcasted_bits"] == robust_history[0]["broadcasted_bits"]
  assert namespace["cnn_ratio"] > 3
  # The robust aggregator's thresholds start at the reference's values and the zeroing one descends.
  assert namespace["zeroing_norms"][0] == pytest.approx(21.0)
  assert namespace["clipping_norms"][0] == pytest.approx(1.0)
  assert np.all(np.diff(namespace["zeroing_norms"]) < 0)
  # Secure aggregation trains like the robust aggregator it simulates.
  assert abs(namespace["secure_history"][-1]["evaluation/accuracy"]
             - robust_history[-1]["evaluation/accuracy"]) < 0.05
  assert namespace["secure_clipped_total"] == 0
  # Two Byzantine clients break the mean, not the median; the composed aggregator zeroes both every round.
  accuracy = namespace["byzantine_accuracy"]
  assert accuracy[("mean", "2 of 10 Byzantine")] < 0.2
  assert accuracy[("median", "2 of 10 Byzantine")] > accuracy[("mean", "2 of 10 Byzantine")] + 0.2
  assert set(namespace["zeroed_per_round"]) == {2}
  # vmap over four clip norms: fewer clients clipped as the norm grows, the aggregate never above the norm.
  clipped = np.asarray(namespace["clipped"])
  assert np.all(np.diff(clipped) <= 0) and clipped[0] == 10
  assert np.all(np.asarray(namespace["aggregate_norms"]) <= np.asarray(namespace["clip_norms"]) + 1e-6)


@pytest.mark.slow
def test_03_differential_privacy(monkeypatch):
  namespace = run_notebook("03_differential_privacy.ipynb", monkeypatch)
  planned = namespace["planned"]
  # PLD certifies a smaller epsilon than RDP; more noise, less epsilon; calibration meets its target.
  assert all(planned[z]["pld"] < planned[z]["rdp"] for z in planned)
  assert [planned[z]["rdp"] for z in sorted(planned)] == sorted((planned[z]["rdp"] for z in planned), reverse=True)
  calibrated = namespace["privacy"].planned_epsilon(
      namespace["calibrated_z"], rounds=namespace["num_rounds"], delta=namespace["DELTA"],
      sampling_probability=namespace["SAMPLING_PROBABILITY"])
  assert calibrated <= namespace["target_epsilon"] + 1e-9
  assert namespace["adaptive_epsilon"] == pytest.approx(planned[1.0]["rdp"])
  assert namespace["larger_population_epsilon"] < planned[1.0]["rdp"] / 2
  # The ledger's epsilon increases every round and the budget stops the run before exceeding it.
  epsilons = namespace["dp_epsilons"]
  assert len(epsilons) >= 2 and np.all(np.diff(epsilons) > 0)
  assert namespace["result"].stopped_early is not None and "budget" in namespace["result"].stopped_early
  assert epsilons[-1] <= namespace["epsilon_budget"] < namespace["recipe"].ledger.epsilon_after(len(epsilons) + 1)
  assert len(epsilons) < namespace["num_rounds"]
  assert epsilons[-1] == pytest.approx(namespace["privacy"].planned_epsilon(
      1.0, rounds=len(epsilons), delta=namespace["DELTA"], sampling_probability=namespace["SAMPLING_PROBABILITY"]))
  # The sweep: six models trained; epsilon falls as the noise grows; the models learn beyond chance.
  sweep_epsilon = namespace["sweep_epsilon"]
  finite = [sweep_epsilon[name] for name in ("z=0.5", "z=1", "z=2", "z=4")]
  assert finite == sorted(finite, reverse=True) and math.isinf(sweep_epsilon["clip only"])
  assert all(len(curve) == namespace["num_rounds"] for curve in namespace["sweep_accuracy"].values())
  assert namespace["sweep_accuracy"]["non-private (no clip, no noise)"][-1] > 0.3
  # DP-FTRL: no amplification by sampling, so a larger epsilon than DP-FedAvg at the same noise.
  assert namespace["ftrl_epsilon"] > sweep_epsilon["z=4"]
  assert len(namespace["ftrl_history"]) == namespace["num_rounds"]
