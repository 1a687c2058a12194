"""Checkpoints of training-state pytrees (orbax), with integrity checks and a config fingerprint.

Generic: any pytree of arrays (params, optax state, step counters, typed PRNG keys, flax struct
dataclasses) is saved; the caller restores it into a template of the same structure (e.g. a
freshly initialised state, or `jax.eval_shape` of one).

Layout of a checkpoint directory (`Checkpointer(directory)`, e.g. `workdir/checkpoints`)::

    fingerprint.json        the config fingerprint of the run the checkpoints belong to
    <step>/                 one orbax checkpoint per saved step (the last `max_to_keep`)
      state/                orbax StandardSave of the state as a nested dict keyed by pytree
                            path ('params/block_0/attn/c_attn/kernel', 'opt_state/1/0/mu/...');
                            typed PRNG keys are stored as their `jax.random.key_data`
      meta/metadata         JSON: step, sha256 digest of every leaf, PRNG-key paths and
                            implementations, the caller's metadata (e.g. wall time so far)

Atomicity: orbax writes each step into a temporary directory and renames it into place only
when complete, so a crash mid-save leaves the earlier checkpoints untouched (the unfinished
temporary directory is ignored, and cleaned up when the next writer opens the directory). Saving
is synchronous and copies the arrays to host memory first, so donated device buffers may be
reused right away.

Readers: `Checkpointer(directory, read_only=True)` never creates, deletes or moves anything, so
it may read a directory another process is writing (an LM still training): it leaves the
writer's temporary directories alone and skips a corrupted checkpoint instead of moving it.

Corruption: every leaf's bytes are hashed at save time and checked at restore. `restore` falls
back to the newest *valid* checkpoint: a corrupted one (unreadable files, bad metadata, digest
mismatch, orbax metadata missing) is moved aside to `<directory>_corrupt/<step>-<time>` with a
warning naming its path and the error (a read-only reader only skips it), and the previous one
is tried. If none is valid it raises `CheckpointError`
listing every path tried and why. `restore(..., fallback=False)` raises on the first corrupted
checkpoint instead.

Config fingerprint: `verify_fingerprint` compares the config of a resumed run with the one that
wrote the checkpoints and raises `ConfigMismatchError` naming every differing field (fields
that may legitimately change, e.g. total steps or logging intervals, are exempt); checkpoints
without a fingerprint are refused too. `record_fingerprint` writes it; `check_fingerprint` does
both.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import hashlib
import json
import os
import shutil
from typing import Any, Iterable, Mapping

from absl import logging
import jax
import numpy as np
import orbax.checkpoint as ocp

from jaxsae.core import distributed
from jaxsae.core import jsonio

PyTree = Any

_FINGERPRINT_FILE = "fingerprint.json"


@contextlib.contextmanager
def _quiet(level: int = logging.WARNING):
  """Orbax logs every save/restore phase at INFO; keep only its warnings (or `level`)."""
  previous = logging.get_verbosity()
  logging.set_verbosity(min(previous, level))
  try:
    yield
  finally:
    logging.set_verbosity(previous)


class CheckpointError(RuntimeError):
  """No usable checkpoint (corrupted, unreadable, or not matching the template)."""


class ConfigMismatchError(ValueError):
  """The checkpoints in a directory were written by a run with a different config."""


@dataclasses.dataclass(frozen=True)
class Restored:
  """What `Checkpointer.restore` returns.

  Attributes:
    state: the restored pytree (structure of the template; host numpy arrays, typed PRNG keys
      as jax key arrays).
    step: the step of the checkpoint restored.
    metadata: the caller's metadata saved with it.
    skipped: paths of corrupted newer checkpoints that were moved aside (fallback; only
      skipped by a read-only reader), newest first.
    digest: the sha256 content digest of the restored leaves (verified), the checkpoint's
      identity.
  """

  state: PyTree
  step: int
  metadata: dict[str, Any]
  skipped: tuple[str, ...] = ()
  digest: str = ""


# ------------------------------------------------------------------------------------------------
# Pytree <-> nested dict of host arrays.


def _is_key(x) -> bool:
  return hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _path_names(tree: PyTree) -> list[tuple[str, Any]]:
  """(slash-joined path, leaf) in flatten order; raises on duplicate paths."""
  out = []
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    name = jax.tree_util.keystr(path, simple=True, separator="/") or "_root"
    out.append((name, leaf))
  names = [n for n, _ in out]
  if len(set(names)) != len(names):
    dup = sorted({n for n in names if names.count(n) > 1})
    raise ValueError(f"pytree paths collide when flattened to names: {dup}")
  return out


def _nest(flat: Mapping[str, Any]) -> dict[str, Any]:
  root: dict[str, Any] = {}
  for name, value in flat.items():
    node = root
    *parents, last = name.split("/")
    for p in parents:
      node = node.setdefault(p, {})
    node[last] = value
  return root


def _flatten_nested(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in tree.items():
    name = f"{prefix}/{k}" if prefix else k
    if isinstance(v, Mapping):
      out.update(_flatten_nested(v, name))
    else:
      out[name] = v
  return out


def _digest(flat: Mapping[str, np.ndarray]) -> str:
  h = hashlib.sha256()
  for name in sorted(flat):
    a = np.ascontiguousarray(flat[name])
    h.update(f"{name}|{a.dtype.str}|{a.shape}|".encode())
    h.update(a.tobytes())
  return h.hexdigest()


def _to_host(tree: PyTree) -> tuple[dict[str, np.ndarray], dict[str, str]]:
  """Copies every leaf to a fresh numpy array; typed keys become key data (and are noted)."""
  flat, keys = {}, {}
  for name, leaf in _path_names(tree):
    if _is_key(leaf):
      keys[name] = str(jax.random.key_impl(leaf))
      leaf = jax.random.key_data(leaf)
    # A copy (the device buffer may be donated next), whole even where other processes hold
    # some of the shards.
    flat[name] = np.array(distributed.to_host(leaf), copy=True)
  return flat, keys


# ------------------------------------------------------------------------------------------------
# Config fingerprint.


def flatten_config(config: Mapping[str, Any] | Any) -> dict[str, Any]:
  """A ConfigDict / nested dict as {'a.b.c': JSON-able value}."""
  if hasattr(config, "to_dict"):
    config = config.to_dict()
  out = {}

  def walk(node, prefix):
    for k, v in node.items():
      name = f"{prefix}.{k}" if prefix else str(k)
      if isinstance(v, Mapping):
        walk(v, name)
      else:
        out[name] = json.loads(json.dumps(v, default=str))  # normalise tuples, numpy scalars
  walk(config, "")
  return out


def read_fingerprint(directory: str) -> dict[str, Any] | None:
  """The recorded config fingerprint of `directory` (flattened config), or None."""
  path = os.path.join(directory, _FINGERPRINT_FILE)
  if not os.path.exists(path):
    return None
  try:
    with open(path) as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise ConfigMismatchError(f"{path} is not valid JSON ({e}); restore it from a copy, or use "
                              "a new workdir (the checkpoints cannot be matched to a config "
                              "without it)") from None


def fingerprint_diffs(recorded: Mapping[str, Any], config: Mapping[str, Any] | Any,
                      exempt: Iterable[str] = ()) -> list[tuple[str, Any, Any]]:
  """(field, recorded value, value in `config`) for every field that differs, outside `exempt`
  (dotted names; a prefix 'eval' exempts 'eval.*'); '<absent>' stands for a missing field."""
  new = flatten_config(config)
  exempt = tuple(exempt)
  skip = lambda n: any(n == m or n.startswith(m + ".") for m in exempt)
  return [(n, recorded.get(n, "<absent>"), new.get(n, "<absent>"))
          for n in sorted(set(recorded) | set(new))
          if not skip(n) and recorded.get(n, "<absent>") != new.get(n, "<absent>")]


def verify_fingerprint(directory: str, config: Mapping[str, Any] | Any,
                       mutable: Iterable[str] = (), *, has_checkpoints: bool) -> None:
  """Checks `config` against `directory/fingerprint.json`; writes nothing.

  If the directory holds checkpoints, every field outside `mutable` (dotted names; a prefix
  'eval' exempts 'eval.*') must equal the recorded one. Checkpoints without a fingerprint are
  refused: nothing would show that they come from this config.

  Raises:
    ConfigMismatchError: the fields that differ, their old and new values, and the fix.
  """
  if not has_checkpoints:
    return
  old = read_fingerprint(directory)
  if old is None:
    raise ConfigMismatchError(
        f"{directory} holds checkpoints but no {_FINGERPRINT_FILE} (the record of the config "
        "that wrote them), so a resume cannot be checked against it. Put the file back, or use "
        "a new --workdir.")
  mutable = tuple(mutable)
  diffs = fingerprint_diffs(old, config, mutable)
  if diffs:
    lines = "\n".join(f"  {n}: {o!r} (checkpoint) != {v!r} (now)" for n, o, v in diffs)
    raise ConfigMismatchError(
        f"The checkpoints in {directory} were written with a different config; differing "
        f"fields:\n{lines}\nResuming would mix two runs. Use a new --workdir for the new "
        f"config (or restore the old values to resume). Fields that may change on resume: "
        f"{', '.join(mutable) or 'none'}.")


def record_fingerprint(directory: str, config: Mapping[str, Any] | Any) -> None:
  """Writes `config` (flattened) as `directory/fingerprint.json`, atomically."""
  os.makedirs(directory, exist_ok=True)
  jsonio.write(os.path.join(directory, _FINGERPRINT_FILE), flatten_config(config), sort_keys=True)


def check_fingerprint(directory: str, config: Mapping[str, Any] | Any,
                      mutable: Iterable[str] = (), *, has_checkpoints: bool) -> None:
  """`verify_fingerprint`, then `record_fingerprint`.

  Raises:
    ConfigMismatchError: see `verify_fingerprint`.
  """
  verify_fingerprint(directory, config, mutable, has_checkpoints=has_checkpoints)
  record_fingerprint(directory, config)


# ------------------------------------------------------------------------------------------------
# The checkpointer.


class Checkpointer:
  """Saves and restores a state pytree under `directory/<step>` (see the module docstring).

  Use as a context manager or call `close()`. With `read_only=True` it only reads: no directory
  is created, no temporary directory cleaned up, no corrupted checkpoint moved, no save.
  """

  def __init__(self, directory: str, *, max_to_keep: int = 3, read_only: bool = False):
    if max_to_keep < 1:
      raise ValueError(f"max_to_keep must be >= 1, got {max_to_keep}")
    self.directory = os.path.abspath(directory)
    self.read_only = read_only
    if read_only:
      with _quiet(logging.ERROR):  # orbax warns that read-only disables saving
        options = ocp.CheckpointManagerOptions(
            enable_async_checkpointing=False, cleanup_tmp_directories=False, create=False,
            read_only=True, save_root_metadata=False)
    else:
      options = ocp.CheckpointManagerOptions(
          preservation_policy=ocp.checkpoint_managers.LatestN(max_to_keep),
          enable_async_checkpointing=False,  # saves are small; sync keeps crash semantics simple
          cleanup_tmp_directories=True,  # leftovers of a crash mid-save
          create=True)
    # A read-only manager warns that it is read-only; that is the point here.
    with _quiet(logging.ERROR if read_only else logging.WARNING):
      self._manager = ocp.CheckpointManager(
          self.directory, options=options,
          item_handlers={"state": ocp.StandardCheckpointHandler(),
                         "meta": ocp.JsonCheckpointHandler()})
    if not read_only:
      # A process killed between a save and the deletion that save triggers leaves one
      # checkpoint too many, which a finished job would never remove (it saves nothing more):
      # finish that deletion now, as the next save would.
      with _quiet():
        for step in self.all_steps()[:-max_to_keep]:
          self._manager.delete(step)

  # -- queries --

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    steps = self.all_steps()
    return steps[-1] if steps else None

  def step_path(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def metadata(self, step: int) -> dict[str, Any]:
    """The caller's metadata saved with checkpoint `step` (read alone; the arrays are not read
    or verified)."""
    with _quiet():
      restored = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    return dict(restored.meta["metadata"])

  # -- save / restore --

  def save(self, step: int, state: PyTree, metadata: Mapping[str, Any] | None = None) -> str:
    """Saves `state` as checkpoint `step` (atomically; older ones beyond `max_to_keep` go).

    Returns:
      The checkpoint's path.
    """
    if self.read_only:
      raise CheckpointError(f"{self.directory} was opened read-only; cannot save step {step}")
    step = int(step)
    flat, keys = _to_host(state)
    meta = {"step": step, "digest": _digest(flat), "prng_keys": keys,
            "metadata": json.loads(json.dumps(dict(metadata or {}), default=float))}
    if step in self._manager.all_steps():
      raise CheckpointError(f"checkpoint {self.step_path(step)} already exists")
    with _quiet():
      self._manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(_nest(flat)), meta=ocp.args.JsonSave(meta)), force=True)
      self._manager.wait_until_finished()
    return self.step_path(step)

  def restore(self, template: PyTree, step: int | None = None, *,
              fallback: bool = True) -> Restored:
    """Restores the newest valid checkpoint (or exactly `step`) into `template`'s structure.

    Args:
      template: a pytree with the structure, shapes and dtypes of the saved state (arrays or
        `jax.ShapeDtypeStruct`s; typed PRNG keys as key arrays or key-typed structs).
      step: restore this step only (no fallback); default the newest valid one.
      fallback: on a corrupted newest checkpoint, move it aside (read-only: leave it) and try
        the previous one.

    Returns:
      A `Restored`.

    Raises:
      CheckpointError: no checkpoint, none valid (names each path tried and the reason), or
        no checkpoint `step` (lists the available steps).
    """
    steps = [int(step)] if step is not None else sorted(self.all_steps(), reverse=True)
    if not steps:
      raise CheckpointError(f"no checkpoint in {self.directory}")
    if step is not None and int(step) not in self.all_steps():
      raise CheckpointError(f"checkpoint step {int(step)} does not exist in {self.directory}; "
                            f"the available steps are {self.all_steps() or 'none'}")
    errors, skipped = [], []
    for s in steps:
      path = self.step_path(s)
      try:
        with _quiet():
          state, meta = self._restore_one(s, template)
      except _Mismatch as e:  # the template is wrong, not the checkpoint: never fall back
        raise CheckpointError(f"checkpoint {path} does not match the restore template: {e}") from e
      except Exception as e:  # pylint: disable=broad-except
        reason = f"{type(e).__name__}: {str(e)[:500]}"
        errors.append(f"{path}: {reason}")
        if step is not None or not fallback:
          raise CheckpointError(f"checkpoint {path} is corrupted or unreadable ({reason}). "
                                f"Delete it (or restore with fallback) to resume from an "
                                f"earlier one.") from e
        if self.read_only:
          logging.warning("Checkpoint %s is corrupted or unreadable (%s); skipping it (left in "
                          "place: read-only) and falling back to the previous one.", path,
                          reason)
        else:
          moved = self._quarantine(s)
          logging.warning("Checkpoint %s is corrupted or unreadable (%s); moved it to %s and "
                          "falling back to the previous one.", path, reason, moved)
        skipped.append(path)
        continue
      return Restored(state=state, step=s, metadata=meta["metadata"], skipped=tuple(skipped),
                      digest=meta["digest"])
    raise CheckpointError(f"no valid checkpoint in {self.directory}; tried:\n  "
                          + "\n  ".join(errors))

  def _restore_one(self, step: int, template: PyTree) -> tuple[PyTree, dict[str, Any]]:
    names = _path_names(template)
    abstract = {}
    for name, leaf in names:
      if _is_key(leaf):
        leaf = jax.eval_shape(jax.random.key_data, leaf)
      abstract[name] = jax.ShapeDtypeStruct(np.shape(leaf), np.dtype(leaf.dtype))
    # Structure, shapes and dtypes from the saved metadata, before reading any data: a wrong
    # template is the caller's error and must not be mistaken for corruption.
    item_meta = self._manager.item_metadata(step)
    if item_meta is None or item_meta.get("state") is None:
      raise ValueError("orbax metadata of the state (state/_METADATA) is missing: the "
                       "checkpoint is incomplete")
    saved = _flatten_nested(dict(item_meta["state"]))
    if set(saved) != set(abstract):
      missing = sorted(set(abstract) - set(saved))[:5]
      extra = sorted(set(saved) - set(abstract))[:5]
      raise _Mismatch(f"leaves missing from the checkpoint {missing}, unexpected {extra}")
    for n, a in abstract.items():
      shape, dtype = tuple(saved[n].shape), np.dtype(saved[n].dtype)
      if shape != a.shape or dtype != a.dtype:
        raise _Mismatch(f"leaf {n}: saved {dtype}{list(shape)}, template {a.dtype}{list(a.shape)}")
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(_nest(abstract)), meta=ocp.args.JsonRestore()))
    meta = restored.meta
    if set(meta["prng_keys"]) != {n for n, leaf in names if _is_key(leaf)}:
      raise _Mismatch(f"PRNG-key leaves differ: saved {sorted(meta['prng_keys'])}")
    flat = {n: np.asarray(v) for n, v in _flatten_nested(restored.state).items()}
    if _digest(flat) != meta["digest"]:
      raise ValueError("content digest mismatch (the array data changed after saving)")
    leaves = []
    for name, leaf in names:
      value = flat[name]
      if _is_key(leaf):
        impl = meta["prng_keys"][name]
        if isinstance(leaf, jax.Array) and str(jax.random.key_impl(leaf)) != impl:
          raise _Mismatch(f"PRNG key {name}: saved impl {impl}, template "
                          f"{jax.random.key_impl(leaf)}")
        value = jax.random.wrap_key_data(value, impl=impl)
      leaves.append(value)
    treedef = jax.tree_util.tree_structure(template)
    return jax.tree_util.tree_unflatten(treedef, leaves), meta

  def _quarantine(self, step: int) -> str:
    src = self.step_path(step)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S-%f")
    dst_dir = self.directory.rstrip("/") + "_corrupt"
    os.makedirs(dst_dir, exist_ok=True)
    dst = os.path.join(dst_dir, f"{step}-{stamp}")
    shutil.move(src, dst)
    with _quiet():
      self._manager.reload()
    return dst

  def close(self) -> None:
    with _quiet():
      self._manager.close()

  def __enter__(self) -> "Checkpointer":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


class _Mismatch(Exception):
  """The restore template does not match the saved structure (a caller bug, not corruption)."""
