"""SAE types and the tables that compare them: grids, feature recovery, causal predictability.

The data logic of the report (`report/assemble.py`) and its plots (`report/plots.py`), usable on its own
(e.g. on `report.json`'s `variants` in a notebook):

- `sae_type`: the SAE type of a variant from its sweep fields (`local`, `e2e`, `topk`,
  `causal-topk`, ...), and `type_sort_key`, the canonical order of types in plots and tables;
- `points_by_type`: report rows grouped by type, as the Pareto fronts and matched comparisons
  (`matched.py`) and the plotting functions take them;
- `grid_table`, `grid_row_field`: Menon et al.'s k/α × expansion layout;
- `feature_recovery`: latent ↔ label recovery per type from `analysis.summarise` output;
- `causal_by_type`, `causal_sentences`, `fidelity_metric`: causal predictability per type next
  to what the type costs (NMSE, CE increase, spliced grammaticality), and whether the causal
  loss (`causal-X` against `X`) raises it;
- `as_float`, `is_finite`, `format_number`, `METRIC_NAMES`: the JSON numbers ("nan" / "inf"
  strings allowed) and their display.

Frozen variants (training hit a non-finite value) are left out of what compares types.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np

from jaxsae.core import stats

# Canonical order of the base types (plots, tables); unknown combinations sort after these.
_TYPE_ORDER = ("local", "e2e", "e2e_ds", "topk", "batchtopk", "jumprelu", "gated",
               "sparsemax_no_kds", "sparsemax_recon_dist", "sparsemax_dist")
_LOSSES = ("local", "e2e", "e2e_ds")
_ACTIVATIONS = ("relu", "topk", "batchtopk", "jumprelu", "gated", "sparsemax_no_kds",
                "sparsemax_recon_dist", "sparsemax_dist")
# Display names of metrics (axis labels, table headers, sentences).
METRIC_NAMES = {"l0": "L0", "alive": "alive latents", "ce_increase": "CE increase",
                "grammaticality": "spliced grammaticality", "ev_token_mean": "explained variance"}
STRONG_CORR = 0.8  # "recovered" labels: best |corr| at least this


# ------------------------------------------------------------------------------------------------
# Numbers.


def as_float(x: Any) -> float | None:
  """A float from a JSON value ("nan"/"inf" strings allowed); None when missing or not a number."""
  if x is None or isinstance(x, bool):
    return None if x is None else float(x)
  try:
    return float(x)
  except (TypeError, ValueError):
    return None


def is_finite(x: Any) -> bool:
  """Whether a JSON value is a finite number ("nan"/"inf" strings and None are not)."""
  v = as_float(x)
  return v is not None and math.isfinite(v)


def format_number(x: Any, digits: int = 4) -> str:
  """Markdown text of a number: 4 significant digits, ints as ints, '—' when missing."""
  if isinstance(x, (bool, np.bool_)):
    return "yes" if x else "no"
  if isinstance(x, (int, np.integer)):
    return str(int(x))
  v = as_float(x)
  if v is None:
    return "—"
  if math.isnan(v):
    return "nan"
  if math.isinf(v):
    return "inf" if v > 0 else "-inf"
  if v == int(v) and abs(v) < 1e6:
    return str(int(v))
  return f"{v:.{digits}g}"


# ------------------------------------------------------------------------------------------------
# SAE types.


def sae_type(hparams: Mapping[str, Any]) -> str:
  """The SAE type of a variant, for colouring and grouping.

  Rule: a `local` loss gives the activation's name, except ReLU (+ L1), which is `local`
  (`topk`, `batchtopk`, `jumprelu`, `gated`, `sparsemax_no_kds`, ...); an `e2e` / `e2e_ds` loss
  gives the loss name with ReLU (`e2e`, `e2e_ds`) and `<loss>_<activation>` otherwise
  (`e2e_topk`). Training recipes mark the name: `matryoshka_` before it for nested prefixes
  (`matryoshka_batchtopk`), `+auxk` after it for the AuxK loss (`topk+auxk`), then `+panneal`
  for p-annealing (`local+panneal`) and `+resample` for dead-latent resampling
  (`local+panneal+resample`), and last Menon's normalisations: `+input_norm` (x normalised
  before the SAE), `+input_recon_norm` (also the reconstruction), `+recon_norm`. A `causal-` prefix is added when `hparams["causal"]` is
  true. Missing fields take the sweep registry's defaults (loss `local`, activation `relu`, no
  recipe, causal off).

  Args:
    hparams: a variant's sweep fields (`summary.json`'s `hparams`).

  Raises:
    ValueError: unknown loss or activation.
  """
  if not isinstance(hparams, Mapping):
    raise ValueError(f"hparams must be a dict of sweep fields, got {type(hparams).__name__}; "
                     "pass summary['variants'][id]['hparams'].")
  loss = hparams.get("loss", "local")
  act = hparams.get("activation", "relu")
  if loss not in _LOSSES:
    raise ValueError(f"hparams['loss']={loss!r} is unknown; use one of {', '.join(_LOSSES)} "
                     "(or teach comparison.sae_type the new preset).")
  if act not in _ACTIVATIONS:
    raise ValueError(f"hparams['activation']={act!r} is unknown; use one of "
                     f"{', '.join(_ACTIVATIONS)} (or teach comparison.sae_type the new one).")
  if loss == "local":
    base = "local" if act == "relu" else act
  else:
    base = loss if act == "relu" else f"{loss}_{act}"
  if hparams.get("matryoshka"):
    base = f"matryoshka_{base}"
  if hparams.get("auxk"):
    base = f"{base}+auxk"
  if hparams.get("p_anneal"):
    base = f"{base}+panneal"
  if hparams.get("resample_steps"):
    base = f"{base}+resample"
  norm = [n for n in ("input", "recon") if hparams.get(f"{n}_norm")]
  if norm:
    base = f"{base}+{'_'.join(norm)}_norm"
  return f"causal-{base}" if hparams.get("causal", False) else base


def type_sort_key(t: str) -> tuple:
  """Sort key of an SAE type: the canonical base-type order, each base before its `causal-`."""
  base = t[len("causal-"):] if t.startswith("causal-") else t
  rank = _TYPE_ORDER.index(base) if base in _TYPE_ORDER else len(_TYPE_ORDER)
  return (rank, base, t.startswith("causal-"))


def points_by_type(rows: Sequence[Mapping[str, Any]], *metrics: str,
                   include_frozen: bool = False) -> dict[str, list[dict[str, Any]]]:
  """Variant rows grouped by SAE type, each reduced to its id, frozen flag and `metrics`.

  The input of `matched.matched_comparison` and of the `report.plots` trade-off plots.

  Args:
    rows: variants as `report.json`'s `variants` (dicts with `id`, `frozen`, the metrics, and
      `type` or else `hparams`, from which `sae_type` derives it).
    *metrics: the metric keys kept (e.g. "ce_increase", "l0").
    include_frozen: keep frozen variants (flagged `"frozen": True`, which the plots draw as
      crosses); by default they are left out, as Pareto fronts and matched comparisons need.

  Returns:
    SAE type -> [{"id", "frozen", metric: value, ...}] (values as given, "nan" strings too),
    types in the order first seen.

  Raises:
    ValueError: rows that are not a list of dicts, or a row without a requested metric.
  """
  if isinstance(rows, (Mapping, str)) or not all(isinstance(r, Mapping) for r in rows):
    raise ValueError("rows must be a list of variant dicts, as report.json's 'variants' (not "
                     f"a {type(rows).__name__} of them); pass json.load(...)['variants'].")
  if not metrics:
    raise ValueError("points_by_type needs at least one metric name, e.g. "
                     "points_by_type(rows, 'ce_increase', 'l0').")
  out: dict[str, list[dict[str, Any]]] = {}
  for r in rows:
    missing = [m for m in metrics if m not in r]
    if missing:
      raise ValueError(f"variant {r.get('id', '?')!r} has no {missing}; rows must carry every "
                       "requested metric (report.json's 'variants' have l0, alive, ce_increase, "
                       "grammaticality, ...).")
    frozen = bool(r.get("frozen", False))
    if frozen and not include_frozen:
      continue
    t = r["type"] if "type" in r else sae_type(r.get("hparams", {}))
    out.setdefault(t, []).append({"id": r.get("id"), "frozen": frozen,
                                  **{m: r[m] for m in metrics}})
  return out


# ------------------------------------------------------------------------------------------------
# Menon-layout grids and feature recovery tables.


def grid_row_field(t: str) -> str | None:
  """The hyperparameter of an SAE type's grid rows: `k` (TopK kinds), None (sparsemax kinds,
  which have no sparsity knob), else `sparsity_coeff`."""
  base = (t[len("causal-"):] if t.startswith("causal-") else t).split("+")[0]
  if base.endswith("topk"):
    return "k"
  if "sparsemax" in base:
    return None
  return "sparsity_coeff"


def grid_table(rows: Sequence[Mapping[str, Any]], metric: str, *, row_field: str | None,
               col_field: str = "expansion") -> dict[str, Any] | None:
  """A Menon-layout table: `row_field` values (k or α) × `col_field` values (expansion).

  Args:
    rows: variants, each with `hparams` and the metric (a key of the row or of its `metrics`).
    metric: the metric shown.
    row_field: hyperparameter of the rows (None: a single row).
    col_field: hyperparameter of the columns.

  Returns:
    `{"row_field", "col_field", "metric", "rows", "cols", "values": [[float]], "counts":
    [[int]]}` (a cell holding several variants shows the mean of their finite values; NaN when
    none), or None when the variants do not span at least two cells.
  """
  cells: dict[tuple, list[float]] = {}
  for r in rows:
    hp = r.get("hparams", {})
    if col_field not in hp or (row_field is not None and row_field not in hp):
      return None
    key = (hp[row_field] if row_field else "—", hp[col_field])
    v = as_float(r.get(metric, r.get("metrics", {}).get(metric)))
    cells.setdefault(key, []).append(math.nan if v is None else v)
  if len(cells) < 2:
    return None
  row_vals = sorted({k[0] for k in cells}, key=lambda v: (isinstance(v, str), v))
  col_vals = sorted({k[1] for k in cells})
  values, counts = [], []
  for rv in row_vals:
    values.append([])
    counts.append([])
    for cv in col_vals:
      vs = [v for v in cells.get((rv, cv), []) if math.isfinite(v)]
      values[-1].append(float(np.mean(vs)) if vs else math.nan)
      counts[-1].append(len(cells.get((rv, cv), [])))
  return {"row_field": row_field, "col_field": col_field, "metric": metric, "rows": row_vals,
          "cols": col_vals, "values": values, "counts": counts}


def feature_recovery(features: Mapping[str, Any], types: Mapping[str, str]
                     ) -> dict[str, dict[str, Any]]:
  """Feature recovery per SAE type from `analysis.summarise` output.

  Args:
    features: `{"columns": [...], "variants": {id: summary}}`.
    types: variant id -> SAE type.

  Returns:
    type -> `{"variants": [ids], "mean_best_abs_corr": {column: mean over the type's variants
    of the best |corr|}, "mean_matching_score", "best_variant" (highest matching score),
    "matching_score" (of it), "best_latents": {column: {"latent", "corr"}} (of it),
    "labels_ge_0.8": [columns with best |corr| >= 0.8 in it]}`.
  """
  if not isinstance(features, Mapping) or "variants" not in features:
    raise ValueError("features must be analysis.summarise(...) output: a dict with 'columns' "
                     "and 'variants'.")
  names = [c["name"] for c in features.get("columns") or []]
  by_type: dict[str, list[str]] = {}
  for vid in sorted(features["variants"]):
    if vid not in types:
      raise ValueError(f"features has variant {vid!r}, which is not in the run's summary; pass "
                       "the analysis of the same sae workdir.")
    by_type.setdefault(types[vid], []).append(vid)
  out = {}
  for t in sorted(by_type, key=type_sort_key):
    ids = by_type[t]
    fv = [features["variants"][i] for i in ids]
    names_t = names or sorted(fv[0].get("labels", {}))
    mean_abs = {}
    for n in names_t:
      vals = [abs(as_float(v["labels"][n]["corr"])) for v in fv
              if n in v.get("labels", {}) and is_finite(v["labels"][n]["corr"])]
      mean_abs[n] = float(np.mean(vals)) if vals else math.nan
    scores = [(as_float(v.get("matching_score")), i) for v, i in zip(fv, ids)]
    finite_scores = [(s, i) for (s, i), v in zip(scores, fv)
                     if s is not None and math.isfinite(s) and v.get("finite", True)]
    best_id = max(finite_scores)[1] if finite_scores else ids[0]
    best = features["variants"][best_id]
    best_latents = {n: {"latent": best["labels"][n]["latent"],
                        "corr": as_float(best["labels"][n]["corr"])}
                    for n in names_t if n in best.get("labels", {})}
    out[t] = {
        "variants": ids, "mean_best_abs_corr": mean_abs,
        "mean_matching_score": (float(np.mean([s for s, _ in finite_scores]))
                                if finite_scores else math.nan),
        "best_variant": best_id, "matching_score": as_float(best.get("matching_score")),
        "best_latents": best_latents,
        "labels_ge_0.8": [n for n, b in best_latents.items()
                          if is_finite(b["corr"]) and abs(b["corr"]) >= STRONG_CORR]}
  return out


# ------------------------------------------------------------------------------------------------
# Causal predictability per type, and what it costs.

_CAUSAL_PREFIX = "causal-"
_COST_METRICS = ("nmse", "ev_token_mean", "ce_increase", "grammaticality")


def _mean_finite(values: Sequence[Any]) -> float | None:
  vs = [as_float(v) for v in values if is_finite(v)]
  return float(np.mean(vs)) if vs else None


def _median_finite(values: Sequence[Any]) -> float | None:
  vs = [as_float(v) for v in values if is_finite(v)]
  return float(np.median(vs)) if vs else None


def causal_by_type(causal: Mapping[str, Mapping[str, Any]], rows: Sequence[Mapping[str, Any]]
                   ) -> dict[str, dict[str, Any]]:
  """Causal predictability per SAE type, next to what the type costs in fidelity.

  Args:
    causal: variant id -> `causality.causal_predictability(...)` output (its
      `fraction_as_predicted` and `mean_effect` are used).
    rows: every variant of the run, as `report.json`'s `variants` (`id`, `type`, `frozen`,
      `nmse`, `ev_token_mean`, `ce_increase`, `grammaticality` (the headline spliced
      grammaticality); missing metrics count as missing values).

  Returns:
    SAE type -> `{"n_saes" (SAEs with causal results), "ids", "fraction_as_predicted" and
    "mean_effect" (means over those SAEs of the finite values), "n_pairs" and
    "n_pairs_as_predicted" and "n_null_too_small" (strong pairs whose label had too few
    unrelated latents for the test; summed over them), "pooled_fraction" (`stats.fraction` of
    those: a Wilson interval; None without pairs), "pooled_mean_effect" (`stats.mean_se` of
    the tested pairs' signed effects; None without pairs), "n_variants" (the type's live
    SAEs), "nmse", "ev_token_mean", "ce_increase", "grammaticality" (medians over the type's
    live SAEs of the finite values)}`, types in canonical order; a statistic without a finite
    value is None. Ids of `causal` that are not in `rows` are left out.

  Raises:
    ValueError: `causal` not a dict of results, or rows not a list of dicts with `id`/`type`.
  """
  if not isinstance(causal, Mapping) or not all(isinstance(c, Mapping)
                                                for c in causal.values()):
    raise ValueError("causal must map variant id -> causality.causal_predictability(...) "
                     "result dict (causal.json's 'variants').")
  if isinstance(rows, (Mapping, str)) or not all(isinstance(r, Mapping) and "id" in r
                                                 and "type" in r for r in rows):
    raise ValueError("rows must be a list of variant dicts with 'id' and 'type', as "
                     "report.json's 'variants'.")
  by_id = {r["id"]: r for r in rows}
  tested: dict[str, list[str]] = {}
  for vid in sorted(causal):
    if vid in by_id:
      tested.setdefault(by_id[vid]["type"], []).append(vid)
  out = {}
  for t in sorted(tested, key=type_sort_key):
    ids = tested[t]
    live = [r for r in rows if r["type"] == t and not r.get("frozen", False)]
    n_pairs = sum(int(causal[i].get("n_tested") or 0) for i in ids)
    n_small = sum(int(causal[i].get("n_null_too_small") or 0) for i in ids)
    n_ok = sum(int(causal[i].get("n_as_predicted") or 0) for i in ids)
    effects = [as_float(p.get("signed_effect")) for i in ids for p in causal[i].get("pairs") or ()
               if is_finite(p.get("signed_effect"))]
    out[t] = {"n_saes": len(ids), "ids": ids,
              "fraction_as_predicted": _mean_finite(
                  [causal[i].get("fraction_as_predicted") for i in ids]),
              "mean_effect": _mean_finite([causal[i].get("mean_effect") for i in ids]),
              "n_pairs": n_pairs, "n_pairs_as_predicted": n_ok, "n_null_too_small": n_small,
              "pooled_fraction": stats.fraction(n_ok, n_pairs) if n_pairs else None,
              "pooled_mean_effect": stats.mean_se(effects) if effects else None,
              "n_variants": len(live),
              **{m: _median_finite([r.get(m) for r in live]) for m in _COST_METRICS}}
  return out


def fidelity_metric(by_type: Mapping[str, Mapping[str, Any]]) -> str:
  """The reconstruction metric the causal summary shows: `nmse` when some type has one, else
  `ev_token_mean` (explained variance)."""
  return "nmse" if any(v.get("nmse") is not None for v in by_type.values()) else "ev_token_mean"


def pooled_fraction_text(v: Mapping[str, Any]) -> str:
  """"pooled 0.5 [0.24, 0.76] of 12 pairs" from a `causal_by_type` entry ("no pairs tested"
  without pairs)."""
  est = v.get("pooled_fraction")
  if not est:
    return "no pairs tested"
  return f"pooled {stats.format_estimate(est)} of {v['n_pairs']} pairs"


def causal_sentences(by_type: Mapping[str, Mapping[str, Any]]) -> list[str]:
  """Does the causal loss raise causal predictability, and what does it cost? One sentence per
  `causal-X` type whose base type `X` is also in `by_type` (`causal_by_type` output), e.g.
  "causal-topk SAEs: 0.81 of tested pairs act as predicted (pooled 0.81 [0.66, 0.9] of 42
  pairs) vs 0.74 (pooled 0.74 [0.59, 0.85] of 42 pairs) for topk; median CE increase 0.003 vs
  0.001, NMSE 0.05 vs 0.02, spliced grammaticality 0.97 vs 0.98." (3 significant digits,
  intervals to their resolution; '—' for a missing number)."""
  fid = fidelity_metric(by_type)
  fid_name = "NMSE" if fid == "nmse" else METRIC_NAMES[fid]
  lines = []
  for t in by_type:
    base = t[len(_CAUSAL_PREFIX):]
    if not t.startswith(_CAUSAL_PREFIX) or base not in by_type:
      continue
    c, b = ({k: format_number(v, 3) for k, v in by_type[n].items()} for n in (t, base))
    lines.append(
        f"{t} SAEs: {c['fraction_as_predicted']} of tested pairs act as predicted "
        f"({pooled_fraction_text(by_type[t])}) vs {b['fraction_as_predicted']} "
        f"({pooled_fraction_text(by_type[base])}) for {base}; median CE increase "
        f"{c['ce_increase']} vs {b['ce_increase']}, {fid_name} {c[fid]} vs "
        f"{b[fid]}, spliced grammaticality {c['grammaticality']} vs "
        f"{b['grammaticality']}.")
  return lines
