"""Checkpoints of a training run (orbax-checkpoint): what :func:`~fedjax_lite.training.run_training` saves, and
how a resumed run continues bit for bit.

A checkpoint is the state of the loop after ``rounds_completed`` complete rounds, saved as one orbax step
(``<checkpoint_dir>/<rounds_completed>/``) holding

* one item per **named pytree** (``'server_state'`` and whatever the caller adds through ``extra_state``, e.g. a
  per-client state store ``'client_states'``): the pytree's leaves as numpy arrays, in flattening order;
* ``'meta'`` (JSON): the run's configuration, library versions, the metrics history (every record written to the
  metrics file), the privacy ledger's spent epsilon, the sampler's position (the next round: samplers are pure
  functions of ``(seed, round)``, so the round number IS the sampler's position), and for each named pytree its
  leaf paths, shapes, dtypes and a SHA-256 of its bytes.

Guarantees:

* **atomic**: orbax writes a step into a temporary directory and renames it into place only when every item is
  written (and on object stores writes a ``commit_success.txt`` last); a process killed during a save leaves at most
  a temporary directory, which :meth:`RunCheckpointer.steps` never lists;
* **asynchronous**: :meth:`RunCheckpointer.save` copies the trees to host memory (numpy) and returns; the files are
  written in a background thread while the next rounds run (a save waits for the previous one to finish);
* **keep last N**: older steps are deleted once a newer one is complete;
* **one writer**: a writing :class:`RunCheckpointer` holds the folder's lock file (PID and host,
  :mod:`fedjax_lite.training.folder_lock`) until it is closed; a second writer is refused
  (:class:`CheckpointInUseError`), a stale lock (its process gone) is taken over with a warning, and a folder where
  the lock cannot be written (read-only, full) is refused (:class:`CheckpointError`) before any training;
* **a failed save loses nothing saved before**: a save that cannot be written (disk full, folder made read-only)
  raises :class:`CheckpointSaveError` at the next save, :meth:`~RunCheckpointer.wait` or
  :meth:`~RunCheckpointer.close`; its partial step (orbax's temporary directory) is removed, and the previous
  complete step stays as it was;
* **damage is set aside, never used**: :meth:`RunCheckpointer.restore_latest` reads the newest step whose meta
  parses and whose every tree reads back with the SHA-256 recorded in the meta. A step that fails any of this
  (flipped or truncated bytes, a truncated meta, an empty folder) is renamed to ``<step>.unreadable`` (kept for
  inspection, never deleted), reported in one warning, and the previous step is tried.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
import platform
import re
import shutil
import signal
import threading
import warnings
from typing import Any, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp

from fedjax_lite.core import validation
from fedjax_lite.core.tree import PyTree
from fedjax_lite.training.folder_lock import FolderLock, FolderLockedError, FolderNotWritableError, describe_holder

CHECKPOINT_FORMAT = 1
SERVER_STATE = "server_state"
META = "meta"
UNREADABLE_SUFFIX = ".unreadable"


class ConfigMismatchError(ValueError):
  """Resuming with a configuration that would change the results; the message names every difference."""


class CheckpointError(RuntimeError):
  """A checkpoint directory that cannot be used (not writable, holding a different kind of run, ...)."""


class CheckpointInUseError(CheckpointError):
  """Another running process writes the checkpoint directory (it holds the directory's lock file)."""


class CheckpointSaveError(CheckpointError):
  """A checkpoint could not be written (disk full, directory made read-only, ...); its partial step was removed.

  Attributes:
    rounds_completed: the rounds of the checkpoint that failed.
    last_complete: the rounds of the newest complete checkpoint left in the directory (None: there is none).
  """

  def __init__(self, message: str, rounds_completed: int, last_complete: int | None):
    super().__init__(message)
    self.rounds_completed = rounds_completed
    self.last_complete = last_complete


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
    new = jsonable(current.get(key, "<absent>"))
    if json.dumps(old, sort_keys=True) != json.dumps(new, sort_keys=True):
      differences.append(f"{key}: {_short(old)} in the checkpoint, {_short(new)} now")
  return differences


def _short(value: Any) -> str:
  text = json.dumps(value, sort_keys=True)
  return text if len(text) <= 80 else text[:77] + "..."


def jsonable(value: Any) -> Any:
  """``value`` as it reads back from JSON (tuples become lists, numpy scalars Python numbers, anything else its
  ``repr``), so that a saved configuration and the current one compare equal."""
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
    exclusive: hold the directory's lock file until :meth:`close` (default; see the module docstring). False for
      reading only (e.g. :func:`read_checkpoint`): nothing in the directory is then written, renamed or locked,
      and damaged steps are skipped with a warning instead of set aside.

  Raises:
    NotADirectoryError: ``directory`` is a file.
    CheckpointInUseError: another running process holds the directory's lock.
    CheckpointError: the directory cannot be created, or (``exclusive``) written.
  """

  def __init__(self, directory: str | os.PathLike, *, max_to_keep: int = 3, async_save: bool = True,
               exclusive: bool = True):
    validation.check_int("max_to_keep", max_to_keep, minimum=1)
    for name, value in (("async_save", async_save), ("exclusive", exclusive)):
      if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}.")
    self.directory = os.path.abspath(os.fspath(directory))
    if os.path.exists(self.directory) and not os.path.isdir(self.directory):
      raise NotADirectoryError(f"checkpoint_dir {self.directory} is a file, not a directory.")
    try:
      os.makedirs(self.directory, exist_ok=True)
    except OSError as error:
      raise CheckpointError(f"checkpoint folder {self.directory} cannot be created ({error.strerror or error})"
                            ) from None
    self._lock = self._take_lock() if exclusive else None
    self._pending: int | None = None  # the step being written in the background
    try:
      # Step directories are created before save() returns, so that a folder that cannot take them fails there
      # (created in orbax's background threads, the failure leaves threads waiting for them for minutes).
      options = ocp.CheckpointManagerOptions(
          max_to_keep=max_to_keep, create=True, enable_async_checkpointing=async_save,
          async_options=ocp.AsyncOptions(create_directories_asynchronously=False))
      self._manager = ocp.CheckpointManager(self.directory, options=options)
    except BaseException:
      self._release_lock()
      raise

  def _take_lock(self) -> FolderLock:
    try:
      lock = FolderLock.acquire(self.directory)
    except FolderLockedError as error:
      raise CheckpointInUseError(str(error)) from None
    except FolderNotWritableError as error:
      raise CheckpointError(error.strerror) from None
    if lock.took_over is not None:
      warnings.warn(f"checkpoint folder {self.directory}: took over the lock left by {describe_holder(lock.took_over)}"
                    ", which is no longer running.", RuntimeWarning, stacklevel=3)
    return lock

  def _release_lock(self) -> None:
    if self._lock is not None:
      self._lock.release()
      self._lock = None

  def steps(self) -> list[int]:
    """Round counts of the complete checkpoints, ascending (temporary directories of unfinished saves excluded)."""
    if self._manager is None:
      raise CheckpointError(f"the checkpointer of {self.directory} is closed (after a failed save, or close()).")
    self._manager.reload()
    return sorted(int(step) for step in self._manager.all_steps())

  def save(self, rounds_completed: int, trees: Mapping[str, PyTree], meta: Mapping[str, Any]) -> None:
    """Copies ``trees`` to host memory and saves them with ``meta`` as checkpoint ``rounds_completed``.

    Returns as soon as the copies are made (the write continues in the background with ``async_save``).

    Raises:
      CheckpointSaveError: this save, or the previous one still running in the background, could not be written.
    """
    validation.check_int("rounds_completed", rounds_completed, minimum=1)
    self._finish_pending()
    if self._manager is None:
      raise CheckpointError(f"the checkpointer of {self.directory} is closed (after a failed save, or close()).")
    items: dict[str, Any] = {}
    tree_meta = {}
    for name, tree in trees.items():
      if not isinstance(name, str) or not name or name == META or "/" in name:
        raise ValueError(f"checkpoint tree names must be non-empty strings without '/' other than {META!r}, "
                         f"got {name!r}.")
      paths_and_leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
      arrays = [_to_host(leaf) for _, leaf in paths_and_leaves]
      tree_meta[name] = {"treedef": str(treedef), "leaves": [_leaf_spec(leaf) for _, leaf in paths_and_leaves],
                         "paths": [jax.tree_util.keystr(path) for path, _ in paths_and_leaves],
                         "sha256": _digest(arrays)}
      if arrays:
        items[name] = ocp.args.StandardSave({_leaf_name(k): array for k, array in enumerate(arrays)})
    full_meta = dict(jsonable(dict(meta)), format=CHECKPOINT_FORMAT, rounds_completed=int(rounds_completed),
                     trees=tree_meta)
    items[META] = ocp.args.JsonSave(full_meta)
    try:
      self._manager.save(int(rounds_completed), args=ocp.args.Composite(**items), force=True)
    except Exception as error:  # pylint: disable=broad-except  (anything the storage raises: reported once)
      self._save_failed(int(rounds_completed), error)
    self._pending = int(rounds_completed)

  def _finish_pending(self) -> None:
    """Waits for the background write; a failure there is reported as :class:`CheckpointSaveError`."""
    if self._pending is None:
      return
    step, self._pending = self._pending, None
    try:
      self._manager.wait_until_finished()
    except Exception as error:  # pylint: disable=broad-except
      self._save_failed(step, error)

  def _save_failed(self, step: int, error: BaseException):
    """Stops orbax, removes the step's partial files and raises :class:`CheckpointSaveError` saying what is left.

    The checkpointer is closed afterwards (its lock stays held until :meth:`close`)."""
    self._stop_orbax()  # its other background writes would go on filling the partial step
    partial = glob.glob(os.path.join(glob.escape(self.directory), f"{step}.orbax-checkpoint-tmp*"))
    for path in partial:
      shutil.rmtree(path, ignore_errors=True)
    left = [path for path in partial if os.path.exists(path)]
    complete = [done for done in _step_folders(self.directory) if done != step]
    last = complete[-1] if complete else None
    message = f"could not write the checkpoint after {step} rounds in {self.directory} ({_error_reason(error)}); "
    if left:
      message += f"its partial files {', '.join(left)} could not be removed; "
    elif partial:
      message += "its partial files were removed; "
    message += (f"the last complete checkpoint (after {last} rounds) is intact" if last is not None else
                "no earlier checkpoint was complete")
    raise CheckpointSaveError(message, step, last) from error

  def _stop_orbax(self) -> None:
    """Closes orbax's manager, waiting for every background write: after a failure each of its waits raises the
    error of one more of them (and skips the rest), so it is closed until one close goes through."""
    if self._manager is None:
      return
    manager, self._manager = self._manager, None
    for _ in range(16):
      try:
        manager.close()
        return
      except Exception:  # pylint: disable=broad-except  (the failure is reported once, by the caller)
        continue

  def restore_latest(self, templates: Mapping[str, PyTree], *, check=None) -> Restored | None:
    """The newest readable checkpoint, or None if there is none.

    A step is readable when its meta parses and describes it, and every named tree reads back with the SHA-256
    recorded in the meta. An unreadable step is set aside (renamed to ``<step>.unreadable``, or only skipped when
    not ``exclusive``) with a warning, and the previous step is tried.

    Args:
      templates: name -> a pytree of the structure, shapes and dtypes saved under that name (e.g. the freshly
        initialized server state); restored leaves take each template leaf's form (jax array on the same
        sharding, numpy array, Python scalar).
      check: optional ``check(meta, rounds_completed)`` called with a readable step's meta before its trees are
        read; what it raises (e.g. :class:`ConfigMismatchError`) propagates.

    Raises:
      CheckpointError: a checkpoint lacks a named tree or holds a different structure (another kind of run), or
        an unreadable step cannot be set aside.
    """
    for step in reversed(self.steps()):
      try:
        meta = self._read_meta(step)
        if check is not None:
          check(meta, step)
        self._check_structure(step, meta, templates)
        return Restored(rounds_completed=step, trees=self._read_trees(step, meta, templates), meta=meta)
      except _Damaged as damage:
        self._set_aside(step, str(damage))
    return None

  def _read_meta(self, step: int) -> dict:
    try:
      meta = self._manager.restore(step, args=ocp.args.Composite(**{META: ocp.args.JsonRestore()}))[META]
    except Exception as error:  # pylint: disable=broad-except
      self._raise_if_not_permitted(step, error)
      raise _Damaged(f"its meta cannot be read: {_error_reason(error)}") from None
    trees = meta.get("trees") if isinstance(meta, dict) else None
    if not isinstance(trees, dict) or meta.get("format") != CHECKPOINT_FORMAT or meta.get("rounds_completed") != step:
      raise _Damaged("its meta does not describe this step")
    for name, spec in trees.items():
      if not (isinstance(spec, dict) and isinstance(spec.get("leaves"), list) and isinstance(spec.get("treedef"), str)
              and isinstance(spec.get("sha256"), str)):
        raise _Damaged(f"its meta does not describe {name!r}")
    return meta

  def _check_structure(self, step: int, meta: dict, templates: Mapping[str, PyTree]) -> None:
    """Refuses (:class:`CheckpointError`) a checkpoint of another kind of run, from its meta alone."""
    where = f"the checkpoint {os.path.join(self.directory, str(step))}"
    saved_trees = meta["trees"]
    missing = sorted(set(templates) - set(saved_trees))
    if missing:
      raise CheckpointError(f"{where} has no {missing} (it holds {sorted(saved_trees)}); it was written by a "
                            "different kind of run.")
    for name, template in templates.items():
      saved = saved_trees[name]
      paths_and_leaves, treedef = jax.tree_util.tree_flatten_with_path(template)
      if len(paths_and_leaves) != len(saved["leaves"]) or str(treedef) != saved["treedef"]:
        paths = [jax.tree_util.keystr(path) for path, _ in paths_and_leaves]
        raise CheckpointError(f"{where} holds a different {name!r} than this run ({len(saved['leaves'])} arrays "
                              f"there, {len(paths)} here{_path_differences(saved.get('paths'), paths)}): it was "
                              "written by another algorithm or model.")
      for k, (leaf, spec) in enumerate(zip((leaf for _, leaf in paths_and_leaves), saved["leaves"])):
        if _leaf_spec(leaf) != spec:
          raise CheckpointError(f"array {k} of {name!r} is {spec} in {where} but {_leaf_spec(leaf)} in this run.")

  def _read_trees(self, step: int, meta: dict, templates: Mapping[str, PyTree]) -> dict[str, PyTree]:
    saved_trees = meta["trees"]
    items = {name: ocp.args.StandardRestore() for name in templates if saved_trees[name]["leaves"]}
    try:
      raw = self._manager.restore(step, args=ocp.args.Composite(**items)) if items else {}
      stored = {name: [np.asarray(raw[name][_leaf_name(k)]) for k in range(len(saved_trees[name]["leaves"]))]
                for name in items}
    except Exception as error:  # pylint: disable=broad-except
      self._raise_if_not_permitted(step, error)
      raise _Damaged(f"its arrays cannot be read: {_error_reason(error)}") from None
    trees = {}
    for name, template in templates.items():
      specs = saved_trees[name]["leaves"]
      arrays = stored.get(name, [])
      if _digest(arrays) != saved_trees[name]["sha256"]:
        raise _Damaged(f"the bytes of {name!r} do not match their SHA-256")
      template_leaves, treedef = jax.tree.flatten(template)
      trees[name] = jax.tree.unflatten(
          treedef, [_from_host(array, leaf, spec) for array, leaf, spec in zip(arrays, template_leaves, specs)])
    return trees

  def _raise_if_not_permitted(self, step: int, error: BaseException) -> None:
    """A step we may not read is not damaged: say so instead of setting it aside."""
    if isinstance(error, PermissionError) or "PERMISSION_DENIED" in str(error):
      raise CheckpointError(f"cannot read the checkpoint {os.path.join(self.directory, str(step))} "
                            f"({_error_reason(error)}).") from None

  def _set_aside(self, step: int, reason: str) -> None:
    """Renames an unreadable step out of orbax's sight (``<step>.unreadable``) and says so in one warning."""
    source = os.path.join(self.directory, str(step))
    if self._lock is None:  # reading only: touch nothing
      warnings.warn(f"checkpoint {source} is unreadable ({reason}); trying the previous one.", RuntimeWarning,
                    stacklevel=3)
      return
    target, number = source + UNREADABLE_SUFFIX, 2
    while os.path.lexists(target):
      target, number = f"{source}{UNREADABLE_SUFFIX}-{number}", number + 1
    try:
      os.rename(source, target)
    except OSError as error:
      raise CheckpointError(f"checkpoint {source} is unreadable ({reason}) and cannot be set aside "
                            f"({error.strerror or error}); move it out of {self.directory}, then resume.") from None
    self._manager.reload()
    warnings.warn(f"checkpoint {source} is unreadable ({reason}); set aside as {target}, trying the previous one.",
                  RuntimeWarning, stacklevel=3)

  def wait(self) -> None:
    """Blocks until the last save is written and finalized.

    Raises:
      CheckpointSaveError: it could not be written.
    """
    self._finish_pending()

  def close(self) -> None:
    """Waits for the last save, releases orbax's resources and the directory's lock.

    Raises:
      CheckpointSaveError: the last save could not be written.
    """
    try:
      self._finish_pending()
      if self._manager is not None:
        self._manager.close()
        self._manager = None
    finally:
      self._release_lock()


