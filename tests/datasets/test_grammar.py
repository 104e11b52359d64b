"""Tests for fedjax_lite.datasets.grammar: the generated grammar corpus is deterministic, in StackOverflow's layout,
and its client shifts and domains change word choice as documented."""

import numpy as np
import pytest

from fedjax_lite.datasets import grammar


def word_frequencies(data, client, num_ids):
  words = np.asarray(data.client(client)["y"]).ravel()
  return np.bincount(words, minlength=num_ids)[1:52] / max(1, np.sum((words >= 1) & (words <= 51)))


def test_layout_is_stackoverflows_and_deterministic():
  corpus = grammar.grammar_corpus(num_clients=2, examples_per_client=20, sequence_length=8, seed=3)
  again = grammar.grammar_corpus(num_clients=2, examples_per_client=20, sequence_length=8, seed=3)
  tokens = corpus.special_tokens
  assert (tokens.pad, tokens.oov, tokens.bos, tokens.eos) == (0, (52,), 53, 54) and corpus.num_classes == 55
  assert len(corpus.vocabulary) == 51 and corpus.input_shape == (8,)
  assert corpus.train.num_clients == corpus.test.num_clients == 2
  assert list(corpus.train.client_sizes) == [16, 16] and list(corpus.test.client_sizes) == [4, 4]
  x, y = np.asarray(corpus.train.client(0)["x"]), np.asarray(corpus.train.client(0)["y"])
  np.testing.assert_array_equal(x, np.asarray(again.train.client(0)["x"]))
  assert x.dtype == np.int32 and x.shape == (16, 8)
  assert np.all(x[:, 0] == tokens.bos)
  np.testing.assert_array_equal(x[:, 1:], y[:, :-1])  # y is x shifted by one
  assert not np.any(y == tokens.oov) and not np.any(x[:, 1:] == tokens.bos)
  for row in y:  # words, then EOS (unless truncated), then padding only
    real = row[row != 0]
    assert np.all(row[len(real):] == 0)
    assert np.all((real[:-1] >= 1) & (real[:-1] <= 51)) and (real[-1] == tokens.eos or len(real) == 8)


def test_shift_gives_clients_their_own_word_choice_and_domain_changes_the_shared_one():
  shared = grammar.grammar_corpus(num_clients=2, examples_per_client=400, shift=0.0, seed=0)
  shifted = grammar.grammar_corpus(num_clients=2, examples_per_client=400, shift=1.0, concentration=0.2, seed=0)
  other_domain = grammar.grammar_corpus(num_clients=1, examples_per_client=400, domain=1, seed=0)

  def distance(a, b):  # total variation between word frequencies
    return 0.5 * np.abs(a - b).sum()

  same = distance(word_frequencies(shared.train, 0, 55), word_frequencies(shared.train, 1, 55))
  apart = distance(word_frequencies(shifted.train, 0, 55), word_frequencies(shifted.train, 1, 55))
  domains = distance(word_frequencies(shared.train, 0, 55), word_frequencies(other_domain.train, 0, 55))
  # ~2,500 words per client: two samples of one distribution are E[TV] <= 0.5 sqrt(4 / (pi n)) sum_i sqrt(p_i)
  # <= 0.5 * 0.023 * sqrt(51) = 0.08 apart; the shifts move the distributions much further.
  assert same < 0.15 and apart > 0.4 and domains > 0.25


@pytest.mark.parametrize("kwargs, message", [({"shift": 1.5}, "shift"), ({"num_clients": 0}, "num_clients"),
                                             ({"test_fraction": 0.0}, "test_fraction"),
                                             ({"concentration": 0.0}, "concentration")])
def test_bad_arguments(kwargs, message):
  with pytest.raises(ValueError, match=message):
    grammar.grammar_corpus(**kwargs)
