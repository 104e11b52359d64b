"""Checkpoints of a training run (orbax-checkpoint): what :func:`~fedjax_lite.training.run_training` saves, and
how a resumed run continues bit for bit.

A checkpoint is the state of the loop after ``rounds_completed`` complete rounds, saved as one orbax step
(``<checkpoint_dir>/<rounds_completed>/``) holding

* one item per **named pytree** (``'server_state'`` and whatever the caller adds through ``extra_state``, e.g. a
  per-client state store ``'client_states'``): the pytree's leaves as numpy arrays, in flattening order;
* ``'meta'`` (JSON): the run's configuration, library versions, the metrics history (every record written to the
  metrics file), the privacy ledger's spent epsilon, the sampler's position (the next round: samplers are pure
  functions of ``(seed, round)``, so the round number IS the sampler's position), and for each named pytree its
  leaf shapes, dtypes and a SHA-256 of its bytes.

Guarantees:

* **atomic**: orbax writes a step into a temporary directory and renames it into place only when every item is
  written (and on object stores writes a ``commit_success.txt`` last); a process killed during a save leaves at most
  a temporary directory, which :meth:`RunCheckpointer.latest` never returns. On top of that every restored tree is
  checked against the SHA-256 recorded in its meta: a step whose bytes do not match is skipped with a warning
  and the previous complete step is used;
* **asynchronous**: :meth:`RunCheckpointer.save` copies the trees to host memory (numpy) and returns; the files are
  written in a background thread while the next rounds run (a save waits for the previous one to finish);
* **keep last N**: older steps are deleted once a newer one is complete.

Test hook: with the environment variable ``FEDJAX_LITE_TEST_SAVE_DELAY=<rounds_completed>:<seconds>`` the
background write of that step sleeps before writing its meta, so a test can kill the process in the middle of a
save (``tests/training/test_checkpoint.py``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import signal
import threading
import time
import warnings
from typing import Any, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_args

from fedjax_lite.core import validation
from fedjax_lite.core.tree import PyTree

CHECKPOINT_FORMAT = 1
SERVER_STATE = "server_state"
META = "meta"
SAVE_DELAY_ENV = "FEDJAX_LITE_TEST_SAVE_DELAY"


class ConfigMismatchError(ValueError):
  """Resuming with a configuration that would change the results; the message names every difference."""


class CheckpointError(RuntimeError):
  """A checkpoint directory that cannot be used (damaged, or holding a different kind of run)."""


class TrainingInterrupted(KeyboardInterrupt):
  """Raised by ``run_training`` after SIGINT/SIGTERM once the checkpoint of the last complete round is written.

  Attributes:
    signum: the signal received.
    rounds_completed: rounds saved in the checkpoint.
    checkpoint_dir: where it is.
  """

  def __init__(self, signum: int, rounds_completed: int, checkpoint_dir: str):
    super().__init__(f"interrupted by signal {signum} after {rounds_completed} rounds; checkpoint saved in "
                     f"{checkpoint_dir}")
    self.signum = signum
    self.rounds_completed = rounds_completed
    self.checkpoint_dir = checkpoint_dir


def library_versions() -> dict[str, str]:
  """Versions that decide the numbers a run produces (a resumed run is bit-identical only on the same ones)."""
  from importlib import metadata

  versions = {}
  for package in ("fedjax_lite", "jax", "jaxlib", "numpy", "dp-accounting", "orbax-checkpoint", "optax", "flax"):
    try:
      versions[package] = metadata.version(package)
    except metadata.PackageNotFoundError:
      versions[package] = "absent"
  versions["python"] = platform.python_version()
  versions["backend"] = jax.default_backend()
  return versions


def config_differences(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
  """``'name: X in the checkpoint, Y now'`` for every key whose JSON value differs (missing keys included)."""
  differences = []
  for key in sorted(set(saved) | set(current), key=str):
    old = saved.get(key, "<absent>")
    new = _jsonable(current.get(key, "<absent>"))
    if json.dumps(old, sort_keys=True) != json.dumps(new, sort_keys=True):
      differences.append(f"{key}: {_short(old)} in the checkpoint, {_short(new)} now")
  return differences


def _short(value: Any) -> str:
  text = json.dumps(value, sort_keys=True)
  return text if len(text) <= 80 else text[:77] + "..."


def _jsonable(value: Any) -> Any:
  """JSON round trip (tuples become lists, numpy scalars Python numbers) so saved and current compare equal."""
  return json.loads(json.dumps(value, default=_json_default))


def _json_default(value: Any) -> Any:
  if isinstance(value, np.generic):
    return value.item()
  if isinstance(value, np.ndarray):
    return value.tolist()
  if isinstance(value, np.dtype):
    return str(value)
  return repr(value)


# Trees <-> host arrays --------------------------------------------------------------------------------------------


def _is_key(leaf: Any) -> bool:
  return isinstance(leaf, jax.Array) and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key)


def _leaf_spec(leaf: Any) -> dict:
  if _is_key(leaf):
    data = jax.random.key_data(leaf)
    return {"shape": list(data.shape), "dtype": str(data.dtype), "key_impl": str(jax.random.key_impl(leaf))}
  array = np.asarray(leaf)
  return {"shape": list(array.shape), "dtype": str(array.dtype)}


def _to_host(leaf: Any) -> np.ndarray:
  """A private host copy (the caller may donate or mutate the original right after)."""
  if _is_key(leaf):
    leaf = jax.random.key_data(leaf)
  return np.array(jax.device_get(leaf), copy=True)


def _digest(arrays: list[np.ndarray]) -> str:
  digest = hashlib.sha256()
  for index, array in enumerate(arrays):
    digest.update(f"{index}:{array.dtype.str}:{array.shape};".encode())
    digest.update(np.ascontiguousarray(array).tobytes())
  return digest.hexdigest()


def _leaf_name(index: int) -> str:
  return f"{index:06d}"


def _from_host(array: np.ndarray, template: Any, spec: dict) -> Any:
  """``array`` in the form of ``template``'s leaf: a jax array on the same sharding, numpy, or a Python scalar."""
  if spec.get("key_impl") is not None:
    value = jax.random.wrap_key_data(np.asarray(array), impl=spec["key_impl"])
    return jax.device_put(value, template.sharding) if isinstance(template, jax.Array) else value
  array = np.asarray(array, dtype=np.dtype(spec["dtype"])).reshape(spec["shape"])
  if isinstance(template, jax.Array):
    return jax.device_put(array, template.sharding)
  if isinstance(template, np.ndarray):
    return array
  if isinstance(template, np.generic):
    return template.dtype.type(array.item())
  if isinstance(template, (bool, int, float, complex)):
    return type(template)(array.item())
  return array


