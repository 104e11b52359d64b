"""Tests for the compression preset (fedjax_lite.aggregators.presets.compression_aggregator): the zeroing / clipping / quantized-mean preset.

Measured upload per client for the original FedAvg CNN (1,663,370 float32 parameters): 53,227,872 bits with the
uncompressed ``mean()``, 13,464,224 with ``compression_aggregator()`` (3.95x less; TFF's sizing reported 3.47x,
counting 28-bit packed words), 17,616,736 with ``rotation=True`` (3.02x: the rotated leaves are padded to powers
of two, 1,605,632 -> 2,097,152 for the largest).
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_lite.aggregators.base import Aggregator, client_upload_bits, split_rng
from fedjax_lite.aggregators.presets import compression_aggregator
from fedjax_lite.aggregators.mean import mean
from fedjax_lite.core.process import MeasuredOutput
from fedjax_lite.models import original_fedavg_cnn

from tests.aggregators.helpers import one_client, run_streaming


# Built once: a jitted function compiles once per input shape, and tests share these.
PRESETS = {rotation: compression_aggregator(threshold=20, rotation=rotation) for rotation in (False, True)}
PRESET_NEXT = {rotation: jax.jit(aggregator.next) for rotation, aggregator in PRESETS.items()}




def client_values(num_clients=4, seed=0, scale=0.05):
  rng = np.random.default_rng(seed)
  return {"kernel": (rng.normal(size=(num_clients, 6, 10)) * scale).astype(np.float32),
          "bias": (rng.normal(size=(num_clients, 10)) * scale).astype(np.float32)}


def test_state_and_measurements_have_the_reference_structure():
  values = client_values(num_clients=3)
  state = PRESETS[False].init(one_client(values))
  output = PRESET_NEXT[False](state, values, np.ones(3, np.float32), jax.random.key(0))
  assert set(output.state) == {"zeroing_norm", "inner_agg", "zeroed_count_agg"}
  assert set(output.state["inner_agg"]) == {"clipping_norm", "inner_agg", "clipped_count_agg"}
  assert output.state["inner_agg"]["inner_agg"] == {"value_sum_process": (), "weight_sum_process": ()}
  chex.assert_trees_all_equal_structs(jax.tree.map(lambda _: 0, output.state), jax.tree.map(lambda _: 0, state))
  measurements = output.measurements
  assert set(measurements) == {"zeroing", "zeroing_norm", "zeroed_count"}
  assert set(measurements["zeroing"]) == {"clipping", "clipping_norm", "clipped_count"}
  assert measurements["zeroing"]["clipping"] == {"mean_value": (), "mean_weight": ()}
  assert float(measurements["zeroing_norm"]) == 21.0 and float(measurements["zeroing"]["clipping_norm"]) == 1.0

  bare = compression_aggregator(zeroing=False, clipping=False, weighted=False, threshold=20)
  assert jax.eval_shape(bare.next, bare.init(one_client(values)), values, np.ones(3, np.float32),
                        jax.random.key(0)).measurements == {"mean_value": (), "mean_count": ()}


def test_weighted_and_unweighted_means_within_the_quantization_error():
  values = client_values(num_clients=3, seed=1)
  weights = np.asarray([1.0, 3.0, 6.0], np.float32)
  weighted = compression_aggregator(clipping=False, zeroing=False, threshold=20, quantization_bits=6)
  unweighted = compression_aggregator(clipping=False, zeroing=False, weighted=False, threshold=20,
                                      quantization_bits=6)

  @jax.jit
  def both(values, weights, rng):
    state_w, state_u = weighted.init(one_client(values)), unweighted.init(one_client(values))
    # With neither zeroing nor clipping the preset IS the mean: its upload is {'value', 'weight'}.
    upload = weighted.client(weighted.broadcast(state_w), one_client(values), weights[0], rng)
    return (weighted.next(state_w, values, weights, rng).result, unweighted.next(state_u, values, weights, rng).result,
            upload)

  weighted_result, unweighted_result, upload = both(values, weights, jax.random.key(3))
  kernels = values["kernel"].reshape(3, -1)
  steps = (kernels.max(1) - kernels.min(1)) / 63
  exact_weighted = np.tensordot(weights, values["kernel"], 1) / weights.sum()
  # Client i's decoded w_i x_i is off by at most w_i * step_i per coordinate.
  assert np.max(np.abs(weighted_result["kernel"] - exact_weighted)) <= (weights * steps).sum() / weights.sum() * 1.001
  assert np.max(np.abs(unweighted_result["kernel"] - values["kernel"].mean(0))) <= steps.sum() / 3 * 1.001
  # The 10-element bias is at or below the threshold: exact up to the float32 arithmetic of the mean.
  np.testing.assert_allclose(weighted_result["bias"], np.tensordot(weights, values["bias"], 1) / weights.sum(),
                             rtol=1e-5, atol=1e-7)
  # What client 0 uploads is its WEIGHTED kernel, quantized on the 64-level grid of w_0 * x_0.
  scaled = weights[0] * kernels[0]
  grid = scaled.min() + np.arange(64) * (scaled.max() - scaled.min()) / 63
  decoded = np.asarray(upload["value"]["kernel"]).reshape(-1)
  assert np.max(np.min(np.abs(decoded[:, None] - grid[None, :]), axis=1)) < 1e-6
  np.testing.assert_array_equal(upload["weight"], weights[0])


@pytest.mark.parametrize("rotation", [False, True])
def test_streaming_equals_next_over_two_rounds(rotation):
  values = client_values(num_clients=3, seed=2, scale=2.0)
  values["kernel"][2] *= 50.0  # beyond the L-inf zeroing norm: zeroed
  weights = np.asarray([2.0, 1.0, 4.0], np.float32)
  aggregator = PRESETS[rotation]
  state = aggregator.init(one_client(values))
  next_fn = PRESET_NEXT[rotation]
  for round_key in jax.random.split(jax.random.key(4), 2):
    expected = next_fn(state, values, weights, round_key)
    chex.assert_trees_all_equal(run_streaming(aggregator, state, values, weights, round_key), expected)
    state = expected.state
  assert int(expected.measurements["zeroed_count"]) == 1
  assert int(expected.measurements["zeroing"]["clipped_count"]) == 2
  if rotation:
    hd_state = expected.state["inner_agg"]["inner_agg"]["value_sum_process"]
    assert int(hd_state["round_seed"]) == 2
    assert expected.measurements["zeroing"]["clipping"]["mean_value"] == {"hd": ()}


def test_cnn_upload_ratio():
  template = jax.eval_shape(original_fedavg_cnn().init, jax.random.key(0))
  uncompressed = client_upload_bits(mean(), template)
  compressed = client_upload_bits(compression_aggregator(), template)
  rotated = client_upload_bits(compression_aggregator(rotation=True), template)
  assert (uncompressed, compressed, rotated) == (53_227_872, 13_464_224, 17_616_736)
  assert uncompressed / compressed >= 3.4
  # Fewer bits, fewer quantized elements: 4 bits and a threshold above every leaf but the largest.
  assert client_upload_bits(compression_aggregator(quantization_bits=4, threshold=60_000), template) == (
      1_605_632 * 4 + 64 + (1_663_370 - 1_605_632) * 32 + 32 + 192)


def test_debug_measurements_fn_wraps_the_mean():
  seen = []

  def add_debug_measurements(inner: Aggregator) -> Aggregator:
    seen.append(inner)

    def server(state, total, rng, context):
      output = inner.server(state, total, rng, context)
      max_abs = jnp.max(jnp.abs(jnp.concatenate([jnp.ravel(x) for x in jax.tree.leaves(output.result)])))
      return MeasuredOutput(output.state, output.result, {"inner": output.measurements, "max_abs": max_abs})

    return inner._replace(server=server)

  values = client_values(num_clients=2, seed=3)
  aggregator = compression_aggregator(threshold=20, debug_measurements_fn=add_debug_measurements)
  assert len(seen) == 1
  output = jax.jit(aggregator.next)(aggregator.init(one_client(values)), values, np.ones(2, np.float32),
                                    jax.random.key(5))
  debug = output.measurements["zeroing"]["clipping"]
  assert debug["inner"] == {"mean_value": (), "mean_weight": ()}
  np.testing.assert_allclose(debug["max_abs"], max(np.abs(x).max() for x in jax.tree.leaves(output.result)))
  template = one_client(values)
  assert client_upload_bits(aggregator, template) == client_upload_bits(compression_aggregator(threshold=20), template)


def test_bad_arguments():
  with pytest.raises(ValueError, match="quantization_bits"):
    compression_aggregator(quantization_bits=0)
  with pytest.raises(ValueError, match="quantization_bits"):
    compression_aggregator(quantization_bits=17)
  with pytest.raises(ValueError, match="threshold"):
    compression_aggregator(threshold=-1)
  for flag in ("zeroing", "clipping", "weighted", "rotation"):
    with pytest.raises(TypeError, match=flag):
      compression_aggregator(**{flag: 1})
  with pytest.raises(TypeError, match="debug_measurements_fn"):
    compression_aggregator(debug_measurements_fn="mean")
  with pytest.raises(TypeError, match="debug_measurements_fn"):
    compression_aggregator(debug_measurements_fn=lambda inner: None)
