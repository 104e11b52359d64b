"""Independent float64 NumPy re-implementations of the federated algorithms, written from the papers' formulas.

Nothing here imports fedjax_lite: the tests feed these functions the SAME packed round data the library gets
(the arrays of ``fedjax_lite.core.packing.pack_clients``, as plain NumPy data) and compare the results. The model
is softmax regression, ``logits = x @ W + b`` on flattened ``x``, trained on the mean cross-entropy of a batch's
real examples (``mask``). Parameters are ``{'W': [d, C], 'b': [C]}``.

Round data (per the packing contract): ``x [slots, steps, batch, ...]``, ``y [slots, steps, batch]``,
``mask [slots, steps, batch]``, ``num_examples [slots]``. A slot with ``num_examples == 0`` is padding: weight 0,
no state written. A client's local steps are its batches with at least one real example, in order.

Algorithms (one round each; ``x`` the server model, ``S`` the real clients of the round):

* FedAvg (McMahan et al. 2017): ``delta_i = x - y_i`` after local SGD; ``delta = sum w_i delta_i / sum w_i`` with
  ``w_i = n_i`` (examples processed) or 1; server step ``server(x, delta)``.
* FedProx (Li et al. 2020): local gradient ``grad F_i(y) + mu (y - x)``.
* SCAFFOLD (Karimireddy et al. 2020, Alg. 1, option II): local step ``y <- y - eta_l (g_i(y) - c_i + c)``;
  ``c_i+ = c_i - c + (x - y_i) / (K_i eta_l)``; ``x <- x - eta_g mean_S delta_i``; ``c <- c + (1/N) sum_S (c_i+ -
  c_i)``.
* MimeLite / Mime (Karimireddy et al. 2021) with a base optimizer whose state ``s`` is frozen during local steps:
  e.g. SGD with heavy-ball momentum ``beta`` (state ``m``), a local step is ``y <- y - lr (g + beta m)``; the
  server updates ``m <- G + beta m`` from the mean full-batch gradient ``G = mean_S grad f_i(x)``. Mime corrects
  each local gradient to ``grad f_i(y; b) - grad f_i(x; b) + G``. Adam as the base optimizer: ``BaseAdam``.
* FedAvgM / FedAdagrad / FedAdam / FedYogi (Reddi et al. 2021, Algorithm 2) on the aggregated delta ``D``:
  ``m <- b1 m + (1 - b1) D``; Adagrad ``v <- v + D^2``; Adam ``v <- b2 v + (1 - b2) D^2``; Yogi
  ``v <- v - (1 - b2) D^2 sign(v - D^2)``; ``x <- x - eta m / (sqrt(v) + tau)``. FedAvgM: ``a <- mu a + D``,
  ``x <- x - eta a``.
"""

from __future__ import annotations

import numpy as np


# ----------------------------------------------------------------------------------------------- the model

def as_float64(params):
  return {key: np.asarray(value, np.float64) for key, value in params.items()}


def logits(params, x):
  x = np.asarray(x, np.float64).reshape(x.shape[0], -1)
  return x @ params["W"] + params["b"]


def batch_loss_and_grad(params, x, y, mask):
  """``(mean cross-entropy over real examples, its gradient)``; an all-padding batch gives ``(0, zeros)``."""
  mask = np.asarray(mask, bool)
  count = max(int(mask.sum()), 1)
  x = np.asarray(x, np.float64).reshape(x.shape[0], -1)
  z = x @ params["W"] + params["b"]
  z = z - z.max(axis=1, keepdims=True)
  log_p = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
  labels = np.asarray(y, np.int64)
  per_example = -log_p[np.arange(len(labels)), labels]
  loss = float(np.sum(per_example[mask])) / count
  dz = np.exp(log_p)
  dz[np.arange(len(labels)), labels] -= 1.0
  dz = dz * mask[:, None] / count
  return loss, {"W": x.T @ dz, "b": dz.sum(axis=0)}


def dataset_loss(params, x, y):
  """Mean cross-entropy of a whole dataset (every example real)."""
  return batch_loss_and_grad(params, x, y, np.ones(len(y), bool))[0]


def tree_map(fn, *trees):
  return {key: fn(*(tree[key] for tree in trees)) for key in trees[0]}


def zeros_like(params):
  return tree_map(np.zeros_like, params)


def real_steps(round_data, slot):
  """The client's local steps: indices of its batches holding at least one real example."""
  return [t for t in range(round_data["mask"].shape[1]) if round_data["mask"][slot, t].any()]


def batch(round_data, slot, t):
  return round_data["x"][slot, t], round_data["y"][slot, t], round_data["mask"][slot, t]


def client_slots(round_data):
  """The real client slots (``num_examples > 0``)."""
  return [k for k in range(len(round_data["num_examples"])) if round_data["num_examples"][k] > 0]


