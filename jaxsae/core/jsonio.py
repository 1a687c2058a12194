"""The jobs' JSON files: atomic writes, reads, and values made plain JSON.

Non-finite floats are written as the strings "nan", "inf", "-inf" (strict JSON has no such
numbers), which is how eval.json, summary.json and report.json hold them.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Mapping

import numpy as np


def finite_or_str(x: Any) -> float | str:
  """`float(x)`, or its string form when not finite."""
  x = float(x)
  return x if math.isfinite(x) else str(x)


def jsonable(x: Any) -> Any:
  """Plain JSON: mappings and sequences recursively, NumPy to Python, non-finite floats to
  strings."""
  if isinstance(x, Mapping):
    return {str(k): jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [jsonable(v) for v in x]
  if isinstance(x, np.ndarray):
    return jsonable(x.tolist())
  if isinstance(x, (bool, np.bool_)):
    return bool(x)
  if isinstance(x, (int, np.integer)):
    return int(x)
  if isinstance(x, (float, np.floating)):
    return finite_or_str(x)
  return x


def write(path: str, value: Any) -> None:
  """Writes `value` to `path` atomically (a reader never sees a half-written file, and a crash
  leaves the old file or the new one)."""
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "w") as f:
    json.dump(value, f, indent=1)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


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
