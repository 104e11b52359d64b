"""The TensorFlow-free tf.train.Example codec, cross-checked with protobuf's own Example message."""

import numpy as np
import pytest

from fedjax_lite.datasets.errors import DatasetFormatError
from fedjax_lite.datasets.example_proto import decode_example, encode_example


def _sample():
  return {"pixels": np.linspace(-1.5, 2.0, 12, dtype=np.float32).reshape(3, 4),
          "label": np.array([-3, 0, 127, 128, 300, 2**40, -(2**63)]),
          "snippets": [b"to be, or not", "caf\u00e9".encode()]}


def test_round_trip_exact():
  decoded = decode_example(encode_example(_sample()))
  assert decoded["pixels"][0] == "float"
  np.testing.assert_array_equal(decoded["pixels"][1], _sample()["pixels"].reshape(-1))
  np.testing.assert_array_equal(decoded["label"][1], _sample()["label"])
  assert decoded["snippets"] == ("bytes", [b"to be, or not", "caf\u00e9".encode()])


def test_agrees_with_protobuf_both_ways():
  pb2 = pytest.importorskip("tensorflow_datasets.proto.tf_example_generated_pb2")
  sample = _sample()
  message = pb2.Example()
  message.ParseFromString(encode_example(sample))
  features = message.features.feature
  np.testing.assert_array_equal(np.array(features["pixels"].float_list.value, np.float32),
                                sample["pixels"].reshape(-1))
  assert list(features["label"].int64_list.value) == sample["label"].tolist()
  assert list(features["snippets"].bytes_list.value) == sample["snippets"]
  # protobuf's own serialization (unpacked ints added by hand below) decodes to the same values.
  other = pb2.Example()
  other.features.feature["a"].int64_list.value.extend([5, -7, 1 << 35])
  other.features.feature["b"].float_list.value.extend([0.25, -2.0])
  other.features.feature["c"].bytes_list.value.extend([b"", b"xyz"])
  decoded = decode_example(other.SerializeToString())
  assert decoded["a"][1].tolist() == [5, -7, 1 << 35]
  assert decoded["b"][1].tolist() == [0.25, -2.0]
  assert decoded["c"][1] == [b"", b"xyz"]


def test_unpacked_repeated_fields():
  # Feature{int64_list{value: 1 value: 300}} unpacked (wire type 0), float unpacked (wire type 5).
  int_list = bytes([0x08, 0x01, 0x08, 0xAC, 0x02])
  float_list = bytes([0x0D]) + np.float32(1.5).tobytes() + bytes([0x0D]) + np.float32(-2).tobytes()
  def feature(field, payload):
    return bytes([field << 3 | 2, len(payload)]) + payload
  def entry(key, feat):
    body = feature(1, key) + feature(2, feat)
    return feature(1, body)
  example = feature(1, entry(b"i", feature(3, int_list)) + entry(b"f", feature(2, float_list)))
  decoded = decode_example(example)
  assert decoded["i"][1].tolist() == [1, 300]
  assert decoded["f"][1].tolist() == [1.5, -2.0]


@pytest.mark.parametrize("cut", [1, 5, 20, -3])
def test_truncated_bytes_raise_format_error(cut):
  serialized = encode_example(_sample())
  with pytest.raises(DatasetFormatError, match="malformed tf.train.Example"):
    decode_example(serialized[:cut])


def test_rejects_non_bytes():
  with pytest.raises(TypeError, match="serialized must be bytes"):
    decode_example("text")
