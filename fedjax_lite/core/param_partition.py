"""Parameter partitions: which parameters train, which travel, which stay on the client.

Where this sits in a round: a model's parameters are labelled once, from the initial params, and the labels decide
every part of the round that touches them --

* ``'global'``: trained by the clients, broadcast, uploaded and aggregated (every parameter of plain FedAvg);
* ``'local'``: trained by the clients, never uploaded: kept per client (client state) or reconstructed every round
  (FedPer/FedRep heads, Ditto's personal model, Federated Reconstruction, FedBN's batch-norm layers);
* ``'frozen'``: never trained, never uploaded (the pretrained base under LoRA adapters).

Labels come from a function of the parameter's path (a tuple of names, e.g. ``('params', 'Dense_0', 'kernel')``
for a flax model with state, ``('Dense_0', 'kernel')`` without), from one label for everything, or from a pytree of
labels shaped like the params (:func:`label_params`). :func:`split_params` cuts params into one tree per label and
:func:`merge_params` puts them back: both keep the params' tree structure (the other labels' positions hold
``None``, an empty subtree to ``jax.tree``), are exact (leaves are moved, never computed) and run under ``jit`` and
``vmap`` (the labels are static Python strings; close over them, never pass them as traced arguments).

Two ways to keep frozen parameters from training, for the two situations:

* :func:`partition_optimizer` -- the params stay whole and optax's own partitioning trains them:
  ``optax.multi_transform`` with ``optax.set_to_zero()`` for ``'frozen'`` (their update is exactly zero, so they
  stay bit-identical: ``p + 0 = p`` for every float but ``-0.0``, which becomes ``+0.0``).
* :func:`partial_model` -- the model becomes a function of the non-fixed parameters only, the fixed ones (the
  frozen base) bound as a traced argument. Local training then carries, differentiates and updates only the
  adapters; when the client work is mapped over a cohort with the base broadcast (unbatched, ``in_axes=None``), one
  copy of the base serves every client (a frozen base inside the params would be carried by every client's training
  loop, and ``vmap`` of a ``while_loop`` with a per-client trip count batches every carried value: one copy per
  client; ``benchmarks/lora_memory.py`` measures both).

Models with non-trainable state (BatchNorm statistics) keep it as top-level collections of their params
(:attr:`fedjax_lite.core.model.Model.state_collections`); label its paths (``path[0] == 'batch_stats'``) ``'local'``
for FedBN or ``'global'`` to aggregate it, and :func:`fedjax_lite.core.model.split_model_state` separates it from
the trained parameters of a partition (e.g. to average it as a plain mean).
"""

from __future__ import annotations

from typing import Callable, Iterable, Mapping

import jax
import optax

from fedjax_lite.core.model import Batch, Model, ModelState, Params
from fedjax_lite.core.tree import PyTree, tree_num_elements

GLOBAL = "global"
LOCAL = "local"
FROZEN = "frozen"
PARAM_LABELS: tuple[str, ...] = (GLOBAL, LOCAL, FROZEN)

ParamPath = tuple[str, ...]
Labels = PyTree  # a pytree of label strings shaped like the params
LabelSpec = str | Callable[[ParamPath], str] | Labels


def path_names(key_path) -> ParamPath:
  """A ``jax.tree_util`` key path as a tuple of names: dict keys and attribute names as strings, sequence
  indices as their decimal strings (``(DictKey('params'), DictKey('Dense_0'), DictKey('kernel'))`` ->
  ``('params', 'Dense_0', 'kernel')``)."""
  names = []
  for key in key_path:
    if isinstance(key, jax.tree_util.DictKey):
      names.append(str(key.key))
    elif isinstance(key, jax.tree_util.SequenceKey):
      names.append(str(key.idx))
    elif isinstance(key, jax.tree_util.GetAttrKey):
      names.append(key.name)
    elif isinstance(key, jax.tree_util.FlattenedIndexKey):
      names.append(str(key.key))
    else:
      names.append(str(key))
  return tuple(names)


def _check_label(label, where: str) -> str:
  if not isinstance(label, str) or label not in PARAM_LABELS:
    raise ValueError(f"unknown parameter label {label!r} {where}; the labels are {list(PARAM_LABELS)}.")
  return label


