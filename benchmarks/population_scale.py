"""Population scale: a 340,000-client population on memory-mapped files and a 10,000-client round drawn from it.

Issue 12, section 5. StackOverflow's federated split has about 340,000 clients; this script builds a population of
that many clients (EMNIST-shaped examples: ``x`` uint8 28x28x1, ``y`` int32 of 62 classes, client sizes
``Geometric(1 / m)`` on 1, 2, ..., mean ``m = --mean-examples``) written to ``.npy`` files in a temporary directory and opened with
``np.load(mmap_mode='r')``, so the population lives on disk and in the page cache, not in the process. A
:class:`fedjax_lite.core.FederatedData` is built over those memmaps with its CSR constructor (``client_ids``,
``examples``, ``offsets``), which keeps read-only memmaps uncopied. Then, for ``--rounds`` rounds, a cohort of
``--cohort`` clients is sampled (``core.sample_clients``) and packed with one local step each (batch 10,
``max_steps=1``), and a FedAvg round of a dense softmax (784 -> 62) runs on it with the default runner (``uint8 ->
float32 / 255`` inside the jitted round, so only the cohort's bytes are converted; ``--runner chunked`` for
``Runner('chunked')``).

Prints ONE JSON line: the host RSS (psutil) before and after building the population, after each packing and after
the rounds; the bytes of the population's files and of a packed cohort; packing throughput (clients/s); the round's
time; the device's peak memory where the backend reports it (GPU/TPU; ``null`` on CPU). The claim under test:
host memory grows with the clients in flight (a packed cohort), not with the population (the files).

Usage: ``python benchmarks/population_scale.py [--quick] [--output results.jsonl]`` (~1-2 minutes here;
``--quick``: 3,400 clients, cohorts of 100, seconds).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time

import numpy as np

from fedjax_lite.training.cli import number_type, positive_int

FEATURE_SHAPE = (28, 28, 1)
NUM_CLASSES = 62
BATCH_SIZE = 10


_mean_examples = number_type(float, "a number in [1, 1e6)", lambda value: 1.0 <= value < 1e6)


def rss_bytes() -> dict:
  """The process's resident memory now: ``rss`` (psutil) and, on Linux, its split into ``anon`` (the process's own
  heap: what packing allocates) and ``file`` (pages of mapped files, here the memmapped population: the kernel maps
  already-cached neighbouring pages on every fault, so this counts page cache that the kernel can reclaim)."""
  import psutil

  memory = {"rss": int(psutil.Process().memory_info().rss)}
  try:
    with open("/proc/self/status") as status:
      fields = dict(line.split(":", 1) for line in status if ":" in line)
    memory["anon"] = int(fields["RssAnon"].split()[0]) * 1024
    memory["file"] = int(fields["RssFile"].split()[0]) * 1024
  except (OSError, KeyError, ValueError):
    pass
  return memory


def peak_rss_bytes() -> int:
  """The process's peak resident set size so far (``getrusage``; kilobytes on Linux, bytes on macOS)."""
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return int(peak if sys.platform == "darwin" else peak * 1024)


def device_peak_bytes() -> int | None:
  """``peak_bytes_in_use`` of the first device, or None where the backend does not report it (CPU)."""
  import jax

  try:
    stats = jax.devices()[0].memory_stats()
  except Exception:  # noqa: BLE001 -- not implemented on some backends
    return None
  return int(stats["peak_bytes_in_use"]) if stats and "peak_bytes_in_use" in stats else None


def write_npy_in_chunks(path: str, shape: tuple[int, ...], dtype, make_chunk, chunk_rows: int = 65536) -> int:
  """Writes a ``.npy`` file chunk by chunk with plain writes (no mapping: the pages go to the page cache, not to
  this process's RSS); ``make_chunk(start, stop)`` returns rows ``start:stop``. Returns the file's size."""
  dtype = np.dtype(dtype)
  header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": tuple(shape)}
  with open(path, "wb") as file:
    np.lib.format.write_array_header_1_0(file, header)
    for start in range(0, shape[0], chunk_rows):
      stop = min(start + chunk_rows, shape[0])
      chunk = np.ascontiguousarray(make_chunk(start, stop), dtype=dtype)
      if chunk.shape != (stop - start,) + tuple(shape[1:]):
        raise ValueError(f"make_chunk returned shape {chunk.shape} for rows {start}:{stop}")
      file.write(chunk.tobytes())
  return os.path.getsize(path)


