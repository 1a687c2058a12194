"""What a job's workdir guarantees: one writer at a time, durable records, pinned inputs.

One writer. `lock(workdir)` takes an exclusive `fcntl.flock` on `<workdir>/.lock` for the job's
life and writes the holder's pid, host, command and start time into it. The kernel releases the
lock when the process ends, however it ends (return, exception, kill -9), so a crash never leaves
a stale lock; a second writer is refused at once with `LockedError` naming the holder. Readers
(loading an LM or a grid, possibly while it trains) take no lock and write nothing.

Records. `metrics.jsonl` holds one JSON object per line with a `step`. `resume_records` makes the
file agree with the checkpoint a job resumes from: a torn last line (a kill mid-append) is dropped
and so is every record after the checkpoint's step (they are recomputed), so the file never holds
a record twice. Summaries are built from these records and the checkpoint, never from what one
process happened to run, so rerunning a finished job rewrites the same summary.

Inputs. A job that reads another workdir records that input's identity (its path relative to the
workdir, the checkpoint step and content digest) in `<workdir>/inputs.json`; `check_input`
refuses a run whose input changed, naming what changed, before the job writes anything.

Configs. `write_config` writes a job's `<workdir>/config.json` with the format version of the
code (`"format": CONFIG_FORMAT`); `read_config` reads one back without that field, refuses a
newer format (the code is older than the workdir) and fills the fields an older format lacks
(`_ADDED_AT`, the one place that knows which fields came later and what the code that wrote such
a file used for them). Configs built by `experiments/configs/` always carry every field; library
code reads them directly, never with a default.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import hashlib
import json
import os
import socket
import sys
import threading
from typing import Any, Callable, Iterator, Mapping, Sequence

from absl import logging

from jaxsae.core import jsonio

LOCK_FILE = ".lock"
INPUTS_FILE = "inputs.json"
CONFIG_FILE = "config.json"
# The format of config.json written by this code. 0: files written before the field existed.
# Bump it when a config field is added that old files lack, and add the field to _ADDED_AT.
CONFIG_FORMAT = 2
# format -> job -> the fields (nested dicts for sub-configs) a file of an older format lacks,
# with the value the code of that time used for them.
_ADDED_AT: dict[int, dict[str, dict[str, Any]]] = {
    1: {"sae": {"variant_loop": "auto"},
        "lm": {"eval": {"max_new_tokens": 118, "temperature": 1.0, "top_k": 0},
               "loss_reduction": "sequence"}},
    2: {"pipeline": {"analysis": {"null_latents": 64}}},
}


class LockedError(RuntimeError):
  """Another process is writing to the workdir."""


class InputMismatchError(ValueError):
  """An input of a workdir (the LM of a grid, the grid of an eval) is not the one it was built
  from."""


# ------------------------------------------------------------------------------------------------
# One writer per workdir.

_held: dict[str, list[Any]] = {}  # realpath -> [file object, depth] (re-entrant in one process)
_held_guard = threading.Lock()


def _holder(path: str) -> str:
  try:
    with open(path) as f:
      info = json.loads(f.read() or "{}")
  except (OSError, ValueError):
    info = {}
  if not info:
    return "a process that has not yet written its details"
  return (f"pid {info.get('pid')} on {info.get('host')}, since {info.get('started')}: "
          f"{info.get('command')}")


@contextlib.contextmanager
def lock(workdir: str, command: str | None = None) -> Iterator[str]:
  """Holds the exclusive writer lock of `workdir` (created if needed) for the `with` body.

  Re-entrant within one process. Yields the lock file's path.

  Raises:
    LockedError: another process holds it (names its pid, host and command).
  """
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(os.path.realpath(workdir), LOCK_FILE)
  with _held_guard:
    if path in _held:
      _held[path][1] += 1
      entered = True
    else:
      entered = False
  if not entered:
    f = open(path, "a+")  # pylint: disable=consider-using-with
    try:
      fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      f.close()
      if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
        raise
      raise LockedError(
          f"{workdir} is in use by another job ({_holder(path)}). One job writes to a workdir "
          "at a time: wait for that one to finish (the lock goes when its process exits, "
          "however it exits) or use another --workdir.") from None
    info = {"pid": os.getpid(), "host": socket.gethostname(),
            "command": command if command is not None else " ".join(sys.argv),
            "started": datetime.datetime.now().isoformat(timespec="seconds")}
    f.seek(0)
    f.truncate()
    f.write(json.dumps(info) + "\n")
    f.flush()
    with _held_guard:
      _held[path] = [f, 1]
  try:
    yield path
  finally:
    with _held_guard:
      _held[path][1] -= 1
      done = _held[path][1] == 0
      f = _held.pop(path)[0] if done else None
    if f is not None:
      f.close()  # closing the only descriptor releases the flock


# ------------------------------------------------------------------------------------------------
# metrics.jsonl.


def read_records(path: str) -> list[dict[str, Any]]:
  """The complete records of a JSON-lines file (a torn last line is left out).

  Raises:
    ValueError: a line other than the last is not JSON (names the file, line and fix).
  """
  records, _ = jsonio.read_lines(path)
  return records


def resume_records(path: str, step: int,
                   drop: Callable[[Mapping[str, Any]], bool] = lambda r: False
                   ) -> list[dict[str, Any]]:
  """Makes `path` hold exactly the complete records up to `step` (a resumed checkpoint's).

  Drops a torn last line, records with `step` beyond `step`, and records for which `drop` is
  true; rewrites the file atomically only if something was dropped.

  Returns:
    The records kept.
  """
  records, torn = jsonio.read_lines(path)
  kept = [r for r in records if int(r.get("step", 0)) <= step and not drop(r)]
  if torn or len(kept) != len(records):
    logging.warning("%s: %s%d record(s) after step %d dropped (they are recomputed).", path,
                    "a torn last line and " if torn else "", len(records) - len(kept), step)
    jsonio.write_lines(path, kept)
  return kept


def append_records(path: str, records: Sequence[Mapping[str, Any]]) -> None:
  """Appends records, one JSON line each, in one write."""
  jsonio.append_lines(path, records)


# ------------------------------------------------------------------------------------------------
# Pinned inputs.


def digest_of(value: Any) -> str:
  """A short content digest of a JSON-able value (key order ignored)."""
  blob = json.dumps(value, sort_keys=True, default=str)
  return hashlib.sha256(blob.encode()).hexdigest()[:16]


def relative_path(path: str, workdir: str) -> str:
  """`path` relative to `workdir` (what a workdir stores, so both can move together)."""
  return os.path.relpath(os.path.abspath(path), os.path.abspath(workdir))


def resolve(workdir: str, stored: str) -> str:
  """A path stored relative to `workdir` (or absolute) as an absolute path."""
  return os.path.normpath(os.path.join(os.path.abspath(workdir), stored))


def read_inputs(workdir: str) -> dict[str, Any]:
  """`<workdir>/inputs.json` (input name -> identity), or {} when absent."""
  return jsonio.read(os.path.join(workdir, INPUTS_FILE), {}) or {}


def record_input(workdir: str, name: str, identity: Mapping[str, Any]) -> None:
  """Records (or replaces) the identity of input `name` in `<workdir>/inputs.json`."""
  inputs = read_inputs(workdir)
  inputs[name] = dict(identity)
  jsonio.write(os.path.join(workdir, INPUTS_FILE), inputs)


def check_input(what: str, recorded: Mapping[str, Any] | None, current: Mapping[str, Any],
                fix: str, keys: Sequence[str] = ("step", "digest")) -> None:
  """Raises `InputMismatchError` if `current` differs from `recorded` in any of `keys`.

  Args:
    what: the input, as the message names it (e.g. 'the LM in /x/lm').
    recorded: the identity stored by the workdir (None or {}: nothing recorded, nothing checked).
    current: the identity of the input as it is now.
    fix: what to do about it, appended to the message.
    keys: the identity fields compared.
  """
  if not recorded:
    return
  diffs = [(k, recorded.get(k), current.get(k)) for k in keys
           if recorded.get(k) != current.get(k)]
  if diffs:
    lines = "; ".join(f"{k}: {old!r} (recorded) != {new!r} (now)" for k, old, new in diffs)
    raise InputMismatchError(f"{what} is not the one this workdir was built from ({lines}). "
                             f"{fix}")


def check_grid(workdir: str, grid: Mapping[str, Any], job: str) -> dict[str, Any]:
  """The identity an eval or export `workdir` records for a grid (`trained.TrainedGrid.identity`,
  its path made relative); refuses a grid other than the one recorded there. Writes nothing.

  Raises:
    InputMismatchError: the grid (checkpoint step, content or config) changed since `workdir`
      was written from it.
  """
  identity = dict(grid)
  identity["path"] = relative_path(grid.get("path", ""), workdir)
  check_input(f"the SAE grid in {grid.get('path')!r}", read_inputs(workdir).get("grid"),
              identity,
              f"This {job} workdir holds the results of that grid as it was then; write the new "
              f"ones to a new --workdir, or delete {os.path.join(workdir, INPUTS_FILE)} to "
              "replace them.", keys=("step", "digest", "config"))
  return identity


def forget_input(workdir: str, name: str) -> None:
  """Removes input `name` from `<workdir>/inputs.json` (for a caller that knows the results in
  `workdir` are being recomputed from a new input)."""
  inputs = read_inputs(workdir)
  if inputs.pop(name, None) is not None:
    jsonio.write(os.path.join(workdir, INPUTS_FILE), inputs)


# ------------------------------------------------------------------------------------------------
# config.json.


class ConfigFormatError(ValueError):
  """A config.json written by a newer version of the code (or with an unreadable format)."""


def write_config(workdir: str, config: Any) -> None:
  """Writes `config` (a ConfigDict or a dict) to `<workdir>/config.json` with its format."""
  value = config.to_dict() if hasattr(config, "to_dict") else dict(config)
  jsonio.write(os.path.join(workdir, CONFIG_FILE), {**value, "format": CONFIG_FORMAT})


def _fill(value: dict[str, Any], added: Mapping[str, Any]) -> None:
  for k, v in added.items():
    if isinstance(v, Mapping):
      if isinstance(value.get(k), dict):
        _fill(value[k], v)
    elif k not in value:
      value[k] = v


def upgrade_config(value: Mapping[str, Any], where: str = "config.json") -> dict[str, Any]:
  """A config.json's content as this code's configs look: without the `format` field, with
  the fields its format lacks filled in (the compatibility place for old workdirs).

  Raises:
    ConfigFormatError: a format newer than `CONFIG_FORMAT` or one that is not an int.
  """
  out = json.loads(json.dumps(dict(value)))  # a deep copy
  fmt = out.pop("format", 0)
  if isinstance(fmt, bool) or not isinstance(fmt, int) or fmt < 0:
    raise ConfigFormatError(f"{where} has format={fmt!r}; a config.json's format is an int >= 0 "
                            "(absent in files written before formats were recorded)")
  if fmt > CONFIG_FORMAT:
    raise ConfigFormatError(
        f"{where} has format {fmt}, newer than the format {CONFIG_FORMAT} this code reads: the "
        "workdir was written by a newer version of jaxsae. Update the code (git pull) to read "
        "it, or use a workdir written by this version.")
  for version in sorted(v for v in _ADDED_AT if v > fmt):
    _fill(out, _ADDED_AT[version].get(out.get("job"), {}))
  return out


def read_config(workdir: str) -> dict[str, Any] | None:
  """`<workdir>/config.json` as `upgrade_config` returns it, or None when absent.

  Raises:
    ConfigFormatError: written by a newer version of the code.
  """
  path = os.path.join(workdir, CONFIG_FILE)
  value = jsonio.read(path)
  return None if value is None else upgrade_config(value, path)
