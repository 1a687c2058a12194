"""Divergence of a training run read from its metrics.jsonl: a loss that grows by orders of
magnitude, not only one that turns NaN.

A run, or one SAE variant of a grid, is *diverged* when its last logged loss is non-finite or
more than `FACTOR` times its initial loss: the smaller of its first logged loss (a mean over
the first logged interval) and the loss before any update (an LM's uniform-prediction CE
ln V; an SAE's loss at its first step, logged as `first_step_loss`). Losses are
cross-entropies or reconstruction + sparsity terms, so >= 0. A finite loss of 1e9 (an LM at
lr 1e6) or an SAE whose loss went from 1e-1 to 1e10 trains nothing useful, but passes every
NaN check; the jobs flag it in `summary.json` and the log, with the variant's hyperparameters.
Flagging changes no training: the other variants and the checkpoints are untouched.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Iterable, Mapping

from absl import logging

FACTOR = 100.0  # last loss / first loss above this is divergence


def check(steps: Iterable[int], losses: Iterable[Any], factor: float = FACTOR,
          baseline: float | None = None) -> dict[str, Any] | None:
  """The verdict on one loss curve, or None when it has not diverged (or is empty).

  Args:
    steps: the logged steps, increasing.
    losses: the loss at each step (floats, or "nan" / "inf" strings as the jobs write them).
    factor: growth of the last loss over the reference that counts as divergence.
    baseline: a known loss at initialisation (an LM's uniform-prediction CE, ln V). The
      reference is the smaller of it and the first logged loss, so a run that already blew
      up within its first logged interval is still caught.

  Returns:
    None, or {"reason", "first_step", "first_loss", "reference", "last_step", "last_loss",
    "ratio"} (losses as written: non-finite ones as strings).
  """
  pairs = [(int(s), float(x)) for s, x in zip(steps, losses)]
  if not pairs:
    return None
  (s0, first), (s1, last) = pairs[0], pairs[-1]
  ref = first if baseline is None or not math.isfinite(first) else min(first, baseline)
  if not math.isfinite(last):
    reason = f"non-finite loss {last} at step {s1}"
    ratio = None
  elif math.isfinite(ref) and ref > 0 and last > factor * ref:
    ratio = last / ref
    what = f"its first logged loss {first:.4g} (step {s0})" if ref == first else (
        f"the initial loss {ref:.4g} (first logged: {first:.4g} at step {s0})")
    reason = f"loss {last:.4g} at step {s1} is {ratio:.3g}x (> {factor:g}x) {what}"
  else:
    return None
  as_json = lambda x: x if math.isfinite(x) else str(x)
  return {"reason": reason, "first_step": s0, "first_loss": as_json(first),
          "reference": as_json(ref), "last_step": s1, "last_loss": as_json(last), "ratio": ratio}


def _records(path: str) -> list[dict[str, Any]]:
  """metrics.jsonl's complete records (an unfinished last line, from a kill, is skipped)."""
  if not os.path.exists(path):
    return []
  out = []
  with open(path) as f:
    for line in f:
      try:
        out.append(json.loads(line))
      except json.JSONDecodeError:
        continue
  return out


def flag_run(summary: dict[str, Any], metrics_path: str, vocab_size: int,
             factor: float = FACTOR) -> None:
  """Adds `summary["divergence"]` for an LM run (its 'train' records) and logs a warning.

  The value is None for a healthy run, else `check`'s verdict; the baseline is the CE of a
  uniform prediction, ln(vocab_size).
  """
  train = sorted((r for r in _records(metrics_path) if r.get("kind") == "train"),
                 key=lambda r: r["step"])
  verdict = check((r["step"] for r in train), (r["loss"] for r in train), factor,
                  baseline=math.log(vocab_size))
  summary["divergence"] = verdict
  if verdict:
    logging.warning("The run diverged: %s. Lower config.optim.peak_lr (or raise "
                    "warmup_steps) and train again in a new workdir.", verdict["reason"])


def flag_variants(summary: dict[str, Any], metrics_path: str,
                  factor: float = FACTOR) -> None:
  """Marks diverged SAE variants in a grid summary (from the per-variant records on disk).

  Sets `summary["variants"][id]["divergence"]` (None or `check`'s verdict) for every variant
  and `summary["diverged"]` = {id: verdict plus "group" and "hparams"}, and logs a warning
  per diverged variant naming its hyperparameters.
  """
  curves: dict[str, list[dict[str, Any]]] = {}
  for r in _records(metrics_path):
    if "variant" in r and "loss" in r:
      curves.setdefault(r["variant"], []).append(r)
  diverged = {}
  variants: Mapping[str, dict[str, Any]] = summary.get("variants", {})
  for vid, info in variants.items():
    points = sorted(curves.get(vid, []), key=lambda r: r["step"])
    # The loss before the first update (a record's loss is a mean over its steps).
    start = float(points[0].get("first_step_loss", "nan")) if points else math.nan
    verdict = check((r["step"] for r in points), (r["loss"] for r in points), factor,
                    baseline=start if math.isfinite(start) else None)
    info["divergence"] = verdict
    if verdict:
      diverged[vid] = {**verdict, "group": info.get("group"), "hparams": info.get("hparams")}
      logging.warning("variant %s (group %s, %s) diverged: %s. The other variants are "
                      "unaffected; lower its lr or sparsity coefficient.", vid,
                      info.get("group"), json.dumps(info.get("hparams")), verdict["reason"])
  summary["diverged"] = diverged