def client_weight(round_data, slot, weighting):
  if weighting == "num_examples":
    return float(round_data["mask"][slot].sum())
  assert weighting == "uniform", weighting
  return 1.0


def weighted_mean(values, weights):
  total = sum(weights)
  return {key: sum(w * v[key] for v, w in zip(values, weights)) / total for key in values[0]}


def full_gradient(params, round_data, slot):
  """``grad f_i(x)``: the gradient of the client's mean loss over all its real examples."""
  count = float(round_data["mask"][slot].sum())
  total = zeros_like(params)
  for t in real_steps(round_data, slot):
    x, y, mask = batch(round_data, slot, t)
    _, grad = batch_loss_and_grad(params, x, y, mask)
    total = tree_map(lambda a, g: a + g * mask.sum(), total, grad)
  return tree_map(lambda a: a / count, total)


def local_sgd(params, round_data, slot, learning_rate, correction=None):
  """Local SGD from ``params``: ``y <- y - lr * (grad + correction(y, t))`` over the client's real steps."""
  y_params = dict(params)
  for t in real_steps(round_data, slot):
    x, y, mask = batch(round_data, slot, t)
    _, grad = batch_loss_and_grad(y_params, x, y, mask)
    if correction is not None:
      grad = tree_map(np.add, grad, correction(y_params, t))
    y_params = tree_map(lambda p, g: p - learning_rate * g, y_params, grad)
  return y_params


# ------------------------------------------------------------------------------------------- server steps

class ServerSGD:
  """``x <- x - lr * D`` (optionally heavy-ball momentum ``a <- mu a + D``, ``x <- x - lr a``: FedAvgM)."""

  def __init__(self, learning_rate=1.0, momentum=0.0):
    self.learning_rate, self.momentum, self.trace = learning_rate, momentum, None

  def step(self, params, delta):
    if self.trace is None:
      self.trace = zeros_like(params)
    self.trace = tree_map(lambda a, d: self.momentum * a + d, self.trace, delta)
    return tree_map(lambda p, a: p - self.learning_rate * a, params, self.trace)


class ServerAdaptive:
  """Reddi et al. 2021, Algorithm 2, ``v_{-1} = initial_accumulator``, ``m_{-1} = 0``. With ``bias_correction``
  the step of round ``t = 1, 2, ...`` is multiplied by ``sqrt(1 - beta2^t) / (1 - beta1^t)`` (Kingma & Ba's
  Adam step size, which TFF's Adam and Yogi use; the paper's Algorithm 2 does not)."""

  def __init__(self, kind, learning_rate, beta1, beta2, tau, initial_accumulator=0.0, bias_correction=False):
    assert kind in ("adagrad", "adam", "yogi"), kind
    self.kind, self.learning_rate, self.beta1, self.beta2, self.tau = kind, learning_rate, beta1, beta2, tau
    self.initial_accumulator, self.bias_correction = initial_accumulator, bias_correction
    self.m = self.v = None
    self.t = 0

  def step(self, params, delta):
    if self.m is None:
      self.m = zeros_like(params)
      self.v = tree_map(lambda p: np.full_like(p, self.initial_accumulator), params)
    b1, b2 = self.beta1, self.beta2
    self.m = tree_map(lambda m, d: b1 * m + (1.0 - b1) * d, self.m, delta)
    if self.kind == "adagrad":
      self.v = tree_map(lambda v, d: v + d * d, self.v, delta)
    elif self.kind == "adam":
      self.v = tree_map(lambda v, d: b2 * v + (1.0 - b2) * d * d, self.v, delta)
    else:
      self.v = tree_map(lambda v, d: v - (1.0 - b2) * d * d * np.sign(v - d * d), self.v, delta)
    self.t += 1
    rate = self.learning_rate
    if self.bias_correction:
      rate *= np.sqrt(1.0 - b2 ** self.t) / (1.0 - b1 ** self.t)
    return tree_map(lambda p, m, v: p - rate * m / (np.sqrt(v) + self.tau), params, self.m, self.v)


# ------------------------------------------------------------------------------------------------- rounds

def fed_avg_round(params, round_data, *, client_learning_rate, server, weighting, proximal_strength=0.0):
  """One FedAvg round (FedProx when ``proximal_strength > 0``); ``server`` has ``step(params, delta)``."""
  deltas, weights = [], []
  for slot in client_slots(round_data):
    correction = None
    if proximal_strength:
      correction = lambda y, t: tree_map(lambda w, w0: proximal_strength * (w - w0), y, params)
    final = local_sgd(params, round_data, slot, client_learning_rate, correction)
    deltas.append(tree_map(np.subtract, params, final))
    weights.append(client_weight(round_data, slot, weighting))
  return server.step(params, weighted_mean(deltas, weights))


