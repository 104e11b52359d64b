"""``fedjax-lite train --algorithm fedbuff``: FedBuff from the command line with its knobs (server steps in place of
rounds, on simulated log-normal client systems); its knobs elsewhere and what it does not support are refused with
one line and exit code 2."""

from __future__ import annotations

import json

import pytest

from fedjax_lite.training import cli
from tests.training.test_cli_algorithms import TINY


def test_fed_buff_trains_from_the_command_line(tmp_path, capsys):
  code = cli.main(TINY + ["--algorithm", "fedbuff", "--output-dir", str(tmp_path), "--fedbuff-concurrency", "4",
                          "--fedbuff-buffer-size", "2", "--fedbuff-max-staleness", "3", "--systems", "lognormal",
                          "--dropout", "0.3"])
  assert code == 0, capsys.readouterr().err
  summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert summary["algorithm"] == "fedbuff" and summary["rounds"] == 2
  assert (summary["clients_per_round"], summary["fedbuff_concurrency"], summary["fedbuff_max_staleness"]) == (2, 4, 3)
  records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [record["round"] for record in records] == [0, 1]
  assert all(record["fedbuff/num_applied"] == 2 and record["client_work/train/num_examples"] > 0
             for record in records)
  assert records[-1]["fedbuff/elapsed_seconds"] > 0 and "evaluation/accuracy" in records[-1]
  assert all("fedbuff/dropped_offline" in record for record in records)  # --dropout reaches the event order


@pytest.mark.parametrize("flags, named", [
    (["--algorithm", "fedavg", "--fedbuff-buffer-size", "2"], "--fedbuff-buffer-size"),
    (["--algorithm", "fedprox", "--fedbuff-concurrency", "2"], "--fedbuff-concurrency"),
    (["--algorithm", "fedbuff", "--checkpoint-dir", "{tmp}/ckpt"], "--checkpoint-dir"),
    (["--algorithm", "fedbuff", "--log-format", "csv"], "--log-format csv"),
    (["--algorithm", "fedbuff", "--fedbuff-concurrency", "5"], "(5 + 3 - 1) exceeds the 6 clients"),
    (["--algorithm", "fedbuff", "--systems", "lognormal", "--deadline", "5"], "--deadline shapes synchronous rounds"),
])
def test_fed_buff_flags_refused(flags, named, tmp_path, capsys):
  flags = [flag.replace("{tmp}", str(tmp_path)) for flag in flags]
  code = cli.main(TINY + ["--output-dir", str(tmp_path / "out")] + flags)
  assert code == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and named in err[0], err
