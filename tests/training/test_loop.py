"""The training loop: one compilation per run, early stopping, metrics file, evaluation cadence, arguments."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from jax import monitoring

from fedjax_lite.algorithms.fed_avg import fed_avg
from fedjax_lite.core.packing import ClientSpec
from fedjax_lite.training.loop import flatten_metrics, run_training

from tests.conftest import make_population

_COMPILES: list[str] = []
monitoring.register_event_duration_secs_listener(
    lambda name, duration, **kwargs: _COMPILES.append(name) if name == "/jax/core/compile/backend_compile_duration"
    else None)


def test_ragged_random_cohorts_compile_the_round_once(tiny_model, tiny_params):
  """Cohorts of clients with 2..40 examples: every round has the same shape, so the round compiles once."""
  data = make_population(num_clients=20, min_size=2, max_size=40, seed=3)
  process = fed_avg(tiny_model, client_learning_rate=0.1)
  run_training(process, data, tiny_params, client_spec=ClientSpec(batch_size=4), clients_per_round=5,
               num_rounds=2, seed=0, progress=False)  # warm up everything outside the round
  before = len(_COMPILES)
  result = run_training(process, data, tiny_params, client_spec=ClientSpec(batch_size=4), clients_per_round=5,
                        num_rounds=8, seed=1, progress=False)
  assert len(result.history) == 8
  sizes = {r["client_work/train/num_examples"] for r in result.history}
  assert len(sizes) > 1  # the cohorts really differed
  # One compile for the round program (a fresh jax.jit per run); nothing per round.
  assert len(_COMPILES) - before <= 1


def test_metrics_file_evaluation_cadence_and_early_stop(tmp_path, tiny_model, tiny_params):
  data = make_population(num_clients=8)
  path = tmp_path / "metrics.jsonl"
  evaluated = []

  def evaluate(params):
    evaluated.append(1)
    return {"accuracy": 0.5}

  result = run_training(
      fed_avg(tiny_model, client_learning_rate=0.1), data, tiny_params, client_spec=ClientSpec(batch_size=4),
      clients_per_round=2, num_rounds=10, seed=0, evaluate=evaluate, evaluate_every=3, metrics_path=path,
      progress=False, on_round_end=lambda r, m: "enough" if r == 4 else None)
  assert result.stopped_early == "enough"
  records = [json.loads(line) for line in path.read_text().splitlines()]
  assert [r["round"] for r in records] == [0, 1, 2, 3, 4]
  assert [r["round"] for r in records if "evaluation/accuracy" in r] == [2]
  assert len(evaluated) == 1
  assert all(r["round_time_in_seconds"] > 0 for r in records)
  per_round = [r["aggregated_bits"] for r in records]
  assert [r["cumulative_aggregated_bits"] for r in records] == list(np.cumsum(per_round))
  assert records[-1]["cumulative_broadcasted_bits"] == sum(r["broadcasted_bits"] for r in records)
  assert result.first_round_seconds == records[0]["round_time_in_seconds"]


def test_caller_params_survive_donation(tiny_model, tiny_params):
  """The jitted round donates its input state; the caller's initial parameters must stay usable."""
  data = make_population(num_clients=4)
  before = [np.asarray(leaf).copy() for leaf in jax.tree.leaves(tiny_params)]
  run_training(fed_avg(tiny_model, client_learning_rate=0.1), data, tiny_params,
               client_spec=ClientSpec(batch_size=4), clients_per_round=2, num_rounds=2, progress=False)
  for leaf, copy in zip(jax.tree.leaves(tiny_params), before):
    np.testing.assert_array_equal(np.asarray(leaf), copy)  # raises if the buffer had been donated


def test_flatten_metrics():
  flat = flatten_metrics({"a": {"b": 1, "c": {"d": 2.5}}, "empty": (), "vec": [1, 2]})
  assert flat == {"a/b": 1, "a/c/d": 2.5, "vec": [1, 2]}


@pytest.mark.parametrize("kwargs, match", [
    (dict(clients_per_round=0), "clients_per_round"),
    (dict(clients_per_round=99), "clients_per_round"),
    (dict(num_rounds=0), "num_rounds"),
    (dict(seed=-1), "seed"),
    (dict(evaluate_every=0), "evaluate_every"),
    (dict(client_spec=4), "client_spec"),
])
def test_bad_arguments(tiny_model, tiny_params, kwargs, match):
  args = dict(client_spec=ClientSpec(batch_size=4), clients_per_round=2, num_rounds=1)
  args.update(kwargs)
  with pytest.raises((ValueError, TypeError), match=match):
    run_training(fed_avg(tiny_model, client_learning_rate=0.1), make_population(num_clients=4), tiny_params,
                 progress=False, **args)