def local_momentum_sgd(params, round_data, slot, learning_rate, momentum):
  """Local heavy-ball SGD from ``params``, the buffer fresh: ``v <- rho v + g``, ``y <- y - lr v``."""
  y_params, buffer = dict(params), zeros_like(params)
  for t in real_steps(round_data, slot):
    x, y, mask = batch(round_data, slot, t)
    _, grad = batch_loss_and_grad(y_params, x, y, mask)
    buffer = tree_map(lambda v, g: momentum * v + g, buffer, grad)
    y_params = tree_map(lambda p, v: p - learning_rate * v, y_params, buffer)
  return y_params


def nova_a_vector(tau, momentum=0.0):
  """The paper's ``a_i`` for ``tau`` local steps: ones (SGD), or ``a[k] = sum_{j=0}^{tau-1-k} rho^j`` (the weight
  of gradient ``k`` in the sum of the momentum buffers ``v_k, ..., v_{tau-1}``), summed term by term."""
  return np.array([sum(momentum ** j for j in range(tau - k)) for k in range(tau)], np.float64)


def fed_nova_round(params, round_data, *, client_learning_rate, momentum=0.0, weighting="num_examples",
                   server_learning_rate=1.0):
  """One FedNova round (Wang et al. 2020, "Tackling the Objective Inconsistency Problem in Heterogeneous
  Federated Optimization", eq. 6): ``x <- x - lr_s tau_eff sum_i p_i (x - y_i) / ||a_i||_1`` with
  ``p_i = w_i / sum_j w_j`` (``w_i = n_i`` or 1), ``tau_eff = sum_i p_i ||a_i||_1`` and ``a_i`` the paper's vector
  (:func:`nova_a_vector`; SGD: ``||a_i||_1 = tau_i``, so ``(x - y_i) / tau_i`` is ``eta`` times the client's mean
  local gradient)."""
  slots = client_slots(round_data)
  sizes = np.array([client_weight(round_data, slot, weighting) for slot in slots])
  shares = sizes / sizes.sum()
  norms = np.array([nova_a_vector(len(real_steps(round_data, slot)), momentum).sum() for slot in slots])
  finals = [local_momentum_sgd(params, round_data, slot, client_learning_rate, momentum) if momentum
            else local_sgd(params, round_data, slot, client_learning_rate) for slot in slots]
  normalized = [tree_map(lambda x, y, norm=norm: (x - y) / norm, params, final) for final, norm in zip(finals, norms)]
  tau_eff = float(shares @ norms)
  return tree_map(lambda x, *d: x - server_learning_rate * tau_eff * sum(p * d_i for p, d_i in zip(shares, d)),
                  params, *normalized)


def client_mean_loss(params, round_data, slot):
  """``F_k(w)``: the client's mean loss over every real example it is packed with (epochs included)."""
  total, count = 0.0, 0.0
  for t in real_steps(round_data, slot):
    x, y, mask = batch(round_data, slot, t)
    loss, _ = batch_loss_and_grad(params, x, y, mask)
    total += loss * mask.sum()
    count += mask.sum()
  return total / count


def q_ffl_round(params, round_data, *, client_learning_rate, q, lipschitz=None, server_learning_rate=1.0):
  """One q-FedAvg round (Li et al. 2020, "Fair Resource Allocation in Federated Learning", Algorithm 2), with the
  paper's code's ``L = 1 / eta`` by default and ``F_k + 1e-10``: ``Delta w_k = L (w - w_k_bar)``,
  ``Delta_k = F_k^q Delta w_k``, ``h_k = q F_k^(q-1) ||Delta w_k||^2 + L F_k^q``,
  ``w <- w - lr_s sum_k Delta_k / sum_k h_k``."""
  rate = 1.0 / client_learning_rate if lipschitz is None else lipschitz
  deltas, hs = [], []
  for slot in client_slots(round_data):
    loss = client_mean_loss(params, round_data, slot) + 1e-10
    final = local_sgd(params, round_data, slot, client_learning_rate)
    step = tree_map(lambda x, y: rate * (x - y), params, final)
    squared_norm = sum(float(np.sum(v * v)) for v in step.values())
    deltas.append(tree_map(lambda d: loss ** q * d, step))
    hs.append(q * loss ** (q - 1) * squared_norm + rate * loss ** q)
  total_h = sum(hs)
  return tree_map(lambda x, *d: x - server_learning_rate * sum(d) / total_h, params, *deltas)


