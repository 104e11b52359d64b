"""Tests for fedjax_lite.models.recurrent: parameter counts against the reference, the LSTM's equations, shapes,
finite gradients, and one FedAvg round of the character LSTM on two tiny clients that lowers the loss."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_lite.algorithms import fed_avg
from fedjax_lite.core import ClientSpec, FederatedData
from fedjax_lite.core.model import masked_loss_and_metric_sums
from fedjax_lite.models import LSTM, shakespeare_lstm, stackoverflow_lstm, token_metrics

TINY = {"vocab_size": 6, "embedding_size": 4, "lstm_sizes": (8, 8)}  # 10 ids: pad 0, 1..6, OOV 7, BOS 8, EOS 9


def num_params(model) -> int:
  return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(jax.eval_shape(model.init, jax.random.key(0))))


def keras_lstm_params(units: int, input_width: int) -> int:
  """Keras LSTM: kernel [D, 4U] + recurrent kernel [U, 4U] + bias [4U]."""
  return 4 * units * (input_width + units + 1)


def test_shakespeare_parameter_count():
  # TFF simulation/baselines/shakespeare/char_prediction_models.py (create_recurrent_model): Embedding(90, 8),
  # LSTM(256), LSTM(256), Dense(90); 90 = 86 characters (char_prediction_preprocessing.CHAR_VOCAB) + pad/OOV/BOS/EOS.
  expected = 90 * 8 + keras_lstm_params(256, 8) + keras_lstm_params(256, 256) + (256 * 90 + 90)
  assert expected == 820_522
  assert num_params(shakespeare_lstm()) == expected


def test_stackoverflow_parameter_count():
  # TFF simulation/baselines/stackoverflow/word_prediction_models.py (create_recurrent_model with the task's
  # defaults): Embedding(10004, 96), LSTM(670), Dense(96), Dense(10004); 10,004 = 10,000 words + 1 OOV bucket +
  # pad/BOS/EOS (word_prediction_tasks.py, extended_vocab_size).
  expected = 10_004 * 96 + keras_lstm_params(670, 96) + (670 * 96 + 96) + (96 * 10_004 + 10_004)
  assert expected == 4_050_748
  assert num_params(stackoverflow_lstm()) == expected


def test_lstm_matches_the_keras_equations_step_by_step():
  rng = np.random.default_rng(0)
  inputs = rng.standard_normal((5, 2, 3)).astype(np.float32)  # [T, B, D]
  layer = LSTM(4)
  params = layer.init(jax.random.key(0), inputs)["params"]
  kernel, recurrent, bias = (np.asarray(params[k], np.float64) for k in ("kernel", "recurrent_kernel", "bias"))
  assert np.all(bias[4:8] == 1.0) and np.all(bias[:4] == 0.0) and np.all(bias[8:] == 0.0)  # unit_forget_bias
  sigmoid = lambda v: 1.0 / (1.0 + np.exp(-v))
  h = np.zeros((2, 4))
  c = np.zeros((2, 4))
  expected = []
  for x_t in inputs.astype(np.float64):
    z = x_t @ kernel + h @ recurrent + bias
    i, f, g, o = np.split(z, 4, axis=-1)
    c = sigmoid(f) * c + sigmoid(i) * np.tanh(g)
    h = sigmoid(o) * np.tanh(c)
    expected.append(h)
  outputs = np.asarray(layer.apply({"params": params}, inputs))
  # float32 against float64 over 5 steps of O(1) values: a few float32 ulps per op, well inside 1e-5.
  np.testing.assert_allclose(outputs, np.stack(expected), atol=1e-5)
  unrolled = LSTM(4, unroll=5).apply({"params": params}, inputs)
  np.testing.assert_allclose(np.asarray(unrolled), outputs, atol=1e-6)


def test_shakespeare_output_shape():
  model = shakespeare_lstm(sequence_length=5, **TINY)
  params = jax.eval_shape(model.init, jax.random.key(0))
  logits = jax.eval_shape(lambda p: model.apply(p, {"x": jnp.zeros((3, 5), jnp.int32)}, None, False), params)
  assert logits.shape == (3, 5, 10)  # its gradients are exercised by the FedAvg round below


def test_stackoverflow_shapes_and_finite_gradients():
  model = stackoverflow_lstm(sequence_length=5, vocab_size=6, embedding_size=4, lstm_size=8)
  params = jax.jit(model.init)(jax.random.key(0))
  ids = np.array([[8, 1, 2, 3, 9], [8, 7, 9, 0, 0]], np.int32)
  batch = {"x": ids, "y": np.roll(ids, -1, axis=1)}

  @jax.jit  # one compile for all three (eager autodiff through the scan would dispatch op by op)
  def forward_and_grad(p):
    loss = lambda q: masked_loss_and_metric_sums(model, q, batch, np.array([True, True]), None, True)[0]
    return model.apply(p, batch, None, False), *jax.value_and_grad(loss)(p)

  logits, value, grads = forward_and_grad(params)
  assert logits.shape == (2, 5, 10)
  assert np.isfinite(float(value))
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
  assert any(float(jnp.max(jnp.abs(g))) > 0 for g in jax.tree.leaves(grads))


def test_builder_argument_checks():
  with pytest.raises(ValueError, match="vocab_size must be a positive int"):
    shakespeare_lstm(vocab_size=0)
  with pytest.raises(ValueError, match="lstm_sizes must be a non-empty tuple"):
    shakespeare_lstm(lstm_sizes=())
  with pytest.raises(ValueError, match="below the vocabulary's 10 ids"):
    shakespeare_lstm(vocab_size=6, eos_id=10)
  with pytest.raises(ValueError, match="distinct"):
    stackoverflow_lstm(vocab_size=6, bos_id=0)
  with pytest.raises(ValueError, match="unroll must be a positive int"):
    stackoverflow_lstm(unroll=0)
  with pytest.raises(ValueError, match=r"ids must be token ids \[B, T\]"):
    model = shakespeare_lstm(sequence_length=4, **TINY)
    params = jax.eval_shape(model.init, jax.random.key(0))
    jax.eval_shape(lambda p: model.apply(p, {"x": jnp.zeros((2, 4, 1), jnp.int32)}, None, False), params)


def tiny_text_clients(sequence_length: int = 8) -> FederatedData:
  """Two clients of sequences BOS, a cycle of the 6 characters starting at a random place, EOS, padding."""
  rng = np.random.default_rng(0)
  clients = {}
  for client in range(2):
    rows = []
    for _ in range(12):
      start = int(rng.integers(0, 6))
      length = int(rng.integers(4, sequence_length))  # characters; BOS + chars + EOS + pads = T + 1
      chars = [1 + (start + k) % 6 for k in range(length)]
      row = [8] + chars + [9]
      rows.append(row + [0] * (sequence_length + 1 - len(row)))
    ids = np.array(rows, np.int32)
    clients[f"c{client}"] = {"x": ids[:, :-1], "y": ids[:, 1:]}
  return FederatedData.from_clients(clients)


def test_one_fed_avg_round_lowers_the_loss():
  data = tiny_text_clients()
  model = shakespeare_lstm(sequence_length=8, **TINY)
  process = fed_avg(model, client_optimizer=optax.sgd, client_learning_rate=1.0, server_optimizer=optax.sgd(1.0))
  params = model.init(jax.random.key(0))
  spec = ClientSpec(batch_size=4, num_epochs=4)
  round_data = spec.pack(data, [0, 1], seed=0, round_num=0)
  examples = {key: np.concatenate([data.client(k)[key] for k in range(2)]) for key in ("x", "y")}

  @jax.jit
  def evaluate(p):
    _, sums = masked_loss_and_metric_sums(model, p, examples, np.ones(len(examples["x"]), bool), None, False)
    return token_metrics(sums)

  before = evaluate(params)
  state, metrics, _ = jax.jit(process.next)(process.init(params), round_data, jax.random.key(1))
  after = evaluate(state.params)
  assert np.isfinite(float(after["loss"]))
  assert float(after["loss"]) < float(before["loss"]) - 0.1, (before, after)
  train = metrics["client_work"]["train"]
  assert int(train["num_examples"]) == 2 * 12 * 4  # 4 epochs of 12 sequences on each client
  assert float(train["counted_tokens"]) > 0
