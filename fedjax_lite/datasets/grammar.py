"""A generated word-level language-modelling corpus: sentences of a small probabilistic grammar, with client shifts.

Where this sits: the offline corpus for pretraining the transformer language model
(``experiments/pretrain_transformer.py``) and for federated fine-tuning on clients whose word choice drifts from the
pretraining distribution (LoRA experiments), in the same layout as StackOverflow's next-word data
(:func:`fedjax_lite.datasets.load_stackoverflow`): ``'x'``/``'y'`` int32 ``[sequence_length]``, pad 0, words
``1..V``, one OOV id (never produced), BOS, EOS. Fully determined by the seed; nothing is downloaded.

The grammar (a probabilistic context-free grammar, Booth & Thompson 1973)::

  S   -> NP VP                      NP -> Det N | Det Adj N | Det N PP (depth-limited)
  VP  -> V NP | V | Adv V NP | V NP PP                       PP -> P NP

with a fixed lexicon for each part of speech. Each client ``k`` draws its own word preferences: within each part
of speech, ``p_k = (1 - shift) p + shift q_k`` with ``p`` the shared (Zipf-like) word distribution and ``q_k`` a
Dirichlet(``concentration``) draw, so ``shift = 0`` is one shared distribution and ``shift = 1`` gives each client a
lexicon of its own. ``domain`` re-draws the shared ``p`` itself: pretrain on one domain, fine-tune on another.
"""

from __future__ import annotations

import numpy as np

from fedjax_lite.core import validation
from fedjax_lite.core.federated_data import FederatedData
from fedjax_lite.datasets.records import FederatedDataset
from fedjax_lite.datasets.text import word_special_tokens

__all__ = ["GRAMMAR_LEXICON", "grammar_corpus"]

GRAMMAR_LEXICON: dict[str, tuple[str, ...]] = {
    "Det": ("the", "a", "every", "some", "this", "that"),
    "N": ("cat", "dog", "bird", "child", "teacher", "robot", "river", "tree", "house", "garden", "book", "song",
          "city", "farmer", "ship", "letter"),
    "Adj": ("small", "big", "red", "happy", "quiet", "old", "green", "bright", "strange", "gentle"),
    "V": ("sees", "likes", "finds", "follows", "builds", "reads", "sings", "watches", "carries", "paints"),
    "P": ("near", "under", "with", "behind", "beside"),
    "Adv": ("often", "never", "quickly", "slowly"),
}
_NP_RULES = (("Det", "N"), ("Det", "Adj", "N"), ("Det", "N", "PP"))
_NP_PROBABILITIES = (0.5, 0.3, 0.2)
_VP_RULES = (("V", "NP"), ("V",), ("Adv", "V", "NP"), ("V", "NP", "PP"))
_VP_PROBABILITIES = (0.5, 0.15, 0.15, 0.2)
_MAX_DEPTH = 2  # PPs nest at most this deep; deeper NPs drop the PP rule


def _vocabulary() -> tuple[str, ...]:
  return tuple(word for words in GRAMMAR_LEXICON.values() for word in words)


def _word_distributions(domain: int) -> dict[str, np.ndarray]:
  """The shared per-part-of-speech word distributions: Zipf-like weights ``1/rank``, the ranks of each domain's
  own random order of the words."""
  order = np.random.default_rng([abs(domain), int(domain < 0), 7919])
  out = {}
  for tag, words in GRAMMAR_LEXICON.items():
    weights = 1.0 / np.arange(1, len(words) + 1)
    out[tag] = weights[order.permutation(len(words))] / weights.sum()
  return out


