"""Trackers: JSON lines, CSV (widening header) and TensorBoard event files read back record by record."""

from __future__ import annotations

import csv
import json
import math
import struct

import numpy as np
import pytest

from fedjax_lite.training import tracking

RECORDS = [
    {"round": 0, "client_work/train/loss": 2.25, "aggregated_bits": 1024, "cumulative_aggregated_bits": 1024},
    {"round": 1, "client_work/train/loss": 1.5, "aggregated_bits": 1024, "cumulative_aggregated_bits": 2048,
     "evaluation/accuracy": 0.75, "aggregator/per_client": [1.0, 2.0]},
    {"round": 2, "client_work/train/loss": float("nan"), "aggregated_bits": 1024,
     "cumulative_aggregated_bits": 3072, "privacy/epsilon": np.float32(0.5), "flag": True},
]


def _crc32c(data: bytes) -> int:
  """CRC-32C (Castagnoli, reflected polynomial 0x82F63B78), bit by bit: independent of the writer's table."""
  crc = 0xFFFFFFFF
  for byte in data:
    crc ^= byte
    for _ in range(8):
      crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
  return crc ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> int:
  crc = _crc32c(data)
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def read_event_file(path) -> list:
  """TFRecord framing (u64 length, masked CRC of it, payload, masked CRC of it) -> decoded Event protos."""
  from tensorboardX.proto import event_pb2

  data = path.read_bytes()
  events, offset = [], 0
  while offset < len(data):
    header = data[offset:offset + 8]
    (length,) = struct.unpack("<Q", header)
    (length_crc,) = struct.unpack("<I", data[offset + 8:offset + 12])
    assert length_crc == _masked_crc(header)
    payload = data[offset + 12:offset + 12 + length]
    (payload_crc,) = struct.unpack("<I", data[offset + 12 + length:offset + 16 + length])
    assert payload_crc == _masked_crc(payload)
    event = event_pb2.Event()
    event.ParseFromString(payload)
    events.append(event)
    offset += 16 + length
  assert offset == len(data)
  return events


def test_crc32c_matches_the_standard_check_value():
  assert _crc32c(b"123456789") == 0xE3069283  # the CRC-32C catalogue's check value


def test_jsonl_tracker_writes_one_object_per_round(tmp_path):
  tracker = tracking.JsonlTracker(tmp_path / "m.jsonl")
  for record in RECORDS[:2]:
    tracker.write(record)
  tracker.close()
  lines = (tmp_path / "m.jsonl").read_text().splitlines()
  assert [json.loads(line) for line in lines] == RECORDS[:2]


def test_csv_tracker_widens_its_header_and_keeps_every_row(tmp_path):
  path = tmp_path / "m.csv"
  tracker = tracking.CsvTracker(path)
  tracker.write(RECORDS[0])
  assert path.read_text().splitlines() == [
      "round,client_work/train/loss,aggregated_bits,cumulative_aggregated_bits", "0,2.25,1024,1024"]
  for record in RECORDS[1:]:
    tracker.write(record)
  tracker.close()
  rows = list(csv.DictReader(path.open()))
  assert list(rows[0]) == ["round", "client_work/train/loss", "aggregated_bits", "cumulative_aggregated_bits",
                           "evaluation/accuracy", "aggregator/per_client", "privacy/epsilon", "flag"]
  assert [row["round"] for row in rows] == ["0", "1", "2"]
  assert rows[0]["evaluation/accuracy"] == "" and float(rows[1]["evaluation/accuracy"]) == 0.75
  assert json.loads(rows[1]["aggregator/per_client"]) == [1.0, 2.0]
  assert math.isnan(float(rows[2]["client_work/train/loss"]))  # NaN stays NaN, never a finite number
  assert float(rows[2]["privacy/epsilon"]) == 0.5 and rows[2]["flag"] == "True"
  assert [int(row["cumulative_aggregated_bits"]) for row in rows] == [1024, 2048, 3072]


