"""Completed parts of an evaluation kept on disk, so a stopped eval job resumes where it stopped.

An evaluation of a large grid is hours of CPU or many minutes of accelerator time; a run that is
stopped (a time limit, a lost machine) must not lose the groups it finished. `Store` keeps, in
`<eval workdir>/partial/`:

- `metrics-<fingerprint>/group-<i>.npz`: group i's finalised held-out metrics (every array of
  `evaluate._evaluate`'s per-group result), and `clean.npz`, the clean model's sums;
- `generations-<fingerprint>/group-<i>-<mode>-<positions>-<settings>.npz`: group i's spliced
  generations (tokens `[N, G, B, T]` and finished `[N, G, B]`) for one combination and one set
  of generation settings, before recognition.

The fingerprint is a digest of the grid's identity (checkpoint step, content digest, config
digest: `trained.TrainedGrid.identity` without its path) and of every setting the part depends
on, so a changed grid or changed settings never reuses old parts; the two phases have separate
fingerprints (new generation settings keep the finished held-out metrics). Files are written
atomically (a temporary file, then a rename) and read back bit-exactly, so a resumed evaluation
writes the same eval.json as an uninterrupted one. The eval job removes the directory once
eval.json is written.
"""

from __future__ import annotations

import os
import shutil
from typing import Any, Mapping

import numpy as np

from jaxsae.core import workdir as workdir_lib

DIRNAME = "partial"
_FORMAT = 1  # bump when what a part holds changes, so old parts are not read


def _save_npz(path: str, arrays: Mapping[str, Any]) -> None:
  tmp = f"{path}.tmp-{os.getpid()}.npz"
  np.savez(tmp, **{k: np.asarray(v) for k, v in arrays.items()})
  os.replace(tmp, path)


def _load_npz(path: str) -> dict[str, np.ndarray] | None:
  if not os.path.exists(path):
    return None
  with np.load(path, allow_pickle=False) as f:
    return {k: f[k] for k in f.files}


class Store:
  """The finished parts of one evaluation (see the module docstring)."""

  def __init__(self, workdir: str, grid_identity: Mapping[str, Any],
               metrics_settings: Mapping[str, Any], generation_settings: Mapping[str, Any]):
    """
    Args:
      workdir: the eval workdir (parts go to `<workdir>/partial/`).
      grid_identity: `trained.TrainedGrid.identity` (its `path` is ignored: a moved grid is the
        same grid).
      metrics_settings, generation_settings: JSON-able settings each phase depends on.
    """
    grid = {k: v for k, v in grid_identity.items() if k != "path"}
    self.root = os.path.join(workdir, DIRNAME)
    fp = lambda settings: workdir_lib.digest_of([_FORMAT, grid, dict(settings)])
    self._metrics = os.path.join(self.root, f"metrics-{fp(metrics_settings)}")
    self._generations = os.path.join(self.root, f"generations-{fp(generation_settings)}")

  # Held-out metrics.

  def load_metrics(self, group: int) -> dict[str, np.ndarray] | None:
    """Group `group`'s saved metrics, or None."""
    return _load_npz(os.path.join(self._metrics, f"group-{group}.npz"))

  def save_metrics(self, group: int, metrics: Mapping[str, Any]) -> None:
    os.makedirs(self._metrics, exist_ok=True)
    _save_npz(os.path.join(self._metrics, f"group-{group}.npz"), metrics)

  def load_clean(self) -> dict[str, Any] | None:
    """The clean sums as saved (0-d arrays back to Python floats), or None."""
    arrays = _load_npz(os.path.join(self._metrics, "clean.npz"))
    if arrays is None:
      return None
    return {k: float(v) if v.ndim == 0 else v for k, v in arrays.items()}

  def save_clean(self, sums: Mapping[str, Any]) -> None:
    os.makedirs(self._metrics, exist_ok=True)
    _save_npz(os.path.join(self._metrics, "clean.npz"), sums)

  # Spliced generations.

  def _gen_path(self, group: int, combo: str, settings: Mapping[str, Any]) -> str:
    tag = workdir_lib.digest_of(dict(settings))[:8]
    return os.path.join(self._generations, f"group-{group}-{combo.replace('/', '-')}-{tag}.npz")

  def load_generations(self, group: int, combo: str, settings: Mapping[str, Any]
                       ) -> tuple[np.ndarray, np.ndarray] | None:
    """(tokens, finished) of group `group`, `combo` ('<mode>/<positions>') and the generation
    `settings` (temperature, lengths, ...), or None."""
    arrays = _load_npz(self._gen_path(group, combo, settings))
    return None if arrays is None else (arrays["tokens"], arrays["finished"])

  def save_generations(self, group: int, combo: str, settings: Mapping[str, Any],
                       tokens: np.ndarray, finished: np.ndarray) -> None:
    os.makedirs(self._generations, exist_ok=True)
    _save_npz(self._gen_path(group, combo, settings), {"tokens": tokens, "finished": finished})

  def clear(self) -> None:
    """Removes every part (once the evaluation's result is written)."""
    shutil.rmtree(self.root, ignore_errors=True)