# The delayed meta writer (test hook) -------------------------------------------------------------------------------


class _DelayedWrite:
  """A commit future that sleeps, then writes the meta file (only under the test hook)."""

  def __init__(self, path, text: str, seconds: float):
    self._path = path
    self._text = text
    self._seconds = seconds

  def result(self, timeout: float | None = None):
    del timeout
    time.sleep(self._seconds)
    os.makedirs(os.path.dirname(os.fspath(self._path)), exist_ok=True)
    with open(os.fspath(self._path), "w") as sink:
      sink.write(self._text)


class _MetaHandler(ocp.JsonCheckpointHandler):
  """Writes the run's meta as JSON; sleeps first under the ``FEDJAX_LITE_TEST_SAVE_DELAY`` test hook."""

  async def async_save(self, directory, item=None, args=None):
    hook = os.environ.get(SAVE_DELAY_ENV)
    if hook and args is not None:
      step, seconds = hook.split(":")
      if int(args.item.get("rounds_completed", -1)) == int(step):
        return [_DelayedWrite(directory / self._filename, json.dumps(args.item), float(seconds))]
    return await super().async_save(directory, item, args)


@checkpoint_args.register_with_handler(_MetaHandler, for_save=True)
@dataclasses.dataclass
class _MetaSave(ocp.args.JsonSave):
  pass