def scaffold_round(params, server_control, client_controls, cohort, round_data, *, client_learning_rate,
                   server_learning_rate, num_clients, weighting):
  """One SCAFFOLD round. ``client_controls`` is the population's ``{client: c_i}`` (updated in place for the
  cohort's real slots); ``cohort[k]`` is the client of slot ``k``. Returns ``(params, server_control)``."""
  deltas, weights, control_changes = [], [], []
  for slot in client_slots(round_data):
    client = cohort[slot]
    c_i = client_controls[client]
    correction = tree_map(np.subtract, server_control, c_i)  # c - c_i
    final = local_sgd(params, round_data, slot, client_learning_rate, lambda y, t: correction)
    delta = tree_map(np.subtract, params, final)
    num_steps = len(real_steps(round_data, slot))
    new_c_i = tree_map(lambda ci, c, d: ci - c + d / (num_steps * client_learning_rate), c_i, server_control,
                       delta)
    control_changes.append(tree_map(np.subtract, new_c_i, c_i))
    client_controls[client] = new_c_i
    deltas.append(delta)
    weights.append(client_weight(round_data, slot, weighting))
  delta = weighted_mean(deltas, weights)
  params = tree_map(lambda p, d: p - server_learning_rate * d, params, delta)
  server_control = tree_map(lambda c, *changes: c + sum(changes) / num_clients, server_control, *control_changes)
  return params, server_control


class BaseMomentum:
  """Mime's base optimizer SGD with heavy-ball momentum: state ``m``; a step with frozen state moves by
  ``-lr (g + beta m)``; the server's state update is ``m <- g + beta m``."""

  def __init__(self, learning_rate, beta):
    self.learning_rate, self.beta = learning_rate, beta

  def init(self, params):
    return zeros_like(params)

  def step(self, grad, m):
    return tree_map(lambda g, mm: -self.learning_rate * (g + self.beta * mm), grad, m)

  def next_state(self, grad, m):
    return tree_map(lambda g, mm: g + self.beta * mm, grad, m)


class BaseAdam:
  """Mime's base optimizer Adam (Kingma & Ba 2015, bias-corrected, epsilon outside the root): state
  ``(t, m, v)``. A step with frozen state uses ``m' = b1 m + (1 - b1) g``, ``v' = b2 v + (1 - b2) g^2`` and moves
  by ``-lr (m' / (1 - b1^(t+1))) / (sqrt(v' / (1 - b2^(t+1))) + eps)`` without keeping ``m', v', t + 1``; the
  server keeps them."""

  def __init__(self, learning_rate, b1=0.9, b2=0.999, eps=1e-8, bias_correction_dtype=np.float64):
    self.learning_rate, self.b1, self.b2, self.eps = learning_rate, b1, b2, eps
    # The decay rates as the bias corrections ``1 - b^t`` see them. optax computes ``decay ** count`` in float32,
    # i.e. with b2 = float32(0.999) = 0.99900001287, while the moment update uses ``1 - b2`` rounded from
    # float64: a deterministic 1.3e-5 relative change of ``1 - b2`` (so of v-hat; 6e-6 of the step), far above
    # float32 rounding. ``bias_correction_dtype=np.float32`` reproduces it.
    self.b1_t, self.b2_t = float(bias_correction_dtype(b1)), float(bias_correction_dtype(b2))

  def init(self, params):
    return (0, zeros_like(params), zeros_like(params))

  def next_state(self, grad, state):
    t, m, v = state
    return (t + 1, tree_map(lambda mm, g: self.b1 * mm + (1 - self.b1) * g, m, grad),
            tree_map(lambda vv, g: self.b2 * vv + (1 - self.b2) * g * g, v, grad))

  def step(self, grad, state):
    t, m, v = self.next_state(grad, state)
    return tree_map(lambda mm, vv: -self.learning_rate * (mm / (1 - self.b1_t ** t))
                    / (np.sqrt(vv / (1 - self.b2_t ** t)) + self.eps), m, v)


def mime_round(params, base_state, round_data, *, base, weighting, svrg):
  """One MimeLite (``svrg=False``) or Mime (``svrg=True``) round with base optimizer ``base`` (e.g.
  :class:`BaseMomentum`) whose state ``base_state`` is frozen during local steps, and server SGD(1.0). Returns
  ``(params, base_state)``, the state updated from the mean full gradient at the round's server params."""
  slots = client_slots(round_data)
  weights = [client_weight(round_data, slot, weighting) for slot in slots]
  full = weighted_mean([full_gradient(params, round_data, slot) for slot in slots], weights)
  deltas = []
  for slot in slots:
    y_params = dict(params)
    for t in real_steps(round_data, slot):
      x, y, mask = batch(round_data, slot, t)
      _, grad = batch_loss_and_grad(y_params, x, y, mask)
      if svrg:
        _, grad_at_server = batch_loss_and_grad(params, x, y, mask)
        grad = tree_map(lambda gy, gx, g: gy - gx + g, grad, grad_at_server, full)
      y_params = tree_map(np.add, y_params, base.step(grad, base_state))
    deltas.append(tree_map(np.subtract, params, y_params))
  params = tree_map(np.subtract, params, weighted_mean(deltas, weights))
  return params, base.next_state(full, base_state)