class _Damaged(Exception):
  """A checkpoint step that cannot be read back as it was written."""


def _step_folders(directory: str) -> list[int]:
  """The step folders orbax renamed into place (complete on a local filesystem), ascending."""
  try:
    names = os.listdir(directory)
  except OSError:
    return []
  return sorted(int(name) for name in names if name.isdigit() and os.path.isdir(os.path.join(directory, name)))


def _error_reason(error: BaseException) -> str:
  """A storage error in a few words: the OS's reason where there is one, else the error's first line, cut."""
  text = str(error)
  code = re.search(r"os_error_code='?(\d+)", text)  # tensorstore's wrapping of an OS error
  if isinstance(error, OSError) and error.strerror:
    return error.strerror
  if code:
    return os.strerror(int(code.group(1)))
  first = text.split(" [tensorstore_spec")[0].strip().splitlines()[0] if text.strip() else ""
  first = f"{type(error).__name__}: {first}" if first else type(error).__name__
  return first if len(first) <= 200 else first[:197] + "..."


def _path_differences(saved_paths: list[str] | None, paths: list[str]) -> str:
  """``'; only there: .finalizer_state.control_variate and 2 more'`` (checkpoints written before paths were
  recorded: '')."""
  if not isinstance(saved_paths, list):
    return ""
  text = ""
  for label, these, others in (("only there", saved_paths, paths), ("only here", paths, saved_paths)):
    missing = [path for path in these if path not in set(others)]
    if missing:
      text += f"; {label}: {missing[0]}" + (f" and {len(missing) - 1} more" if len(missing) > 1 else "")
  return text


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
  return jsonable(description)


