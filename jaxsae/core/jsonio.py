"""Every JSON and JSON-lines file the jobs write: atomic writes, appends, reads, plain values.

JSON files (`write` / `read`): written atomically (a temporary file, fsynced, then renamed), in
the layout each file has always had: `indent=1` by default, `indent=2` for the grammar survey's
report, one line (`indent=None`) for SAELens configs, sorted keys for checkpoint fingerprints.
JSON-lines files (`append_lines` / `write_lines` / `read_lines`): one object per line as
`json.dumps` writes it; an append is one write, a rewrite is atomic, and a read tells a torn last
line (a crash mid-append) from a corrupt file.

Non-finite floats are written as the strings "nan", "inf", "-inf" (strict JSON has no such
numbers), which is how eval.json, summary.json and report.json hold them.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Mapping, Sequence

import numpy as np


def finite_or_str(x: Any) -> float | str:
  """`float(x)`, or its string form when not finite."""
  x = float(x)
  return x if math.isfinite(x) else str(x)


def jsonable(x: Any, *, strict: bool = False) -> Any:
  """Plain JSON: mappings and sequences recursively, NumPy to Python, non-finite floats to
  strings ("nan", "inf"), or to None with `strict` (JSON without NaN literals or strings)."""
  if isinstance(x, Mapping):
    return {str(k): jsonable(v, strict=strict) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [jsonable(v, strict=strict) for v in x]
  if isinstance(x, np.ndarray):
    return jsonable(x.tolist(), strict=strict)
  if isinstance(x, (bool, np.bool_)):
    return bool(x)
  if isinstance(x, (int, np.integer)):
    return int(x)
  if isinstance(x, (float, np.floating)):
    if strict:
      return float(x) if math.isfinite(x) else None
    return finite_or_str(x)
  return x


def _replace_atomically(path: str, text: str) -> None:
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "w") as f:
    f.write(text)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def write(path: str, value: Any, *, indent: int | None = 1, sort_keys: bool = False,
          allow_nan: bool = True) -> None:
  """Writes `value` to `path` atomically (a reader never sees a half-written file, and a crash
  leaves the old file or the new one).

  Args:
    path: the file.
    value: JSON-serialisable (see `jsonable`).
    indent, sort_keys, allow_nan: as `json.dumps` (None: one line).

  Raises:
    ValueError / TypeError: `value` is not serialisable (nothing is written then).
  """
  _replace_atomically(path, json.dumps(value, indent=indent, sort_keys=sort_keys,
                                       allow_nan=allow_nan))


def append_lines(path: str, records: Sequence[Any]) -> None:
  """Appends records to a JSON-lines file, one `json.dumps` line each, in one write."""
  text = "".join(json.dumps(r) + "\n" for r in records)
  with open(path, "a") as f:
    f.write(text)


def write_lines(path: str, records: Sequence[Any]) -> None:
  """Replaces a JSON-lines file with `records` atomically."""
  _replace_atomically(path, "".join(json.dumps(r) + "\n" for r in records))


def read_lines(path: str) -> tuple[list[Any], bool]:
  """The complete records of a JSON-lines file, and whether a torn last line was left out.

  A missing file has no records. A last line that is not JSON is torn (a crash mid-append); it
  is left out.

  Raises:
    ValueError: a line other than the last is not JSON (names the file, line and fix).
  """
  if not os.path.exists(path):
    return [], False
  with open(path) as f:
    lines = f.read().split("\n")
  # The file ends with '\n' when complete: the last split element is '' then.
  tail, lines = lines[-1], lines[:-1]
  records = []
  for i, line in enumerate(lines):
    if not line.strip():
      continue
    try:
      records.append(json.loads(line))
    except json.JSONDecodeError as e:
      if i == len(lines) - 1 and not tail:
        return records, True  # the last line is torn (e.g. a crash mid-write, then a newline)
      raise ValueError(f"{path} line {i + 1} is not JSON ({e}); it is not the last line, so "
                       "this is not a torn write: fix or delete that line (records are one "
                       "JSON object per line).") from None
  return records, bool(tail.strip())


def read(path: str, default: Any = None, fix: str | None = None) -> Any:
  """The JSON in `path`, or `default` when the file does not exist.

  Args:
    path: the file.
    default: returned when it does not exist.
    fix: what to do if it is not valid JSON (appended to the error; a generic hint by default).

  Raises:
    ValueError: the file is not valid JSON (names the file, the parse error and the fix).
  """
  if not os.path.exists(path):
    return default
  with open(path) as f:
    text = f.read()
  try:
    return json.loads(text)
  except json.JSONDecodeError as e:
    raise ValueError(
        f"{path} is not valid JSON ({e}): cut short or edited by hand. "
        + (fix or "Restore it from a copy, or delete it and rerun the job that writes it.")
    ) from None