def _paths(tree: PyTree) -> list[str]:
  return ["/".join(path_names(path)) for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _structure_error(labels: PyTree, params: PyTree, what: str) -> ValueError:
  label_paths, param_paths = _paths(labels), _paths(params)
  missing = [p for p in param_paths if p not in set(label_paths)]
  extra = [p for p in label_paths if p not in set(param_paths)]
  if missing or extra:
    detail = (f"paths without a label: {missing[:5]}{' ...' if len(missing) > 5 else ''}; "
              f"labels for no parameter: {extra[:5]}{' ...' if len(extra) > 5 else ''}")
  else:
    detail = (f"same paths, different containers: labels {jax.tree.structure(labels)} vs params "
              f"{jax.tree.structure(params)}")
  return ValueError(f"the label tree does not match the {what}'s structure ({detail}).")


def label_params(params: Params, labels: LabelSpec) -> Labels:
  """The validated label tree of ``params``: one of ``'global'``, ``'local'``, ``'frozen'`` per leaf.

  Args:
    params: the model's parameters (arrays or shapes: only the structure is read).
    labels: one label for every parameter (a str); or a function ``path -> label`` of the parameter's path (a
      tuple of names, :func:`path_names`); or a pytree of labels with the params' structure.

  Raises:
    ValueError: an unknown label (naming the parameter's path), or a label tree whose structure differs from the
      params' (naming the paths on either side).

  >>> import jax.numpy as jnp
  >>> params = {'body': {'w': jnp.ones((2, 2))}, 'head': {'w': jnp.ones((2, 1))}}
  >>> label_params(params, lambda path: 'local' if path[0] == 'head' else 'global')
  {'body': {'w': 'global'}, 'head': {'w': 'local'}}
  """
  if isinstance(labels, str):
    _check_label(labels, "(the one label for every parameter)")
    return jax.tree.map(lambda _: labels, params)
  if callable(labels):

    def call(path, _):
      names = path_names(path)
      return _check_label(labels(names), f"returned for parameter {'/'.join(names)!r}")

    return jax.tree_util.tree_map_with_path(call, params)
  if jax.tree.structure(labels) != jax.tree.structure(params):
    raise _structure_error(labels, params, "params")
  for path, label in jax.tree_util.tree_flatten_with_path(labels)[0]:
    _check_label(label, f"at parameter {'/'.join(path_names(path))!r}")
  return labels


def _label_set(keep: str | Iterable[str], name: str) -> frozenset[str]:
  keep = (keep,) if isinstance(keep, str) else tuple(keep)
  for label in keep:
    _check_label(label, f"in {name}")
  return frozenset(keep)


def select_params(params: Params, labels: LabelSpec, keep: str | Iterable[str]) -> PyTree:
  """``params`` with every leaf whose label is not in ``keep`` replaced by ``None`` (same tree structure)."""
  labels = label_params(params, labels)
  keep = _label_set(keep, "keep")
  return jax.tree.map(lambda label, leaf: leaf if label in keep else None, labels, params)


def split_params(params: Params, labels: LabelSpec) -> dict[str, PyTree]:
  """``{'global': ..., 'local': ..., 'frozen': ...}``: the params cut by label, each part with the params' tree
  structure and ``None`` where another label holds the leaf (a part whose label is unused is all ``None``).

  Exact and jittable; :func:`merge_params` is its inverse. Only the ``'global'`` part travels in a round (broadcast,
  upload, aggregation, bit counts); ``jax.tree.leaves`` and every aggregator see only its leaves.

  >>> import jax.numpy as jnp
  >>> params = {'body': jnp.ones(2), 'head': jnp.zeros(1)}
  >>> parts = split_params(params, lambda path: 'local' if path == ('head',) else 'global')
  >>> parts['global']
  {'body': Array([1., 1.], dtype=float32), 'head': None}
  >>> merge_params(parts, label_params(params, lambda path: 'local' if path == ('head',) else 'global'))['head']
  Array([0.], dtype=float32)
  """
  labels = label_params(params, labels)
  return {label: select_params(params, labels, label) for label in PARAM_LABELS}


def merge_params(parts: Mapping[str, PyTree], labels: Labels) -> Params:
  """The params whose leaf at each position comes from ``parts[label of that position]``: the inverse of
  :func:`split_params`, with the label tree's structure.

  Args:
    parts: label -> a tree with the labels' structure holding at least the leaves of that label (``None``, or
      anything, elsewhere: only that label's positions are read). Every label in use needs its part; one tree may
      serve several labels (e.g. a partial model's params for ``'global'`` and ``'local'``).
    labels: the label tree (from :func:`label_params`; a path function cannot be used here, since no part holds
      every path).

  Raises:
    ValueError: a part missing for a label in use, a part not shaped like the labels, or ``None`` where a part must
      hold a parameter.
  """
  if isinstance(labels, str) or callable(labels):
    raise TypeError("merge_params needs the label tree (label_params(params, ...)), not a label or a function: "
                    "the parts alone do not hold every parameter's path.")
  if not isinstance(parts, Mapping):
    raise TypeError(f"parts must be a dict label -> tree, got {type(parts).__name__}.")
  for label in parts:
    _check_label(label, "as a key of parts")
  treedef = jax.tree.structure(labels)
  label_leaves = treedef.flatten_up_to(labels)
  path_list = [path_names(path) for path, _ in jax.tree_util.tree_flatten_with_path(labels)[0]]
  for index, label in enumerate(label_leaves):
    _check_label(label, f"at parameter {'/'.join(path_list[index])!r}")
  used = sorted(set(label_leaves), key=PARAM_LABELS.index)
  flat_parts = {}
  for label in used:
    if label not in parts:
      raise ValueError(f"parts has no {label!r} part, but the labels use it; got parts {sorted(parts)}.")
    try:
      flat_parts[label] = treedef.flatten_up_to(parts[label])
    except (ValueError, TypeError) as error:
      raise ValueError(f"parts[{label!r}] is not shaped like the labels: {error}") from None
  leaves = []
  for index, label in enumerate(label_leaves):
    leaf = flat_parts[label][index]
    if leaf is None:
      raise ValueError(f"parts[{label!r}] holds None at parameter {'/'.join(path_list[index])!r}, which is "
                       f"labelled {label!r}.")
    leaves.append(leaf)
  return jax.tree.unflatten(treedef, leaves)


def overlay_params(params: PyTree, part: PyTree) -> PyTree:
  """``params`` with every leaf that ``part`` holds replaced by ``part``'s: the non-``None`` leaves of a part (a
  client's local parameters from :func:`split_params`, kept as its state) laid over a tree that has them or
  ``None`` there (the server's params, or the broadcast's). No labels needed; exact and jittable.

  >>> import jax.numpy as jnp
  >>> overlay_params({'body': jnp.ones(1), 'head': None}, {'body': None, 'head': jnp.zeros(1)})['head']
  Array([0.], dtype=float32)
  """
  return jax.tree.map(lambda own, laid: own if laid is None else laid, params, part, is_leaf=lambda x: x is None)


def count_params(params: Params, labels: LabelSpec) -> dict[str, int]:
  """``{label: number of parameter elements with that label}`` (static Python ints; every label present)."""
  parts = split_params(params, labels)
  return {label: tree_num_elements(part) for label, part in parts.items()}


def partition_optimizer(
    labels: LabelSpec,
    optimizer: optax.GradientTransformation,
    *,
    local_optimizer: optax.GradientTransformation | None = None,
) -> optax.GradientTransformation:
  """The training mask as optax's own partitioning: ``optax.multi_transform`` with ``optimizer`` for ``'global'``,
  ``local_optimizer`` (default ``optimizer``, with its own state) for ``'local'`` and ``optax.set_to_zero()`` for
  ``'frozen'`` (an update of exactly zero; no optimizer state for frozen leaves).

  The labels may be a label tree or a path function (resolved against the params at ``init`` and the updates at
  ``update``, validated by :func:`label_params`). The gradients of frozen leaves are discarded, so XLA removes their
  computation; for a large frozen base that should not even be carried, use :func:`partial_model`.

  >>> import jax.numpy as jnp, optax
  >>> params = {'base': jnp.ones(2), 'adapter': jnp.ones(2)}
  >>> tx = partition_optimizer(lambda path: 'frozen' if path == ('base',) else 'global', optax.sgd(0.5))
  >>> updates, _ = tx.update({'base': jnp.ones(2), 'adapter': jnp.ones(2)}, tx.init(params), params)
  >>> optax.apply_updates(params, updates)
  {'adapter': Array([0.5, 0.5], dtype=float32), 'base': Array([1., 1.], dtype=float32)}
  """
  for name, value in (("optimizer", optimizer), ("local_optimizer", local_optimizer)):
    if value is not None and not isinstance(value, optax.GradientTransformation):
      raise TypeError(f"{name} must be an optax.GradientTransformation, got {type(value).__name__}.")
  if not (isinstance(labels, str) or callable(labels)):
    label_params(jax.tree.map(lambda _: 0, labels), labels)  # validates the label values now
  transforms = {GLOBAL: optimizer, LOCAL: local_optimizer if local_optimizer is not None else optimizer,
                FROZEN: optax.set_to_zero()}
  return optax.multi_transform(transforms, lambda tree: label_params(tree, labels))


def partial_model(model: Model, labels: Labels, fixed: Mapping[str, PyTree]) -> Model:
  """``model`` as a function of the parameters whose label is not in ``fixed``; the fixed parts are bound.

  The partial model's params are the full params with ``None`` at the fixed positions (what
  ``select_params(params, labels, other labels)`` gives); its ``apply`` merges them with ``fixed``
  (:func:`merge_params`) and calls ``model.apply``. Gradients, optimizer states, updates and uploads of the
  partial model cover the non-fixed parameters only. Build it INSIDE the traced client work with the fixed parts
  taken from a broadcast argument (e.g. ``partial_model(model, labels, {'frozen': broadcast.extra})``): the base is
  then a traced input shared by every client, never a per-client copy and never a constant baked into the program.

  For a model with state (:attr:`Model.state_collections`), state leaves in ``fixed`` stay fixed (the training
  forward pass's new value for them is dropped); the others are updated as usual.

  Args:
    model: the full model.
    labels: its label tree (:func:`label_params`).
    fixed: label -> that label's part (:func:`split_params`), for the labels to bind (e.g. ``{'frozen': base}``;
      FedRep's head phase binds ``{'global': body}``).

  Raises:
    ValueError: an unknown label in ``fixed``, or every label in use fixed (nothing would be left to train).
  """
  if not isinstance(model, Model):
    raise TypeError(f"model must be a fedjax_lite Model, got {type(model).__name__}.")
  if isinstance(labels, str) or callable(labels):
    raise TypeError("partial_model needs the label tree (label_params(params, ...)), not a label or a function.")
  if not isinstance(fixed, Mapping) or not fixed:
    raise ValueError(f"fixed must be a non-empty dict label -> part, got {fixed!r}.")
  fixed_labels = _label_set(fixed, "fixed")
  label_leaves = jax.tree.leaves(labels)
  for label in label_leaves:
    _check_label(label, "in labels")
  free = [label for label in PARAM_LABELS if label in set(label_leaves) and label not in fixed_labels]
  if not free:
    raise ValueError(f"fixed binds every label in use ({sorted(fixed_labels)}): the partial model would have no "
                     "parameters.")

  def full(params: PyTree) -> Params:
    return merge_params({**{label: params for label in free}, **fixed}, labels)

  def init(rng: jax.Array) -> PyTree:
    return select_params(model.init(rng), labels, free)

  def apply(params: PyTree, batch: Batch, rng: jax.Array | None, train: bool) -> jax.Array:
    return model.apply(full(params), batch, rng, train)

  train_apply = None
  if model.train_apply is not None:

    def train_apply(params: PyTree, batch: Batch, mask: jax.Array, rng: jax.Array | None):
      predictions, new_state = model.train_apply(full(params), batch, mask, rng)
      kept: ModelState = {
          collection: jax.tree.map(lambda label, leaf: None if label in fixed_labels else leaf, labels[collection],
                                   value)
          for collection, value in new_state.items()
      }
      return predictions, kept

  return Model(init=init, apply=apply, loss=model.loss, metrics=model.metrics, name=model.name,
               train_apply=train_apply, state_collections=model.state_collections)
