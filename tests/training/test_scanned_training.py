"""Whole training on the device (``run_training(..., rounds_per_dispatch=R)``).

The scanned mode must equal a per-round Python loop over the same device sampler, packer and ``process.next`` bit
for bit, whatever R; write the same records (evaluation cadence, files, cumulative bits) as the per-round loop;
resume from a checkpoint taken at a dispatch boundary exactly; and refuse clearly what it cannot run.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_lite.algorithms.fed_avg import fed_avg
from fedjax_lite.core import sampling
from fedjax_lite.core.device_rounds import DevicePoissonSampler, DevicePopulation, DeviceUniformSampler, round_key
from fedjax_lite.core.packing import ClientSpec
from fedjax_lite.training.loop import flatten_metrics, run_training

from tests.conftest import make_population

SPEC = ClientSpec(batch_size=4, num_epochs=2)
NUM_CLIENTS = 9


def _data():
  return make_population(num_clients=NUM_CLIENTS, min_size=2, max_size=23, seed=3)  # ragged clients


def _without_times(history):
  return [{key: value for key, value in record.items() if not key.endswith("time_in_seconds")} for record in history]


def _evaluate(params):
  return {"kernel_sum": float(jnp.sum(params["Dense_0"]["kernel"]))}


def test_scanned_training_equals_a_python_loop_of_the_same_rounds(tmp_path, tiny_model, tiny_params):
  data = _data()
  process = fed_avg(tiny_model, client_learning_rate=0.1)
  result = run_training(process, data, tiny_params, client_spec=SPEC, clients_per_round=3, num_rounds=5, seed=2,
                        progress=False, rounds_per_dispatch=3, evaluate=_evaluate, evaluate_every=2,
                        metrics_path=tmp_path / "metrics.jsonl")

  # The same rounds by hand: the device sampler and packer, then the jitted process.next, one round at a time.
  population = DevicePopulation.from_data(data, SPEC)
  sampler, base = DeviceUniformSampler(NUM_CLIENTS, 3), jax.random.key(2)
  round_data = jax.jit(lambda round_num: population.round_data(sampler, base, round_num)[0])
  next_fn = jax.jit(process.next)
  state = jax.tree.map(jnp.copy, process.init(tiny_params))
  records = []
  for round_num in range(5):
    state, metrics, _ = next_fn(state, round_data(round_num), round_key(base, round_num))
    records.append({"round": round_num, **flatten_metrics(jax.device_get(metrics))})
  for leaf, expected in zip(jax.tree.leaves(result.state), jax.tree.leaves(state)):
    np.testing.assert_array_equal(np.asarray(leaf), np.asarray(expected))
  history = _without_times(result.history)
  assert [{k: v for k, v in r.items() if k in records[0]} for r in history] == records
  # Written as the per-round loop writes them: evaluation after rounds 1, 3 and the last; cumulative bits.
  assert [r["round"] for r in history if "evaluation/kernel_sum" in r] == [1, 3, 4]
  assert history[-1]["evaluation/kernel_sum"] == _evaluate(state.params)["kernel_sum"]
  assert history[-1]["cumulative_aggregated_bits"] == sum(r["aggregated_bits"] for r in records)
  lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert lines == result.history
  assert all(r["round_time_in_seconds"] > 0 for r in result.history)


def test_results_do_not_depend_on_rounds_per_dispatch(tiny_model, tiny_params):
  data = _data()
  process = fed_avg(tiny_model, client_learning_rate=0.1)
  runs = [run_training(process, data, tiny_params, client_spec=SPEC, clients_per_round=3, num_rounds=4, seed=1,
                       progress=False, rounds_per_dispatch=per_dispatch) for per_dispatch in (1, 3)]
  assert _without_times(runs[0].history) == _without_times(runs[1].history)
  for a, b in zip(jax.tree.leaves(runs[0].state), jax.tree.leaves(runs[1].state)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_resume_from_a_dispatch_boundary_is_exact(tmp_path, tiny_model, tiny_params):
  data = _data()
  process = fed_avg(tiny_model, client_learning_rate=0.1)
  common = dict(client_spec=SPEC, clients_per_round=3, seed=4, progress=False, rounds_per_dispatch=4)
  full = run_training(process, data, tiny_params, num_rounds=5, **common)
  run_training(process, data, tiny_params, num_rounds=2, checkpoint_dir=tmp_path / "ckpt", **common)
  resumed = run_training(process, data, tiny_params, num_rounds=5, checkpoint_dir=tmp_path / "ckpt",
                         resume=True, **common)
  assert _without_times(resumed.history) == _without_times(full.history)
  for a, b in zip(jax.tree.leaves(resumed.state), jax.tree.leaves(full.state)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  with pytest.raises(Exception, match="sampler"):  # the host-sampled mode draws other cohorts: refused
    run_training(process, data, tiny_params, num_rounds=6, checkpoint_dir=tmp_path / "ckpt", resume=True,
                 **dict(common, rounds_per_dispatch=None))


def test_a_stop_asked_mid_dispatch_takes_effect_at_its_end(tiny_model, tiny_params):
  result = run_training(fed_avg(tiny_model, client_learning_rate=0.1), _data(), tiny_params, client_spec=SPEC,
                        clients_per_round=3, num_rounds=8, progress=False, rounds_per_dispatch=3,
                        on_round_end=lambda round_num, record: "enough" if round_num == 1 else None)
  assert result.stopped_early == "enough"
  assert [r["round"] for r in result.history] == [0, 1, 2]


class _TightPoisson(DevicePoissonSampler):
  """A Poisson sampler padded to 1 slot: its cohorts overflow."""

  @property
  def cohort_capacity(self) -> int:
    return 1


def test_refusals_are_one_clear_error(tiny_model, tiny_params):
  data = _data()
  process = fed_avg(tiny_model, client_learning_rate=0.1)
  common = dict(client_spec=SPEC, num_rounds=2, progress=False, rounds_per_dispatch=2)
  with pytest.raises(ValueError, match="per-client state"):
    run_training(process._replace(client_state=lambda params: params), data, tiny_params, clients_per_round=3,
                 **common)

  def host_only(round_num):
    return np.arange(3)

  host_only.cohort_capacity = 3
  with pytest.raises(ValueError, match="host only"):
    run_training(process, data, tiny_params, sampler=host_only, **common)
  with pytest.raises(ValueError, match="round_packer"):
    run_training(process, data, tiny_params, clients_per_round=3, round_packer=lambda *a, **k: None, **common)
  with pytest.raises(ValueError, match="rounds_per_dispatch"):
    run_training(process, data, tiny_params, clients_per_round=3, **dict(common, rounds_per_dispatch=0))
  with pytest.raises(RuntimeError, match="client slots"):
    run_training(process, data, tiny_params, sampler=_TightPoisson(NUM_CLIENTS, 0.9), **common)


def test_poisson_sampling_on_the_device_runs(tiny_model, tiny_params):
  result = run_training(fed_avg(tiny_model, client_learning_rate=0.1), _data(), tiny_params, client_spec=SPEC,
                        sampler=sampling.PoissonSampler(NUM_CLIENTS, 0.3), num_rounds=3, progress=False,
                        rounds_per_dispatch=3)
  assert len(result.history) == 3


def test_cli_flag_runs_and_refuses_stateful_algorithms_in_one_line(tmp_path, capsys):
  from fedjax_lite.training import cli

  code = cli.main(["train", "--model", "dense", "--rounds", "2", "--local-epochs", "1", "--rounds-per-dispatch",
                   "2", "--output-dir", str(tmp_path / "run"), "--json", "--log-format", "jsonl"])
  assert code == 0
  assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 2
  capsys.readouterr()
  code = cli.main(["train", "--model", "dense", "--algorithm", "scaffold", "--rounds", "1", "--rounds-per-dispatch",
                   "2", "--output-dir", str(tmp_path / "stateful")])
  assert code == 2
  error = capsys.readouterr().err.strip()
  assert error.count("\n") == 0 and "--rounds-per-dispatch" in error and "per-client state" in error