@checkpoint_args.register_with_handler(_MetaHandler, for_restore=True)
@dataclasses.dataclass
class _MetaRestore(ocp.args.JsonRestore):
  pass


# The checkpointer -------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Restored:
  """A restored checkpoint.

  Attributes:
    rounds_completed: complete rounds it holds; the resumed run starts at this round.
    trees: name -> pytree, in the form of the templates given to :meth:`RunCheckpointer.restore_latest`.
    meta: the saved meta (configuration, versions, history, privacy, ...).
  """

  rounds_completed: int
  trees: dict[str, PyTree]
  meta: dict[str, Any]


class RunCheckpointer:
  """Saves and restores named pytrees plus JSON meta per round count, on orbax's ``CheckpointManager``.

  Args:
    directory: the checkpoint directory (created if missing).
    max_to_keep: complete checkpoints kept (older ones are deleted), >= 1.
    async_save: write in a background thread (default); False writes before :meth:`save` returns.
  """

  def __init__(self, directory: str | os.PathLike, *, max_to_keep: int = 3, async_save: bool = True):
    validation.check_int("max_to_keep", max_to_keep, minimum=1)
    if not isinstance(async_save, bool):
      raise TypeError(f"async_save must be a bool, got {type(async_save).__name__}.")
    self.directory = os.path.abspath(os.fspath(directory))
    if os.path.exists(self.directory) and not os.path.isdir(self.directory):
      raise NotADirectoryError(f"checkpoint_dir {self.directory} is a file, not a directory.")
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                           enable_async_checkpointing=async_save)
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  def steps(self) -> list[int]:
    """Round counts of the complete checkpoints, ascending (temporary directories of unfinished saves excluded)."""
    self._manager.reload()
    return sorted(int(step) for step in self._manager.all_steps())

  def save(self, rounds_completed: int, trees: Mapping[str, PyTree], meta: Mapping[str, Any]) -> None:
    """Copies ``trees`` to host memory and saves them with ``meta`` as checkpoint ``rounds_completed``.

    Returns as soon as the copies are made (the write continues in the background with ``async_save``).
    """
    validation.check_int("rounds_completed", rounds_completed, minimum=1)
    items: dict[str, Any] = {}
    tree_meta = {}
    for name, tree in trees.items():
      if not isinstance(name, str) or not name or name == META or "/" in name:
        raise ValueError(f"checkpoint tree names must be non-empty strings without '/' other than {META!r}, "
                         f"got {name!r}.")
      leaves, treedef = jax.tree.flatten(tree)
      arrays = [_to_host(leaf) for leaf in leaves]
      tree_meta[name] = {"treedef": str(treedef), "leaves": [_leaf_spec(leaf) for leaf in leaves],
                         "sha256": _digest(arrays)}
      if arrays:
        items[name] = ocp.args.StandardSave({_leaf_name(k): array for k, array in enumerate(arrays)})
    full_meta = dict(_jsonable(dict(meta)), format=CHECKPOINT_FORMAT, rounds_completed=int(rounds_completed),
                     trees=tree_meta)
    items[META] = _MetaSave(full_meta)
    self._manager.save(int(rounds_completed), args=ocp.args.Composite(**items), force=True)

  def restore_latest(self, templates: Mapping[str, PyTree]) -> Restored | None:
    """The newest complete checkpoint whose bytes match their recorded SHA-256, or None if there is none.

    Args:
      templates: name -> a pytree of the structure, shapes and dtypes saved under that name (e.g. the freshly
        initialized server state); restored leaves take each template leaf's form (jax array on the same
        sharding, numpy array, Python scalar).

    Raises:
      CheckpointError: a checkpoint lacks a named tree or holds a different structure (another kind of run).
    """
    for step in reversed(self.steps()):
      try:
        return self._restore(step, templates)
      except _Damaged as damage:
        warnings.warn(f"checkpoint {os.path.join(self.directory, str(step))} is damaged ({damage}); trying the "
                      "previous one.", RuntimeWarning, stacklevel=2)
    return None

  def _restore(self, step: int, templates: Mapping[str, PyTree]) -> Restored:
    meta = self._manager.restore(step, args=ocp.args.Composite(**{META: _MetaRestore()}))[META]
    if meta.get("format") != CHECKPOINT_FORMAT or meta.get("rounds_completed") != step:
      raise _Damaged(f"its meta describes format {meta.get('format')} / round {meta.get('rounds_completed')}")
    saved_trees = meta.get("trees", {})
    missing = sorted(set(templates) - set(saved_trees))
    if missing:
      raise CheckpointError(f"the checkpoint {os.path.join(self.directory, str(step))} has no {missing} "
                            f"(it holds {sorted(saved_trees)}); it was written by a different kind of run.")
    items = {}
    for name in templates:
      if saved_trees[name]["leaves"]:
        items[name] = ocp.args.StandardRestore()
    raw = self._manager.restore(step, args=ocp.args.Composite(**items)) if items else {}
    trees = {}
    for name, template in templates.items():
      specs = saved_trees[name]["leaves"]
      template_leaves, treedef = jax.tree.flatten(template)
      if len(template_leaves) != len(specs) or str(treedef) != saved_trees[name]["treedef"]:
        raise CheckpointError(f"the checkpoint's {name!r} has {len(specs)} arrays in the structure "
                              f"{saved_trees[name]['treedef'][:200]}; this run's has {len(template_leaves)} in "
                              f"{str(treedef)[:200]}.")
      stored = raw[name] if specs else {}
      arrays = [np.asarray(stored[_leaf_name(k)]) for k in range(len(specs))]
      if _digest(arrays) != saved_trees[name]["sha256"]:
        raise _Damaged(f"the bytes of {name!r} do not match their SHA-256")
      for k, (leaf, spec) in enumerate(zip(template_leaves, specs)):
        if _leaf_spec(leaf) != spec:
          raise CheckpointError(f"array {k} of {name!r} is {spec} in the checkpoint but {_leaf_spec(leaf)} in "
                                "this run.")
      trees[name] = jax.tree.unflatten(
          treedef, [_from_host(array, leaf, spec) for array, leaf, spec in zip(arrays, template_leaves, specs)])
    return Restored(rounds_completed=step, trees=trees, meta=meta)

  def wait(self) -> None:
    """Blocks until the last save is written and finalized."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for the last save and releases orbax's resources."""
    self._manager.wait_until_finished()
    self._manager.close()


