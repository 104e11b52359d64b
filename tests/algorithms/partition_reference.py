"""Independent float64 NumPy re-derivations of the partitioned algorithms (FedPer, FedRep, FedBN's split), written
from the papers' formulas. Nothing here imports fedjax_lite.

The model is a two-layer perceptron written out by hand: ``h = tanh(x W1 + b1)`` (the BODY, global),
``logits = h W2 + b2`` (the HEAD, local), trained on the mean cross-entropy of a batch's real examples (``mask``).
Parameters are ``{'W1': [d, H], 'b1': [H], 'W2': [H, C], 'b2': [C]}``.

Round data (the packing contract): ``x [slots, steps, batch, d]``, ``y [slots, steps, batch]``, ``mask [slots,
steps, batch]``, ``num_examples [slots]``; a slot with ``num_examples == 0`` is padding; a client's local steps are
its batches with at least one real example, in order.

* FedPer (Arivazhagan et al. 2019, arXiv:1912.00818): each client starts from the server body and its OWN head,
  runs local SGD on all of them, uploads ``delta_body = body - body_final`` and keeps ``head_final``; the server
  body moves by the example-weighted mean of the deltas (server SGD at rate 1); the server head never changes.
* FedRep (Collins et al. 2021, ICML, arXiv:2102.07078, Algorithm 1): from the server body and its own head, a
  client first runs ``head_epochs`` passes of SGD on the head alone (body fixed), then ``body_epochs`` passes on
  the body alone (the new head fixed); it keeps the head and uploads ``body - body_final``; the server averages
  (weights: the examples of the body passes).
"""

from __future__ import annotations

import numpy as np

BODY, HEAD = ("W1", "b1"), ("W2", "b2")


def as_float64(params):
  return {key: np.asarray(value, np.float64) for key, value in params.items()}


def cross_entropy_and_grad(logits, y, mask):
  """``(mean softmax cross-entropy over the real examples, its gradient with respect to the logits)``."""
  count = max(int(mask.sum()), 1)
  z = logits - logits.max(axis=1, keepdims=True)
  log_p = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
  labels = np.asarray(y, np.int64)
  loss = float(np.sum(-log_p[np.arange(len(labels)), labels][mask])) / count
  dz = np.exp(log_p)
  dz[np.arange(len(labels)), labels] -= 1.0
  return loss, dz * mask[:, None] / count


def loss_and_grad(params, x, y, mask):
  """``(mean cross-entropy over real examples, its gradient)`` of the two-layer perceptron."""
  mask = np.asarray(mask, bool)
  x = np.asarray(x, np.float64).reshape(x.shape[0], -1)
  h = np.tanh(x @ params["W1"] + params["b1"])
  loss, dz = cross_entropy_and_grad(h @ params["W2"] + params["b2"], y, mask)
  dh = (dz @ params["W2"].T) * (1.0 - h ** 2)
  return loss, {"W1": x.T @ dh, "b1": dh.sum(axis=0), "W2": h.T @ dz, "b2": dz.sum(axis=0)}


def real_steps(round_data, slot):
  return [t for t in range(round_data["mask"].shape[1]) if np.any(round_data["mask"][slot, t])]


def client_slots(round_data):
  return [k for k in range(len(round_data["num_examples"])) if round_data["num_examples"][k] > 0]


def sgd_passes(params, round_data, slot, learning_rate, trained, passes=1):
  """``passes`` passes of SGD over the client's real batches, updating only the keys in ``trained``; returns
  ``(params, examples processed)``."""
  params, examples = dict(params), 0
  for _ in range(passes):
    for t in real_steps(round_data, slot):
      _, grads = loss_and_grad(params, round_data["x"][slot, t], round_data["y"][slot, t],
                               round_data["mask"][slot, t])
      for key in trained:
        params[key] = params[key] - learning_rate * grads[key]
      examples += int(np.sum(round_data["mask"][slot, t]))
  return params, examples


