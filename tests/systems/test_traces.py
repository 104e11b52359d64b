"""A user's systems trace from CSV or JSON: values, population order, windows, and one clear error per problem."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from fedjax_lite import systems

CSV = """client_id,seconds_per_example,download_bits_per_second,upload_bits_per_second,availability
a,0.01,2000000,1000000,0-3600;7200-9000
b,0.02,4000000,,
c,0.03,8000000,500000,100-200
"""


def test_csv_trace_in_population_order(tmp_path):
  path = tmp_path / "trace.csv"
  path.write_text(CSV)
  population = systems.load_trace(path, client_ids=["c", "a"], period_seconds=86400)
  assert population.client_ids == ("c", "a")
  np.testing.assert_array_equal(population.seconds_per_example, [0.03, 0.01])
  np.testing.assert_array_equal(population.upload_bits_per_second, [5e5, 1e6])
  np.testing.assert_array_equal(population.seconds_per_step, [0.0, 0.0])
  windows = population.availability
  assert windows.period_seconds == 86400
  np.testing.assert_array_equal(windows.online_for([0, 1], 150.0), [50.0, 3450.0])
  everyone = systems.load_trace(path)  # file order; b has no windows: always online
  assert everyone.client_ids == ("a", "b", "c")
  assert everyone.upload_bits_per_second[1] == 4e6  # the download rate
  assert math.isinf(everyone.availability.online_for([1], 5000.0)[0])


def test_json_trace_with_period_and_always_on(tmp_path):
  path = tmp_path / "trace.json"
  path.write_text(json.dumps({"period_seconds": 100, "clients": [
      {"client_id": 7, "seconds_per_step": 0.5, "download_bits_per_second": 1e6, "windows": [[90, 100], [0, 10]]},
      {"client_id": "x", "seconds_per_example": 0.1, "download_bits_per_second": 2e6}]}))
  population = systems.load_trace(path, client_ids=["7", "x"])
  np.testing.assert_array_equal(population.seconds_per_step, [0.5, 0.0])
  np.testing.assert_array_equal(population.availability.online_for([0], 95.0), [15.0])  # wraps into [0, 10)
  plain = tmp_path / "plain.json"
  plain.write_text(json.dumps([{"client_id": "x", "seconds_per_example": 0.1, "download_bits_per_second": 2e6}]))
  assert isinstance(systems.load_trace(plain).availability, systems.AlwaysOn)


@pytest.mark.parametrize("text, match", [
    ("client_id,seconds_per_example,download_bits_per_second\na,0.1,-5\n",
     r"trace.csv, row 2 \(client 'a'\): download_bits_per_second must be a finite number > 0, got '-5'"),
    ("client_id,seconds_per_example,download_bits_per_second\na,fast,5\n",
     r"row 2 \(client 'a'\): seconds_per_example must be a number, got 'fast'"),
    ("client_id,seconds_per_example,download_bits_per_second\na,0.1,5\nb,0.1,\n",
     r"row 3 \(client 'b'\): download_bits_per_second is missing"),
    ("client_id,seconds_per_example,download_bits_per_second\na,0.1,5\na,0.2,5\n",
     r"row 3: client_id 'a' repeats .*row 2"),
    ("client_id,speed,download_bits_per_second\na,0.1,5\n", r"row 1 \(header\): unknown columns \['speed'\]"),
    ("client_id,seconds_per_example,download_bits_per_second,availability\na,0.1,5,10-5\n",
     r"row 2 \(client 'a'\): window \[10.0, 5.0\) must have start < end"),
    ("client_id,seconds_per_example,download_bits_per_second,availability\na,0.1,5,10:20\n",
     r"row 2: availability must be 'start-end' pairs"),
    ("client_id,download_bits_per_second\na,5\n", r"row 2 \(client 'a'\): give seconds_per_example or"),
    ("", "empty file"),
    ("client_id,seconds_per_example,download_bits_per_second\n", "no client records"),
])
def test_csv_errors_name_file_row_and_field(tmp_path, text, match):
  path = tmp_path / "trace.csv"
  path.write_text(text)
  with pytest.raises(systems.TraceError, match=match):
    systems.load_trace(path)


@pytest.mark.parametrize("content, match", [
    ('{"clients": [{"client_id": "a", "seconds_per_example": 0.1, "download_bits_per_second": 5, "speed": 1}]}',
     r"trace.json, record 0: unknown fields \['speed'\]"),
    ('[{"client_id": "a", "seconds_per_example": 0.1, "download_bits_per_second": 5, "windows": [[1, 2, 3]]}]',
     r"record 0: each window must be a \[start, end\] pair"),
    ('[{"client_id": "a", "seconds_per_example": 0.1, "download_bits_per_second": 5}, 3]',
     r"record 1: a client record must be an object"),
    ('{"clients": [], "period": 5}', r"got keys \['clients', 'period'\]"),
    ('[{"client_id": "a",', r"trace.json, line 1: not valid JSON"),
    ('{"period_seconds": 10, "clients": [{"client_id": "a", "seconds_per_example": 0.1, '
     '"download_bits_per_second": 5, "windows": [[0, 20]]}]}', r"record 0 \(client 'a'\): window .* <= period"),
])
def test_json_errors_name_file_and_record(tmp_path, content, match):
  path = tmp_path / "trace.json"
  path.write_text(content)
  with pytest.raises(systems.TraceError, match=match):
    systems.load_trace(path)


def test_missing_clients_and_files(tmp_path):
  path = tmp_path / "trace.csv"
  path.write_text(CSV)
  with pytest.raises(systems.TraceError, match=r"1 client\(s\) of the population are not in the trace, e.g. \['z'\]"):
    systems.load_trace(path, client_ids=["a", "z"])
  with pytest.raises(systems.TraceError, match="cannot read"):
    systems.load_trace(tmp_path / "absent.csv")
  with pytest.raises(systems.TraceError, match=".csv or .json"):
    systems.load_trace(tmp_path / "trace.txt")