class _Damaged(Exception):
  """A checkpoint step whose content does not match its meta."""


# What run_training needs ------------------------------------------------------------------------------------------


def _fingerprint_arrays(tree: PyTree) -> str:
  return _digest([_to_host(leaf) for leaf in jax.tree.leaves(tree)])


# Content of the training data is hashed up to this many bytes (always: client ids, sizes and feature specs).
DATA_HASH_LIMIT_BYTES = 256 * 2**20


def describe_run(*, seed: int, sampler: Any, client_spec: Any, num_steps: int, evaluate_every: int,
                 train_data: Any, initial_params: PyTree, privacy: Any, extra_names: list[str]) -> dict:
  """What ``run_training`` itself knows of a run that changes its results (compared when resuming)."""
  if dataclasses.is_dataclass(sampler):
    sampler_description = {"type": type(sampler).__name__, **dataclasses.asdict(sampler)}
  else:
    sampler_description = {"type": type(sampler).__name__, "cohort_capacity": int(sampler.cohort_capacity)}
  data_digest = hashlib.sha256()
  data_digest.update(json.dumps([list(train_data.client_ids), train_data.offsets.tolist()]).encode())
  examples_bytes = sum(array.nbytes for array in train_data.examples.values())
  if examples_bytes <= DATA_HASH_LIMIT_BYTES:
    for name in sorted(train_data.examples):
      data_digest.update(name.encode())
      data_digest.update(np.ascontiguousarray(train_data.examples[name]).tobytes())
  description = {
      "seed": int(seed),
      "sampler": sampler_description,
      "client_spec": dataclasses.asdict(client_spec),
      "num_steps": int(num_steps),
      "evaluate_every": int(evaluate_every),
      "train_data": {"num_clients": int(train_data.num_clients), "num_examples": int(train_data.num_examples),
                     "features": {k: [list(shape), str(dtype)] for k, (shape, dtype) in
                                  sorted(train_data.element_spec.items())},
                     "sha256": data_digest.hexdigest()},
      "initial_params": {"arrays": [_leaf_spec(leaf) for leaf in jax.tree.leaves(initial_params)],
                         "sha256": _fingerprint_arrays(initial_params)},
      "extra_state": sorted(extra_names),
      "privacy": None,
  }
  if privacy is not None:
    description["privacy"] = {"delta": float(privacy.delta), "accountant": privacy_accountant_name(privacy),
                              "events": privacy.run.description, "epsilon_after_one_round":
                              float(privacy.epsilon_after(1))}
  return _jsonable(description)


