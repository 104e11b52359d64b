"""The batch decoder's template path gives exactly what the row-by-row decoder gives, and falls back safely."""

import numpy as np
import pytest

from fedjax_lite.datasets.errors import DatasetFormatError
from fedjax_lite.datasets.example_batch import BatchDecoder, _payload_spans
from fedjax_lite.datasets.example_proto import encode_example
from fedjax_lite.datasets.feature_spec import FeatureSpec

SPEC = {"pixels": FeatureSpec("float", (2, 3), np.float32), "label": FeatureSpec("int64", (), np.int32)}


def _rows(rng, count):
  pixels = rng.standard_normal((count, 2, 3)).astype(np.float32)
  # labels of 1, 2 and 3 varint bytes and negative ones (10 bytes): several row lengths, several templates.
  labels = rng.choice([0, 5, 127, 128, 300, 20000, -1, -7], size=count)
  blobs = [encode_example({"pixels": pixels[i], "label": int(labels[i])}) for i in range(count)]
  return blobs, pixels, labels


def test_template_path_equals_row_by_row():
  rng = np.random.default_rng(0)
  decoder = BatchDecoder(SPEC)
  for batch in range(3):
    blobs, pixels, labels = _rows(rng, 200)
    if batch == 2:  # same length as a template but another structure: an extra key of equal size
      blobs[7] = encode_example({"pixels": pixels[7], "label": int(labels[7]), "x": 1.5})
      blobs[8] = encode_example({"pixelz": pixels[8], "pixels": pixels[8], "label": int(labels[8])})
    arrays, texts = decoder.decode(blobs)
    np.testing.assert_array_equal(arrays["pixels"], pixels)
    np.testing.assert_array_equal(arrays["label"], labels.astype(np.int32))
    assert texts == {}
  assert decoder.rows_by_template > 300  # batches 2 and 3 mostly went through templates


def test_unpacked_rows_and_bad_rows_fall_back_to_the_parser():
  rng = np.random.default_rng(1)
  decoder = BatchDecoder(SPEC, where="file.sqlite")
  blobs, pixels, labels = _rows(rng, 50)
  decoder.decode(blobs)
  for damage in ("wire_type", "continuation_bit"):
    bad = list(blobs)
    row = bytearray(blobs[3])
    if damage == "wire_type":
      row[0] = 0x0B  # field 1 with the unsupported wire type 3; same length as the template
    else:
      _, start, end = _payload_spans(bytes(row))["label"]
      row[end - 1] |= 0x80  # the label's last varint byte now continues past its packed list
    bad[3] = bytes(row)
    with pytest.raises(DatasetFormatError, match="malformed"):
      decoder.decode(bad)
  wrong = list(blobs)
  wrong[4] = encode_example({"pixels": np.zeros(5, np.float32), "label": 1})
  with pytest.raises(DatasetFormatError, match="row 104 has 5 values for feature 'pixels'"):
    decoder.decode(wrong, first_row=100)


def test_text_features():
  spec = {"snippets": FeatureSpec("bytes")}
  arrays, texts = BatchDecoder(spec).decode([encode_example({"snippets": b"ab"}), encode_example({"snippets": b""})])
  assert arrays == {} and texts == {"snippets": [b"ab", b""]}
