"""The report of a run: `report.md`, `report.json` and PNG plots from the jobs' JSON outputs.

`write_report` is called by the eval job and the pipeline; it only reads the dicts below (every
number in the report comes from them) and never touches a checkpoint. This module holds the
data logic (SAE types, Pareto fronts, the matched comparison, grids, feature recovery per type),
`write_report` and the markdown; the figures are drawn by `report_plots.py`.

Inputs (JSON-able dicts; metric values may be floats or the strings "nan" / "inf" / "-inf"):

- `summary`: the `sae` job's `summary.json` (`train_sae._summary`)::

      {"language", "site", "steps", "lm_step", "token_capacity",
       "variants": {id: {"group", "hparams": {every sweep field: loss, activation, expansion,
                                              k, sparsity_coeff, sparsity_reduction, causal,
                                              causal_coeff, ...},
                         "frozen": bool, "bad_step": int, "metrics": {final training metrics}}}}

- `eval_results`: the eval job's `eval.json` (`evaluate.evaluate_trained`)::

      {"language", "site", "steps", "heldout": {...}, "grammaticality_settings": {...} | None,
       "clean": {"ce_clean", "ce_zero_ablation", "ce_mean_ablation", "grammatical_mass_clean",
                 ["grammaticality", "grammaticality_std", ...]},
       "variants": {id: {"group", "frozen", "bad_step", "splice_mode", "hparams",
                         "l0", "alive", "dead", "ce_increase", "kl", "ce_recovered_zero",
                         "ce_recovered_mean", "ev_token_mean", ...,
                         "grammaticality/<mode>/<positions>", "grammaticality_std/<mode>/..."}}}

- `features` (optional): `analysis.summarise(...)` output, `{"columns": [{"name", "kind",
  "label"}], "variants": {id: {"labels": {column: {"latent", "corr", ...}}, "matching_score",
  "mean_best_abs_corr", "n_labels_corr_ge_0.8", ...}}}`, optionally with `"corr": {id:
  [F, K] array}` (correlations of chosen SAEs) for heatmaps, whose K columns are named by
  `"corr_columns"` (default: the `columns` names, in order).
- `causal` (optional): `{id: causality.causal_predictability(...) output}` (`n_strong`,
  `n_tested`, `n_as_predicted`, `fraction_as_predicted`, `mean_effect`, `median_effect`,
  `pairs`, `not_as_predicted`: [{"latent", "label", "corr", "signed_effect", ...}]).
- `lm` (optional): the LM job's `summary.json` (`grammatical_fraction`,
  `grammatical_fraction_std`, `eval_ce`, `grammatical_next_token_mass`, `steps`, ...).
- `meta` (optional): `{"commit", "machine", "date", "stage_seconds": {stage: seconds}}`.

SAE types (`sae_type`) colour the plots and group the comparisons. Frozen variants (training
hit a non-finite value) are listed but left out of Pareto fronts and matched comparisons; NaN
metrics are shown as "nan" and never plotted. Sections whose input is missing are replaced by
a one-line note.

The matched comparison (Braun et al.'s question): for every SAE of a non-reference type, the
reference type's L0 (or alive latents) at the same CE increase, linearly interpolated between
the two neighbouring points of the reference type's Pareto front (lower CE increase and lower
L0 are better); an SAE whose CE increase lies outside the front's range is flagged
`in_range: false` and gets no ratio (never extrapolated).
"""

from __future__ import annotations

import json
import math
import os
import re
from typing import Any, Mapping, Sequence

import numpy as np

# report_plots imports this module back (module docstring there); both resolve at call time.
from jaxsae import report_plots

REFERENCE = "local"
# Canonical order of the base types (plots, tables); unknown combinations sort after these.
_TYPE_ORDER = ("local", "e2e", "e2e_ds", "topk", "batchtopk", "jumprelu", "sparsemax_no_kds",
               "sparsemax_recon_dist", "sparsemax_dist")
_LOSSES = ("local", "e2e", "e2e_ds")
_ACTIVATIONS = ("relu", "topk", "batchtopk", "jumprelu", "sparsemax_no_kds",
                "sparsemax_recon_dist", "sparsemax_dist")
# evaluate.py's default generation combos, in its order: the first present is the headline.
_GRAM_COMBOS = ("corrected/all", "corrected/sentence", "original/all", "original/sentence")
_METRICS = ("l0", "alive", "dead", "ce_increase", "kl", "ce_recovered_zero", "ce_recovered_mean",
            "ev_token_mean", "ev_ratio_of_sums", "nmse", "top1_agreement",
            "grammatical_mass_spliced")
