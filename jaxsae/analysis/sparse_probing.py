"""k-sparse probing of exact binary features: SAE latents against raw activation dimensions.

For each binary column, a linear probe reads the feature from k input columns (SAE latents, or
raw activation dimensions, or all raw dimensions), and is scored on held-out tokens:

- split: the first ⌊train_fraction · M⌋ tokens train, the rest test (tokens are in row-major
  sequence order, so the test tokens are mostly whole held-out sequences); each column uses the
  tokens where it is defined;
- selection: the k inputs with the largest |mean(x | y = 1) − mean(x | y = 0)| on the training
  tokens (SAEBench's sparse-probing criterion; ties → the lower index);
- probe: class-balanced ridge least squares, a closed form and deterministic. Inputs are
  centred and scaled by their class-balanced mean and standard deviation (weights 1 / (2·n_c)
  per token of class c, summing to 1; a constant input is dropped), then
  β = (Zᵀ W Z + λ I)⁻¹ Zᵀ W (y − ½) and the probe predicts 1 iff Z β > 0. For binary y this is
  Fisher's LDA direction with equal class priors, shrunk by λ;
- scores on the test tokens: accuracy (with its Wilson interval), balanced accuracy, F1.

A column needs at least one positive and one negative token in both halves; others are skipped
(None). Cost: a [C, K] matmul for the selection, then per column a k × k solve; with
`full=True` also a C × C one, from a Gram matrix shared by the columns with one defined mask
(O(M·C²) once per mask) and the scatter of the column's smaller class (O(min(n₁, n₀)·C²)).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from jaxsae.analysis import recovery
from jaxsae.core import stats


def train_mask(num_tokens: int, train_fraction: float = 0.8) -> np.ndarray:
  """bool `[M]`: the first ⌊train_fraction · M⌋ tokens."""
  if not 0 < train_fraction < 1:
    raise ValueError(f"train_fraction={train_fraction} must lie in (0, 1), e.g. 0.8.")
  mask = np.zeros((num_tokens,), bool)
  mask[: int(train_fraction * num_tokens)] = True
  return mask


def mean_difference(x_MC: np.ndarray, lm: recovery.LabelMatrix, train_M: np.ndarray
                    ) -> np.ndarray:
  """`[C, K]` |mean(x | y = 1) − mean(x | y = 0)| over each column's defined training tokens
  (0 where a class is empty)."""
  use_MK = lm.defined & train_M[:, None]
  pos_MK = (use_MK & (lm.values == 1)).astype(np.float32)
  neg_MK = (use_MK & (lm.values == 0)).astype(np.float32)
  x = np.asarray(x_MC, np.float32)
  n_pos, n_neg = pos_MK.sum(axis=0, dtype=np.float64), neg_MK.sum(axis=0, dtype=np.float64)
  ok = (n_pos > 0) & (n_neg > 0)
  # Class sums as float32 matmuls (codes can be large); the means in float64.
  diff = ((x.T @ pos_MK).astype(np.float64) / np.maximum(n_pos, 1)
          - (x.T @ neg_MK).astype(np.float64) / np.maximum(n_neg, 1))
  return np.where(ok[None, :], np.abs(diff), 0.0)


def _solve(mean_pos: np.ndarray, mean_neg: np.ndarray, cov_w: np.ndarray, ref: np.ndarray,
           ridge: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """The probe from class means and the class-balanced covariance about μ = (m₁ + m₀) / 2.

  With weights summing to 1, Zᵀ W (y − ½) = (m₁ − m₀) / (4·scale), so the solve needs only
  these moments. An input whose balanced variance is below 1e-10 of `ref` (its second moment
  about the centre the moments were taken around) counts as constant and is dropped.
  """
  var = np.diag(cov_w)
  live = var > 1e-10 * np.maximum(ref, np.finfo(np.float64).tiny)
  scale = np.where(live, np.sqrt(np.where(live, var, 1.0)), 1.0)
  corr = np.where(np.outer(live, live), cov_w / np.outer(scale, scale), 0.0)
  rhs = np.where(live, (mean_pos - mean_neg) / (4 * scale), 0.0)
  beta = np.linalg.solve(corr + ridge * np.eye(corr.shape[0]), rhs)
  return (mean_pos + mean_neg) / 2, scale, np.where(live, beta, 0.0)


def fit_probe(x_NC: np.ndarray, y_N: np.ndarray, ridge: float = 1e-3
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Class-balanced ridge least squares (module docstring).

  Args:
    x_NC: training inputs.
    y_N: 0/1 labels with both classes present.
    ridge: λ ≥ 0 (relative to the unit-variance scaled inputs).

  Returns:
    `(mean_C, scale_C, beta_C)`: predict 1 iff ((x − mean) / scale) · beta > 0 (beta 0 on
    constant inputs); mean is the class-balanced mean (m₁ + m₀) / 2.
  """
  x = np.asarray(x_NC, np.float64)
  y = np.asarray(y_N) == 1
  n_pos, n_neg = int(y.sum()), int((~y).sum())
  if n_pos == 0 or n_neg == 0:
    raise ValueError("fit_probe needs both classes in the training tokens.")
  m_pos, m_neg = x[y].mean(axis=0), x[~y].mean(axis=0)
  xc = x - (m_pos + m_neg) / 2
  w = np.where(y, 0.5 / n_pos, 0.5 / n_neg)
  cov_w = xc.T @ (w[:, None] * xc)
  return _solve(m_pos, m_neg, cov_w, w @ np.square(x), ridge)


