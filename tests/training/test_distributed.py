"""Multi-process runs (experiments/distributed.py): two processes on localhost give the one-process round.

The two-process test starts this file as a script twice (``python test_distributed.py worker ...``): each process
exposes two CPU devices, joins the run through ``jax.distributed`` (gloo collectives over TCP) and trains one FedAvg
round with ``run_training`` on a 4-device client mesh, packing only its own clients; process 0 writes the result.
The test compares it with the same round run in one process with the default runner.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:  # when run as the worker script
  sys.path.insert(0, ROOT)

from fedjax_lite.core.packing import ClientSpec, pack_clients  # noqa: E402
from fedjax_lite.training.distributed import DistributedConfig  # noqa: E402
from tests.conftest import TinyMLP, make_population  # noqa: E402

NUM_CLIENTS = 7
COHORT = 5  # per round, of NUM_CLIENTS: 5 slots padded to 2 processes x 2 devices x 2 slots
SPEC = ClientSpec(batch_size=4, num_epochs=2)
SEED = 3
WORKER_TIMEOUT_S = 90


def _job(runner):
  """The tiny job both sides run: TinyMLP, FedAvg with client SGD 0.1, 7 ragged clients, 5 a round."""
  import jax

  from fedjax_lite.algorithms import fed_avg
  from fedjax_lite.models.adapter import from_flax

  model = from_flax(TinyMLP(), np.zeros((1, 8), np.float32))
  population = make_population(num_clients=NUM_CLIENTS, seed=SEED)
  process = fed_avg(model, client_learning_rate=0.1, runner=runner)
  return process, population, model.init(jax.random.key(SEED))


def worker(port: int, process_id: int, output_dir: str) -> None:
  """One process of the two-process run (see the module docstring)."""
  from fedjax_lite.training import distributed

  distributed.initialize(DistributedConfig(f"127.0.0.1:{port}", num_processes=2, process_id=process_id,
                                           local_devices=2))
  import jax

  from fedjax_lite.core.runner import Runner
  from fedjax_lite.training.loop import run_training

  assert (jax.process_count(), jax.device_count(), jax.local_device_count()) == (2, 4, 2), jax.devices()
  mesh = distributed.global_client_mesh()
  process, population, params = _job(Runner(mesh=mesh))
  process = distributed.distribute_process(process, mesh)
  shard = distributed.ProcessShard(mesh)
  packer = shard.packer(SPEC, population)
  packed_here = []

  def recording_packer(cohort, **kwargs):  # what this process packed: its slots' examples only
    placed, num_real = packer(cohort, **kwargs)
    local = [np.asarray(s.data) for s in sorted(placed["num_examples"].addressable_shards,
                                               key=lambda s: s.index[0].start)]
    packed_here.append({"slots": list(shard.slot_range(kwargs["cohort_size"])),
                        "num_examples": np.concatenate(local).tolist(), "num_real": num_real})
    return placed, num_real

  result = run_training(process, population, params, client_spec=SPEC, clients_per_round=COHORT, num_rounds=1,
                        seed=SEED, progress=False, round_packer=recording_packer)
  # Round 2 takes the state in the layout round 1 returned it: no recompilation.
  step = jax.jit(process.next)
  state = step(result.state, *_round_inputs(packer, population, 1))[0]
  step(state, *_round_inputs(packer, population, 2))
  record = {"packed": packed_here, "history": result.history, "cache_size": step._cache_size()}
  if distributed.is_writer():
    leaves = [np.asarray(leaf).tolist() for leaf in jax.tree.leaves(result.state.params)]
    record["params"] = leaves
  with open(os.path.join(output_dir, f"process{process_id}.json"), "w") as sink:
    json.dump(record, sink)
  distributed.shutdown()


def _round_inputs(packer, population, round_num):
  """Round ``round_num``'s global round data and key, as ``run_training`` makes them."""
  import jax

  from fedjax_lite.core.sampling import UniformSampler

  cohort = UniformSampler(NUM_CLIENTS, COHORT, SEED)(round_num)
  placed, _ = packer(cohort, seed=SEED, round_num=round_num, num_steps=SPEC.max_num_steps(population),
                     cohort_size=COHORT)
  return placed, jax.random.fold_in(jax.random.key(SEED), round_num)


def _free_port() -> int:
  with socket.socket() as probe:
    probe.bind(("127.0.0.1", 0))
    return probe.getsockname()[1]


def _gloo_available() -> str | None:
  """None, or why this jaxlib has no CPU collectives for cross-process psum."""
  import jax

  if "jax_cpu_collectives_implementation" not in jax.config.values:
    return "this jax has no jax_cpu_collectives_implementation option (no CPU cross-process collectives)"
  try:
    from jax._src.lib import _jax
  except ImportError:
    return None  # the worker reports a real failure
  if not hasattr(_jax, "make_gloo_tcp_collectives"):
    return "this jaxlib was built without gloo TCP collectives (make_gloo_tcp_collectives missing)"
  return None