_NAMES = {"l0": "L0", "alive": "alive latents", "ce_increase": "CE increase",
          "grammaticality": "spliced grammaticality", "ev_token_mean": "explained variance"}
STRONG_CORR = 0.8  # "recovered" labels: best |corr| at least this


# ------------------------------------------------------------------------------------------------
# Numbers.


def _num(x: Any) -> float | None:
  """A float from a JSON value ("nan"/"inf" strings allowed); None when missing or not a number."""
  if x is None or isinstance(x, bool):
    return None if x is None else float(x)
  try:
    return float(x)
  except (TypeError, ValueError):
    return None


def _finite(x: Any) -> bool:
  v = _num(x)
  return v is not None and math.isfinite(v)


def _fmt(x: Any, digits: int = 4) -> str:
  """Markdown text of a number: 4 significant digits, ints as ints, '—' when missing."""
  if isinstance(x, (bool, np.bool_)):
    return "yes" if x else "no"
  if isinstance(x, (int, np.integer)):
    return str(int(x))
  v = _num(x)
  if v is None:
    return "—"
  if math.isnan(v):
    return "nan"
  if math.isinf(v):
    return "inf" if v > 0 else "-inf"
  if v == int(v) and abs(v) < 1e6:
    return str(int(v))
  return f"{v:.{digits}g}"


def _jsonable(x: Any) -> Any:
  """Plain JSON: NumPy to Python, non-finite floats to strings (as eval.json writes them)."""
  if isinstance(x, Mapping):
    return {str(k): _jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_jsonable(v) for v in x]
  if isinstance(x, np.ndarray):
    return _jsonable(x.tolist())
  if isinstance(x, (bool, np.bool_)):
    return bool(x)
  if isinstance(x, (int, np.integer)):
    return int(x)
  if isinstance(x, (float, np.floating)):
    return float(x) if math.isfinite(x) else str(float(x))
  return x


# ------------------------------------------------------------------------------------------------
# SAE types.