def test_tensorboard_event_file_reads_back_every_scalar(tmp_path):
  pytest.importorskip("tensorboardX")
  tracker = tracking.TensorBoardTracker(tmp_path / "tb")
  for record in RECORDS:
    tracker.write(record)
  tracker.close()
  files = list((tmp_path / "tb").glob("events.out.tfevents.*"))
  assert len(files) == 1
  events = read_event_file(files[0])
  assert events[0].file_version.startswith("brain.Event:")
  scalars = {}
  for event in events[1:]:
    for value in event.summary.value:
      scalars[(value.tag, event.step)] = value.simple_value
  expected = {}
  for record in RECORDS:
    for key, value in record.items():
      if key != "round" and not isinstance(value, list):
        expected[(key, record["round"])] = float(value)
  assert set(scalars) == set(expected)  # lists skipped, the round is the step
  for key, value in expected.items():
    if math.isnan(value):
      assert math.isnan(scalars[key])
    else:  # simple_value is a float32
      assert scalars[key] == np.float32(value)


def test_a_new_tensorboard_tracker_replaces_the_old_event_files(tmp_path):
  pytest.importorskip("tensorboardX")
  (tmp_path / "tb").mkdir()
  (tmp_path / "tb" / "notes.txt").write_text("kept")
  first = tracking.TensorBoardTracker(tmp_path / "tb")
  first.write(RECORDS[0])
  first.write(RECORDS[1])
  first.close()
  second = tracking.TensorBoardTracker(tmp_path / "tb")  # a resumed run replays round 0 only
  second.write(RECORDS[0])
  second.close()
  files = list((tmp_path / "tb").glob("events.out.tfevents.*"))
  assert len(files) == 1 and (tmp_path / "tb" / "notes.txt").read_text() == "kept"
  assert {event.step for event in read_event_file(files[0])[1:]} == {0}
  kept = tracking.TensorBoardTracker(tmp_path / "tb", overwrite=False)
  kept.close()
  assert len(list((tmp_path / "tb").glob("events.out.tfevents.*"))) == 2


def test_make_trackers_writes_each_format_in_its_file(tmp_path):
  trackers = tracking.make_trackers("csv, jsonl,csv", tmp_path / "out")
  assert [type(t) for t in trackers] == [tracking.CsvTracker, tracking.JsonlTracker]
  for tracker in trackers:
    tracker.write(RECORDS[0])
    tracker.close()
  assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["metrics.csv", "metrics.jsonl"]
  assert all(isinstance(t, tracking.Tracker) for t in trackers)


@pytest.mark.parametrize("formats, message", [("", "at least one"), ("jsonl,xml", "unknown log format 'xml'"),
                                              ([], "at least one")])
def test_bad_formats_are_refused(formats, message, tmp_path):
  with pytest.raises(ValueError, match=message):
    tracking.make_trackers(formats, tmp_path)


def test_bad_records_and_paths_are_refused(tmp_path):
  tracker = tracking.CsvTracker(tmp_path / "m.csv")
  with pytest.raises(ValueError, match="'round'"):
    tracker.write({"loss": 1.0})
  with pytest.raises(TypeError, match="mapping"):
    tracker.write([("round", 0)])
  tracker.close()
  with pytest.raises(TypeError, match="path"):
    tracking.JsonlTracker("")


def test_cli_writes_every_log_format_and_quiet_prints_nothing(tmp_path, capsys):
  from fedjax_lite.training import cli

  out = tmp_path / "run"
  code = cli.main(["train", "--model", "dense", "--rounds", "3", "--eval-every", "2", "--clients-per-round", "4",
                   "--local-epochs", "1", "--output-dir", str(out), "--log-format", "csv,tensorboard,jsonl",
                   "--quiet"])
  assert code == 0
  captured = capsys.readouterr()
  assert captured.out == "" and "rounds" not in captured.err  # no summary line, no progress bar
  assert not (out / "training.png").exists()
  jsonl = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
  rows = list(csv.DictReader((out / "metrics.csv").open()))
  assert [int(row["round"]) for row in rows] == [record["round"] for record in jsonl] == [0, 1, 2]
  assert [float(row["client_work/train/loss"]) for row in rows] == [r["client_work/train/loss"] for r in jsonl]
  assert rows[0]["evaluation/accuracy"] == "" and float(rows[2]["evaluation/accuracy"]) == jsonl[2][
      "evaluation/accuracy"]
  events = read_event_file(next((out / "tensorboard").glob("events.out.tfevents.*")))
  losses = {event.step: value.simple_value for event in events for value in event.summary.value
            if value.tag == "client_work/train/loss"}
  assert losses == {r["round"]: np.float32(r["client_work/train/loss"]) for r in jsonl}
  summary = json.loads((out / "summary.json").read_text())
  assert summary["plot_file"] is None and summary["csv_file"].endswith("metrics.csv")


