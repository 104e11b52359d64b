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


def test_readme_python_example_runs(capsys):
  blocks = code_blocks("python")
  assert blocks, "the README has no Python example"
  for block in blocks:
    namespace: dict = {}
    exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102 - the README's own example
  state = namespace["state"]
  assert int(state.round_num) == 20
  printed = capsys.readouterr().out
  assert "accuracy" in printed