def privacy_accountant_name(ledger: Any) -> str:
  from fedjax_lite.privacy.accounting import describe_accountant

  return describe_accountant(ledger.accountant)


def check_resumable(restored: Restored, *, run: Mapping[str, Any], config: Mapping[str, Any] | None,
                    privacy: Any, directory: str) -> None:
  """Refuses (``ConfigMismatchError``) a resume whose configuration differs from the checkpoint's.

  The caller's ``config`` is compared first (its keys, e.g. the CLI's flags, name the difference); then what
  ``run_training`` knows itself (seed, sampler, client spec, data, initial parameters, privacy ledger). The ledger
  must give exactly the epsilon the checkpoint recorded as spent.
  """
  meta = restored.meta
  where = f"cannot resume from {directory} (after {restored.rounds_completed} rounds): "
  user_differences = config_differences(meta.get("config") or {}, _jsonable(dict(config or {})))
  if user_differences:
    raise ConfigMismatchError(where + "the configuration differs: " + "; ".join(user_differences))
  run_differences = config_differences(meta.get("run") or {}, run)
  if run_differences:
    raise ConfigMismatchError(where + "the run differs: " + "; ".join(run_differences))
  saved_privacy = meta.get("privacy")
  if (saved_privacy is None) != (privacy is None):
    raise ConfigMismatchError(where + ("the checkpoint has a privacy ledger and this run none" if privacy is None
                                       else "this run has a privacy ledger and the checkpoint none"))
  if privacy is not None:
    spent = float(saved_privacy["epsilon"])
    now = float(privacy.epsilon_after(restored.rounds_completed))
    if now != spent:
      raise ConfigMismatchError(where + f"the checkpoint spent epsilon {spent!r} in {restored.rounds_completed} "
                                f"rounds; this run's privacy ledger gives {now!r} for them.")
  saved_versions = meta.get("versions") or {}
  changed = {k: (saved_versions.get(k), v) for k, v in library_versions().items() if saved_versions.get(k) != v}
  if changed:
    warnings.warn("resuming with other library versions than the checkpoint's ("
                  + ", ".join(f"{k} {old} -> {new}" for k, (old, new) in sorted(changed.items()))
                  + "): the resumed run is no longer guaranteed to be bit-identical to an uninterrupted one.",
                  RuntimeWarning, stacklevel=3)


