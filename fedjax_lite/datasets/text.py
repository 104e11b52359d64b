"""Text to token ids as the reference's baselines do it, vectorized with numpy over all clients at once.

* Shakespeare (TFF ``baselines/shakespeare/char_prediction_preprocessing.py``): the 86-character vocabulary of
  TFF's text-generation tutorial gets ids ``1..86``; pad ``0``, OOV ``87``, BOS ``88``, EOS ``89`` (90 ids).
  Every snippet becomes ``[BOS, chars..., EOS]`` (one id per *byte*, as ``tf.strings.bytes_split``), zero-padded
  to a multiple of ``sequence_length + 1`` and cut into rows of that length; ``x = row[:-1]``, ``y = row[1:]``.
  A row never spans two snippets.
* StackOverflow next-word prediction (``baselines/stackoverflow/word_prediction_preprocessing.py``): words of
  the vocabulary get ids ``1..V`` in vocabulary order, OOV buckets ``V+1..V+B``, BOS ``V+B+1``, EOS ``V+B+2``,
  pad ``0``. A sentence is split on single spaces (so ``'a  b'`` has an empty middle word, as
  ``tf.strings.split(sep=' ')``), truncated to ``sequence_length`` words, followed by EOS only when shorter,
  preceded by BOS and padded to ``sequence_length + 1``; ``x = row[:-1]``, ``y = row[1:]``. With ``B > 1`` an OOV
  word goes to bucket ``crc32(word) % B`` (TensorFlow hashes with Fingerprint64, so the bucket of a given word
  differs from the reference's; the number of buckets and their ids do not).
"""

from __future__ import annotations

import itertools
import zlib
from typing import Sequence

import numpy as np

from fedjax_lite.datasets.array_cache import RaggedBytes
from fedjax_lite.datasets.records import SpecialTokens

__all__ = ["SHAKESPEARE_VOCABULARY", "shakespeare_special_tokens", "char_sequences",
           "word_special_tokens", "word_sequences"]

SHAKESPEARE_VOCABULARY = tuple(
    "dhlptx@DHLPTX $(,048cgkoswCGKOSW[_#'/37;?bfjnrvzBFJNRVZ\"&*.26:\naeimquyAEIMQUY]!%)-159\r")


def shakespeare_special_tokens() -> SpecialTokens:
  """pad 0, OOV 87, BOS 88, EOS 89."""
  size = len(SHAKESPEARE_VOCABULARY)
  return SpecialTokens(pad=0, oov=(size + 1,), bos=size + 2, eos=size + 3)


def _byte_table() -> np.ndarray:
  table = np.full(256, len(SHAKESPEARE_VOCABULARY) + 1, np.int32)
  for index, char in enumerate(SHAKESPEARE_VOCABULARY):
    table[ord(char)] = index + 1
  return table


_BYTE_TABLE = _byte_table()


def _check_sequence_length(sequence_length) -> int:
  if isinstance(sequence_length, bool) or not isinstance(sequence_length, (int, np.integer)) or sequence_length < 1:
    raise ValueError(f"sequence_length must be an int >= 1, got {sequence_length!r}.")
  return int(sequence_length)