def write_population(directory: str, num_clients: int, mean_examples: float, seed: int) -> dict:
  """Client sizes ``~ Geometric(1 / mean_examples)`` (support 1, 2, ...; mean ``mean_examples``) and the
  examples' files ``x.npy`` (uint8) and ``y.npy`` (int32) in ``directory``; returns sizes and file bytes."""
  rng = np.random.default_rng(seed)
  sizes = rng.geometric(1.0 / mean_examples, num_clients).astype(np.int64)  # support {1, 2, ...}, mean m
  total = int(sizes.sum())
  x_bytes = write_npy_in_chunks(os.path.join(directory, "x.npy"), (total,) + FEATURE_SHAPE, np.uint8,
                                lambda a, b: rng.integers(0, 256, (b - a,) + FEATURE_SHAPE, dtype=np.uint8))
  y_bytes = write_npy_in_chunks(os.path.join(directory, "y.npy"), (total,), np.int32,
                                lambda a, b: rng.integers(0, NUM_CLASSES, b - a, dtype=np.int32))
  np.save(os.path.join(directory, "offsets.npy"), np.concatenate([[0], np.cumsum(sizes)]))
  return {"num_examples": total, "file_bytes": x_bytes + y_bytes}


def open_population(directory: str):
  """A ``FederatedData`` over the memory-mapped files of :func:`write_population` (nothing is read yet)."""
  from fedjax_lite.core import FederatedData

  x = np.load(os.path.join(directory, "x.npy"), mmap_mode="r")
  y = np.load(os.path.join(directory, "y.npy"), mmap_mode="r")
  offsets = np.load(os.path.join(directory, "offsets.npy"))
  client_ids = tuple(f"c{k:06d}" for k in range(offsets.shape[0] - 1))  # sorted order = storage order
  return FederatedData(client_ids, {"x": x, "y": y}, offsets)


def from_arrays_keeps_memmap(directory: str) -> bool:
  """Whether ``FederatedData.from_arrays`` keeps a read-only memmap uncopied (checked on a small file)."""
  from fedjax_lite.core import FederatedData

  path = os.path.join(directory, "small.npy")
  np.save(path, np.arange(12, dtype=np.float32).reshape(6, 2))
  small = np.load(path, mmap_mode="r")
  data = FederatedData.from_arrays({"x": small}, np.repeat(np.arange(3), 2))
  return isinstance(data.examples["x"], np.memmap)


def _growth(before: dict, after: list[dict], key: str) -> int | None:
  """The largest growth of ``key`` from ``before`` to any of ``after`` (None where not measured)."""
  if key not in before or any(key not in m for m in after):
    return None
  return max(m[key] for m in after) - before[key]


def build_round(process):
  """``process.next`` behind a jit that turns the packed uint8 images into float32 in [0, 1] on the device."""
  import jax
  import jax.numpy as jnp

  @jax.jit
  def round_fn(state, round_data, key):
    round_data = dict(round_data, x=round_data["x"].astype(jnp.float32) / 255.0)
    return process.next(state, round_data, key)

  return round_fn