def test_two_processes_match_one_process(tmp_path):
  """Two processes x two CPU devices train the one-process round (to float32 summation order)."""
  reason = _gloo_available()
  if reason is not None:
    pytest.skip(reason)
  port = _free_port()
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  env.pop("XLA_FLAGS", None)  # the workers set their devices with local_devices
  results = _run_workers([[sys.executable, os.path.abspath(__file__), "worker", str(port), str(k), str(tmp_path)]
                          for k in range(2)], env, WORKER_TIMEOUT_S)
  for k, (code, out) in enumerate(results):
    assert code == 0, f"process {k} failed:\n{out[-4000:]}"
  records = [json.loads((tmp_path / f"process{k}.json").read_text()) for k in range(2)]

  # Each process packed only its own block of slots: 5 clients -> 2 x 4 slots, real clients in slots 0..4.
  import jax

  from fedjax_lite.core.sampling import UniformSampler
  from fedjax_lite.training.loop import run_training

  process, population, params = _job(None)  # one process, the default runner
  cohort = UniformSampler(NUM_CLIENTS, COHORT, SEED)(0)
  whole = SPEC.pack(population, cohort, seed=SEED, round_num=0, num_steps=SPEC.max_num_steps(population),
                    cohort_size=8)["num_examples"].tolist()
  assert records[0]["packed"][0]["slots"] == [0, 4] and records[1]["packed"][0]["slots"] == [4, 8]
  assert records[0]["packed"][0]["num_examples"] == whole[:4]
  assert records[1]["packed"][0]["num_examples"] == whole[4:]
  assert records[0]["packed"][0]["num_real"] == records[1]["packed"][0]["num_real"] == COHORT
  assert records[0]["cache_size"] == 1  # round 2 did not recompile

  reference = run_training(process, population, params, client_spec=SPEC, clients_per_round=COHORT, num_rounds=1,
                           seed=SEED, progress=False)
  # The same clients, keys and shuffles; the 5 weighted deltas are summed in another order (over 4 devices and a
  # psum instead of one process's scan), then divided and applied: a few ulps times (clients + 2) at the
  # parameters' scale. The loss is a sum over the round's examples.
  from tests.tolerances import float_atol

  for got, want in zip(records[0]["params"], jax.tree.leaves(reference.state.params)):
    want = np.asarray(want)
    np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=0,
                               atol=float_atol(COHORT + 2, float(np.max(np.abs(want)))))
  ref, got0, got1 = reference.history[0], records[0]["history"][0], records[1]["history"][0]
  num_examples = ref["client_work/train/num_examples"]
  assert got0["client_work/train/num_examples"] == got1["client_work/train/num_examples"] == num_examples
  assert got0["client_work/train/loss"] == got1["client_work/train/loss"]  # every process reads the same metrics
  assert got0["client_work/train/loss"] == pytest.approx(
      ref["client_work/train/loss"], abs=float_atol(num_examples, abs(ref["client_work/train/loss"])))


def test_client_slots_pack_a_slice_of_the_cohort():
  """pack_clients(client_slots=(a, b)) equals packing the whole cohort and slicing slots a..b-1."""
  population = make_population(num_clients=NUM_CLIENTS, seed=SEED)
  cohort = [4, 0, 6, 2, 5]
  whole = pack_clients(population, cohort, batch_size=3, num_epochs=2, cohort_size=8, seed=1, round_num=2)
  for start, stop in [(0, 4), (4, 8), (2, 5), (5, 8)]:
    part = pack_clients(population, cohort, batch_size=3, num_epochs=2, cohort_size=8, seed=1, round_num=2,
                        client_slots=(start, stop))
    assert sorted(part) == sorted(whole)
    for key in whole:
      np.testing.assert_array_equal(part[key], whole[key][start:stop], err_msg=key)


@pytest.mark.parametrize("slots", [(4, 4), (-1, 2), (0, 9), (5, 3)])
def test_client_slots_out_of_range(slots):
  with pytest.raises(ValueError, match="client_slots"):
    pack_clients(make_population(), [0, 1], batch_size=2, cohort_size=8, client_slots=slots)


@pytest.mark.parametrize("kwargs, match", [
    (dict(coordinator_address="localhost", num_processes=2, process_id=0), "host:port"),
    (dict(coordinator_address="localhost:99999", num_processes=2, process_id=0), "port"),
    (dict(coordinator_address="localhost:1234", num_processes=0, process_id=0), "num_processes"),
    (dict(coordinator_address="localhost:1234", num_processes=2, process_id=2), "process_id"),
    (dict(coordinator_address="localhost:1234", num_processes=2, process_id=0, local_devices=0), "local_devices"),
])
def test_config_validation(kwargs, match):
  with pytest.raises(ValueError, match=match):
    DistributedConfig(**kwargs)


