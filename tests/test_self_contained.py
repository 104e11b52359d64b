"""The repository stands alone: no file refers to a folder beside the checkout (the project's working notes lived in
a ``shared`` folder next to it, which a user's clone does not have). Cite papers and public sources instead, or put
the facts a reader needs into ``docs/`` (e.g. ``docs/xla_cpu.md``).

Checked on every file git tracks, plus the untracked files it does not ignore (a new file counts before it is
added); without git (an unpacked source archive), on every file below the root outside build and cache folders.
"""

from __future__ import annotations

import pathlib
import subprocess

ROOT = pathlib.Path(__file__).resolve().parents[1]
# Written in pieces, so that this file does not itself contain what it looks for.
OUTSIDE_REFERENCES = ("../" + "shared", "/work/" + "shared")
SKIPPED_FOLDERS = {".git", ".venv", ".venv-newest", "__pycache__", ".pytest_cache", ".hypothesis", "build", "dist",
                   "_build"}


def repository_files(root: pathlib.Path) -> list[pathlib.Path]:
  """The files of the checkout at ``root``: tracked and untracked-but-not-ignored ones (git), else all files."""
  try:
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=root,
                            capture_output=True, check=True, timeout=60).stdout
    return [root / name for name in listed.decode().split("\0") if name and (root / name).is_file()]
  except (OSError, subprocess.CalledProcessError, subprocess.TimeoutExpired):
    return [path for path in root.rglob("*")
            if path.is_file() and not SKIPPED_FOLDERS & set(path.relative_to(root).parts)
            and not path.name.endswith(".egg-info")]


def outside_references(root: pathlib.Path, files: list[pathlib.Path]) -> list[str]:
  """``path:line: text`` for every line of ``files`` that mentions a folder outside the repository."""
  found = []
  needles = [needle.encode() for needle in OUTSIDE_REFERENCES]
  for path in files:
    data = path.read_bytes()
    if not any(needle in data for needle in needles):
      continue
    for number, line in enumerate(data.splitlines(), start=1):
      if any(needle in line for needle in needles):
        found.append(f"{path.relative_to(root)}:{number}: {line.decode(errors='replace').strip()[:160]}")
  return found


def test_no_file_refers_outside_the_repository():
  files = repository_files(ROOT)
  assert any(path.name == "README.md" for path in files) and len(files) > 100  # the listing saw the checkout
  assert outside_references(ROOT, files) == []


def test_the_check_finds_a_reference(tmp_path):
  (tmp_path / "docs").mkdir()
  (tmp_path / "docs" / "page.md").write_text("fine\nsee " + OUTSIDE_REFERENCES[0] + "/reference/notes.md\n")
  (tmp_path / "module.py").write_text('"""Facts from ' + OUTSIDE_REFERENCES[1] + '/DESIGN.md."""\n')
  (tmp_path / "clean.py").write_text("shared = '../data'  # the word alone is no hit\n")
  files = sorted(tmp_path.rglob("*.*"))
  assert outside_references(tmp_path, files) == [
      "docs/page.md:2: see " + OUTSIDE_REFERENCES[0] + "/reference/notes.md",
      "module.py:1: \"\"\"Facts from " + OUTSIDE_REFERENCES[1] + "/DESIGN.md.\"\"\"",
  ]
