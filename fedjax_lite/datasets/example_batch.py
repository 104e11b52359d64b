"""Decodes a batch of serialized ``tf.train.Example`` rows into arrays, vectorized over rows of one layout.

Rows of one dataset are written by one program, so most of them are byte-for-byte the same message skeleton
(tags, lengths, feature keys) with different payloads: EMNIST's rows differ only in the 3,136 pixel bytes and
the label's varint. :class:`BatchDecoder` learns a row layout (a *template*) from a row decoded by the exact
decoder of :mod:`.example_proto`, then decodes every row of the same length whose structural bytes equal the
template's — and whose varint payload bytes have the template's continuation bits, so every varint spans the
same bytes — with numpy over the whole batch at once (a 2-D ``uint8`` view, float payloads reinterpreted as
little-endian float32, varints summed over their byte columns). Rows that match no template go through the
exact decoder, so the result is the same as decoding row by row; templates are learned per row length (at most
:data:`MAX_TEMPLATES`), so rows whose labels need a longer varint get their own template.

Both paths check integer values before they are stored: a value the cached dtype cannot hold or a label
outside the spec's classes (:meth:`.FeatureSpec.out_of_range`) is a :class:`~.errors.DatasetFormatError`
naming the file, the row, the client and the value, as is a row that is not a well-formed Example.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from fedjax_lite.datasets.errors import DatasetFormatError
from fedjax_lite.datasets.example_proto import _LENGTH, _Truncated, _fields, decode_example
from fedjax_lite.datasets.feature_spec import FeatureSpec

__all__ = ["BatchDecoder", "MAX_TEMPLATES"]

MAX_TEMPLATES = 16


def _payload_spans(buffer: bytes) -> dict[str, tuple[str, int, int]] | None:
  """``{name: (kind, start, end)}`` of each numeric feature's packed payload, or ``None`` if a feature is encoded
  in a way the template path does not handle (unpacked or split lists)."""
  spans: dict[str, tuple[str, int, int]] = {}
  try:
    for field, wire, (start, end) in ((f, w, v) for f, w, v in _fields(buffer, 0, len(buffer)) if w == _LENGTH):
      if field != 1:
        continue
      for entry_field, entry_wire, entry_span in _fields(buffer, start, end):
        if entry_field != 1 or entry_wire != _LENGTH:
          return None
        key, payload = None, None
        for f, w, span in _fields(buffer, *entry_span):
          if f == 1 and w == _LENGTH:
            key = buffer[span[0]:span[1]].decode("utf-8")
          elif f == 2 and w == _LENGTH:
            lists = [(lf, ls) for lf, lw, ls in _fields(buffer, *span) if lw == _LENGTH]
            if len(lists) != 1:
              return None
            list_field, list_span = lists[0]
            if list_field == 1:
              payload = ("bytes", 0, 0)
              continue
            values = list(_fields(buffer, *list_span))
            if len(values) != 1 or values[0][0] != 1 or values[0][1] != _LENGTH:
              return None
            payload = ("float" if list_field == 2 else "int64", *values[0][2])
        if key is None or payload is None:
          return None
        spans[key] = payload
  except (_Truncated, UnicodeDecodeError):
    return None
  return spans


class _Template:
  """One row layout: which bytes must match exactly, which only in their high bit, where the payloads are."""

  def __init__(self, row: bytes, spans: Mapping[str, tuple[str, int, int]], spec: Mapping[str, FeatureSpec]):
    self.length = len(row)
    self.row = np.frombuffer(row, np.uint8)
    exact = np.ones(self.length, bool)
    self.spans = {}
    for name, feature_spec in spec.items():
      kind, start, end = spans[name]
      exact[start:end] = False
      self.spans[name] = (start, end)
    self.exact = np.flatnonzero(exact)
    varint_columns = [np.arange(*self.spans[n]) for n, s in spec.items() if s.kind == "int64"]
    self.high_bit = np.concatenate(varint_columns) if varint_columns else np.zeros(0, np.int64)
    self.spec = spec
    self._scratch = bytearray()

  def gather(self, blobs: Sequence[bytes], indices: np.ndarray) -> np.ndarray:
    """The rows ``indices`` of ``blobs`` as a ``[len(indices), length]`` uint8 array (in a reused buffer)."""
    needed = indices.size * self.length
    if len(self._scratch) < needed:
      self._scratch = bytearray(needed)
    view = memoryview(self._scratch)
    length = self.length
    for slot, index in enumerate(indices.tolist()):
      view[slot * length:(slot + 1) * length] = blobs[index]
    return np.frombuffer(self._scratch, np.uint8, needed).reshape(indices.size, length)

  def match(self, rows: np.ndarray) -> np.ndarray:
    ok = np.all(rows[:, self.exact] == self.row[self.exact], axis=1)
    if self.high_bit.size:
      ok &= np.all((rows[:, self.high_bit] & 0x80) == (self.row[self.high_bit] & 0x80), axis=1)
    return ok

  def decode(self, rows: np.ndarray) -> dict[str, np.ndarray]:
    out = {}
    for name, feature_spec in self.spec.items():
      start, end = self.spans[name]
      block = rows[:, start:end]
      if feature_spec.kind == "float":
        values = block.view("<f4")  # a strided view: the payload bytes reinterpreted, not copied
      else:
        groups = self.row[start:end] < 0x80  # varint ends, the same in every matched row
        ends = np.flatnonzero(groups)
        begins = np.concatenate([[0], ends[:-1] + 1])
        values = np.zeros((rows.shape[0], ends.size), np.uint64)
        for k, (b, e) in enumerate(zip(begins.tolist(), ends.tolist())):
          for shift, column in enumerate(range(b, e + 1)):
            values[:, k] |= (block[:, column] & 0x7F).astype(np.uint64) << np.uint64(7 * shift)
        values = values.view(np.int64)
      out[name] = values.reshape((rows.shape[0], *feature_spec.shape))
    return out


class BatchDecoder:
  """Decodes batches of serialized Examples into ``spec``'s fixed-size arrays and byte-string lists."""

  def __init__(self, spec: Mapping[str, FeatureSpec], *, where: str = "the file"):
    self.spec = dict(spec)
    self.numeric = {n: s for n, s in self.spec.items() if s.kind != "bytes"}
    self.where = where
    self._templates: dict[int, _Template | None] = {}
    self.rows_by_template = 0
    self.rows_by_parser = 0

  def _at(self, row: int, client: Any) -> str:
    return f"{self.where}: row {row}" + ("" if client is None else f" (client {client!r})")

  def _check_values(self, name: str, values: np.ndarray, rows: np.ndarray, clients: Sequence[Any] | None,
                   indices: np.ndarray) -> None:
    """Raises if feature ``name``'s decoded ``values`` (``[len(indices), ...]``, of the blobs ``indices``, file rows
    ``rows``) hold a value its cached dtype or classes cannot (see :meth:`.FeatureSpec.out_of_range`)."""
    feature_spec = self.spec[name]
    bad = feature_spec.out_of_range(values)
    if bad is None:
      return
    per_example = max(1, feature_spec.size)
    first = int(bad[0]) // per_example
    value = np.asarray(values).reshape(-1)[int(bad[0])]
    client = None if clients is None else clients[int(indices[first])]
    raise DatasetFormatError(f"{self._at(int(rows[first]), client)} has {name!r} value {value.item()!r}; expected "
                             f"{feature_spec.expected_values()} ({bad.size} such value(s) in this chunk of rows).")

  def _decode_one(self, blob: bytes, row: int, client: Any = None) -> dict[str, Any]:
    try:
      features = decode_example(blob)
    except DatasetFormatError as error:
      raise DatasetFormatError(f"{self._at(row, client)}: {error} Expected a serialized tf.train.Example with "
                               f"features {sorted(self.spec)}.") from None
    out = {}
    for name, feature_spec in self.spec.items():
      if name not in features:
        raise DatasetFormatError(f"{self._at(row, client)} lacks feature {name!r} (it has {sorted(features)}).")
      kind, values = features[name]
      expected = 1 if feature_spec.kind == "bytes" else feature_spec.size
      if kind != feature_spec.kind:
        raise DatasetFormatError(f"{self._at(row, client)} has feature {name!r} as a {kind} list, expected "
                                 f"{feature_spec.kind}.")
      if len(values) != expected:
        raise DatasetFormatError(f"{self._at(row, client)} has {len(values)} values for feature {name!r}, "
                                 f"expected {feature_spec.describe()} ({expected} values).")
      out[name] = values[0] if feature_spec.kind == "bytes" else np.asarray(values).reshape(feature_spec.shape)
      if feature_spec.kind == "int64":
        self._check_values(name, out[name][np.newaxis], np.array([row]), [client], np.zeros(1, np.int64))
    if len(self._templates) < MAX_TEMPLATES and len(blob) not in self._templates and self.numeric and \
        len(self.numeric) == len(self.spec):
      spans = _payload_spans(bytes(blob))
      usable = spans is not None and all(n in spans and spans[n][0] == s.kind for n, s in self.spec.items())
      self._templates[len(blob)] = _Template(bytes(blob), spans, self.spec) if usable else None
    return out

  def decode(self, blobs: Sequence[bytes], first_row: int = 0, *, out: Mapping[str, np.ndarray] | None = None,
             slots: np.ndarray | None = None,
             clients: Sequence[Any] | None = None) -> tuple[dict[str, np.ndarray], dict[str, list]]:
    """Decodes ``blobs`` (rows ``first_row...`` of the file, for messages).

    Args:
      blobs: serialized Examples.
      first_row: the file row of ``blobs[0]``.
      out: optional arrays to write the numeric features into (e.g. the cache's memmaps), at rows ``slots``
        (``slots[i]`` receives ``blobs[i]``); without it new arrays are returned.
      slots: int array of ``len(blobs)`` destination rows, with ``out``.
      clients: optional client id of each blob, named in error messages.

    Raises:
      DatasetFormatError: a row is not a well-formed Example of ``spec``, or holds an integer value that its
        feature's dtype or classes cannot hold.

    Returns:
      ``(arrays, texts)``: numeric features as ``[len(blobs), *shape]`` arrays of the spec's dtype (or ``out``),
      and bytes features as lists of ``bytes``.
    """
    count = len(blobs)
    if out is None:
      arrays = {n: np.empty((count, *s.shape), s.dtype) for n, s in self.numeric.items()}
      slots = np.arange(count)
    else:
      arrays = dict(out)
      slots = np.asarray(slots)
      if slots.shape != (count,):
        raise ValueError(f"slots must have shape ({count},), got {slots.shape}.")
    texts: dict[str, list] = {n: [None] * count for n, s in self.spec.items() if s.kind == "bytes"}
    done = np.zeros(count, bool)

    def parse(i):
      one = self._decode_one(blobs[i], first_row + i, None if clients is None else clients[i])
      self.rows_by_parser += 1
      for name, value in one.items():
        if name in arrays:
          arrays[name][slots[i]] = value
        else:
          texts[name][i] = value
      done[i] = True

    if not texts:
      lengths = np.fromiter(map(len, blobs), np.int64, count)
      unique_lengths, first_index = np.unique(lengths, return_index=True)
      for length, i in zip(unique_lengths.tolist(), first_index.tolist()):
        if length not in self._templates and len(self._templates) < MAX_TEMPLATES:
          parse(i)  # the exact decoder checks the row and learns its layout for the rest of the batch
      lengths[done] = -1
      for length, template in list(self._templates.items()):
        if template is None:
          continue
        candidates = np.flatnonzero(lengths == length)
        if candidates.size == 0:
          continue
        rows = template.gather(blobs, candidates)
        matched = template.match(rows)
        decoded = template.decode(rows if matched.all() else rows[matched])
        for name, values in decoded.items():
          if self.spec[name].kind == "int64":
            indices = candidates[matched]
            self._check_values(name, values, first_row + indices, clients, indices)
          arrays[name][slots[candidates[matched]]] = values
        done[candidates[matched]] = True
        self.rows_by_template += int(matched.sum())
    for i in np.flatnonzero(~done).tolist():
      parse(i)
    return arrays, texts