def _fit_full(x_NC: np.ndarray, y_N: np.ndarray, centre_C: np.ndarray, gram_CC: np.ndarray,
              ridge: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """`fit_probe` on all inputs from `gram_CC` = Σ (x − c)(x − c)ᵀ over the training tokens
  (shared by the columns with this defined mask): only the smaller class is summed here, the
  other's scatter is the difference."""
  y = np.asarray(y_N) == 1
  small = y if y.sum() <= (~y).sum() else ~y
  xs = x_NC[small].astype(np.float64) - centre_C
  n_s, n_l = int(small.sum()), int((~small).sum())
  sum_s = xs.sum(axis=0)
  sum_l = (x_NC.sum(axis=0, dtype=np.float64) - x_NC.shape[0] * centre_C) - sum_s
  scat_s = xs.T @ xs
  scat_l = gram_CC - scat_s
  m_s, m_l = sum_s / n_s, sum_l / n_l
  # Balanced covariance about μ: ½ Cov₁ + ½ Cov₀ + δδᵀ with δ = (m₁ − m₀) / 2.
  delta = (m_s - m_l) / 2
  cov_w = (0.5 * (scat_s / n_s - np.outer(m_s, m_s)) + 0.5 * (scat_l / n_l - np.outer(m_l, m_l))
           + np.outer(delta, delta))
  m_pos, m_neg = (m_s, m_l) if small is y else (m_l, m_s)
  ref = 0.5 * np.diag(scat_s) / n_s + 0.5 * np.diag(scat_l) / n_l
  return _solve(m_pos + centre_C, m_neg + centre_C, cov_w, ref, ridge)


def _score(pred: np.ndarray, y: np.ndarray) -> dict[str, Any]:
  tp = int(np.sum(pred & (y == 1)))
  fp, fn = int(np.sum(pred & (y == 0))), int(np.sum(~pred & (y == 1)))
  correct = int(np.sum(pred == (y == 1)))
  n_pos, n_neg = int(np.sum(y == 1)), int(np.sum(y == 0))
  return {"accuracy": stats.fraction(correct, y.size),
          "balanced_accuracy": 0.5 * (tp / n_pos + (n_neg - fp) / n_neg),
          "f1": 2 * tp / max(2 * tp + fp + fn, 1), "n_test": int(y.size)}


def sparse_probe(x_MC: Any, lm: recovery.LabelMatrix, *, ks: Sequence[int] = (1, 2, 5),
                 train_fraction: float = 0.8, ridge: float = 1e-3, full: bool = False
                 ) -> dict[str, dict[str, Any] | None]:
  """k-sparse probes of every binary column (module docstring).

  Args:
    x_MC: `[M, C]` inputs: SAE codes (C = F) or raw activations (C = D).
    lm: binary columns over the M tokens.
    ks: probe sizes (each ≤ C is used; larger ones are skipped).
    train_fraction: the split (`train_mask`).
    ridge: λ of `fit_probe`.
    full: also a probe on all C inputs (key "full").

  Returns:
    Column name → None (too few tokens of a class in a half) or `{"k=1": {"dims", "accuracy"
    (estimate dict), "balanced_accuracy", "f1", "n_test"}, ...}`.
  """
  x = np.asarray(x_MC, np.float32)  # only the probed sub-blocks go to float64
  if x.ndim != 2 or x.shape[0] != lm.num_tokens:
    raise ValueError(f"x must be [M={lm.num_tokens}, C], got shape {x.shape}.")
  bad = [n for n, k in zip(lm.names, lm.kinds) if k not in recovery.BINARY_KINDS]
  if bad:
    raise ValueError(f"columns {bad} are not binary; pass lm.binary().")
  if any(not isinstance(k, (int, np.integer)) or k < 1 for k in ks):
    raise ValueError(f"ks={tuple(ks)} must be positive ints.")
  train = train_mask(lm.num_tokens, train_fraction)
  score_CK = mean_difference(x, lm, train)
  grams: dict[bytes, tuple[np.ndarray, np.ndarray]] = {}  # defined-train mask → centre, Gram
  out: dict[str, dict[str, Any] | None] = {}
  for j, name in enumerate(lm.names):
    d, y = lm.defined[:, j], lm.values[:, j]
    tr, te = np.nonzero(d & train)[0], np.nonzero(d & ~train)[0]
    if min(np.sum(y[tr] == 1), np.sum(y[tr] == 0), np.sum(y[te] == 1), np.sum(y[te] == 0)) < 1:
      out[name] = None
      continue
    order = np.argsort(-score_CK[:, j], kind="stable")
    probes = {f"k={int(k)}": order[: int(k)] for k in ks if k <= x.shape[1]}
    if full:
      probes["full"] = np.arange(x.shape[1])
    res = {}
    for key, dims in probes.items():
      if key == "full":
        mask_key = np.packbits(d & train).tobytes()
        if mask_key not in grams:
          xt = x[tr].astype(np.float64)
          centre = xt.mean(axis=0)
          grams[mask_key] = (centre, (xt - centre).T @ (xt - centre))
        mean, scale, beta = _fit_full(x[tr], y[tr], *grams[mask_key], ridge)
      else:
        mean, scale, beta = fit_probe(x[np.ix_(tr, dims)], y[tr], ridge)
      pred = ((x[np.ix_(te, dims)].astype(np.float64) - mean) / scale) @ beta > 0
      res[key] = {"dims": [int(c) for c in dims] if key != "full" else None,
                  **_score(pred, y[te])}
    out[name] = res
  return out


def summarise_probes(probes: Mapping[str, Any], raw: Mapping[str, Any] | None = None
                     ) -> dict[str, Any]:
  """Means over probed columns, per probe size, and (with `raw`) the same on raw activations.

  Args:
    probes: `sparse_probe` output (e.g. on SAE codes).
    raw: `sparse_probe` output on raw activations over the same columns, or None.

  Returns:
    `{key: {"accuracy", "f1", "balanced_accuracy" (estimate dicts over columns)}}` per probe
    key; with `raw`, under `"raw"` the raw probes' means, and per key present in both
    `"minus_raw"`: the paired difference of accuracy (this − raw) over the columns both probe;
    and `"per_column"`: column → key → accuracy.
  """
  keys = sorted({k for r in probes.values() if r for k in r})
  mean_of = lambda res, key, field: stats.mean_se(
      [_value(r[key][field]) for r in res.values() if r and key in r])
  out: dict[str, Any] = {k: {f: mean_of(probes, k, f)
                             for f in ("accuracy", "balanced_accuracy", "f1")} for k in keys}
  out["per_column"] = {name: ({k: _value(r[k]["accuracy"]) for k in r} if r else None)
                       for name, r in probes.items()}
  if raw is not None:
    raw_keys = sorted({k for r in raw.values() if r for k in r})
    out["raw"] = {k: {f: mean_of(raw, k, f) for f in ("accuracy", "balanced_accuracy", "f1")}
                  for k in raw_keys}
    diffs = {}
    for k in keys:
      both = [n for n, r in probes.items()
              if r and k in r and raw.get(n) and k in raw[n]]
      if len(both) >= 1:
        diffs[k] = stats.paired_difference([_value(raw[n][k]["accuracy"]) for n in both],
                                           [_value(probes[n][k]["accuracy"]) for n in both])
    out["minus_raw"] = diffs
  return out


def _value(v: Any) -> float:
  return float(v["value"]) if isinstance(v, Mapping) else float(v)