def char_sequences(snippets: RaggedBytes, sequence_length: int = 80) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Shakespeare snippets to ``(x, y, rows_per_snippet)``, int32 ``[rows, sequence_length]`` each.

  Args:
    snippets: one byte string per snippet.
    sequence_length: the model's input length (80 in the reference).

  Returns:
    ``x``, ``y`` and int64 ``rows_per_snippet`` (snippet ``i`` owns the next ``rows_per_snippet[i]`` rows).
  """
  sequence_length = _check_sequence_length(sequence_length)
  tokens = shakespeare_special_tokens()
  width = sequence_length + 1
  lengths = snippets.lengths
  rows_per_snippet = -(-(lengths + 2) // width)
  starts = np.concatenate([[0], np.cumsum(rows_per_snippet * width)]).astype(np.int64)
  flat = np.zeros(starts[-1], np.int32)
  flat[starts[:-1]] = tokens.bos
  char_positions = np.repeat(starts[:-1] + 1 - snippets.offsets[:-1], lengths) + np.arange(
      snippets.offsets[-1], dtype=np.int64)
  flat[char_positions] = _BYTE_TABLE[np.asarray(snippets.values)]
  flat[starts[:-1] + 1 + lengths] = tokens.eos
  rows = flat.reshape(-1, width)
  return np.ascontiguousarray(rows[:, :-1]), np.ascontiguousarray(rows[:, 1:]), rows_per_snippet


def word_special_tokens(vocabulary_size: int, num_oov_buckets: int = 1) -> SpecialTokens:
  """pad 0, words 1..V, OOV V+1..V+B, BOS V+B+1, EOS V+B+2."""
  return SpecialTokens(pad=0, oov=tuple(range(vocabulary_size + 1, vocabulary_size + 1 + num_oov_buckets)),
                       bos=vocabulary_size + num_oov_buckets + 1, eos=vocabulary_size + num_oov_buckets + 2)


def word_sequences(sentences: RaggedBytes, vocabulary: Sequence[str], sequence_length: int = 20,
                   num_oov_buckets: int = 1, *, chunk: int = 200_000) -> tuple[np.ndarray, np.ndarray]:
  """Space-separated sentences to ``(x, y)``, int32 ``[num_sentences, sequence_length]``, one row per sentence.

  Args:
    sentences: one byte string per sentence (StackOverflow's ``tokens`` feature).
    vocabulary: the words, most frequent first (ids ``1..len(vocabulary)``).
    sequence_length: words kept per sentence (20 in the reference).
    num_oov_buckets: ``>= 1``.
    chunk: sentences tokenized at a time (bounds the temporary Python word lists).
  """
  sequence_length = _check_sequence_length(sequence_length)
  if isinstance(num_oov_buckets, bool) or not isinstance(num_oov_buckets, (int, np.integer)) or num_oov_buckets < 1:
    raise ValueError(f"num_oov_buckets must be an int >= 1, got {num_oov_buckets!r}.")
  if len(vocabulary) == 0:
    raise ValueError("vocabulary must not be empty.")
  tokens = word_special_tokens(len(vocabulary), num_oov_buckets)
  lookup = {word.encode("utf-8") if isinstance(word, str) else bytes(word): index + 1
            for index, word in enumerate(vocabulary)}
  num_sentences = len(sentences)
  rows = np.zeros((num_sentences, sequence_length + 1), np.int32)
  rows[:, 0] = tokens.bos
  for begin in range(0, num_sentences, chunk):
    end = min(begin + chunk, num_sentences)
    _fill_word_rows(sentences, begin, end, lookup, tokens, num_oov_buckets, sequence_length, rows[begin:end])
  return np.ascontiguousarray(rows[:, :-1]), np.ascontiguousarray(rows[:, 1:])


def _fill_word_rows(sentences: RaggedBytes, begin: int, end: int, lookup: dict[bytes, int], tokens: SpecialTokens,
                    num_oov_buckets: int, sequence_length: int, rows: np.ndarray) -> None:
  offsets = sentences.offsets[begin:end + 1]
  text = np.asarray(sentences.values[offsets[0]:offsets[-1]]).tobytes()
  bounds = (offsets - offsets[0]).tolist()
  word_lists = [text[a:b].split(b" ") for a, b in zip(bounds[:-1], bounds[1:])]
  counts = np.fromiter(map(len, word_lists), np.int64, len(word_lists))
  words = list(itertools.chain.from_iterable(word_lists))
  ids = np.fromiter(map(lookup.get, words, itertools.repeat(0)), np.int32, len(words))
  out_of_vocabulary = np.flatnonzero(ids == 0)
  if num_oov_buckets == 1:
    ids[out_of_vocabulary] = tokens.oov[0]
  elif out_of_vocabulary.size:
    buckets = np.fromiter((zlib.crc32(words[i]) % num_oov_buckets for i in out_of_vocabulary.tolist()), np.int32,
                          out_of_vocabulary.size)
    ids[out_of_vocabulary] = tokens.oov[0] + buckets
  kept = np.minimum(counts, sequence_length)
  word_starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
  sentence_of_word = np.repeat(np.arange(counts.size), kept)
  position = np.arange(kept.sum()) - np.repeat(np.concatenate([[0], np.cumsum(kept)[:-1]]), kept)
  rows[sentence_of_word, 1 + position] = ids[word_starts[sentence_of_word] + position]
  short = np.flatnonzero(kept < sequence_length)
  rows[short, 1 + kept[short]] = tokens.eos
