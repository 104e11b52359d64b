"""Byzantine attacks for robustness studies: corrupted updates, poisoned data, and who attacks each round.

* :func:`choose_malicious`: exactly ``floor(fraction * n)`` real clients per round, chosen from
  ``(seed, round, slot)``.
* Update attacks (:class:`UpdateAttack`, transformations of the stacked updates): :func:`sign_flip`,
  :func:`scaling`, :func:`gaussian_noise` (one client at a time, also on a ``ClientOutput`` via
  :func:`corrupt_client_output`), :func:`a_little_is_enough` and :func:`inner_product_manipulation` (colluding,
  from the honest clients' statistics).
* :func:`byzantine_aggregator`: any aggregator under an update attack; works with ``fed_avg(aggregator=...)``.
* Data poisoning: :func:`label_flip` / :func:`flip_labels`, applied to an algorithm by :func:`with_data_poisoning`.
"""

from fedjax_lite.attacks.base import UpdateAttack, corrupt_client_output, per_client_attack
from fedjax_lite.attacks.byzantine_aggregator import byzantine_aggregator
from fedjax_lite.attacks.collusion import a_little_is_enough, inner_product_manipulation
from fedjax_lite.attacks.data_poisoning import flip_labels, label_flip, with_data_poisoning
from fedjax_lite.attacks.model_poisoning import gaussian_noise, scaling, sign_flip
from fedjax_lite.attacks.selection import choose_malicious

__all__ = [
    "UpdateAttack",
    "a_little_is_enough",
    "byzantine_aggregator",
    "choose_malicious",
    "corrupt_client_output",
    "flip_labels",
    "gaussian_noise",
    "inner_product_manipulation",
    "label_flip",
    "per_client_attack",
    "scaling",
    "sign_flip",
    "with_data_poisoning",
]
