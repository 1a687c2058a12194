"""Ground-truth feature metrics that exact token labels make computable.

On natural text, absorption, splitting and matching scores are estimated against probes or
proxy labels; a formal language labels every token exactly, so here they are counts. Inputs are
host arrays: codes `[M, F]` of one SAE on M tokens, binary label columns (`recovery.LabelMatrix`,
each scored over its own defined tokens) and, for the hierarchy metrics, a
`hierarchy.Hierarchy` of parent / child columns. The parts live in their own modules:

- `firing.py`: a latent *fires* when its code is > 0; precision / recall / F1 of firing as a
  classifier of each column, and `splitting` (latents that each take a share of a feature);
- `hierarchy.py`: parent / child families of a grammar's labels, and on them `absorption`
  and `hedging`;
- `sparse_probing.py`: k-sparse probes on latents against raw activation dimensions;
- here: `matched_recovery` (one-to-one Hungarian matching of columns to latents by |Pearson|:
  MCC and the macro P / R / F1 of the matched latents), `latent_classification`
  (SynthSAEBench's per-latent form), `null_mcc` (the exact chance level of a matched
  |Pearson|), `shrinkage` (‖x̂‖ / ‖x‖ and the best rescaling γ), and `ground_truth_summary`,
  all of them per variant, JSON-ready.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import numpy as np
import scipy.integrate
import scipy.optimize
import scipy.stats

from jaxsae.analysis import firing
from jaxsae.analysis import hierarchy as hierarchy_lib
from jaxsae.analysis import recovery
from jaxsae.analysis import sparse_probing
from jaxsae.core import jsonio
from jaxsae.core import stats


# ------------------------------------------------------------------------------------------------
# Matching: MCC and matched precision / recall / F1.


@dataclasses.dataclass(frozen=True)
class MatchedRecovery:
  """One-to-one matching of K columns to F latents by |Pearson| (`matched_recovery`).

  Attributes:
    latent_K: matched latent per column, −1 where none is left (K > F).
    abs_corr_K: |Pearson| of the matched pair (0 where unmatched).
    precision_K, recall_K, f1_K: the matched latent's firing scores on the column (0 where
      unmatched).
  """

  latent_K: np.ndarray
  abs_corr_K: np.ndarray
  precision_K: np.ndarray
  recall_K: np.ndarray
  f1_K: np.ndarray

  @property
  def mcc(self) -> float:
    """Mean |Pearson| over the matched pairs (min(F, K) of them)."""
    matched = self.latent_K >= 0
    return float(self.abs_corr_K[matched].mean()) if matched.any() else 0.0


def _abs_corr(codes_MF: np.ndarray, lm: recovery.LabelMatrix, corr_FK: Any) -> np.ndarray:
  corr = recovery.correlations(codes_MF, lm) if corr_FK is None else corr_FK
  abs_FK = np.abs(np.nan_to_num(np.asarray(corr, np.float64)))
  if abs_FK.shape != (codes_MF.shape[1], lm.num_columns):
    raise ValueError(f"corr_FK has shape {abs_FK.shape}, expected [F, K] = "
                     f"{(codes_MF.shape[1], lm.num_columns)}.")
  return abs_FK


def matched_recovery(codes_MF: Any, lm: recovery.LabelMatrix,
                     counts: firing.FiringCounts | None = None, corr_FK: Any = None
                     ) -> MatchedRecovery:
  """Mean max correlation with a one-to-one matching, and the matched latents' P / R / F1.

  The score of (latent f, column k) is |Pearson(codes[:, f], column k)| over k's defined tokens
  (`recovery.correlations`; 0 for a constant latent). The Hungarian algorithm picks the
  one-to-one assignment maximising the total score; MCC is the mean score over the min(F, K)
  matched pairs. This is SynthSAEBench's MCC (SAELens `mean_correlation_coefficient`: Hungarian
  on |similarity|, mean over matched pairs) with the |cosine| of decoder and true directions
  replaced by the |Pearson| of activations and exact labels, which needs no true directions
  (the "mean correlation coefficient" of the identifiability literature).

  Precision / recall / F1 are per column, of "the matched latent fires (> 0)" as a classifier of
  the column; macro-averaging them over the K columns (unmatched columns count 0) gives the
  feature-side scores. SynthSAEBench averages the same per-latent scores over latents instead,
  each latent paired with its best column: that form is `latent_classification`.

  Args:
    codes_MF: `[M, F]`.
    lm: binary columns.
    counts: `firing.firing_counts(codes_MF, lm)` if already computed.
    corr_FK: `recovery.correlations(codes_MF, lm)` if already computed.

  Returns:
    `MatchedRecovery`.
  """
  firing.check_binary(lm)
  codes = firing.check_codes(codes_MF, lm.num_tokens)
  counts = firing.firing_counts(codes, lm) if counts is None else counts
  abs_FK = _abs_corr(codes, lm, corr_FK)
  cols, rows = scipy.optimize.linear_sum_assignment(abs_FK.T, maximize=True)
  k = lm.num_columns
  latent_K = np.full((k,), -1, np.int64)
  latent_K[cols] = rows
  pick = lambda a_FK: np.where(latent_K >= 0, a_FK[np.maximum(latent_K, 0), np.arange(k)], 0.0)
  return MatchedRecovery(latent_K=latent_K, abs_corr_K=pick(abs_FK),
                         precision_K=pick(counts.precision_FK), recall_K=pick(counts.recall_FK),
                         f1_K=pick(counts.f1_FK))


def latent_classification(codes_MF: Any, lm: recovery.LabelMatrix,
                          counts: firing.FiringCounts | None = None, corr_FK: Any = None
                          ) -> dict[str, np.ndarray]:
  """SynthSAEBench's classification scores: every latent against its best column.

  Each latent f is paired with the column k(f) = argmax_k |Pearson(f, k)| (SynthSAEBench pairs by
  decoder |cosine|, which needs true directions), and scored as a classifier of that column:
  precision, recall, F1 of "fires (> 0)" over k(f)'s defined tokens, 0 where undefined (a dead
  latent scores 0). Average over latents for SynthSAEBench's numbers. `counts` and `corr_FK`
  as in `matched_recovery`.

  Returns:
    `{"column_F", "precision_F", "recall_F", "f1_F"}`.
  """
  firing.check_binary(lm)
  codes = firing.check_codes(codes_MF, lm.num_tokens)
  counts = firing.firing_counts(codes, lm) if counts is None else counts
  abs_FK = _abs_corr(codes, lm, corr_FK)
  col_F = np.argmax(abs_FK, axis=1)
  f = np.arange(abs_FK.shape[0])
  return {"column_F": col_F, "precision_F": counts.precision_FK[f, col_F],
          "recall_F": counts.recall_FK[f, col_F], "f1_F": counts.f1_FK[f, col_F]}


def null_mcc(num_tokens: int, num_latents: int) -> float:
  """Chance level of one matched |Pearson|: E[max over F latents of |r|] under independence.

  For a fixed non-constant column over n tokens and a latent of i.i.d. Gaussian values, the
  sample correlation r is the cosine between a fixed direction and a uniform direction of the
  (n − 1)-dimensional centred space, so r² ~ Beta(1/2, (n − 2)/2) exactly, independently across
  latents. The expected maximum of F such |r| is ∫₀¹ 1 − G(ρ)^F dρ with G(ρ) = I_{ρ²}(1/2,
  (n − 2)/2) (regularised incomplete beta). This is exact for one column; with K ≪ F columns the
  one-to-one MCC of random codes sits just below it (each column still chooses among F − K + 1
  or more latents). It grows like √(2 ln 2F / n).

  Args:
    num_tokens: n ≥ 3.
    num_latents: F ≥ 1.
  """
  if num_tokens < 3 or num_latents < 1:
    raise ValueError(f"null_mcc needs num_tokens >= 3 and num_latents >= 1, got {num_tokens}, "
                     f"{num_latents}.")
  b = (num_tokens - 2) / 2
  tail = lambda rho: -math.expm1(num_latents * scipy.stats.beta.logcdf(rho * rho, 0.5, b))
  scale = math.sqrt(2 * math.log(2 * num_latents) / num_tokens)
  points = [min(0.999, c * scale) for c in (0.5, 1.0, 2.0)]
  value, _ = scipy.integrate.quad(tail, 0.0, 1.0, points=points, limit=200)
  return float(value)


# ------------------------------------------------------------------------------------------------
# Shrinkage.


def shrinkage(acts_MD: Any, recon_MD: Any) -> dict[str, Any]:
  """Norm shrinkage of a reconstruction and the best rescaling.

  `norm_ratio` is the mean over tokens with ‖x‖ > 0 of ‖x̂_t‖ / ‖x_t‖ (with its SE over tokens).
  γ = ⟨x, x̂⟩ / ‖x̂‖² (sums over all tokens and dimensions) minimises ‖x − γ x̂‖²; γ > 1 means the
  reconstruction is shrunk. Its SE is the delta-method SE of this ratio estimator, treating
  tokens as independent. `rel_error` = ‖x − x̂‖² / ‖x‖² and `rel_error_rescaled` = ‖x − γ x̂‖² /
  ‖x‖²: the gap between them is the reconstruction error that a global rescaling would remove.

  Args:
    acts_MD: `[M, D]` inputs x.
    recon_MD: `[M, D]` reconstructions x̂.

  Returns:
    `{"norm_ratio": estimate dict, "gamma", "gamma_se", "rel_error", "rel_error_rescaled"}`
    (γ None when x̂ = 0).
  """
  x = np.asarray(acts_MD, np.float64)
  xh = np.asarray(recon_MD, np.float64)
  if x.ndim != 2 or x.shape != xh.shape:
    raise ValueError(f"acts and recon must be [M, D] of one shape, got {x.shape} and "
                     f"{xh.shape}.")
  nx, nxh = np.linalg.norm(x, axis=1), np.linalg.norm(xh, axis=1)
  ok = nx > 0
  ratio = stats.mean_se(nxh[ok] / nx[ok]) if ok.any() else stats.mean_se([])
  a_M, b_M = np.sum(x * xh, axis=1), np.square(nxh)
  sxx = float(np.sum(np.square(nx)))
  out = {"norm_ratio": ratio, "gamma": None, "gamma_se": None,
         "rel_error": float(np.sum(np.square(x - xh)) / sxx) if sxx > 0 else None,
         "rel_error_rescaled": None}
  if b_M.sum() > 0:
    gamma = float(a_M.sum() / b_M.sum())
    n = x.shape[0]
    resid = a_M - gamma * b_M
    se = (math.sqrt(np.sum(np.square(resid)) * n / (n - 1)) / b_M.sum()) if n > 1 else None
    out.update(gamma=gamma, gamma_se=se)
    if sxx > 0:
      out["rel_error_rescaled"] = float(np.sum(np.square(x - gamma * xh)) / sxx)
  return out


# ------------------------------------------------------------------------------------------------
# Summary.


def union_columns(*lms: recovery.LabelMatrix) -> recovery.LabelMatrix:
  """The columns of several LabelMatrices over the same tokens, a repeated name kept once."""
  names, values, defined, kinds, sources = [], [], [], [], []
  for lm in lms:
    if lm.num_tokens != lms[0].num_tokens:
      raise ValueError(f"LabelMatrices over {lm.num_tokens} and {lms[0].num_tokens} tokens.")
    for j, name in enumerate(lm.names):
      if name not in names:
        names.append(name)
        values.append(lm.values[:, j])
        defined.append(lm.defined[:, j])
        kinds.append(lm.kinds[j])
        sources.append(lm.sources[j])
  m = lms[0].num_tokens
  stack = lambda cols, dt: (np.stack(cols, axis=1) if cols else np.zeros((m, 0), dt))
  return recovery.LabelMatrix(names=tuple(names), values=stack(values, np.float32),
                              defined=stack(defined, bool), kinds=tuple(kinds),
                              sources=tuple(sources))



def _variant_summary(codes_MF, features, h, recon_MD, acts_MD, raw_probe, *, ks,
                     train_fraction, precision_min, recall_min):
  counts = firing.firing_counts(codes_MF, features)
  corr_FK = recovery.correlations(codes_MF, features)
  mr = matched_recovery(codes_MF, features, counts, corr_FK)
  lc = latent_classification(codes_MF, features, counts, corr_FK)
  split = firing.splitting(codes_MF, features, counts, precision_min=precision_min,
                           recall_min=recall_min)
  per_feature = {
      name: {"latent": int(mr.latent_K[k]), "abs_corr": mr.abs_corr_K[k],
             "precision": mr.precision_K[k], "recall": mr.recall_K[k], "f1": mr.f1_K[k],
             "split_latents": int(split["count_K"][k]), "split_coverage": split["coverage_K"][k]}
      for k, name in enumerate(features.names)}
  matched = mr.latent_K >= 0
  out = {
      "mcc": stats.mean_se(mr.abs_corr_K[matched]),
      "mcc_null": null_mcc(int(np.median(counts.defined_K)), codes_MF.shape[1]),
      "matched": {"precision": stats.mean_se(mr.precision_K),
                  "recall": stats.mean_se(mr.recall_K), "f1": stats.mean_se(mr.f1_K)},
      "latent_classification": {k: stats.mean_se(lc[f"{k}_F"])
                                for k in ("precision", "recall", "f1")},
      "split_latents": stats.mean_se(split["count_K"]),
      "features": per_feature,
      "probing": sparse_probing.summarise_probes(sparse_probing.sparse_probe(
          codes_MF, features, ks=ks, train_fraction=train_fraction), raw_probe),
  }
  if h.families:
    hcounts = firing.firing_counts(codes_MF, h.columns)
    fl = hierarchy_lib.family_latents(hcounts, h)
    absorb = hierarchy_lib.absorption(codes_MF, h, fl)
    hedge = hierarchy_lib.hedging(codes_MF, h, fl)
    tot = lambda key: sum(a[key] for a in absorb if a[key] is not None)
    n_parent = sum(a["parent_tokens"] for a in absorb if a["absorbed"] is not None)
    out["absorption"] = {
        # Pooled over families' parent tokens (a parent token belongs to one family per
        # hierarchy built by `hierarchy.grammar_hierarchy`), with its Wilson interval.
        "pooled": stats.fraction(tot("absorbed"), n_parent),
        "mean_over_families": stats.mean_se([a["absorption"] for a in absorb
                                             if a["absorption"] is not None]),
        "parent_silent": stats.fraction(tot("silent"), n_parent),
        "families": absorb}
    out["hedging"] = {"mean": stats.mean_se([e["hedging"] for e in hedge
                                             if e["hedging"] is not None]),
                      "children": hedge}
  if recon_MD is not None:
    out["shrinkage"] = shrinkage(acts_MD, recon_MD)
  return out


def ground_truth_summary(codes: Any, lm: recovery.LabelMatrix, h: hierarchy_lib.Hierarchy,
                         acts_MD: Any, recon: Any = None, *, ids: Sequence[str] | None = None,
                         ks: Sequence[int] = (1, 2, 5), train_fraction: float = 0.8,
                         precision_min: float = 0.9, recall_min: float = 0.05
                         ) -> dict[str, Any]:
  """Every ground-truth metric of this module per variant, JSON-ready (strict: no NaN).

  The feature set is the binary columns of `lm` together with the hierarchy's columns (by name,
  once each): MCC and matched P / R / F1, SynthSAEBench's per-latent classification, splitting
  and k-sparse probing run on it; absorption and hedging on the hierarchy's families; shrinkage
  on the reconstructions.

  Args:
    codes: `[M, F]` or `[N, M, F]` codes on the M tokens of `lm`.
    lm: label columns (non-binary ones are ignored here).
    h: `hierarchy.grammar_hierarchy(...)` over the same tokens (may have no families).
    acts_MD: `[M, D]` the SAE inputs (for shrinkage and the raw-activation probes).
    recon: `[M, D]` or `[N, M, D]` reconstructions, or None to skip shrinkage.
    ids: N variant ids (default "0" … "N−1").
    ks, train_fraction: k-sparse probing (`sparse_probing.sparse_probe`).
    precision_min, recall_min: `splitting` thresholds.

  Returns:
    `{"features", "hierarchy", "probing_raw", "settings", "variants": {id: {...}}}`; each
    variant holds `mcc` (estimate dict: the mean over matched pairs; its SE is the spread over
    features, the units, not token sampling), `mcc_null` (`null_mcc` at the median
    defined-token count), `matched` and `latent_classification` (P / R / F1 means),
    `split_latents`, per-feature `features`, `probing` (SAE vs raw, per k), and with families
    `absorption` (pooled Wilson fraction, mean over families, per family) and `hedging`; with
    `recon`, `shrinkage`.
  """
  codes = np.asarray(codes, np.float32)
  if codes.ndim not in (2, 3):
    raise ValueError(f"codes must be [M, F] or [N, M, F], got shape {codes.shape}.")
  codes_NMF = codes if codes.ndim == 3 else codes[None]
  n, m = codes_NMF.shape[:2]
  acts_MD = np.asarray(acts_MD, np.float32)
  if acts_MD.ndim != 2 or acts_MD.shape[0] != m:
    raise ValueError(f"acts_MD must be [M={m}, D], got shape {acts_MD.shape}.")
  recon_NMD = None
  if recon is not None:
    recon = np.asarray(recon, np.float32)
    recon_NMD = recon if recon.ndim == 3 else recon[None]
    if recon_NMD.shape != (n,) + acts_MD.shape:
      raise ValueError(f"recon must be [M, D] or [N, M, D] = {(n,) + acts_MD.shape}, got "
                       f"{recon.shape}.")
  ids = [str(i) for i in range(n)] if ids is None else [str(i) for i in ids]
  if len(ids) != n:
    raise ValueError(f"{len(ids)} ids for {n} variants.")
  if h.columns.num_tokens != m:
    raise ValueError(f"the hierarchy covers {h.columns.num_tokens} tokens, the codes {m}; "
                     "build it from the same LabelMatrix and tokens.")
  parts = [lm.binary()] if any(k in recovery.BINARY_KINDS for k in lm.kinds) else []
  features = union_columns(*parts, h.columns) if parts or h.families else None
  if features is None or features.num_columns == 0:
    raise ValueError("no binary label columns and no hierarchy: nothing to score.")
  raw_probe = sparse_probing.sparse_probe(acts_MD, features, ks=ks,
                                          train_fraction=train_fraction, full=True)
  variants = {}
  for i, vid in enumerate(ids):
    variants[vid] = _variant_summary(
        codes_NMF[i], features, h, None if recon_NMD is None else recon_NMD[i], acts_MD,
        raw_probe, ks=ks, train_fraction=train_fraction, precision_min=precision_min,
        recall_min=recall_min)
  return jsonio.jsonable({
      "features": list(features.names), "hierarchy": h.to_json(),
      "probing_raw": sparse_probing.summarise_probes(raw_probe),
      "settings": {"ks": list(ks), "train_fraction": train_fraction,
                   "precision_min": precision_min, "recall_min": recall_min},
      "variants": variants}, strict=True)