def partitioned_round(server, heads, round_data, cohort, *, learning_rate, head_epochs=None, body_epochs=1):
  """One FedPer round (``head_epochs=None``) or FedRep round; ``heads[client]`` is the client's head (updated in
  place). Returns the new server params (the server head unchanged)."""
  deltas, weights = [], []
  for slot in client_slots(round_data):
    client = cohort[slot]
    start = {**{key: server[key] for key in BODY}, **heads[client]}
    if head_epochs is None:  # FedPer: every parameter, one pass
      final, examples = sgd_passes(start, round_data, slot, learning_rate, BODY + HEAD)
    else:  # FedRep: the head first (body fixed), then the body (head fixed)
      tuned, _ = sgd_passes(start, round_data, slot, learning_rate, HEAD, passes=head_epochs)
      final, examples = sgd_passes(tuned, round_data, slot, learning_rate, BODY, passes=body_epochs)
    heads[client] = {key: final[key] for key in HEAD}
    deltas.append({key: start[key] - final[key] for key in BODY})
    weights.append(float(examples))
  total = sum(weights)
  new = dict(server)
  for key in BODY:
    new[key] = server[key] - sum(w * d[key] for w, d in zip(weights, deltas)) / total
  return new


# ------------------------------------------------------------------------------------------------- FedBN

BN_GLOBAL, BN_AFFINE, BN_STATS = ("W1", "b1", "W2", "b2"), ("gamma", "beta"), ("mean", "var")
BN_EPSILON, BN_MOMENTUM = 1e-5, 0.9


def bn_loss_grad_and_stats(params, x, y, mask):
  """The batch-norm perceptron ``logits = tanh(BN(x W1 + b1)) W2 + b2`` in training mode: the batch's statistics
  over its REAL examples (biased variance), ``BN(z) = gamma (z - mu) / sqrt(var + eps) + beta``. Returns ``(loss,
  gradient of every trained parameter, (mu, var))``."""
  real = np.asarray(mask, bool)
  m = max(int(real.sum()), 1)
  x = np.asarray(x, np.float64).reshape(x.shape[0], -1)
  z1 = x @ params["W1"] + params["b1"]
  mu = z1[real].sum(axis=0) / m
  var = np.maximum(0.0, (z1[real] ** 2).sum(axis=0) / m - mu ** 2)
  inv = 1.0 / np.sqrt(var + BN_EPSILON)
  xhat = (z1 - mu) * inv
  h = np.tanh(params["gamma"] * xhat + params["beta"])
  loss, dz = cross_entropy_and_grad(h @ params["W2"] + params["b2"], y, real)
  du = (dz @ params["W2"].T) * (1.0 - h ** 2)
  dxhat = du * params["gamma"]
  # The usual batch-norm backward pass, over the real examples (padded ones have du = 0 and no statistics).
  dz1 = np.zeros_like(z1)
  dz1[real] = inv / m * (m * dxhat[real] - dxhat[real].sum(axis=0)
                         - xhat[real] * (dxhat[real] * xhat[real]).sum(axis=0))
  grads = {"W1": x.T @ dz1, "b1": dz1.sum(axis=0), "W2": h.T @ dz, "b2": dz.sum(axis=0),
           "gamma": (du * xhat).sum(axis=0), "beta": du.sum(axis=0)}
  return loss, grads, (mu, var)


def fed_bn_round(server, local, round_data, cohort, *, learning_rate):
  """One FedBN round: ``server`` holds ``BN_GLOBAL``, ``local[client]`` the client's ``gamma, beta, mean, var``
  (updated in place: SGD on gamma and beta, ``running <- momentum running + (1 - momentum) batch statistic`` after
  each step). Returns the new server params (example-weighted mean of the global deltas, server SGD at 1)."""
  deltas, weights = [], []
  for slot in client_slots(round_data):
    client = cohort[slot]
    params, examples = {**server, **local[client]}, 0
    for t in real_steps(round_data, slot):
      _, grads, (mu, var) = bn_loss_grad_and_stats(params, round_data["x"][slot, t], round_data["y"][slot, t],
                                                   round_data["mask"][slot, t])
      for key in BN_GLOBAL + BN_AFFINE:
        params[key] = params[key] - learning_rate * grads[key]
      params["mean"] = BN_MOMENTUM * params["mean"] + (1 - BN_MOMENTUM) * mu
      params["var"] = BN_MOMENTUM * params["var"] + (1 - BN_MOMENTUM) * var
      examples += int(np.sum(round_data["mask"][slot, t]))
    local[client] = {key: params[key] for key in BN_AFFINE + BN_STATS}
    deltas.append({key: server[key] - params[key] for key in BN_GLOBAL})
    weights.append(float(examples))
  total = sum(weights)
  return {key: server[key] - sum(w * d[key] for w, d in zip(weights, deltas)) / total for key in BN_GLOBAL}