def test_cli_refuses_an_unknown_log_format(capsys):
  from fedjax_lite.training import cli

  assert cli.main(["train", "--log-format", "jsonl,xml"]) == cli.EXIT_USAGE
  assert "unknown log format 'xml'" in capsys.readouterr().err


def test_progress_bar_shows_round_loss_accuracy_epsilon_and_bits(tmp_path, capsys):
  from fedjax_lite.training import cli

  code = cli.main(["train", "--model", "dense", "--rounds", "2", "--eval-every", "1", "--local-epochs", "1",
                   "--aggregator", "dp", "--output-dir", str(tmp_path), "--log-format", "jsonl"])
  assert code == 0
  bar = capsys.readouterr().err.replace("\r", "\n").strip().splitlines()[-1]
  assert "2/2" in bar
  for label in ("loss=", "test_acc=", "eps=", "down_Mibit=", "up_Mibit="):
    assert label in bar, bar


def test_wandb_tracker_logs_scalars_by_round_through_the_wandb_api(monkeypatch):
  import sys
  import types

  calls = []

  class FakeRun:
    def log(self, scalars, step):
      calls.append(("log", scalars, step))

    def finish(self):
      calls.append(("finish",))

  fake = types.ModuleType("wandb")
  fake.init = lambda **kwargs: calls.append(("init", kwargs)) or FakeRun()
  monkeypatch.setitem(sys.modules, "wandb", fake)
  tracker = tracking.WandbTracker("fl-project", name="run-1", config={"rounds": 3}, mode="offline")
  for record in RECORDS[:2]:
    tracker.write(record)
  tracker.close()
  assert calls[0] == ("init", {"project": "fl-project", "name": "run-1", "config": {"rounds": 3}, "mode": "offline"})
  assert calls[1] == ("log", {"client_work/train/loss": 2.25, "aggregated_bits": 1024.0,
                              "cumulative_aggregated_bits": 1024.0}, 0)
  assert calls[2][2] == 1 and "aggregator/per_client" not in calls[2][1] and calls[3] == ("finish",)


def test_wandb_tracker_without_wandb_says_how_to_install(monkeypatch):
  import sys

  monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError
  with pytest.raises(ImportError, match=r"fedjax_lite\[wandb\]"):
    tracking.WandbTracker("fl-project")
  with pytest.raises(ValueError, match="mode"):
    tracking.WandbTracker("fl-project", mode="cloud")


def test_cli_log_format_wandb_uses_the_wandb_tracker_or_exits_2_without_wandb(tmp_path, monkeypatch, capsys):
  import sys
  import types

  from fedjax_lite.training import cli

  argv = ["train", "--model", "dense", "--rounds", "2", "--clients-per-round", "4", "--local-epochs", "1",
          "--output-dir", str(tmp_path / "run"), "--log-format", "wandb", "--quiet"]
  monkeypatch.setitem(sys.modules, "wandb", None)
  assert cli.main(argv) == cli.EXIT_USAGE
  assert "--log-format wandb" in capsys.readouterr().err
  logged = []

  class FakeRun:
    def log(self, scalars, step):
      logged.append((step, scalars))

    def finish(self):
      logged.append("finished")

  fake = types.ModuleType("wandb")
  fake.init = lambda **kwargs: logged.append(kwargs) or FakeRun()
  monkeypatch.setitem(sys.modules, "wandb", fake)
  monkeypatch.setenv("WANDB_PROJECT", "my-project")
  assert cli.main(argv) == 0
  assert logged[0]["project"] == "my-project" and logged[0]["name"] == "run"
  assert logged[0]["config"]["--model"] == "dense"
  assert [step for step, _ in logged[1:-1]] == [0, 1] and logged[-1] == "finished"
  assert all("client_work/train/loss" in scalars for _, scalars in logged[1:-1])
