"""A TensorFlow-free codec for serialized ``tf.train.Example`` protos (the rows of the reference's SQLite files).

The reference (TFF >= 2021) stores one serialized ``tf.train.Example`` per row. Its schema is small::

  Example   { Features features = 1; }
  Features  { map<string, Feature> feature = 1; }      # map entry: { string key = 1; Feature value = 2; }
  Feature   { oneof { BytesList bytes_list = 1; FloatList float_list = 2; Int64List int64_list = 3; } }
  BytesList { repeated bytes value = 1; }
  FloatList { repeated float value = 1 [packed = true]; }   # little-endian IEEE float32
  Int64List { repeated int64 value = 1 [packed = true]; }   # varints, negatives as 10-byte two's complement

so this module decodes the protobuf wire format directly (tags are varints ``field << 3 | wire_type``; wire type
0 = varint, 1 = 8 bytes, 2 = length-delimited, 5 = 4 bytes), accepting packed and unpacked repeated fields and
skipping unknown fields as protobuf parsers do. Float lists become ``np.frombuffer`` views (no per-value Python
work) and packed varints are decoded with numpy. :func:`encode_example` writes the packed encoding that
TensorFlow writes; the tests and the benchmark use it to generate files in the exact format.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from fedjax_lite.datasets.errors import DatasetFormatError

__all__ = ["decode_example", "encode_example"]

_VARINT, _FIXED64, _LENGTH, _FIXED32 = 0, 1, 2, 5


class _Truncated(Exception):
  pass


def _read_varint(buffer: bytes, position: int) -> tuple[int, int]:
  result = 0
  shift = 0
  while True:
    if position >= len(buffer):
      raise _Truncated("varint runs past the end of the message")
    byte = buffer[position]
    position += 1
    result |= (byte & 0x7F) << shift
    if byte < 0x80:
      return result, position
    shift += 7
    if shift >= 70:
      raise _Truncated("varint longer than 10 bytes")


def _fields(buffer: bytes, start: int, stop: int):
  """Yields ``(field_number, wire_type, value)``: value is an int (varint/fixed) or a ``(begin, end)`` span."""
  position = start
  while position < stop:
    tag, position = _read_varint(buffer, position)
    field, wire_type = tag >> 3, tag & 7
    if wire_type == _VARINT:
      value, position = _read_varint(buffer, position)
    elif wire_type == _LENGTH:
      length, position = _read_varint(buffer, position)
      value = (position, position + length)
      position += length
    elif wire_type == _FIXED32:
      value = (position, position + 4)
      position += 4
    elif wire_type == _FIXED64:
      value = (position, position + 8)
      position += 8
    else:
      raise _Truncated(f"unsupported wire type {wire_type}")
    if position > stop:
      raise _Truncated("field runs past the end of its message")
    yield field, wire_type, value


def _decode_packed_varints(data: np.ndarray) -> np.ndarray:
  """Decodes concatenated varints (uint8 array) into int64, vectorized."""
  if data.size == 0:
    return np.zeros(0, np.int64)
  if data[-1] >= 0x80:
    raise _Truncated("packed varints end inside a varint")
  if np.all(data < 0x80):
    return data.astype(np.int64)
  ends = np.flatnonzero(data < 0x80)
  starts = np.concatenate([[0], ends[:-1] + 1])
  group = np.repeat(np.arange(ends.size), ends - starts + 1)
  position_in_group = np.arange(data.size) - starts[group]
  if position_in_group.max() >= 10:
    raise _Truncated("varint longer than 10 bytes")
  parts = (data & 0x7F).astype(np.uint64) << (7 * position_in_group).astype(np.uint64)
  return np.bitwise_or.reduceat(parts, starts).view(np.int64)


def _decode_feature(buffer: bytes, start: int, stop: int) -> tuple[str, Any]:
  kind, values = "bytes", []
  for field, wire_type, value in _fields(buffer, start, stop):
    if wire_type != _LENGTH or field not in (1, 2, 3):
      continue
    kind = ("bytes", "float", "int64")[field - 1]
    begin, end = value
    if field == 1:
      values = [buffer[b:e] for f, w, (b, e) in _fields(buffer, begin, end) if f == 1 and w == _LENGTH]
    elif field == 2:
      chunks = []
      for f, w, span in _fields(buffer, begin, end):
        if f != 1:
          continue
        if w == _LENGTH:  # packed
          if (span[1] - span[0]) % 4:
            raise _Truncated("packed float list length is not a multiple of 4")
          chunks.append(np.frombuffer(buffer, "<f4", (span[1] - span[0]) // 4, span[0]))
        elif w == _FIXED32:
          chunks.append(np.frombuffer(buffer, "<f4", 1, span[0]))
      values = chunks[0] if len(chunks) == 1 else np.concatenate(chunks) if chunks else np.zeros(0, np.float32)
    else:
      chunks = []
      for f, w, span in _fields(buffer, begin, end):
        if f != 1:
          continue
        if w == _LENGTH:
          chunks.append(_decode_packed_varints(np.frombuffer(buffer, np.uint8, span[1] - span[0], span[0])))
        elif w == _VARINT:
          chunks.append(np.array([span], np.uint64).view(np.int64))
      values = np.concatenate(chunks) if chunks else np.zeros(0, np.int64)
  return kind, values


def decode_example(serialized: bytes) -> dict[str, tuple[str, Any]]:
  """Decodes one serialized ``tf.train.Example``.

  Args:
    serialized: the proto's bytes.

  Returns:
    ``{feature name: (kind, values)}`` with kind ``'bytes'`` (a list of ``bytes``), ``'float'`` (a float32
    array, possibly a read-only view into ``serialized``) or ``'int64'`` (an int64 array). A feature with no
    list set decodes as an empty ``'bytes'`` list.

  Raises:
    DatasetFormatError: the bytes are not a well-formed Example (truncated, bad varint, bad wire type).
  """
  if not isinstance(serialized, (bytes, bytearray, memoryview)):
    raise TypeError(f"serialized must be bytes, got {type(serialized).__name__}.")
  buffer = bytes(serialized)
  features: dict[str, tuple[str, Any]] = {}
  try:
    for field, wire_type, value in _fields(buffer, 0, len(buffer)):
      if field != 1 or wire_type != _LENGTH:
        continue
      for entry_field, entry_wire, entry_span in _fields(buffer, *value):
        if entry_field != 1 or entry_wire != _LENGTH:
          continue
        key, feature = None, ("bytes", [])
        for f, w, span in _fields(buffer, *entry_span):
          if f == 1 and w == _LENGTH:
            key = buffer[span[0]:span[1]].decode("utf-8")
          elif f == 2 and w == _LENGTH:
            feature = _decode_feature(buffer, *span)
        if key is None:
          raise _Truncated("a feature map entry has no key")
        features[key] = feature
  except (_Truncated, UnicodeDecodeError) as error:
    raise DatasetFormatError(f"malformed tf.train.Example ({error}).") from None
  return features


def _varint(value: int) -> bytes:
  value &= (1 << 64) - 1
  out = bytearray()
  while True:
    byte = value & 0x7F
    value >>= 7
    if value:
      out.append(byte | 0x80)
    else:
      out.append(byte)
      return bytes(out)


def _length_delimited(field: int, payload: bytes) -> bytes:
  return _varint(field << 3 | _LENGTH) + _varint(len(payload)) + payload


def encode_example(features: Mapping[str, Any]) -> bytes:
  """Serializes ``{name: values}`` as a ``tf.train.Example`` in the packed encoding TensorFlow writes.

  Args:
    features: name -> ``bytes``/``str`` or a list of them (a BytesList), a floating array or float (a
      FloatList, stored as float32), or an integer/bool array or int (an Int64List). Arrays are flattened.

  Returns:
    The serialized proto.
  """
  if not isinstance(features, Mapping):
    raise TypeError(f"features must be a dict of name -> values, got {type(features).__name__}.")
  entries = []
  for name in sorted(features):
    value = features[name]
    if isinstance(value, (bytes, str)):
      value = [value]
    if isinstance(value, (list, tuple)) and (not value or isinstance(value[0], (bytes, str))):
      items = [v.encode("utf-8") if isinstance(v, str) else bytes(v) for v in value]
      feature = _length_delimited(1, b"".join(_length_delimited(1, item) for item in items))
    else:
      array = np.asarray(value)
      if np.issubdtype(array.dtype, np.floating):
        payload = np.ascontiguousarray(array, dtype="<f4").tobytes()
        feature = _length_delimited(2, _length_delimited(1, payload))
      elif np.issubdtype(array.dtype, np.integer) or array.dtype == np.bool_:
        payload = b"".join(_varint(int(v)) for v in array.reshape(-1).tolist())
        feature = _length_delimited(3, _length_delimited(1, payload))
      else:
        raise TypeError(f"features[{name!r}] has unsupported dtype {array.dtype}.")
    entry = _length_delimited(1, str(name).encode("utf-8")) + _length_delimited(2, feature)
    entries.append(_length_delimited(1, entry))
  return _length_delimited(1, b"".join(entries))