def _sentence(rng: np.random.Generator, words: dict[str, np.ndarray], ids: dict[str, np.ndarray]) -> list[int]:
  def expand(symbol: str, depth: int) -> list[int]:
    if symbol in ids:
      return [int(rng.choice(ids[symbol], p=words[symbol]))]
    if symbol == "NP":
      probabilities = np.array(_NP_PROBABILITIES if depth < _MAX_DEPTH else _NP_PROBABILITIES[:2])
      rule = _NP_RULES[rng.choice(len(probabilities), p=probabilities / probabilities.sum())]
    elif symbol == "VP":
      probabilities = np.array(_VP_PROBABILITIES if depth < _MAX_DEPTH else _VP_PROBABILITIES[:3])
      rule = _VP_RULES[rng.choice(len(probabilities), p=probabilities / probabilities.sum())]
    elif symbol == "PP":
      rule = ("P", "NP")
    else:  # S
      rule = ("NP", "VP")
    return [token for part in rule for token in expand(part, depth + (symbol == "PP"))]

  return expand("S", 0)


def grammar_corpus(
    num_clients: int = 10,
    examples_per_client: int = 200,
    sequence_length: int = 20,
    *,
    shift: float = 0.0,
    concentration: float = 0.5,
    domain: int = 0,
    test_fraction: float = 0.2,
    seed: int = 0,
) -> FederatedDataset:
  """Sentences of the module's grammar as federated next-word prediction data.

  Each row is a sentence as StackOverflow's are preprocessed: ``[BOS, w_1..w_n, EOS]`` truncated to
  ``sequence_length + 1`` tokens and padded with 0; ``x`` is all but the last token, ``y`` all but the first.

  Args:
    num_clients: clients (each with its own word preferences when ``shift > 0``).
    examples_per_client: sentences per client, split into train and test.
    sequence_length: T.
    shift: in [0, 1], how far each client's word choice moves from the shared distribution (module docstring).
    concentration: the Dirichlet concentration of the clients' own preferences (small: peaked on few words).
    domain: selects the shared word distribution (another domain ranks the words differently).
    test_fraction: in (0, 1), each client's fraction of sentences in ``test`` (the same clients, as EMNIST's; at
      least one sentence each side).
    seed: the generator's seed.

  Returns:
    A :class:`FederatedDataset` with ``num_classes`` = vocabulary + 4 (pad, OOV, BOS, EOS; 51 words -> 55 ids),
    ``vocabulary`` and ``special_tokens``.
  """
  num_clients = validation.check_int("num_clients", num_clients, minimum=1)
  examples_per_client = validation.check_int("examples_per_client", examples_per_client, minimum=2)
  sequence_length = validation.check_int("sequence_length", sequence_length, minimum=1)
  shift = validation.check_float("shift", shift, low=0.0, high=1.0)
  concentration = validation.check_float("concentration", concentration, low=0.0, low_inclusive=False)
  domain = validation.check_int("domain", domain)
  test_fraction = validation.check_float("test_fraction", test_fraction, low=0.0, high=1.0, low_inclusive=False,
                                         high_inclusive=False)
  seed = validation.check_int("seed", seed, minimum=0)
  vocabulary = _vocabulary()
  tokens = word_special_tokens(len(vocabulary), 1)
  ids, start = {}, 1
  for tag, words in GRAMMAR_LEXICON.items():
    ids[tag] = np.arange(start, start + len(words))
    start += len(words)
  shared = _word_distributions(domain)
  num_test = min(max(1, int(round(examples_per_client * test_fraction))), examples_per_client - 1)
  train, test = {}, {}
  for client in range(num_clients):
    client_rng = np.random.default_rng([seed, client])
    words = {tag: (1 - shift) * p + shift * client_rng.dirichlet(np.full(len(p), concentration))
             for tag, p in shared.items()}
    rows = np.zeros((examples_per_client, sequence_length + 1), np.int32)
    for row in range(examples_per_client):
      sentence = [tokens.bos] + _sentence(client_rng, words, ids) + [tokens.eos]
      sentence = sentence[: sequence_length + 1]
      rows[row, : len(sentence)] = sentence
    name = f"client_{client:04d}"
    train[name] = {"x": rows[num_test:, :-1], "y": rows[num_test:, 1:]}
    test[name] = {"x": rows[:num_test, :-1], "y": rows[:num_test, 1:]}
  return FederatedDataset(train=FederatedData.from_clients(train), test=FederatedData.from_clients(test),
                          num_classes=tokens.eos + 1,
                          input_shape=(sequence_length,), vocabulary=vocabulary, special_tokens=tokens)
