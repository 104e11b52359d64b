"""One convention in every output (``fedjax_lite.training.units``): rounds numbered from 0, communication in exact
bits in the files and in mebibits (2**20 bits) per direction wherever a person reads it.

Regression: the progress bar showed decimal megabits of both directions summed (in scientific notation),
``summary.json`` binary mebibits of each direction, and ``training.png`` numbered rounds from 1 while
``metrics.jsonl``, the CSV and TensorBoard numbered them from 0.
"""

from __future__ import annotations

import csv
import json
import pathlib
import re

import pytest

from fedjax_lite.training import cli, units
from fedjax_lite.training.plotting import ROUND_AXIS_LABEL, history_figure
from tests.training.test_tracking import read_event_file

ROOT = pathlib.Path(__file__).resolve().parents[2]
ROUNDS = 3


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """One CLI run writing every local log format, with its progress bar captured."""
  import contextlib
  import io

  output = tmp_path_factory.mktemp("run")
  stderr = io.StringIO()
  with contextlib.redirect_stderr(stderr):
    code = cli.main(["train", "--model", "dense", "--rounds", str(ROUNDS), "--eval-every", "1", "--local-epochs",
                     "1", "--output-dir", str(output), "--log-format", "jsonl,csv,tensorboard,png"])
  assert code == 0, stderr.getvalue()[-2000:]
  records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
  return output, records, stderr.getvalue()


def test_every_file_numbers_rounds_from_zero(run):
  output, records, _ = run
  expected = list(range(units.FIRST_ROUND, units.FIRST_ROUND + ROUNDS))
  assert [record["round"] for record in records] == expected
  with open(output / "metrics.csv", newline="") as file:
    assert [int(row["round"]) for row in csv.DictReader(file)] == expected
  (event_file,) = (output / "tensorboard").glob("events.out.tfevents.*")
  assert sorted({event.step for event in read_event_file(event_file)[1:]}) == expected
  assert (output / "training.png").read_bytes()[:4] == b"\x89PNG"


def test_the_plot_puts_each_record_at_its_round(run):
  _, records, _ = run
  figure = history_figure(records)
  for axis in figure.axes:
    assert axis.get_xlabel() == ROUND_AXIS_LABEL
    for line in axis.get_lines():
      assert list(line.get_xdata()) == [record["round"] for record in records]


def test_progress_bar_and_summary_show_mebibits_per_direction(run):
  output, records, stderr = run
  last = records[-1]
  assert last["cumulative_broadcasted_bits"] > 0 and last["cumulative_aggregated_bits"] > 0
  bar = stderr.replace("\r", "\n").strip().splitlines()[-1]
  assert f"{ROUNDS}/{ROUNDS}" in bar  # the bar counts rounds done
  down = f"{last['cumulative_broadcasted_bits'] / 2**20:,.2f}"
  up = f"{last['cumulative_aggregated_bits'] / 2**20:,.2f}"
  assert f"down_Mibit={down}" in bar and f"up_Mibit={up}" in bar, bar
  assert "Mbit" not in bar.replace("Mibit", "") and not re.search(r"\d[eE][+-]\d", bar.split("down_Mibit")[1]), bar
  summary = json.loads((output / "summary.json").read_text())
  assert summary["broadcasted_mebibits"] == last["cumulative_broadcasted_bits"] / 2**20
  assert summary["aggregated_mebibits"] == last["cumulative_aggregated_bits"] / 2**20
  assert summary["rounds"] == ROUNDS  # a count


def _notebook_code(path: pathlib.Path) -> str:
  cells = json.loads(path.read_text())["cells"]
  return "\n".join("".join(cell["source"]) for cell in cells if cell["cell_type"] == "code")


def _notebook_text(path: pathlib.Path) -> str:
  text = []
  for cell in json.loads(path.read_text())["cells"]:
    text.append("".join(cell["source"]))
    for output in cell.get("outputs", []):
      text.append("".join(output.get("text", "")))
  return "\n".join(text)


def test_readme_docs_and_notebooks_use_the_same_units_and_numbering():
  pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "notebooks").glob("*.ipynb"))]
  for page in pages:
    text = _notebook_text(page) if page.suffix == ".ipynb" else page.read_text()
    # Volumes in decimal megabits (network rates in Mbit/s are quoted as links are measured: allowed).
    assert not re.search(r"\bMbit\b(?!/s)|\bmegabits?\b(?! per second)|/ ?1e6\b", text), page.name
    if page.suffix == ".ipynb":
      code = _notebook_code(page)
      # Per-round curves are plotted at the records' rounds (from 0), not at 1..N.
      assert not re.search(r"np\.arange\(1,", code), page.name
      assert not re.search(r"""\[["']round["']\] \+ 1""", code), page.name
      assert not re.search(r"round 1:|round \{num_rounds\}", code), page.name  # rounds named by their record
  readme = (ROOT / "README.md").read_text()
  assert "numbered from 0" in readme and "2**20 bits" in readme