def privacy_accountant_name(ledger: Any) -> str:
  from fedjax_lite.privacy.accounting import describe_accountant

  return describe_accountant(ledger.accountant)


def check_resumable(meta: Mapping[str, Any], rounds_completed: int, *, run: Mapping[str, Any],
                    config: Mapping[str, Any] | None, privacy: Any, directory: str) -> None:
  """Refuses (``ConfigMismatchError``) a resume whose configuration differs from the checkpoint's.

  The caller's ``config`` is compared first (its keys, e.g. the CLI's flags, name the difference: ``--algorithm:
  "scaffold" in the checkpoint, "fedavg" now``); then what ``run_training`` knows itself (seed, sampler, client
  spec, data, initial parameters, privacy ledger). The ledger must give exactly the epsilon the checkpoint recorded
  as spent. ``meta`` is the checkpoint's meta after ``rounds_completed`` rounds (read before its arrays, so a
  checkpoint of another kind of run is refused by its configuration first).
  """
  where = f"cannot resume from {directory} (after {rounds_completed} rounds): "
  user_differences = config_differences(meta.get("config") or {}, jsonable(dict(config or {})))
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
    now = float(privacy.epsilon_after(rounds_completed))
    if now != spent:
      raise ConfigMismatchError(where + f"the checkpoint spent epsilon {spent!r} in {rounds_completed} "
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
  checkpointer = RunCheckpointer(directory, async_save=False, exclusive=False)
  try:
    steps = checkpointer.steps()
    if not steps:
      raise CheckpointError(f"{checkpointer.directory} holds no complete checkpoint.")
    step = steps[-1] if rounds_completed is None else int(rounds_completed)
    if step not in steps:
      raise CheckpointError(f"{checkpointer.directory} has no checkpoint after {step} rounds (it has {steps}).")
    manager = checkpointer._manager
    meta = manager.restore(step, args=ocp.args.Composite(**{META: ocp.args.JsonRestore()}))[META]
    names = [name for name, spec in meta["trees"].items() if spec["leaves"]]
    raw = manager.restore(step, args=ocp.args.Composite(**{name: ocp.args.StandardRestore() for name in names}))
    arrays = {name: [np.asarray(raw[name][_leaf_name(k)]) for k in range(len(spec["leaves"]))] if spec["leaves"]
              else [] for name, spec in meta["trees"].items()}
    return arrays, meta
  finally:
    checkpointer.close()
