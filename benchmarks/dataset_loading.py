"""Loading speed and memory of the federated EMNIST loader on generated data of EMNIST's real size.

Writes a TFF-format ``emnist_all.sqlite`` (one serialized ``tf.train.Example`` per row; splits ``all_train``
and ``all_test``) with 3,400 writers and 671,585 + 77,483 examples of 28x28 float32 pixels (the sizes of
TFF's ``emnist.load_data(only_digits=False)``), client sizes drawn from a log-normal and rows written in a
shuffled client order, then measures in fresh processes:

* **cold**: ``load_emnist(only_digits=False, data_dir=...)`` with an empty cache: parse every row and build the
  memory-mapped cache (examples/second, peak RSS);
* **warm**: the same call again: open the cache (examples/second, peak RSS), then the time to pack one round
  (10 random clients) and to read every pixel once (a full pass, first touch of the memmaps).

Peak RSS is ``ru_maxrss`` of the measuring process; it counts the file-backed pages of the memory-mapped cache
that the process touched (reclaimable page cache, not private memory). Prints one JSON line (appended to
``--output`` if given). ``--clients``/``--examples`` shrink the run (the smoke test uses a tiny one).

  .venv/bin/python benchmarks/dataset_loading.py                 # ~5 GB of disk under --workdir, a few minutes
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

EMNIST_TRAIN, EMNIST_TEST, EMNIST_CLIENTS = 671_585, 77_483, 3_400


def _peak_rss_gib() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def _client_sizes(num_clients: int, num_examples: int, rng: np.random.Generator) -> np.ndarray:
  weights = rng.lognormal(0.0, 0.6, num_clients)
  sizes = np.maximum(1, np.floor(weights / weights.sum() * num_examples)).astype(np.int64)
  sizes[np.argmax(sizes)] += num_examples - sizes.sum()
  return sizes


def generate(path: Path, num_clients: int, num_train: int, num_test: int, seed: int = 0) -> float:
  """Writes the SQLite file; returns seconds."""
  from fedjax_lite.datasets.example_proto import encode_example  # pylint: disable=import-outside-toplevel
  start = time.perf_counter()
  rng = np.random.default_rng(seed)
  pool = (rng.integers(0, 256, size=(4096, 28, 28)) / 255.0).astype(np.float32)  # distinct images, reused
  connection = sqlite3.connect(path)
  connection.execute("CREATE TABLE examples (split_name TEXT NOT NULL, client_id TEXT NOT NULL, "
                     "serialized_example_proto BLOB NOT NULL)")
  connection.execute("CREATE TABLE client_metadata (client_id TEXT NOT NULL, split_name TEXT NOT NULL, "
                     "num_examples INTEGER NOT NULL)")
  for split, total in (("all_train", num_train), ("all_test", num_test)):
    sizes = _client_sizes(num_clients, total, rng)
    ids = [f"f{k:04d}_{k % 97:02d}" for k in range(num_clients)]
    for k in rng.permutation(num_clients):
      rows = []
      for _ in range(sizes[k]):
        image = pool[rng.integers(pool.shape[0])]
        rows.append((split, ids[k], encode_example({"pixels": image, "label": int(rng.integers(62))})))
      connection.executemany("INSERT INTO examples VALUES (?, ?, ?)", rows)
    connection.executemany("INSERT INTO client_metadata VALUES (?, ?, ?)",
                           [(ids[k], split, int(sizes[k])) for k in range(num_clients)])
  connection.commit()
  connection.close()
  return time.perf_counter() - start


def measure(data_dir: str, cache_dir: str, warm: bool) -> dict:
  """Runs in a fresh process: one load_emnist call (and, warm, one round's packing and a full pass)."""
  start = time.perf_counter()
  from fedjax_lite import core, datasets  # pylint: disable=import-outside-toplevel
  import_s = time.perf_counter() - start
  start = time.perf_counter()
  data = datasets.load_emnist(only_digits=False, data_dir=data_dir, cache_dir=cache_dir)
  load_s = time.perf_counter() - start
  examples = data.train.num_examples + data.test.num_examples
  result = {"seconds": load_s, "examples": examples, "examples_per_s": examples / load_s,
            "import_s": import_s, "peak_rss_gib_after_load": _peak_rss_gib(),
            "train_clients": data.train.num_clients}
  if warm:
    spec = core.ClientSpec(batch_size=20, num_epochs=1)
    cohort = core.sample_clients(data.train.num_clients, min(10, data.train.num_clients), seed=0, round_num=0)
    start = time.perf_counter()
    spec.pack(data.train, cohort, seed=0, round_num=0, num_steps=spec.max_num_steps(data.train))
    result["pack_round_s"] = time.perf_counter() - start
    start = time.perf_counter()
    total = 0.0
    x = data.train.examples["x"]
    for begin in range(0, x.shape[0], 65536):
      total += float(np.asarray(x[begin:begin + 65536], np.float64).sum())
    result["full_pass_s"] = time.perf_counter() - start
    result["full_pass_checksum"] = total
  result["peak_rss_gib"] = _peak_rss_gib()
  return result


def _child(args: list[str]) -> dict:
  completed = subprocess.run([sys.executable, __file__, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, check=False)
  if completed.returncode != 0:
    raise RuntimeError(completed.stderr[-4000:])
  return json.loads(completed.stdout.strip().splitlines()[-1])


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--clients", type=int, default=EMNIST_CLIENTS)
  parser.add_argument("--examples", type=int, default=EMNIST_TRAIN, help="training examples (test: 11.5%% more)")
  parser.add_argument("--workdir", default=None, help="where the files go (default: a temporary folder)")
  parser.add_argument("--keep", action="store_true", help="keep the generated files")
  parser.add_argument("--output", default=None, help="append the JSON line to this file")
  parser.add_argument("--phase", choices=("cold", "warm"), default=None, help=argparse.SUPPRESS)
  parser.add_argument("--data-dir", default=None, help=argparse.SUPPRESS)
  parser.add_argument("--cache-dir", default=None, help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.phase:
    print(json.dumps(measure(args.data_dir, args.cache_dir, warm=args.phase == "warm")))
    return {}
  if args.clients < 1 or args.examples < args.clients:
    parser.error("--clients must be >= 1 and --examples >= --clients")
  num_test = max(args.clients, round(args.examples * EMNIST_TEST / EMNIST_TRAIN))
  workdir = Path(args.workdir or tempfile.mkdtemp(prefix="fedjax_lite_dataset_bench_"))
  data_dir, cache_dir = workdir / "data", workdir / "cache"
  data_dir.mkdir(parents=True, exist_ok=True)
  try:
    generate_s = generate(data_dir / "emnist_all.sqlite", args.clients, args.examples, num_test)
    sqlite_gib = (data_dir / "emnist_all.sqlite").stat().st_size / 2**30
    common = ["--data-dir", str(data_dir), "--cache-dir", str(cache_dir)]
    cold = _child(["--phase", "cold", *common])
    warm = _child(["--phase", "warm", *common])
    cache_gib = sum(p.stat().st_size for p in (cache_dir / "arrays").rglob("*") if p.is_file()) / 2**30
    report = {"benchmark": "dataset_loading", "clients": args.clients, "train_examples": args.examples,
              "test_examples": num_test, "generate_s": generate_s, "sqlite_gib": sqlite_gib, "cache_gib": cache_gib,
              "cold": cold, "warm": warm, "warm_speedup": cold["seconds"] / warm["seconds"]}
  finally:
    if not args.keep:
      shutil.rmtree(workdir, ignore_errors=True)
  line = json.dumps(report)
  print(line)
  if args.output:
    with open(args.output, "a", encoding="utf-8") as file:
      file.write(line + "\n")
  return report


if __name__ == "__main__":
  sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
  main()
