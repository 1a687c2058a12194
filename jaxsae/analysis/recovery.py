"""Feature recovery: SAE latents against ground-truth token labels.

The inputs are plain arrays: codes `[M, F]` (one variant) or `[N, M, F]` (a grid, N variants
sharing the M tokens) and a `LabelMatrix` of K label columns over the same M tokens, built by
`label_matrix` from `grammars.labels` (−1 = undefined). Every score is computed per (latent,
column) over the tokens where that column is defined:

- `correlations`: Pearson correlation (Menon et al.'s metric), as matmuls over tokens;
- `auroc`: Mann–Whitney AUROC from mid-ranks (ties averaged), a matmul of each latent's ranks
  against the positive indicators (binary columns);
- `best_f1`: the best F1 of "positive iff latent ≥ t" over the latent's distinct values (binary
  columns), from a per-latent sort and cumulative positive counts;
- `best_latents`, `matching_score` (one-to-one Hungarian matching of columns to latents);
- `summarise`: the JSON-able per-variant table that reports are built from (with the
  dictionary geometry of `geometry.py` when decoders are given).

The codes of a trained grid on held-out tokens come from `codes.py` (`analysis_batch`,
`collect_codes`).

Degenerate cases never produce NaN: a latent or column with (numerically) zero variance over the
defined tokens has correlation 0; a constant latent, or a column with no positives or no
negatives, has AUROC 0.5. Variants run one after another inside one compiled program
(`lax.map`), so memory is O(M·F + F·K) per variant on top of the inputs; sorts and gathers of the
rank-based scores are chunked over latents.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import scipy.optimize

from jaxsae import grammars
from jaxsae.analysis import geometry

_HIGHEST = jax.lax.Precision.HIGHEST
# A variance below this fraction of the (globally centred) second moment is rounding noise
# of the one-pass formula: the latent or column is treated as constant on those tokens.
_REL_VAR_TOL = 1e-5
# Budget (elements) for the per-latent chunks of the rank-based scores.
_CHUNK_ELEMENTS = 1 << 24
BINARY_KINDS = ("binary", "class")  # column kinds `auroc` / `best_f1` accept


# ------------------------------------------------------------------------------------------------
# Label columns.


@dataclasses.dataclass(frozen=True)
class LabelMatrix:
  """K label columns over M tokens (host NumPy arrays).

  Attributes:
    names: column names; a categorical label `name` with classes c becomes `name=c` columns.
    values: float32 `[M, K]` (0 where undefined).
    defined: bool `[M, K]`.
    kinds: per column 'binary', 'ordinal', or 'class' (a 0/1 column of a categorical label).
    sources: per column the label it came from.
  """

  names: tuple[str, ...]
  values: np.ndarray
  defined: np.ndarray
  kinds: tuple[str, ...]
  sources: tuple[str, ...]

  @property
  def num_tokens(self) -> int:
    return int(self.values.shape[0])

  @property
  def num_columns(self) -> int:
    return len(self.names)

  def select(self, columns: Sequence[int | str]) -> "LabelMatrix":
    """The sub-matrix of the given column indices or names (in that order)."""
    idx = [self.names.index(c) if isinstance(c, str) else int(c) for c in columns]
    pick = lambda t: tuple(t[i] for i in idx)
    return LabelMatrix(names=pick(self.names), values=self.values[:, idx],
                       defined=self.defined[:, idx], kinds=pick(self.kinds),
                       sources=pick(self.sources))

  def binary(self) -> "LabelMatrix":
    """The binary columns (binary labels and categorical classes), for `auroc` / `best_f1`."""
    return self.select([i for i, k in enumerate(self.kinds) if k in BINARY_KINDS])


def label_matrix(labels: Mapping[str, Any], info: Mapping[str, grammars.LabelInfo],
                 mask: Any = None) -> LabelMatrix:
  """Turns per-token integer labels into float label columns.

  Binary and ordinal labels are one column each; a categorical label with classes
  (c_0, c_1, ...) becomes one 0/1 column `name=c_j` per class, defined wherever the label is.

  Args:
    labels: name → int array `[M]` or `[B, T]` (all the same shape), −1 where undefined (as
      `grammars.labels(grammar, tokens_BT)` returns).
    info: name → `LabelInfo` (`grammars.label_info(grammar)`); must cover every label.
    mask: optional bool array of the labels' shape selecting the M tokens (row-major order, as
      `collect_codes` selects them); default: every position.

  Returns:
    A `LabelMatrix` with columns in the order of `labels`.

  Raises:
    ValueError: empty or mismatched shapes, a label without info, an unknown kind, or values
      outside the label's range.
  """
  if not labels:
    raise ValueError("label_matrix got no labels; pass grammars.labels(grammar, tokens_BT).")
  arrays = {name: np.asarray(v) for name, v in labels.items()}
  shapes = {v.shape for v in arrays.values()}
  if len(shapes) != 1:
    raise ValueError(f"labels have different shapes {sorted(shapes)}; pass arrays over the same "
                     "tokens ([M] or [B, T]).")
  (shape,) = shapes
  if len(shape) not in (1, 2):
    raise ValueError(f"labels must be [M] or [B, T], got shape {shape}.")
  if mask is not None:
    mask = np.asarray(mask).astype(bool)
    if mask.shape != shape:
      raise ValueError(f"mask shape {mask.shape} differs from the labels' {shape}; pass the "
                       "token mask the codes were collected with.")
  names, values, defined, kinds, sources = [], [], [], [], []
  for name, raw in arrays.items():
    if name not in info:
      raise ValueError(f"label {name!r} has no LabelInfo; pass grammars.label_info(grammar) "
                       "for the grammar the labels came from.")
    if not np.issubdtype(raw.dtype, np.integer) and not np.issubdtype(raw.dtype, np.bool_):
      raise ValueError(f"label {name!r} has dtype {raw.dtype}; labels are integer arrays with "
                       "-1 where undefined.")
    v = (raw[mask] if mask is not None else raw.reshape(-1)).astype(np.int64)
    li = info[name]
    ok = v >= 0
    top = int(v.max(initial=-1))
    if li.kind == "binary":
      if top > 1:
        raise ValueError(f"binary label {name!r} has value {top}; expected 0/1 or -1.")
      cols = [(name, v.astype(np.float32), "binary")]
    elif li.kind == "ordinal":
      cols = [(name, v.astype(np.float32), "ordinal")]
    elif li.kind == "categorical":
      if not li.classes:
        raise ValueError(f"categorical label {name!r} lists no classes in its LabelInfo.")
      if top >= len(li.classes):
        raise ValueError(f"categorical label {name!r} has value {top} but only "
                         f"{len(li.classes)} classes {li.classes}.")
      cols = [(f"{name}={c}", (v == j).astype(np.float32), "class")
              for j, c in enumerate(li.classes)]
    else:
      raise ValueError(f"label {name!r} has kind {li.kind!r}; expected binary, categorical or "
                       "ordinal.")
    if int(v.min(initial=0)) < -1:
      raise ValueError(f"label {name!r} has value {int(v.min())}; only -1 marks undefined.")
    for col_name, col, kind in cols:
      names.append(col_name)
      values.append(np.where(ok, col, 0).astype(np.float32))
      defined.append(ok)
      kinds.append(kind)
      sources.append(name)
  return LabelMatrix(names=tuple(names), values=np.stack(values, axis=1),
                     defined=np.stack(defined, axis=1), kinds=tuple(kinds),
                     sources=tuple(sources))


def _check_codes(codes: Any, lm: LabelMatrix) -> tuple[jax.Array, bool]:
  """Codes as float32 `[N, M, F]` (and whether a variant axis was given)."""
  codes = jnp.asarray(codes)
  if codes.ndim not in (2, 3):
    raise ValueError(f"codes must be [M, F] or [N, M, F], got shape {codes.shape}.")
  if codes.shape[-2] != lm.num_tokens:
    raise ValueError(f"codes cover {codes.shape[-2]} tokens but the LabelMatrix has "
                     f"{lm.num_tokens}; build both from the same tokens and mask.")
  if lm.num_columns == 0:
    raise ValueError("the LabelMatrix has no columns.")
  batched = codes.ndim == 3
  codes = codes.astype(jnp.float32)
  return (codes if batched else codes[None]), batched


# ------------------------------------------------------------------------------------------------
# Pearson correlation.


@jax.jit
def _correlations(codes_NMF: jax.Array, y_MK: jax.Array, w_MK: jax.Array) -> jax.Array:
  n_K = jnp.sum(w_MK, axis=0)
  safe_n_K = jnp.maximum(n_K, 1.0)
  y_mean_K = jnp.sum(w_MK * y_MK, axis=0) / safe_n_K
  yc_MK = w_MK * (y_MK - y_mean_K[None, :])  # exactly centred per column (two-pass)
  syy_K = jnp.sum(jnp.square(yc_MK), axis=0)
  y_ok_K = (n_K > 1) & (syy_K > _REL_VAR_TOL**2 * jnp.sum(w_MK * jnp.square(y_MK), axis=0))

  def one(x_MF):
    # Centring by the global mean keeps the one-pass subset variance well conditioned; the
    # covariance needs no subset mean because yc sums to 0 over each column's tokens.
    x_MF = x_MF - jnp.mean(x_MF, axis=0, keepdims=True)
    sx_FK = jnp.einsum("mf,mk->fk", x_MF, w_MK, precision=_HIGHEST)
    sxx_FK = jnp.einsum("mf,mk->fk", jnp.square(x_MF), w_MK, precision=_HIGHEST)
    sxy_FK = jnp.einsum("mf,mk->fk", x_MF, yc_MK, precision=_HIGHEST)
    var_FK = sxx_FK - jnp.square(sx_FK) / safe_n_K[None, :]
    ok_FK = (var_FK > _REL_VAR_TOL * sxx_FK) & y_ok_K[None, :]
    denom_FK = jnp.sqrt(jnp.where(ok_FK, var_FK * syy_K[None, :], 1.0))
    return jnp.clip(jnp.where(ok_FK, sxy_FK / denom_FK, 0.0), -1.0, 1.0)

  return jax.lax.map(one, codes_NMF)


def correlations(codes: Any, lm: LabelMatrix) -> jax.Array:
  """Pearson correlation of every latent with every label column.

  Args:
    codes: `[M, F]` or `[N, M, F]` latent activations on the M tokens of `lm`.
    lm: the label columns.

  Returns:
    `[F, K]` (or `[N, F, K]`) correlations over each column's defined tokens; 0 where the
    latent or the column is constant there (dead latents), never NaN from that.
  """
  codes_NMF, batched = _check_codes(codes, lm)
  out = _correlations(codes_NMF, jnp.asarray(lm.values), jnp.asarray(lm.defined, jnp.float32))
  return out if batched else out[0]


# ------------------------------------------------------------------------------------------------
# Rank-based scores for binary columns.


def _tie_runs(x_M: jax.Array):
  """Sorts one latent ascending; returns (order, tie-run start flags, and for every sorted
  position the first and last sorted position of its run of equal values)."""
  m = x_M.shape[0]
  iota = jnp.arange(m, dtype=jnp.int32)
  x_s, idx = jax.lax.sort((x_M, iota), num_keys=1)
  same_prev = jnp.concatenate([jnp.zeros((1,), bool), x_s[1:] == x_s[:-1]])
  same_next = jnp.concatenate([same_prev[1:], jnp.zeros((1,), bool)])
  first = jax.lax.cummax(jnp.where(same_prev, 0, iota), axis=0)
  last = jax.lax.cummin(jnp.where(same_next, m - 1, iota), axis=0, reverse=True)
  return idx, ~same_prev, first, last


def _chunk(per_latent_elements: int, num_latents: int) -> int:
  return int(max(1, min(num_latents, _CHUNK_ELEMENTS // max(per_latent_elements, 1))))


@functools.partial(jax.jit, static_argnames=("groups", "want_auroc", "want_f1"))
def _binary_scores(codes_NMF, pos_MK, defined_MG, *, groups, want_auroc, want_f1):
  """AUROC and best F1 `[N, F, K]` for 0/1 columns (`pos_MK` 0 where undefined); `groups[g]`
  holds the columns whose defined mask is `defined_MG[:, g]` (ranks depend only on the mask).

  One sort per latent serves every mask: within a run of tied values, the defined tokens of
  mask g hold the within-mask ranks excl_g(run start) + 1 … incl_g(run end), so their mid-rank
  is their mean, and a threshold at a run start predicts the n_g − excl_g defined tokens above.
  """
  m, f = codes_NMF.shape[1:]
  k, g_count = pos_MK.shape[1], defined_MG.shape[1]
  group_of = np.zeros((k,), np.int32)
  for g, cols in enumerate(groups):
    group_of[np.asarray(cols)] = g
  defined_MG = defined_MG.astype(jnp.int32)
  n_G = jnp.sum(defined_MG, axis=0)
  n_pos_K = jnp.sum(pos_MK, axis=0).astype(jnp.int32)

  def latent(x_M):
    idx, start, first, last = _tie_runs(x_M)
    def_s = defined_MG[idx]
    incl = jnp.cumsum(def_s, axis=0)
    excl = incl - def_s
    out = []
    if want_auroc:
      # Within-mask mid-rank minus the mean rank (n+1)/2: 0 for a constant latent.
      mid2 = excl[first] + incl[last] - n_G[None, :]
      r_s = jnp.where(def_s > 0, mid2.astype(jnp.float32) / 2, 0.0)
      out.append(jnp.zeros((m, g_count), jnp.float32).at[idx].set(r_s))
    if want_f1:
      pos_s = pos_MK[idx].astype(jnp.int32)
      tp = n_pos_K[None, :] - (jnp.cumsum(pos_s, axis=0) - pos_s)  # positives >= the run
      pred = n_G[None, group_of] - excl[:, group_of]  # defined tokens >= the run
      f1 = 2.0 * tp / jnp.maximum(pred + n_pos_K[None, :], 1).astype(jnp.float32)
      out.append(jnp.max(jnp.where(start[:, None], f1, 0.0), axis=0))
    return tuple(out)

  per_latent = m * (6 + 4 * g_count + (6 * k if want_f1 else 0))
  chunk = _chunk(per_latent, f)
  num_chunks = -(-f // chunk)

  def latents(x_CM):
    res = jax.vmap(latent)(x_CM)
    out = []
    if want_auroc:  # the matmul of (this chunk's) ranks against the positive indicators
      sum_CK = jnp.zeros((x_CM.shape[0], k), jnp.float32)
      for g, cols in enumerate(groups):
        cols = np.asarray(cols)
        sum_CK = sum_CK.at[:, cols].set(jnp.einsum(
            "cm,mk->ck", res[0][:, :, g], pos_MK[:, cols], precision=_HIGHEST))
      out.append(sum_CK)
    if want_f1:
      out.append(res[-1])
    return tuple(out)

  def one(x_MF):
    # Latent chunks one after another bound the [chunk, M, G] ranks and [chunk, M, K] gathers.
    x_FM = jnp.pad(x_MF.T, ((0, num_chunks * chunk - f), (0, 0)))
    res = jax.lax.map(latents, x_FM.reshape(num_chunks, chunk, m))
    res = [r.reshape(num_chunks * chunk, k)[:f] for r in res]
    out = {}
    if want_auroc:
      pairs_K = n_pos_K.astype(jnp.float32) * (n_G[group_of] - n_pos_K).astype(jnp.float32)
      ok_K = pairs_K > 0
      out["auroc"] = jnp.where(ok_K[None, :],
                               0.5 + res[0] / jnp.where(ok_K, pairs_K, 1.0)[None, :], 0.5)
    if want_f1:
      out["f1"] = res[-1]
    return out

  return jax.lax.map(one, codes_NMF)


def _binary(codes: Any, lm: LabelMatrix, want_auroc: bool, want_f1: bool) -> dict[str, jax.Array]:
  codes_NMF, batched = _check_codes(codes, lm)
  bad = [n for n, kd in zip(lm.names, lm.kinds) if kd not in BINARY_KINDS]
  if bad:
    raise ValueError(f"AUROC / F1 need binary columns; {bad} are not. Pass lm.binary().")
  values = np.asarray(lm.values)
  if not np.all((values == 0) | (values == 1)):
    raise ValueError("binary columns must hold 0/1 values; build them with label_matrix.")
  masks, inverse = np.unique(lm.defined.T, axis=0, return_inverse=True)
  inverse = np.asarray(inverse).reshape(-1)
  groups = tuple(tuple(int(i) for i in np.nonzero(inverse == g)[0]) for g in range(len(masks)))
  out = _binary_scores(codes_NMF, jnp.asarray(values * lm.defined, jnp.float32),
                       jnp.asarray(masks.T), groups=groups, want_auroc=want_auroc,
                       want_f1=want_f1)
  return out if batched else {k: v[0] for k, v in out.items()}


def auroc(codes: Any, lm: LabelMatrix) -> jax.Array:
  """Mann–Whitney AUROC of every latent for every binary column.

  AUROC = P(x_pos > x_neg) + ½·P(x_pos = x_neg) over the column's defined tokens, from mid-ranks
  within those tokens (one sort per latent, shared by all columns) and a matmul of the centred
  ranks against the positive indicators, per distinct defined mask.

  Args:
    codes: `[M, F]` or `[N, M, F]`.
    lm: binary columns only (`lm.binary()`).

  Returns:
    `[F, K]` (or `[N, F, K]`); 0.5 for a constant latent or a column without both classes; 0
    for a latent that is exactly the negated label.
  """
  return _binary(codes, lm, True, False)["auroc"]


def best_f1(codes: Any, lm: LabelMatrix) -> jax.Array:
  """Best F1 of "positive iff latent ≥ t", over t in the latent's distinct defined values.

  Args:
    codes: `[M, F]` or `[N, M, F]`.
    lm: binary columns only (`lm.binary()`).

  Returns:
    `[F, K]` (or `[N, F, K]`); 0 for a column without positives. A constant latent scores the
    all-positive predictor, 2·P / (n + P).
  """
  return _binary(codes, lm, False, True)["f1"]


# ------------------------------------------------------------------------------------------------
# Best latents and matching.


def _scores_FK(scores: Any, names: Sequence[str] | None = None) -> np.ndarray:
  s = np.nan_to_num(np.asarray(scores, np.float64), nan=0.0, posinf=0.0, neginf=0.0)
  if s.ndim != 2:
    raise ValueError(f"scores must be [F, K] (one variant), got shape {s.shape}.")
  if names is not None and len(names) != s.shape[1]:
    raise ValueError(f"{len(names)} names for {s.shape[1]} score columns; pass lm.names of the "
                     "LabelMatrix the scores were computed on.")
  return s


def best_latents(scores: Any, names: Sequence[str], absolute: bool = True
                 ) -> list[dict[str, Any]]:
  """The best latent for each column.

  Args:
    scores: `[F, K]` (one variant).
    names: the K column names.
    absolute: rank by |score| (correlations) instead of the score itself (AUROC, F1).

  Returns:
    One dict per column: `label` (name), `latent` (index), `score` (signed value).
  """
  s = _scores_FK(scores, names)
  best = np.argmax(np.abs(s) if absolute else s, axis=0)
  return [{"label": n, "latent": int(best[j]), "score": float(s[best[j], j])}
          for j, n in enumerate(names)]


def matching_score(scores: Any) -> tuple[float, np.ndarray]:
  """One-to-one matching of columns to distinct latents maximising the total |score|.

  Args:
    scores: `[F, K]` (one variant); non-finite entries count as 0.

  Returns:
    `(mean, assignment)`: the mean over the K columns of the matched |score| (a column left
    unmatched when K > F counts 0), and int `[K]` the matched latent per column (−1 if none).
  """
  s = np.abs(_scores_FK(scores))
  rows, cols = scipy.optimize.linear_sum_assignment(s.T, maximize=True)
  assignment = np.full((s.shape[1],), -1, np.int64)
  assignment[rows] = cols
  return float(s[cols, rows].sum() / s.shape[1]), assignment


# ------------------------------------------------------------------------------------------------
# Per-variant summary.


def summarise(codes_NMF: Any, lm: LabelMatrix, decoders_NFD: Any = None,
              ids: Sequence[str] | None = None) -> dict[str, Any]:
  """Per-variant feature-recovery summary, JSON-able, for reports.

  Args:
    codes_NMF: `[N, M, F]` codes of N variants on the tokens of `lm` (`collect_codes`).
    lm: the label columns.
    decoders_NFD: optional `[N, F, D]` dictionaries (`sae.dictionary`, vmapped) for geometry.
    ids: N variant ids (default "0" … "N−1").

  Returns:
    `{"columns": [{"name", "kind", "label"}], "variants": {id: summary}}`, each summary with:
      `labels`: column name → `{"kind", "latent" (best by |corr|), "corr" (signed)}`, plus for
        binary columns `"auroc"` / `"f1"` of that latent and `"best_auroc"`,
        `"best_auroc_latent"`, `"best_f1"`, `"best_f1_latent"` (maxima over latents);
      `matching_score`: Hungarian mean |corr| over columns; `matching`: column → latent;
      `mean_best_abs_corr`: mean over columns of the best |corr|;
      `n_labels_corr_ge_0.8`, `n_labels_corr_ge_0.5`: columns whose best |corr| reaches it;
      `n_columns`; `dead_latents`: latents that are 0 on every token; `finite`: codes finite;
      `dictionary` (with decoders): within-SAE max cosine `mean`, `median`, `frac_above_0.9`
        (`geometry.dictionary_similarity`).
  """
  codes_NMF = jnp.asarray(codes_NMF)
  if codes_NMF.ndim != 3:
    raise ValueError(f"summarise needs codes [N, M, F], got shape {codes_NMF.shape}; add a "
                     "leading variant axis for one SAE.")
  n = codes_NMF.shape[0]
  ids = [str(i) for i in range(n)] if ids is None else [str(i) for i in ids]
  if len(ids) != n:
    raise ValueError(f"{len(ids)} ids for {n} variants.")
  if decoders_NFD is not None:
    decoders_NFD = np.asarray(decoders_NFD)
    if decoders_NFD.ndim != 3 or decoders_NFD.shape[:2] != (n, codes_NMF.shape[2]):
      raise ValueError(f"decoders must be [N={n}, F={codes_NMF.shape[2]}, D], got shape "
                       f"{decoders_NFD.shape}.")
  corr_NFK = np.asarray(correlations(codes_NMF, lm), np.float64)
  bin_idx = [j for j, kd in enumerate(lm.kinds) if kd in BINARY_KINDS]
  if bin_idx:
    scores = _binary(codes_NMF, lm.select(bin_idx), True, True)
    auc_NFB, f1_NFB = (np.asarray(scores[k], np.float64) for k in ("auroc", "f1"))
  finite_N = np.asarray(jnp.all(jnp.isfinite(codes_NMF), axis=(1, 2)))
  dead_N = np.asarray(jnp.sum(jnp.all(codes_NMF == 0, axis=1), axis=-1))
  variants = {}
  for i, vid in enumerate(ids):
    corr = np.nan_to_num(corr_NFK[i])
    best = best_latents(corr, lm.names)
    per_label = {}
    for j, b in enumerate(best):
      entry = {"kind": lm.kinds[j], "latent": b["latent"], "corr": b["score"]}
      if j in bin_idx:
        jb = bin_idx.index(j)
        auc, f1 = np.nan_to_num(auc_NFB[i, :, jb]), np.nan_to_num(f1_NFB[i, :, jb])
        entry.update(auroc=float(auc[b["latent"]]), f1=float(f1[b["latent"]]),
                     best_auroc=float(auc.max()), best_auroc_latent=int(auc.argmax()),
                     best_f1=float(f1.max()), best_f1_latent=int(f1.argmax()))
      per_label[b["label"]] = entry
    best_abs = np.abs([b["score"] for b in best])
    score, assignment = matching_score(corr)
    summary = {
        "labels": per_label,
        "matching_score": score,
        "matching": {name: int(a) for name, a in zip(lm.names, assignment)},
        "mean_best_abs_corr": float(best_abs.mean()),
        "n_labels_corr_ge_0.8": int(np.sum(best_abs >= 0.8)),
        "n_labels_corr_ge_0.5": int(np.sum(best_abs >= 0.5)),
        "n_columns": lm.num_columns,
        "dead_latents": int(dead_N[i]),
        "finite": bool(finite_N[i]),
    }
    if decoders_NFD is not None:
      summary["dictionary"] = geometry.dictionary_similarity(decoders_NFD[i]).summary()
    variants[vid] = summary
  columns = [{"name": nm, "kind": kd, "label": src}
             for nm, kd, src in zip(lm.names, lm.kinds, lm.sources)]
  return {"columns": columns, "variants": variants}
