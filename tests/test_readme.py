"""The README's promises: its Python example runs as written, and CI runs exactly its test command."""

from __future__ import annotations

import json
import pathlib
import re
import subprocess
import sys
import textwrap

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


def test_readme_python_examples_run(tmp_path):
  """Every Python block of the README, in order, in a fresh interpreter (as a newcomer runs them: the first one
  calls ``fedjax_lite.configure_cpu()`` before JAX starts)."""
  blocks = code_blocks("python")
  assert len(blocks) >= 2, "the README needs its training example and its own-algorithm example"
  checks = textwrap.dedent("""
      import json
      custom = namespaces[1]["result"]  # the FedNova example built with build_round
      print("README-CHECK " + json.dumps({
          "round_num": int(namespaces[0]["state"].round_num), "custom_rounds": len(custom.history),
          "custom_round_num": int(custom.state.round_num),
          "first_loss": custom.history[0]["client_work/train/loss"],
          "last_loss": custom.history[-1]["client_work/train/loss"]}))
  """)
  script = tmp_path / "readme_examples.py"
  script.write_text("namespaces = []\n" + "".join(
      f"namespaces.append({{}})\nexec(compile({block!r}, 'README.md', 'exec'), namespaces[-1])\n"
      for block in blocks) + checks)
  completed = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600, cwd=ROOT)
  assert completed.returncode == 0, completed.stderr[-3000:]
  printed = completed.stdout
  report = json.loads(printed.split("README-CHECK ", 1)[1].splitlines()[0])
  assert report["round_num"] == 20
  assert report["custom_rounds"] == 10 and report["custom_round_num"] == 10
  assert report["last_loss"] < report["first_loss"]
  assert printed.count("accuracy") >= 2


def test_readme_states_the_suite_time_and_the_versions_ci_tests():
  """The README says how long the suite takes and which Python/JAX pairs CI runs; the pairs agree with
  pyproject's minimum and with the newest Python that .ci/run looks for first."""
  assert re.search(r"about \d+ minutes on 2 cores", README)
  oldest = re.search(r"oldest\s+supported pair \(Python (3\.\d+) with jax ([\d.]+)\)", README)
  newest = re.search(r"newest pair \(Python (3\.\d+) with the newest\s+jax pip offers: ([\d.]+) today\)", README)
  assert oldest and newest, "the README must name both pairs CI tests"
  pyproject = (ROOT / "pyproject.toml").read_text()
  assert f'"jax>={oldest.group(2)}"' in pyproject
  ci_script = (ROOT / ".ci" / "run").read_text()
  assert re.search(rf"for version in {re.escape(newest.group(1))}\b", ci_script)
  supported = re.search(r"Supported: Python (3\.\d+)-(3\.\d+)", README)
  assert supported and f'requires-python = ">={supported.group(1)}"' in pyproject