def extra_state_arrays(value: Any) -> PyTree:
  """What is saved for an ``extra_state`` entry: ``value.arrays`` for a store (``arrays`` + ``load``), else the
  pytree itself."""
  return value.arrays if _is_store(value) else value


def load_extra_state(value: Any, restored: PyTree, name: str) -> None:
  """Puts a restored ``extra_state`` entry back IN PLACE: ``value.load(restored)`` for a store, else a copy into
  each (writeable numpy) leaf."""
  if _is_store(value):
    value.load(restored)
    return
  for target, source in zip(jax.tree.leaves(value), jax.tree.leaves(restored)):
    np.copyto(target, np.asarray(source))


def check_extra_state(extra_state: Mapping[str, Any]) -> None:
  """Each entry is a store (``arrays`` property + ``load(arrays)``) or a pytree of writeable numpy arrays."""
  if not isinstance(extra_state, Mapping):
    raise TypeError(f"extra_state must be a mapping of name -> pytree, got {type(extra_state).__name__}.")
  for name, value in extra_state.items():
    if not isinstance(name, str) or not name or name in (SERVER_STATE, META) or "/" in name:
      raise ValueError(f"extra_state names must be non-empty strings without '/' other than {SERVER_STATE!r} "
                       f"and {META!r}, got {name!r}.")
    if _is_store(value):
      continue
    for leaf in jax.tree.leaves(value):
      if not (isinstance(leaf, np.ndarray) and leaf.flags.writeable):
        raise TypeError(f"extra_state[{name!r}] must be a store with .arrays and .load(arrays), or a pytree of "
                        f"writeable numpy arrays (restored in place); it has a {type(leaf).__name__} leaf.")


def _is_store(value: Any) -> bool:
  return hasattr(type(value), "arrays") and callable(getattr(value, "load", None))


class SignalCatcher:
  """While active, SIGINT and SIGTERM only set :attr:`received` (the loop saves, then raises
  :class:`TrainingInterrupted`); a second signal interrupts at once. Inactive outside the main thread."""

  SIGNALS = (signal.SIGINT, signal.SIGTERM)

  def __init__(self):
    self.received: int | None = None
    self._previous: dict[int, Any] = {}

  def _handle(self, signum, frame):
    del frame
    if self.received is not None:
      raise KeyboardInterrupt(f"second signal {signum}: stopping without waiting for the round to end")
    self.received = signum

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for signum in self.SIGNALS:
        self._previous[signum] = signal.signal(signum, self._handle)
    return self

  def __exit__(self, *exc):
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)
    self._previous.clear()
    return False


def read_checkpoint(directory: str | os.PathLike, rounds_completed: int | None = None
                    ) -> tuple[dict[str, list[np.ndarray]], dict[str, Any]]:
  """A checkpoint's raw content without templates: name -> its leaves (numpy, flattening order), and the meta.

  For inspection and tests (e.g. comparing two runs' final parameters bit for bit). Default: the newest complete
  checkpoint.
  """
  checkpointer = RunCheckpointer(directory, async_save=False)
  try:
    steps = checkpointer.steps()
    if not steps:
      raise CheckpointError(f"{checkpointer.directory} holds no complete checkpoint.")
    step = steps[-1] if rounds_completed is None else int(rounds_completed)
    if step not in steps:
      raise CheckpointError(f"{checkpointer.directory} has no checkpoint after {step} rounds (it has {steps}).")
    manager = checkpointer._manager
    meta = manager.restore(step, args=ocp.args.Composite(**{META: _MetaRestore()}))[META]
    names = [name for name, spec in meta["trees"].items() if spec["leaves"]]
    raw = manager.restore(step, args=ocp.args.Composite(**{name: ocp.args.StandardRestore() for name in names}))
    arrays = {name: [np.asarray(raw[name][_leaf_name(k)]) for k in range(len(spec["leaves"]))] if spec["leaves"]
              else [] for name, spec in meta["trees"].items()}
    return arrays, meta
  finally:
    checkpointer.close()