def test_config_from_env():
  assert DistributedConfig.from_env({}) is None
  config = DistributedConfig.from_env({"FEDJAX_LITE_COORDINATOR_ADDRESS": "10.0.0.1:8476",
                                       "FEDJAX_LITE_NUM_PROCESSES": "4", "FEDJAX_LITE_PROCESS_ID": "3"})
  assert config == DistributedConfig("10.0.0.1:8476", 4, 3)
  with pytest.raises(ValueError, match="FEDJAX_LITE_PROCESS_ID"):
    DistributedConfig.from_env({"FEDJAX_LITE_COORDINATOR_ADDRESS": "h:1", "FEDJAX_LITE_NUM_PROCESSES": "2"})
  with pytest.raises(ValueError, match="integer"):
    DistributedConfig.from_env({"FEDJAX_LITE_COORDINATOR_ADDRESS": "h:1", "FEDJAX_LITE_NUM_PROCESSES": "two",
                                "FEDJAX_LITE_PROCESS_ID": "0"})


def test_initialize_after_backend_start_is_refused():
  import jax

  from fedjax_lite.training import distributed

  jax.devices()  # the backend is up in this (pytest) process
  with pytest.raises(RuntimeError, match="before JAX initializes"):
    distributed.initialize(DistributedConfig("127.0.0.1:1234", 2, 0))


def _run_workers(commands, env, timeout_s):
  """Starts one subprocess per command; returns their (return code, output) after at most ``timeout_s``."""
  procs = [subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for command in commands]
  deadline = time.monotonic() + timeout_s
  outputs = []
  try:
    for proc in procs:
      outputs.append(proc.communicate(timeout=max(1.0, deadline - time.monotonic()))[0])
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
        proc.communicate()
  return [(proc.returncode, out) for proc, out in zip(procs, outputs)]


def test_cli_two_processes_write_one_summary(tmp_path):
  """``fedjax-lite train`` with the process flags: both processes finish, only process 0 writes and prints."""
  reason = _gloo_available()
  if reason is not None:
    pytest.skip(reason)
  port = _free_port()
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  env.pop("XLA_FLAGS", None)
  flags = ["train", "--dataset", "synthetic", "--num-clients", "6", "--model", "dense", "--rounds", "2",
           "--clients-per-round", "3", "--local-epochs", "1", "--eval-every", "1", "--json", "--log-format",
           "jsonl", "--coordinator-address", f"127.0.0.1:{port}", "--num-processes", "2", "--local-devices", "1"]
  results = _run_workers([[sys.executable, "-m", "fedjax_lite.training.cli", *flags, "--process-id", str(k),
                           "--output-dir", str(tmp_path / f"out{k}")] for k in range(2)], env, WORKER_TIMEOUT_S)
  for k, (code, out) in enumerate(results):
    assert code == 0, f"process {k} failed:\n{out[-4000:]}"
  summary = json.loads([line for line in results[0][1].splitlines() if line.startswith("{")][-1])
  assert (summary["processes"], summary["devices"], summary["rounds"]) == (2, 2, 2)
  assert len((tmp_path / "out0" / "metrics.jsonl").read_text().splitlines()) == 2
  assert not (tmp_path / "out1").exists()
  assert not any(line.startswith("{") for line in results[1][1].splitlines())


@pytest.mark.parametrize("argv, fragment", [
    (["--num-processes", "2"], "--num-processes applies only with --coordinator-address"),
    (["--local-devices", "2"], "--local-devices applies only with --coordinator-address"),
    (["--coordinator-address", "h:1234", "--num-processes", "2"], "needs --num-processes and --process-id"),
    (["--coordinator-address", "h:1234", "--num-processes", "2", "--process-id", "2"], "--process-id (2) must be <"),
    (["--coordinator-address", "h", "--num-processes", "2", "--process-id", "0"], "--coordinator-address must be"),
    (["--coordinator-address", "h:1", "--num-processes", "2", "--process-id", "0", "--checkpoint-dir", "x"],
     "--checkpoint-dir is not supported with several processes"),
    (["--coordinator-address", "h:1", "--num-processes", "2", "--process-id", "0", "--algorithm", "scaffold"],
     "scaffold keeps per-client state"),
    (["--process-id", "-1"], "non-negative"),
])
def test_cli_bad_process_flags_one_line_exit_2(argv, fragment, capsys):
  from fedjax_lite.training import cli

  assert cli.main(["train", "--model", "dense", "--rounds", "1", *argv]) == 2
  err = capsys.readouterr().err
  assert fragment in err and err.count("\n") == 1, err


def test_cli_process_flags_from_the_environment():
  from fedjax_lite.training import cli

  args = cli.build_parser().parse_args(["train"])
  environ = {"FEDJAX_LITE_COORDINATOR_ADDRESS": "h:1", "FEDJAX_LITE_NUM_PROCESSES": "2",
             "FEDJAX_LITE_PROCESS_ID": "1", "FEDJAX_LITE_LOCAL_DEVICES": "1"}
  assert cli.distributed_config(args, set(), environ) == DistributedConfig("h:1", 2, 1, 1)
  assert cli.distributed_config(args, set(), {}) is None
  with pytest.raises(cli.UsageError, match="FEDJAX_LITE_NUM_PROCESSES"):
    cli.distributed_config(args, set(), {"FEDJAX_LITE_COORDINATOR_ADDRESS": "h:1"})


if __name__ == "__main__":
  if len(sys.argv) == 5 and sys.argv[1] == "worker":
    worker(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
  else:
    sys.exit("usage: test_distributed.py worker PORT PROCESS_ID OUTPUT_DIR")
