"""Smoke test of ``benchmarks/lora_memory.py`` on a tiny transformer, and the design claim it measures: with the
base bound by ``core.partial_model`` and broadcast, the compiled ``vmap`` round holds no per-client copy of any base
matrix; with the base inside the trained params (the optax mask), every client carries one."""

from __future__ import annotations

import importlib.util
import pathlib

SCRIPT = pathlib.Path(__file__).resolve().parents[2] / "benchmarks" / "lora_memory.py"
TINY = dict(width=16, layers=1, heads=2, rank=2, num_steps=2, batch_size=2, sequence_length=6)


def load():
  spec = importlib.util.spec_from_file_location("lora_memory", SCRIPT)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_shared_base_has_no_per_client_copy_and_the_base_in_params_has_one_per_client():
  lora_memory = load()
  shared = lora_memory.measure(3, "shared", **TINY)
  in_params = lora_memory.measure(3, "in_params", **TINY)
  assert shared["per_client_base_buffers"] == 0
  assert in_params["per_client_base_buffers"] > 0
  for row in (shared, in_params):
    assert row["peak_bytes"] >= row["argument_bytes"] >= row["base_bytes"] > row["adapter_bytes"] > 0
  assert in_params["temp_bytes"] > shared["temp_bytes"]


def test_main_prints_the_table(capsys):
  lora_memory = load()
  assert lora_memory.main(["--clients", "1", "--variants", "shared", "--width", "16", "--layers", "1",
                           "--heads", "2", "--rank", "2"]) == 0
  out = capsys.readouterr().out
  assert "| 1 | shared |" in out and "base" in out