def sae_type(hparams: Mapping[str, Any]) -> str:
  """The SAE type of a variant, for colouring and grouping.

  Rule: a `local` loss gives the activation's name, except ReLU (+ L1), which is `local`
  (`topk`, `batchtopk`, `jumprelu`, `sparsemax_no_kds`, ...); an `e2e` / `e2e_ds` loss gives the
  loss name with ReLU (`e2e`, `e2e_ds`) and `<loss>_<activation>` otherwise (`e2e_topk`). A
  `causal-` prefix is added when `hparams["causal"]` is true. Missing fields take the sweep
  registry's defaults (loss `local`, activation `relu`, causal off).

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
                     "(or teach report.sae_type the new preset).")
  if act not in _ACTIVATIONS:
    raise ValueError(f"hparams['activation']={act!r} is unknown; use one of "
                     f"{', '.join(_ACTIVATIONS)} (or teach report.sae_type the new one).")
  if loss == "local":
    base = "local" if act == "relu" else act
  else:
    base = loss if act == "relu" else f"{loss}_{act}"
  return f"causal-{base}" if hparams.get("causal", False) else base


def _type_key(t: str) -> tuple:
  base = t[len("causal-"):] if t.startswith("causal-") else t
  rank = _TYPE_ORDER.index(base) if base in _TYPE_ORDER else len(_TYPE_ORDER)
  return (rank, base, t.startswith("causal-"))


# ------------------------------------------------------------------------------------------------
# Pareto fronts and the matched comparison.


def pareto_front(x: Any, y: Any, *, higher_x_better: bool = False,
                 higher_y_better: bool = False) -> np.ndarray:
  """Indices of the non-dominated points, ordered by increasing x.

  Point i is dominated when some j is at least as good in both coordinates and strictly better
  in one (lower is better unless `higher_*_better`). Non-finite points are never on the front;
  duplicated front points are all kept.

  Args:
    x, y: 1-D sequences of equal length.
    higher_x_better, higher_y_better: the direction of each coordinate.

  Returns:
    int64 indices into x / y.
  """
  x = np.asarray(x, np.float64)
  y = np.asarray(y, np.float64)
  if x.ndim != 1 or x.shape != y.shape:
    raise ValueError(f"pareto_front needs two 1-D arrays of equal length, got shapes {x.shape} "
                     f"and {y.shape}.")
  ok = np.isfinite(x) & np.isfinite(y)
  cx = -x if higher_x_better else x  # in "lower is better" coordinates
  cy = -y if higher_y_better else y
  le = (cx[None, :] <= cx[:, None]) & (cy[None, :] <= cy[:, None])  # [i, j]: j as good as i
  lt = (cx[None, :] < cx[:, None]) | (cy[None, :] < cy[:, None])
  dominated = np.any(le & lt & ok[None, :], axis=1)
  idx = np.nonzero(ok & ~dominated)[0]
  return idx[np.lexsort((y[idx], x[idx]))].astype(np.int64)


def _point_value(point: Mapping[str, Any], key: str, kind: str) -> float:
  if key not in point:
    raise ValueError(f"{kind} point {point.get('id', '?')!r} has no {key!r}; every point needs "
                     f"the compared metrics (keys of eval.json's variants).")
  v = _num(point[key])
  return math.nan if v is None else v


def matched_comparison(points_by_type: Mapping[str, Sequence[Mapping[str, Any]]],
                       x: str = "ce_increase", y: str = "l0",
                       reference: str = REFERENCE) -> dict[str, Any]:
  """Each non-reference SAE's y against the reference type's y at the same x.

  The reference y at x is the linear interpolation between the two neighbouring points of the
  reference type's Pareto front (lower x and lower y are better). An SAE whose x lies outside
  the front's x-range, or whose x or y is not finite, is flagged and gets no ratio.

  Args:
    points_by_type: SAE type -> points, each a mapping with `id` and the keys `x` and `y`
      (values may be "nan" strings).
    x, y: the metric names compared (e.g. `ce_increase` and `l0` or `alive`).
    reference: the type the others are measured against.

  Returns:
    `{"x", "y", "reference", "reference_front": [{"id", "x", "y"}], "points": [{"id", "type",
    "x", "y", "reference_y", "ratio", "in_range", "note"}], "by_type": {type: {"n" (points
    with finite x and y), "n_in_range" (of those, with a ratio), "median_ratio", "min_ratio",
    "max_ratio"}}, "note"}` (`note` is None unless the comparison could not be made at all).
  """
  if not isinstance(points_by_type, Mapping):
    raise ValueError("points_by_type must map SAE type -> list of points (dicts with 'id' and "
                     "the metrics).")
  out = {"x": x, "y": y, "reference": reference, "reference_front": [], "points": [],
         "by_type": {}, "note": None}
  ref = list(points_by_type.get(reference, ()))
  rx = np.array([_point_value(p, x, reference) for p in ref], np.float64)
  ry = np.array([_point_value(p, y, reference) for p in ref], np.float64)
  front = pareto_front(rx, ry) if ref else np.zeros((0,), np.int64)
  fx, fy = rx[front], ry[front]
  out["reference_front"] = [{"id": ref[i].get("id"), "x": float(rx[i]), "y": float(ry[i])}
                            for i in front]
  others = [t for t in sorted(points_by_type, key=_type_key) if t != reference]
  if not others:
    out["note"] = f"only {reference} SAEs: nothing to compare"
  elif not front.size:
    out["note"] = f"no {reference} SAE with finite {x} and {y}: nothing to compare with"
  for t in others:
    ratios, n = [], 0
    for p in points_by_type[t]:
      px, py = _point_value(p, x, t), _point_value(p, y, t)
      rec = {"id": p.get("id"), "type": t, "x": px, "y": py, "reference_y": None,
             "ratio": None, "in_range": False, "note": None}
      n += math.isfinite(px) and math.isfinite(py)
      if not (math.isfinite(px) and math.isfinite(py)):
        rec["note"] = "not finite"
      elif not front.size:
        rec["note"] = f"no {reference} front"
      elif not fx[0] <= px <= fx[-1]:
        rec["note"] = f"outside range [{fx[0]:.4g}, {fx[-1]:.4g}]"
      else:
        ref_y = float(np.interp(px, fx, fy))
        rec.update(reference_y=ref_y, in_range=True)
        if ref_y > 0:
          rec["ratio"] = py / ref_y
          ratios.append(rec["ratio"])
        else:
          rec["note"] = f"reference {y} is {ref_y:.4g}: no ratio"
      out["points"].append(rec)
    out["by_type"][t] = {
        "n": n, "n_in_range": len(ratios),
        "median_ratio": float(np.median(ratios)) if ratios else None,
        "min_ratio": float(np.min(ratios)) if ratios else None,
        "max_ratio": float(np.max(ratios)) if ratios else None}
  return out


def matched_sentences(result: Mapping[str, Any]) -> list[str]:
  """The matched comparison in words, one sentence per compared type (numbers from `result`)."""
  x_name, y_name = (_NAMES.get(result[k], result[k]) for k in ("x", "y"))
  ref = result["reference"]
  if result.get("note") and not result["by_type"]:
    return [f"No matched comparison of {y_name}: {result['note']}."]
  lines = []
  for t, agg in result["by_type"].items():
    if agg["median_ratio"] is None:
      front = result["reference_front"]
      why = result.get("note") or (
          f"no {t} SAE falls inside the {x_name} range [{_fmt(front[0]['x'])}, "
          f"{_fmt(front[-1]['x'])}] of the {ref} Pareto front; never extrapolated")
      lines.append(f"{t} vs {ref}, {y_name}: no matched comparison ({why}; "
                   f"{agg['n_in_range']} of {agg['n']} in range).")
    else:
      lines.append(f"{t} SAEs need a median {agg['median_ratio']:.2g}× the {y_name} of {ref} "
                   f"SAEs at the same {x_name} ({agg['n_in_range']} of {agg['n']} in range).")
  return lines


# ------------------------------------------------------------------------------------------------
# Menon-layout grids and feature recovery tables.


def _grid_row_field(t: str) -> str | None:
  base = t[len("causal-"):] if t.startswith("causal-") else t
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
    v = _num(r.get(metric, r.get("metrics", {}).get(metric)))
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
  for t in sorted(by_type, key=_type_key):
    ids = by_type[t]
    fv = [features["variants"][i] for i in ids]
    names_t = names or sorted(fv[0].get("labels", {}))
    mean_abs = {}
    for n in names_t:
      vals = [abs(_num(v["labels"][n]["corr"])) for v in fv
              if n in v.get("labels", {}) and _finite(v["labels"][n]["corr"])]
      mean_abs[n] = float(np.mean(vals)) if vals else math.nan
    scores = [(_num(v.get("matching_score")), i) for v, i in zip(fv, ids)]
    finite_scores = [(s, i) for (s, i), v in zip(scores, fv)
                     if s is not None and math.isfinite(s) and v.get("finite", True)]
    best_id = max(finite_scores)[1] if finite_scores else ids[0]
    best = features["variants"][best_id]
    best_latents = {n: {"latent": best["labels"][n]["latent"],
                        "corr": _num(best["labels"][n]["corr"])}
                    for n in names_t if n in best.get("labels", {})}
    out[t] = {
        "variants": ids, "mean_best_abs_corr": mean_abs,
        "mean_matching_score": (float(np.mean([s for s, _ in finite_scores]))
                                if finite_scores else math.nan),
        "best_variant": best_id, "matching_score": _num(best.get("matching_score")),
        "best_latents": best_latents,
        "labels_ge_0.8": [n for n, b in best_latents.items()
                          if _finite(b["corr"]) and abs(b["corr"]) >= STRONG_CORR]}
  return out


# ------------------------------------------------------------------------------------------------
# The report.


def _key_hparam(hp: Mapping[str, Any]) -> str:
  parts = [f"×{hp['expansion']}"] if "expansion" in hp else []
  if hp.get("activation") in ("topk", "batchtopk"):
    parts.append(f"k={_fmt(hp.get('k'))}")
  elif not str(hp.get("activation", "relu")).startswith("sparsemax"):
    sym = "α" if hp.get("sparsity_reduction") == "sum_batch" else "λ"
    parts.append(f"{sym}={_fmt(hp.get('sparsity_coeff'))}")
  if hp.get("causal"):
    parts.append(f"β={_fmt(hp.get('causal_coeff'))}")
  return " ".join(parts)


def _variant_rows(summary, eval_results, combo: str | None) -> list[dict[str, Any]]:
  ev = eval_results["variants"]
  rows = []
  for vid in sorted(set(summary["variants"]) | set(ev)):
    s, e = summary["variants"].get(vid, {}), ev.get(vid, {})
    hp = dict(s.get("hparams") or e.get("hparams") or {})
    row = {"id": vid, "type": sae_type(hp), "group": s.get("group", e.get("group")),
           "key_hparam": _key_hparam(hp), "hparams": hp,
           "frozen": bool(s.get("frozen", e.get("frozen", False))),
           "bad_step": s.get("bad_step", e.get("bad_step", -1)), "evaluated": vid in ev}
    for m in _METRICS:
      row[m] = _num(e.get(m))
    row["grammaticality"] = _num(e.get(f"grammaticality/{combo}")) if combo else None
    row["grammaticality_std"] = _num(e.get(f"grammaticality_std/{combo}")) if combo else None
    row["grammaticality_by_combo"] = {
        k.split("/", 1)[1]: {"mean": _num(v), "std": _num(e.get(f"grammaticality_std/"
                                                                 f"{k.split('/', 1)[1]}"))}
        for k, v in e.items() if k.startswith("grammaticality/")}
    row["training_metrics"] = dict(s.get("metrics", {}))
    rows.append(row)
  return rows


def _combos(eval_results) -> list[str]:
  found = {k.split("/", 1)[1] for v in eval_results["variants"].values() for k in v
           if k.startswith("grammaticality/")}
  return [c for c in _GRAM_COMBOS if c in found] + sorted(found - set(_GRAM_COMBOS))


def _check_inputs(summary, eval_results) -> None:
  for name, d in (("summary", summary), ("eval_results", eval_results)):
    if not isinstance(d, Mapping) or not isinstance(d.get("variants"), Mapping):
      raise ValueError(f"{name} must be a dict with a 'variants' dict ({name} is the "
                       f"{'sae job summary.json' if name == 'summary' else 'eval job eval.json'}"
                       ").")
  extra = sorted(set(eval_results["variants"]) - set(summary["variants"]))
  if extra:
    raise ValueError(f"eval_results has variants {extra[:5]} that the summary does not; pass the "
                     "eval.json of the same sae workdir.")
  for k in ("language", "site"):
    a, b = summary.get(k), eval_results.get(k)
    if a is not None and b is not None and a != b:
      raise ValueError(f"summary {k}={a!r} but eval_results {k}={b!r}: they come from different "
                       "runs; pass the eval.json of the same sae workdir.")


def _points(rows, *metrics) -> dict[str, list[dict[str, Any]]]:
  out: dict[str, list[dict[str, Any]]] = {}
  for r in rows:
    out.setdefault(r["type"], []).append(
        {"id": r["id"], "frozen": r["frozen"], **{m: r[m] for m in metrics}})
  return out


def _md_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
  cell = lambda v: v if isinstance(v, str) else _fmt(v)
  lines = ["| " + " | ".join(h.replace("|", "\\|") for h in headers) + " |",
           "|" + "---|" * len(headers)]
  lines += ["| " + " | ".join(cell(v).replace("|", "\\|") for v in r) + " |" for r in rows]
  return lines + [""]


def _pm(mean, std) -> str:
  return f"{_fmt(mean)} ± {_fmt(std)}" if std is not None else _fmt(mean)


def _safe(name: str) -> str:
  return re.sub(r"[^A-Za-z0-9_.-]+", "_", str(name))


def _corr_names(features: Mapping[str, Any] | None) -> list[str]:
  features = features or {}
  if features.get("corr_columns") is not None:
    return [str(n) for n in features["corr_columns"]]
  return [c["name"] for c in features.get("columns") or []]


def write_report(out_dir: str, *, summary: Mapping[str, Any], eval_results: Mapping[str, Any],
                 features: Mapping[str, Any] | None = None,
                 causal: Mapping[str, Any] | None = None, lm: Mapping[str, Any] | None = None,
                 meta: Mapping[str, Any] | None = None, grammaticality: str | None = None,
                 top_corr_latents: int = 16) -> dict[str, str]:
  """Writes `report.md`, `report.json` and the PNG plots (linked relatively) into `out_dir`.

  Args:
    out_dir: directory (created if needed).
    summary, eval_results, features, causal, lm, meta: see the module docstring.
    grammaticality: the `<mode>/<positions>` generation combo of the headline spliced
      grammaticality (default: the first of corrected/all, corrected/sentence, original/all,
      original/sentence that eval.json has); every combo is listed in its own table.
    top_corr_latents: latents shown in each correlation heatmap.

  Returns:
    name -> path of every file written (`report.md`, `report.json`, one per plot).
  """
  _check_inputs(summary, eval_results)
  combos = _combos(eval_results)
  if grammaticality is not None and grammaticality not in combos:
    raise ValueError(f"grammaticality={grammaticality!r} is not in eval_results; it has "
                     f"{combos or 'no spliced grammaticality (grammaticality_batches=0)'}.")
  combo = grammaticality or (combos[0] if combos else None)
  corr_names = _corr_names(features)
  for vid, corr in ((features or {}).get("corr") or {}).items():
    if np.ndim(corr) != 2 or np.shape(corr)[1] != len(corr_names):
      raise ValueError(f"features['corr'][{vid!r}] has shape {np.shape(corr)}; it must be "
                       f"[F, K={len(corr_names)}], one column per name of "
                       "features['corr_columns'] (default: features['columns']).")
  os.makedirs(out_dir, exist_ok=True)
  paths: dict[str, str] = {}
  plots: dict[str, str] = {}  # name -> path relative to out_dir

  def plot(name: str, fn, *args, **kwargs) -> None:
    rel = f"{name}.png"
    paths[name] = fn(os.path.join(out_dir, rel), *args, **kwargs)
    plots[name] = rel

  rows = _variant_rows(summary, eval_results, combo)
  types = {r["id"]: r["type"] for r in rows}
  clean_e = dict(eval_results.get("clean") or {})
  notes: list[str] = []
  rep: dict[str, Any] = {"notes": notes}
  rep["run"] = {"language": summary.get("language", eval_results.get("language")),
                "site": summary.get("site", eval_results.get("site")),
                "steps": summary.get("steps"), "lm_step": summary.get("lm_step"),
                "n_variants": len(rows), "n_groups": len({r["group"] for r in rows}),
                "n_frozen": sum(r["frozen"] for r in rows),
                "types": sorted(set(types.values()), key=_type_key)}
  rep["meta"] = dict(meta) if meta else None
  rep["clean"] = {"eval": {k: _num(clean_e.get(k)) for k in (
      "grammaticality", "grammaticality_std", "ce_clean", "grammatical_mass_clean",
      "ce_zero_ablation", "ce_mean_ablation")}}
  if lm:
    rep["clean"]["lm"] = {k: _num(lm.get(k)) for k in (
        "grammatical_fraction", "grammatical_fraction_std", "eval_ce",
        "grammatical_next_token_mass", "steps")}
  rep["grammaticality_combo"] = combo
  rep["grammaticality_combos"] = combos
  rep["variants"] = rows

  # Trade-offs and the matched comparison (frozen variants left out).
  live = [r for r in rows if not r["frozen"]]
  rep["matched"] = {y: matched_comparison(_points(live, "ce_increase", y), "ce_increase", y)
                    for y in ("l0", "alive")}
  rep["matched_text"] = {y: matched_sentences(m) for y, m in rep["matched"].items()}
  has = lambda m: any(_finite(r[m]) for r in rows)
  if has("l0") and has("ce_increase"):
    plot("l0_vs_ce", report_plots.plot_l0_vs_ce, _points(rows, "l0", "ce_increase"))
  if has("alive") and has("ce_increase"):
    plot("alive_vs_ce", report_plots.plot_alive_vs_ce, _points(rows, "alive", "ce_increase"))
  if has("l0") and has("grammaticality"):
    plot("l0_vs_grammaticality", report_plots.plot_l0_vs_grammaticality,
         _points(rows, "l0", "grammaticality"), clean_e.get("grammaticality"))

  # Menon-layout grids.
  rep["grids"] = {}
  for metric in ("grammaticality", "ev_token_mean"):
    grids = {}
    for t in rep["run"]["types"]:
      g = grid_table([r for r in rows if r["type"] == t], metric, row_field=_grid_row_field(t))
      if g is not None:
        grids[t] = g
    if grids:
      rep["grids"][metric] = grids
      plot(f"grid_{metric}", report_plots.plot_grids, grids, _NAMES.get(metric, metric),
           **({"vmin": 0.0, "vmax": 1.0} if metric == "grammaticality" else {}))

  # Feature recovery and correlation heatmaps.
  rep["feature_recovery"] = None
  if features:
    rec = feature_recovery(features, types)
    rep["feature_recovery"] = {
        "by_type": rec,
        "per_variant": {vid: {k: v.get(k) for k in ("matching_score", "mean_best_abs_corr",
                                                    "n_labels_corr_ge_0.8", "dead_latents")}
                        for vid, v in sorted(features["variants"].items())},
        "heatmaps": {}}
    if rec:
      plot("feature_recovery", report_plots.plot_feature_recovery, rec)
    for vid, corr in sorted((features.get("corr") or {}).items()):
      corr = np.asarray(corr, np.float64)
      plot(f"corr_{_safe(vid)}", report_plots.plot_correlation, corr, corr_names,
           top=top_corr_latents, title=f"{vid} ({types.get(vid, '?')})")
      lat = report_plots.top_latents(corr, top_corr_latents)
      rep["feature_recovery"]["heatmaps"][vid] = {
          "latents": lat, "max_abs_corr": np.abs(np.nan_to_num(corr[lat])).max(axis=1)}
  else:
    notes.append("feature recovery: no `features` input (run analysis.summarise).")
  if not features or not features.get("corr"):
    notes.append("correlation heatmaps: no correlation matrices given (`features['corr']`).")

  # Causal predictability.
  rep["causal"] = None
  if causal:
    rep["causal"] = {vid: {"type": types.get(vid), **{k: c.get(k) for k in (
        "threshold", "n_strong", "n_testable", "n_tested", "n_as_predicted",
        "fraction_as_predicted", "mean_effect", "median_effect")},
        "not_as_predicted": [{k: p.get(k) for k in ("latent", "label", "corr", "signed_effect")}
                             for p in c.get("not_as_predicted", [])]}
        for vid, c in sorted(causal.items())}
  else:
    notes.append("causal predictability: no `causal` input (run "
                 "causality.causal_predictability).")
  if not meta:
    notes.append("run metadata: no `meta` input (commit, machine, date, stage times).")
  if not lm:
    notes.append("LM job summary: no `lm` input.")
  missing = [r["id"] for r in rows if not r["evaluated"]]
  if missing:
    notes.append(f"not in eval_results (shown as —): {', '.join(missing)}.")
  if combo is None:
    notes.append("spliced grammaticality: eval.json has none (grammaticality_batches=0).")
  rep["plots"] = plots

  md_path = os.path.join(out_dir, "report.md")
  with open(md_path, "w") as f:
    f.write("\n".join(_render(rep)) + "\n")
  json_path = os.path.join(out_dir, "report.json")
  with open(f"{json_path}.tmp", "w") as f:
    json.dump(_jsonable(rep), f, indent=1)
  os.replace(f"{json_path}.tmp", json_path)
  return {"report.md": md_path, "report.json": json_path, **paths}


def _render(rep: Mapping[str, Any]) -> list[str]:
  """report.md lines from the report dict (the single source of every number)."""
  run, meta, plots = rep["run"], rep["meta"], rep["plots"]
  img = lambda name, alt: [f"![{alt}]({plots[name]})", ""] if name in plots else []
  out = [f"# SAE report: {run['language']} at {run['site']}", ""]

  out += ["## Run", ""]
  out += [f"- language: {run['language']}", f"- site: {run['site']}",
          f"- SAE steps: {_fmt(run['steps'])}; LM step: {_fmt(run['lm_step'])}",
          f"- variants: {run['n_variants']} in {run['n_groups']} groups, {run['n_frozen']} "
          f"frozen; types: {', '.join(run['types'])}"]
  if meta:
    out += [f"- commit: {meta.get('commit', '—')}", f"- machine: {meta.get('machine', '—')}",
            f"- date: {meta.get('date', '—')}", ""]
    stages = meta.get("stage_seconds") or {}
    if stages:
      out += _md_table(["stage", "seconds"], [[k, _num(v)] for k, v in stages.items()])
  else:
    out += ["", "_Run metadata (commit, machine, date, stage times) not given._", ""]

  out += ["## Clean model", ""]
  ce, cl = rep["clean"]["eval"], rep["clean"].get("lm")
  table = [["eval job (held-out)", _pm(ce["grammaticality"], ce["grammaticality_std"]),
            ce["ce_clean"], ce["grammatical_mass_clean"]]]
  if cl:
    table.append(["LM job", _pm(cl["grammatical_fraction"], cl["grammatical_fraction_std"]),
                  cl["eval_ce"], cl["grammatical_next_token_mass"]])
  out += _md_table(["source", "grammaticality (mean ± std)", "CE (nats)", "grammatical mass"],
                   table)
  out += [f"Zero-ablation CE {_fmt(ce['ce_zero_ablation'])}, mean-ablation CE "
          f"{_fmt(ce['ce_mean_ablation'])} (the baselines of CE recovered).", ""]
  if not cl:
    out += ["_LM job summary not given._", ""]

  out += ["## Variants", ""]
  clean_g = ce["grammaticality"]
  combo = rep["grammaticality_combo"]
  out += [f"Spliced grammaticality: generation combo `{combo}` (mode/positions); CE recovered "
          "against zero ablation; EV = token-mean explained variance.", ""]
  out += _md_table(
      ["id", "type", "key hparams", "L0", "alive", "CE increase", "KL", "CE recovered", "EV",
       "spliced gram.", "clean gram.", "frozen"],
      [[r["id"], r["type"], r["key_hparam"], r["l0"], r["alive"], r["ce_increase"], r["kl"],
        r["ce_recovered_zero"], r["ev_token_mean"],
        _pm(r["grammaticality"], r["grammaticality_std"]), clean_g,
        f"FROZEN (step {r['bad_step']})" if r["frozen"] else ""] for r in rep["variants"]])
  if len(rep["grammaticality_combos"]) > 1:
    cs = rep["grammaticality_combos"]
    out += ["Spliced grammaticality by splice mode / positions:", ""]
    out += _md_table(["id"] + cs, [[r["id"]] + [
        r["grammaticality_by_combo"].get(c, {}).get("mean") for c in cs] for r in rep["variants"]])
  out += img("l0_vs_grammaticality", "spliced grammaticality vs L0")

  out += ["## e2e vs local at matched CE increase", ""]
  for y in ("l0", "alive"):
    out += [f"- {s}" for s in rep["matched_text"][y]]
  out += [""]
  for y, m in rep["matched"].items():
    pts = m["points"]
    if pts:
      out += [f"Per SAE ({_NAMES[y]}; reference = {m['reference']} Pareto front, "
              f"{len(m['reference_front'])} points):", ""]
      out += _md_table(["id", "type", "CE increase", _NAMES[y], f"{m['reference']} at same CE",
                        "ratio", "note"],
                       [[p["id"], p["type"], p["x"], p["y"], p["reference_y"], p["ratio"],
                         p["note"] or ""] for p in pts])
  out += ["Frozen variants are left out of the comparison.", ""]
  out += img("l0_vs_ce", "CE increase vs L0") + img("alive_vs_ce", "CE increase vs alive")

  out += ["## Grid (Menon layout)", ""]
  if rep["grids"]:
    for metric, grids in rep["grids"].items():
      for t, g in grids.items():
        out += [f"{_NAMES.get(metric, metric)}, {t} (rows {g['row_field'] or '—'}, columns "
                f"{g['col_field']}):", ""]
        out += _md_table([g["row_field"] or ""] + [_fmt(c) for c in g["cols"]],
                         [[v if isinstance(v, str) else _fmt(v)] + list(vals)
                          for v, vals in zip(g["rows"], g["values"])])
      out += img(f"grid_{metric}", f"grid of {metric}")
  else:
    out += ["_No SAE type spans a k/α × expansion grid in this run._", ""]

  out += ["## Feature recovery", ""]
  fr = rep["feature_recovery"]
  if fr:
    for t, r in fr["by_type"].items():
      out += [f"### {t}", "",
              f"Best SAE {r['best_variant']} (matching score {_fmt(r['matching_score'])}; mean "
              f"over the type's {len(r['variants'])} SAEs {_fmt(r['mean_matching_score'])}). "
              f"Labels with |corr| ≥ {STRONG_CORR}: "
              f"{', '.join(r['labels_ge_0.8']) or 'none'}.", ""]
      out += _md_table(["label", "best latent", "corr", "type mean best |corr|"],
                       [[n, b["latent"], b["corr"], r["mean_best_abs_corr"].get(n)]
                        for n, b in r["best_latents"].items()])
    out += _md_table(["id", "matching score", "mean best |corr|", "labels ≥ 0.8", "dead"],
                     [[vid, v["matching_score"], v["mean_best_abs_corr"],
                       v["n_labels_corr_ge_0.8"], v["dead_latents"]]
                      for vid, v in fr["per_variant"].items()])
    out += img("feature_recovery", "feature recovery")
    for vid in fr["heatmaps"]:
      out += img(f"corr_{_safe(vid)}", f"correlations of {vid}")
  else:
    out += ["_Not computed for this run (no `features` input)._", ""]

  out += ["## Causal predictability", ""]
  cz = rep["causal"]
  if cz:
    out += _md_table(["id", "type", "strong pairs", "tested", "as predicted", "fraction",
                      "mean effect"],
                     [[vid, c["type"], c["n_strong"], c["n_tested"], c["n_as_predicted"],
                       c["fraction_as_predicted"], c["mean_effect"]] for vid, c in cz.items()])
    for vid, c in cz.items():
      bad = c["not_as_predicted"]
      if bad:
        out += [f"{vid}: pairs not acting as predicted:", ""]
        out += _md_table(["latent", "label", "corr", "signed effect"],
                         [[p["latent"], p["label"], p["corr"], p["signed_effect"]] for p in bad])
  else:
    out += ["_Not computed for this run (no `causal` input)._", ""]

  if rep["notes"]:
    out += ["## Notes", ""] + [f"- {n}" for n in rep["notes"]]
  return out
