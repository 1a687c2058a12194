"""Latent firing as a classifier of exact binary features.

A latent *fires* on a token when its code is > 0 (SAE codes here are non-negative, so this is
SynthSAEBench's `!= 0`). Against a binary label column, counted over the column's defined
tokens, each latent is a classifier with a precision, recall and F1 (`firing_counts`, one
matmul over tokens for all latents and columns); `splitting` counts the latents that each take
a precise share of one feature. Inputs are host arrays: codes `[M, F]` of one SAE and a
`recovery.LabelMatrix` of binary columns over the same M tokens.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from jaxsae.analysis import recovery


def check_codes(codes_MF: Any, num_tokens: int) -> np.ndarray:
  """Codes as float32 `[M, F]` over `num_tokens` tokens, or a ValueError naming the fix."""
  codes = np.asarray(codes_MF, np.float32)
  if codes.ndim != 2:
    raise ValueError(f"codes must be [M, F] (one SAE), got shape {codes.shape}; loop over the "
                     "variant axis or call ground_truth_summary.")
  if codes.shape[0] != num_tokens:
    raise ValueError(f"codes cover {codes.shape[0]} tokens but the labels cover {num_tokens}; "
                     "build both from the same tokens and mask.")
  return codes


def check_binary(lm: recovery.LabelMatrix) -> None:
  """A ValueError unless `lm` has columns and all of them are binary."""
  bad = [n for n, k in zip(lm.names, lm.kinds) if k not in recovery.BINARY_KINDS]
  if bad:
    raise ValueError(f"columns {bad} are not binary; pass lm.binary() (or hierarchy columns).")
  if lm.num_columns == 0:
    raise ValueError("the LabelMatrix has no columns.")


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
  return np.where(den > 0, num / np.where(den > 0, den, 1.0), 0.0)


# ------------------------------------------------------------------------------------------------
# Firing counts.


@dataclasses.dataclass(frozen=True)
class FiringCounts:
  """Counts of "latent f fires" against column k, over column k's defined tokens (float64).

  Attributes:
    tp_FK: tokens where the latent fires and the column is 1.
    fired_FK: defined tokens where the latent fires.
    positives_K: tokens where the column is 1.
    defined_K: tokens where the column is defined.
  """

  tp_FK: np.ndarray
  fired_FK: np.ndarray
  positives_K: np.ndarray
  defined_K: np.ndarray

  @property
  def precision_FK(self) -> np.ndarray:
    """tp / fired; 0 for a latent that never fires on the column's tokens."""
    return _ratio(self.tp_FK, self.fired_FK)

  @property
  def recall_FK(self) -> np.ndarray:
    """tp / positives; 0 for a column without positives."""
    return _ratio(self.tp_FK, np.broadcast_to(self.positives_K, self.tp_FK.shape))

  @property
  def f1_FK(self) -> np.ndarray:
    """2·tp / (fired + positives) (= 2PR / (P + R)); 0 when tp = 0."""
    return _ratio(2 * self.tp_FK, self.fired_FK + self.positives_K[None, :])


def firing_counts(codes_MF: Any, lm: recovery.LabelMatrix) -> FiringCounts:
  """Firing counts of every latent against every binary column (matmuls over tokens).

  Args:
    codes_MF: `[M, F]` codes on the M tokens of `lm`.
    lm: binary columns.

  Returns:
    `FiringCounts` with `[F, K]` and `[K]` arrays (exact integers in float64).
  """
  check_binary(lm)
  codes = check_codes(codes_MF, lm.num_tokens)
  fires_MF = (codes > 0).astype(np.float32)
  defined_MK = lm.defined.astype(np.float32)
  pos_MK = defined_MK * (lm.values == 1)
  # float32 sums of 0/1 are exact below 2**24 tokens.
  return FiringCounts(tp_FK=(fires_MF.T @ pos_MK).astype(np.float64),
                      fired_FK=(fires_MF.T @ defined_MK).astype(np.float64),
                      positives_K=pos_MK.sum(axis=0, dtype=np.float64),
                      defined_K=defined_MK.sum(axis=0, dtype=np.float64))


# ------------------------------------------------------------------------------------------------
# Splitting.


def splitting(codes_MF: Any, lm: recovery.LabelMatrix, counts: FiringCounts | None = None, *,
              precision_min: float = 0.9, recall_min: float = 0.05) -> dict[str, np.ndarray]:
  """How many latents each take a share of one feature.

  A latent f *covers part of* column k when its firing precision on k is ≥ `precision_min`
  (it fires almost only on k's tokens) and its recall is ≥ `recall_min` (it fires on a
  non-negligible share of them). A feature represented by one latent has count 1; a feature
  split into s latents that each fire on a part of it has count s; `coverage` is the fraction of
  the feature's tokens where at least one of the counted latents fires.

  Returns:
    `{"count_K" (int), "coverage_K" (0 where the count is 0)}`.
  """
  if not (0 < precision_min <= 1 and 0 <= recall_min <= 1):
    raise ValueError(f"precision_min={precision_min} must be in (0, 1] and recall_min="
                     f"{recall_min} in [0, 1].")
  check_binary(lm)
  codes = check_codes(codes_MF, lm.num_tokens)
  counts = firing_counts(codes, lm) if counts is None else counts
  covers_FK = (counts.precision_FK >= precision_min) & (counts.recall_FK >= recall_min)
  covers_FK &= counts.tp_FK > 0
  coverage = np.zeros((lm.num_columns,))
  for k in range(lm.num_columns):
    idx = np.nonzero(covers_FK[:, k])[0]
    pos = lm.defined[:, k] & (lm.values[:, k] == 1)
    if idx.size and pos.any():
      coverage[k] = float(np.mean(np.any(codes[pos][:, idx] > 0, axis=1)))
  return {"count_K": covers_FK.sum(axis=0).astype(np.int64), "coverage_K": coverage}
