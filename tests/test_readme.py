"""The README's promises: its Python example runs as written, and CI runs exactly its test command."""

from __future__ import annotations

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def code_blocks(language: str) -> list[str]:
  return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


def test_ci_runs_the_readme_test_command():
  bash_blocks = [block.strip() for block in code_blocks("bash")]
  test_commands = [block for block in bash_blocks if "pytest" in block]
  assert len(test_commands) == 1, test_commands
  ci_script = (ROOT / ".ci" / "run").read_text()
  assert test_commands[0] in ci_script


def test_readme_main_command_runs_the_train_job():
  bash_blocks = [block.strip() for block in code_blocks("bash")]
  assert any(block.endswith("fedjax-lite train") for block in bash_blocks)


def test_readme_python_examples_run(capsys):
  blocks = code_blocks("python")
  assert len(blocks) >= 2, "the README needs its training example and its own-algorithm example"
  namespaces = []
  for block in blocks:
    namespace: dict = {}
    exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102 - the README's own example
    namespaces.append(namespace)
  assert int(namespaces[0]["state"].round_num) == 20
  custom = namespaces[1]["result"]  # the signSGD example built with build_round
  assert len(custom.history) == 10 and int(custom.state.round_num) == 10
  assert custom.history[-1]["client_work/train/loss"] < custom.history[0]["client_work/train/loss"]
  printed = capsys.readouterr().out
  assert printed.count("accuracy") >= 2