def run(num_clients: int, cohort: int, rounds: int, mean_examples: float, seed: int, directory: str,
        strategy: str = "auto", chunk_size: int = 8) -> dict:
  import jax

  from fedjax_lite import models
  from fedjax_lite.algorithms import fed_avg
  from fedjax_lite.core import Runner, pack_clients, sample_clients

  if cohort > num_clients:
    raise ValueError(f"cohort ({cohort}) must be <= clients ({num_clients})")
  report = {"clients": num_clients, "cohort": cohort, "rounds": rounds, "mean_examples_per_client": mean_examples,
            "local_steps": 1, "batch_size": BATCH_SIZE, "model": f"dense softmax 784 -> {NUM_CLASSES}",
            "runner": Runner(strategy, chunk_size=chunk_size).resolved_strategy(), "backend": jax.default_backend()}
  model = models.dense_softmax(num_classes=NUM_CLASSES, input_shape=FEATURE_SHAPE)
  process = fed_avg(model, client_learning_rate=0.1, runner=Runner(strategy, chunk_size=chunk_size))
  round_fn = build_round(process)
  state = process.init(model.init(jax.random.key(seed)))
  rss = {"before_warm_up": rss_bytes()}
  # Compile the round first on an all-zero cohort of the same shapes, so that the RSS figures below measure the
  # data, not XLA's compilation.
  start = time.perf_counter()
  warm = {"x": np.zeros((cohort, 1, BATCH_SIZE) + FEATURE_SHAPE, np.uint8),
          "y": np.zeros((cohort, 1, BATCH_SIZE), np.int32), "mask": np.ones((cohort, 1, BATCH_SIZE), bool),
          "num_examples": np.full(cohort, BATCH_SIZE, np.int32)}
  jax.block_until_ready(round_fn(state, warm, jax.random.key(seed)))
  report["compile_and_warm_up_s"] = round(time.perf_counter() - start, 3)
  del warm
  report["from_arrays_keeps_memmap"] = from_arrays_keeps_memmap(directory)

  start = time.perf_counter()
  written = write_population(directory, num_clients, mean_examples, seed)
  report.update(population_examples=written["num_examples"], population_file_bytes=written["file_bytes"],
                write_s=round(time.perf_counter() - start, 3))
  rss["before_population"] = rss_bytes()
  start = time.perf_counter()
  population = open_population(directory)
  report["open_s"] = round(time.perf_counter() - start, 3)
  rss["after_population"] = rss_bytes()
  report["population_is_memmapped"] = all(isinstance(v, np.memmap) for v in population.examples.values())

  pack_s, round_s, packed_bytes, rss_after_pack, rss_after_round = [], [], 0, [], []
  metrics = None
  for round_num in range(rounds):
    cohort_ids = sample_clients(population.num_clients, cohort, seed=seed, round_num=round_num)
    start = time.perf_counter()
    packed = pack_clients(population, cohort_ids, batch_size=BATCH_SIZE, max_steps=1, num_steps=1, seed=seed,
                          round_num=round_num)
    pack_s.append(time.perf_counter() - start)
    packed_bytes = sum(value.nbytes for value in packed.values())
    rss_after_pack.append(rss_bytes())  # the previous cohort is freed: this holds one cohort in flight
    start = time.perf_counter()
    state, metrics, _ = round_fn(state, packed, jax.random.fold_in(jax.random.key(seed), round_num))
    jax.block_until_ready((state, metrics))
    elapsed = time.perf_counter() - start
    round_s.append(elapsed)
    del packed
    rss_after_round.append(rss_bytes())
  rss["after_packing"] = rss_after_pack
  rss["after_each_round"] = rss_after_round
  rss["peak"] = peak_rss_bytes()
  params_finite = all(bool(np.all(np.isfinite(np.asarray(leaf)))) for leaf in jax.tree.leaves(state.params))
  pack_median = statistics.median(pack_s)
  report.update(
      rss_bytes=rss,
      population_rss_growth_bytes=rss["after_population"]["rss"] - rss["before_population"]["rss"],
      packing_rss_growth_bytes=max(m["rss"] for m in rss_after_pack) - rss["after_population"]["rss"],
      population_anon_growth_bytes=_growth(rss["before_population"], [rss["after_population"]], "anon"),
      packing_anon_growth_bytes=_growth(rss["after_population"], rss_after_pack, "anon"),
      packed_cohort_bytes=packed_bytes,
      pack_s=[round(s, 4) for s in pack_s],
      packing_clients_per_s=round(cohort / pack_median, 1),
      round_s=[round(s, 4) for s in round_s],
      seconds_per_round=round(statistics.median(round_s), 4),
      clients_per_s_in_round=round(cohort / statistics.median(round_s), 1),
      device_peak_bytes=device_peak_bytes(),
      params_finite=params_finite,
      train_loss=float(np.asarray(metrics["client_work"]["train"]["loss"]))
      if metrics is not None and "client_work" in metrics else None,
  )
  return report


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="3,400 clients, cohorts of 100: a smoke test")
  parser.add_argument("--clients", type=positive_int, default=None, help="population size (default 340,000)")
  parser.add_argument("--cohort", type=positive_int, default=None, help="clients per round (default 10,000)")
  parser.add_argument("--rounds", type=positive_int, default=3, help="rounds (each samples and packs a cohort)")
  parser.add_argument("--mean-examples", type=_mean_examples, default=3.0, help="mean examples per client")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--runner", choices=("auto", "sequential", "vmap", "chunked"), default="auto",
                      help="the round's client runner (default: the library's, sequential on CPU, vmap elsewhere)")
  parser.add_argument("--chunk-size", type=positive_int, default=8, help="clients per vmap chunk for chunked")
  parser.add_argument("--dir", default=None, help="where to write the population (default: a temporary dir)")
  parser.add_argument("--output", default=None, help="also append the JSON line to this file")
  args = parser.parse_args(argv)
  num_clients = args.clients or (3_400 if args.quick else 340_000)
  cohort = args.cohort or (100 if args.quick else 10_000)
  if cohort > num_clients:
    parser.error(f"--cohort ({cohort}) must be <= --clients ({num_clients})")
  start = time.perf_counter()
  with tempfile.TemporaryDirectory(dir=args.dir) as directory:
    report = run(num_clients, cohort, args.rounds, args.mean_examples, args.seed, directory, args.runner,
                 args.chunk_size)
  import jax
  import jaxlib

  report.update(benchmark="population_scale", quick=args.quick, total_s=round(time.perf_counter() - start, 2),
                jax=jax.__version__, jaxlib=jaxlib.__version__, python=platform.python_version(),
                date=time.strftime("%Y-%m-%d"))
  line = json.dumps(report)
  print(line, flush=True)
  if args.output:
    with open(args.output, "a") as file:
      file.write(line + "\n")
  return 0


if __name__ == "__main__":
  sys.exit(main())
