"""Shakespeare and StackOverflow: generated SQLite / HDF5 files through the baselines' token-id preprocessing."""

import numpy as np
import pytest

from fedjax_lite.datasets import load_shakespeare, load_stackoverflow
from fedjax_lite.datasets.array_cache import RaggedBytes
from fedjax_lite.datasets.errors import DatasetNotFoundError
from fedjax_lite.datasets.file_writers import write_tff_hdf5, write_tff_sqlite
from fedjax_lite.datasets.text import SHAKESPEARE_VOCABULARY, char_sequences, word_sequences

SNIPPETS = {
    "THE_TEMPEST_MIRANDA": [b"If by your art, my dearest father, you have", b"O!"],
    "HAMLET_HAMLET": [b"To be, or not to be: that is the question" * 3, "caf\u00e9 \u2014 x".encode()],
}


def _reference_rows(snippet: bytes, sequence_length: int):
  """The baseline's rows for one snippet, written the slow obvious way."""
  ids = [88] + [SHAKESPEARE_VOCABULARY.index(chr(b)) + 1 if chr(b) in SHAKESPEARE_VOCABULARY else 87
                for b in snippet] + [89]
  width = sequence_length + 1
  ids += [0] * (-len(ids) % width)
  rows = [ids[i:i + width] for i in range(0, len(ids), width)]
  return [r[:-1] for r in rows], [r[1:] for r in rows]


def test_char_sequences_match_the_baseline_semantics():
  snippets = [s for client in SNIPPETS.values() for s in client]
  x, y, rows = char_sequences(RaggedBytes.from_list(snippets), 10)
  expected_x, expected_y = [], []
  for snippet in snippets:
    rx, ry = _reference_rows(snippet, 10)
    expected_x += rx
    expected_y += ry
  np.testing.assert_array_equal(x, expected_x)
  np.testing.assert_array_equal(y, expected_y)
  assert rows.sum() == len(expected_x)


@pytest.mark.parametrize("fmt", ["sqlite", "hdf5"])
def test_load_shakespeare(tmp_path, fmt):
  test_split = {cid: s[::-1] for cid, s in SNIPPETS.items()}
  if fmt == "sqlite":
    write_tff_sqlite(tmp_path / "shakespeare.sqlite",
                     {"train": {c: {"snippets": s} for c, s in SNIPPETS.items()},
                      "test": {c: {"snippets": s} for c, s in test_split.items()}})
  else:
    pytest.importorskip("h5py")
    write_tff_hdf5(tmp_path / "shakespeare_train.h5", {c: {"snippets": s} for c, s in SNIPPETS.items()})
    write_tff_hdf5(tmp_path / "shakespeare_test.h5", {c: {"snippets": s} for c, s in test_split.items()})
  data = load_shakespeare(data_dir=tmp_path, cache_dir=tmp_path / "cache")
  assert data.num_classes == 90 and data.input_shape == (80,) and len(data.vocabulary) == 86
  assert (data.special_tokens.pad, data.special_tokens.oov, data.special_tokens.bos, data.special_tokens.eos) == (
      0, (87,), 88, 89)
  for federated, split in ((data.train, SNIPPETS), (data.test, test_split)):
    assert federated.client_ids == tuple(sorted(split))
    for cid, snippets in split.items():
      expected = [row for s in snippets for row in _reference_rows(s, 80)[0]]
      np.testing.assert_array_equal(federated[cid]["x"], expected)
      np.testing.assert_array_equal(federated[cid]["y"][:, :-1], federated[cid]["x"][:, 1:])


def test_word_sequences_match_the_baseline_semantics():
  vocabulary = ["the", "a", "is", "."]
  sentences = [b"the cat is here .", b"a", b"", b"the  the", b"a a a a a a a"]
  x, y = word_sequences(RaggedBytes.from_list(sentences), vocabulary, sequence_length=5)
  bos, eos, oov = 6, 7, 5
  np.testing.assert_array_equal(x, [[bos, 1, oov, 3, oov], [bos, 2, eos, 0, 0], [bos, oov, eos, 0, 0],
                                    [bos, 1, oov, 1, eos], [bos, 2, 2, 2, 2]])
  np.testing.assert_array_equal(y, [[1, oov, 3, oov, 4], [2, eos, 0, 0, 0], [oov, eos, 0, 0, 0],
                                    [1, oov, 1, eos, 0], [2, 2, 2, 2, 2]])
  chunked = word_sequences(RaggedBytes.from_list(sentences), vocabulary, sequence_length=5, chunk=2)
  np.testing.assert_array_equal(chunked[0], x)
  np.testing.assert_array_equal(chunked[1], y)
  x3, _ = word_sequences(RaggedBytes.from_list(sentences), vocabulary, sequence_length=5, num_oov_buckets=3)
  assert set(x3[x == oov].tolist()) <= {5, 6, 7} and x3[0, 0] == 4 + 3 + 1


def test_load_stackoverflow(tmp_path):
  def client(*sentences):
    n = len(sentences)
    return {"tokens": list(sentences), "title": [b"t"] * n, "tags": [b"python|numpy"] * n,
            "type": [b"question"] * n, "creation_date": [b"2010-01-01 00:00:00 UTC"] * n,
            "score": np.arange(n)}
  write_tff_sqlite(tmp_path / "stackoverflow.sqlite", {
      "train": {"u2": client(b"how do i sort a list ?"), "u1": client(b"use sorted", b"thanks")},
      "heldout": {"u0": client(b"ok")}, "test": {"u3": client(b"sort it")}})
  (tmp_path / "stackoverflow.word_count").write_text("sort 50\na 40\nlist 30\nit 10\n")
  data = load_stackoverflow(vocabulary_size=3, sequence_length=4, data_dir=tmp_path, cache_dir=tmp_path / "c",
                            include_held_out=True)
  assert data.vocabulary == ("sort", "a", "list") and data.num_classes == 3 + 1 + 3
  tokens = data.special_tokens
  assert (tokens.pad, tokens.oov, tokens.bos, tokens.eos) == (0, (4,), 5, 6)
  assert data.train.client_ids == ("u1", "u2")
  np.testing.assert_array_equal(data.train["u1"]["x"], [[5, 4, 4, 6], [5, 4, 6, 0]])
  np.testing.assert_array_equal(data.train["u2"]["x"], [[5, 4, 4, 4]])
  np.testing.assert_array_equal(data.train["u2"]["y"], [[4, 4, 4, 1]])
  np.testing.assert_array_equal(data.test["u3"]["x"], [[5, 1, 4, 6]])
  assert data.held_out.client_ids == ("u0",)
  np.testing.assert_array_equal(tokens.excluded(eos=True, oov=True), [0, 6, 4])


def test_stackoverflow_vocabulary_missing_is_explained(tmp_path):
  with pytest.raises(DatasetNotFoundError, match="stackoverflow.word_count.tar.bz2"):
    load_stackoverflow(data_dir=tmp_path, cache_dir=tmp_path / "c")
