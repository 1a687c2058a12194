"""The benchmark's cross-language leaderboard: SAE types ranked per language and metric at
matched CE increase and at matched L0, from finished runs' `report.json`.

Command (each WORKDIR a finished pipeline / study workdir holding `report.json`)::

    python -m experiments.leaderboard --out=DIR WORKDIR [WORKDIR ...]

writes `leaderboard.md`, `leaderboard.json` and, per language, `pareto_<language>.png` (each
metric against CE increase, one line per SAE type) and `heatmap_<language>.png` (types ×
metrics at the middle reference CE increase). Everything here is a pure function of the
report dicts; `leaderboard_output.write` renders and writes the files.

Definitions:

- *Metrics* (`METRICS`): from report.json's `ground_truth.variants` the MCC, the matched
  latents' F1, pooled absorption and mean hedging (both lower is better) and the 1- and 5-sparse
  probes' accuracy minus the same probes on the raw activations; from `causal` the fraction of
  strong latents whose intervention acts as predicted (where the run tested causality). Each
  per-SAE value comes with its within-SAE interval (the estimate's lo / hi, or the Wilson
  interval of the fraction).
- *Curves.* Per language, SAE type, axis (`ce_increase` or `l0`) and metric: the type's live
  (not frozen) SAEs with a finite axis value and metric, seeds pooled into configurations
  (`matched.seed_configs`; x and y are seed means), ordered by x. This is every configuration,
  not the type's Pareto front: the ranked metric is not a cost, and keeping only its
  non-dominated points would select on the quantity being ranked.
- *Reading a curve at x* uses `matched.interpolate_front`'s coverage rule: linear in log x
  between neighbouring configurations at most `matched.MAX_GAP_FACTOR`× apart (both x > 0), the
  value itself on a configuration, "not covered" otherwise. Never extrapolated.
- *Reference points* per language and axis: the quartiles (`QUANTILES`) of the configurations'
  x values (all types pooled) inside the range every type spans ([max of the types' smallest x,
  min of their largest x]); when that range holds no configuration, the quartiles of all
  positive x values, noted as such.
- *Intervals* at a reference point: with several seeds somewhere in the type, the percentile
  bootstrap over seeds (each resample redraws every configuration's seeds with replacement,
  re-sorts and re-reads the curve; given only when at least the confidence level of resamples
  are covered). With one seed per configuration, the within-SAE intervals of the two neighbours
  interpolated with the same weights (a conservative bound for independent errors).
- *Ranks* at a reference point: a type's rank is 1 + the number of types whose interval lies
  entirely on the better side of its own. Types whose intervals overlap are "not
  distinguishable" and may share a rank (`2=`); a type without an interval gets no rank.
- *Measured once.* A metric that no type has on two configurations (e.g. causality tested on
  one SAE per type) has no curve to read: it is listed per SAE with its L0 and CE increase
  (`measured_once`), neither interpolated nor ranked, since those SAEs sit at different costs.
"""

from __future__ import annotations

import math
import os
from typing import Any, Mapping, Sequence

import numpy as np

from jaxsae.analysis import comparison
from jaxsae.analysis import matched
from jaxsae.core import stats

# name -> (display name, higher is better)
METRICS = {"mcc": ("MCC", True), "f1": ("matched F1", True),
           "absorption": ("absorption", False), "hedging": ("hedging", False),
           "probe_k1_minus_raw": ("1-sparse probe − raw", True),
           "probe_k5_minus_raw": ("5-sparse probe − raw", True),
           "causal_fraction": ("causal fraction", True)}
AXES = {"ce_increase": "CE increase", "l0": "L0"}
QUANTILES = (0.25, 0.5, 0.75)
NOT_COVERED = "not covered"


# ------------------------------------------------------------------------------------------------
# Per-SAE values.


def _estimate(v: Any) -> tuple[float, float, float]:
  """(value, lo, hi) of an estimate dict or a bare number; NaN where missing."""
  if isinstance(v, Mapping):
    out = [comparison.as_float(v.get(k)) for k in ("value", "lo", "hi")]
  else:
    out = [comparison.as_float(v), None, None]
  return tuple(math.nan if x is None else x for x in out)


def sae_points(report: Mapping[str, Any]) -> list[dict[str, Any]]:
  """Report.json's live variants as `{"id", "type", "hparams", "ce_increase", "l0", "metrics":
  {metric: (value, lo, hi)}}` (metrics the report has for that variant only).

  Raises:
    ValueError: `report` is not a report.json dict (no `variants` list).
  """
  if not isinstance(report, Mapping) or not isinstance(report.get("variants"), list):
    raise ValueError("a leaderboard input must be a report.json dict with a 'variants' list "
                     "(the pipeline's report stage writes it: rerun the pipeline's workdir).")
  ground = {g["id"]: g for g in ((report.get("ground_truth") or {}).get("variants") or [])}
  causal = report.get("causal") or {}
  out = []
  for r in report["variants"]:
    if r.get("frozen"):
      continue
    ms = {}
    g = ground.get(r["id"]) or {}
    for m in METRICS:
      if m in g and g[m] is not None:
        ms[m] = _estimate(g[m])
    c = causal.get(r["id"])
    if c and c.get("fraction_as_predicted") is not None:
      lo, hi = c.get("fraction_as_predicted_interval") or (None, None)
      ms["causal_fraction"] = _estimate({"value": c["fraction_as_predicted"], "lo": lo,
                                         "hi": hi})
    out.append({"id": r["id"], "type": r.get("type") or comparison.sae_type(r["hparams"]),
                "hparams": r.get("hparams") or {},
                **{a: comparison.as_float(r.get(a)) for a in AXES}, "metrics": ms})
  return out


# ------------------------------------------------------------------------------------------------
# Curves and reading them.


def curves(points: Sequence[Mapping[str, Any]], axis: str, metric: str
           ) -> dict[str, list[dict[str, Any]]]:
  """SAE type -> its configurations with finite `axis` and `metric`, ordered by x: `{"ids",
  "n_seeds", "x", "y" (seed means), "x_se", "y_se" (SE over seeds, NaN with one), "lo", "hi"
  (the within-SAE interval with one seed, else NaN), "xs", "ys" (per seed)}`."""
  configs = matched.seed_configs(points)
  groups: dict[str, dict[str, list]] = {}
  for p in points:
    x = p.get(axis)
    if metric not in p["metrics"] or x is None or not math.isfinite(x):
      continue
    y, lo, hi = p["metrics"][metric]
    if not math.isfinite(y):
      continue
    g = groups.setdefault(configs[p["id"]], {"type": p["type"], "rows": []})
    g["rows"].append((p["id"], x, y, lo, hi))
  out: dict[str, list[dict[str, Any]]] = {}
  for g in groups.values():
    ids, xs, ys, los, his = (list(c) for c in zip(*g["rows"]))
    one = len(ids) == 1
    out.setdefault(g["type"], []).append({
        "ids": ids, "n_seeds": len(ids), "x": float(np.mean(xs)), "y": float(np.mean(ys)),
        "x_se": stats.mean_se(xs)["se"], "y_se": stats.mean_se(ys)["se"],
        "lo": los[0] if one else math.nan, "hi": his[0] if one else math.nan,
        "xs": [float(v) for v in xs], "ys": [float(v) for v in ys]})
  for t in out:
    out[t].sort(key=lambda c: (c["x"], c["ids"][0]))
  return {t: out[t] for t in sorted(out, key=comparison.type_sort_key)}


def reference_points(curves_by_type: Mapping[str, Sequence[Mapping[str, Any]]],
                     quantiles: Sequence[float] = QUANTILES) -> tuple[list[float], str]:
  """The reference x values of one axis and how they were chosen (module docstring).

  Args:
    curves_by_type: type -> configurations (`curves`), e.g. of every type's SAEs.
    quantiles: fractions in [0, 1].

  Returns:
    (sorted distinct reference points, a sentence on how they were chosen); ([], why) when no
    configuration has a positive x.
  """
  if not all(0 <= q <= 1 for q in quantiles):
    raise ValueError(f"quantiles={list(quantiles)} must lie in [0, 1] (e.g. 0.25, 0.5, 0.75).")
  xs = {t: np.array([c["x"] for c in cs if c["x"] > 0]) for t, cs in curves_by_type.items()}
  xs = {t: v for t, v in xs.items() if v.size}
  if not xs:
    return [], "no configuration with a positive value"
  pooled = np.sort(np.concatenate(list(xs.values())))
  lo = max(float(v.min()) for v in xs.values())
  hi = min(float(v.max()) for v in xs.values())
  inside = pooled[(pooled >= lo) & (pooled <= hi)]
  qs = ", ".join(f"{q:g}" for q in quantiles)
  if inside.size:
    pts, how = inside, (f"quantiles {qs} of the {inside.size} configurations inside the range "
                        f"all {len(xs)} types span [{lo:.3g}, {hi:.3g}]")
  else:
    pts, how = pooled, (f"quantiles {qs} of all {pooled.size} configurations (no range common "
                        f"to all {len(xs)} types)")
  return sorted({float(v) for v in np.quantile(pts, list(quantiles))}), how


def _read(xs, ys, x, max_gap_factor):
  order = np.argsort(xs, kind="stable")
  return matched.interpolate_front(x, np.asarray(xs)[order], np.asarray(ys)[order],
                                   max_gap_factor=max_gap_factor)


def read_curve(curve: Sequence[Mapping[str, Any]], x: float, *,
               max_gap_factor: float = matched.MAX_GAP_FACTOR, n_boot: int = stats.N_BOOT,
               confidence: float = stats.CONFIDENCE, rng: np.random.Generator | None = None
               ) -> dict[str, Any]:
  """One type's metric at `x` with its interval (module docstring).

  Returns:
    `{"x", "value", "lo", "hi", "method", "covered", "note"}`; value/lo/hi are None when not
    covered, lo/hi None when there is no interval (`note` says why).
  """
  out = {"x": float(x), "value": None, "lo": None, "hi": None, "method": None,
         "covered": False, "note": None}
  cx = [c["x"] for c in curve]
  value, why = _read(cx, [c["y"] for c in curve], x, max_gap_factor)
  if value is None:
    out["note"] = f"{NOT_COVERED}: {why}" if not why.startswith(NOT_COVERED) else why
    return out
  out.update(value=value, covered=True)
  if max((c["n_seeds"] for c in curve), default=0) > 1:
    rng = rng if rng is not None else np.random.default_rng(0)
    means = []  # per configuration: [n_boot] resampled x and y means
    for c in curve:
      n = c["n_seeds"]
      pick = rng.integers(0, n, (n_boot, n))
      means.append((np.asarray(c["xs"])[pick].mean(1), np.asarray(c["ys"])[pick].mean(1)))
    boot = np.full(n_boot, math.nan)
    for b in range(n_boot):
      v, _ = _read([m[0][b] for m in means], [m[1][b] for m in means], x, max_gap_factor)
      boot[b] = math.nan if v is None else v
    ok = np.isfinite(boot)
    out["method"] = f"percentile bootstrap over seeds ({n_boot} resamples)"
    if ok.mean() < confidence:
      out["note"] = f"coverage unstable over seeds ({ok.mean():.0%} of resamples): no interval"
    else:
      lo, hi = np.quantile(boot[ok], [(1 - confidence) / 2, (1 + confidence) / 2])
      out.update(lo=float(lo), hi=float(hi))
    return out
  lo, _ = _read(cx, [c["lo"] for c in curve], x, max_gap_factor)
  hi, _ = _read(cx, [c["hi"] for c in curve], x, max_gap_factor)
  out["method"] = "within-SAE interval, interpolated (one seed)"
  if lo is None or hi is None or not (math.isfinite(lo) and math.isfinite(hi)):
    out["note"] = "one seed and no within-SAE interval: no interval"
  else:
    out.update(lo=min(lo, value), hi=max(hi, value))
  return out


# ------------------------------------------------------------------------------------------------
# Ranking.


def rank(entries: Mapping[str, Mapping[str, Any]], higher_is_better: bool
         ) -> list[dict[str, Any]]:
  """Ranks of the covered types at one reference point (module docstring).

  Args:
    entries: type -> `read_curve` output.
    higher_is_better: the metric's direction.

  Returns:
    `[{"type", "rank" (None without an interval), "label" ("1", "2=" when shared, "—"),
    "value", "lo", "hi", "indistinguishable_from" (types whose intervals overlap)}]`, best
    first; uncovered types are left out.
  """
  sign = 1.0 if higher_is_better else -1.0
  live = {t: e for t, e in entries.items() if e.get("covered")}
  ranked = {t: e for t, e in live.items() if e.get("lo") is not None and e.get("hi") is not None}
  # In "higher is better" coordinates: [worst end, best end].
  ends = {t: sorted((sign * e["lo"], sign * e["hi"])) for t, e in ranked.items()}
  rows = []
  for t, e in live.items():
    row = {"type": t, "rank": None, "label": "—", "value": e["value"], "lo": e.get("lo"),
           "hi": e.get("hi"), "indistinguishable_from": []}
    if t in ranked:
      worse_end, better_end = ends[t]
      row["rank"] = 1 + sum(ends[u][0] > better_end for u in ranked if u != t)
      row["indistinguishable_from"] = [
          u for u in ranked if u != t and not (ends[u][0] > better_end or ends[u][1] < worse_end)]
    rows.append(row)
  counts: dict[int, int] = {}
  for r in rows:
    if r["rank"] is not None:
      counts[r["rank"]] = counts.get(r["rank"], 0) + 1
  for r in rows:
    if r["rank"] is not None:
      r["label"] = f"{r['rank']}{'=' if counts[r['rank']] > 1 else ''}"
  rows.sort(key=lambda r: (r["rank"] is None, r["rank"] or 0, -sign * r["value"],
                           comparison.type_sort_key(r["type"])))
  return rows


def ranking_text(ranking: Sequence[Mapping[str, Any]]) -> str:
  """"1 topk; 2= batchtopk, gated; no interval: e2e" (types grouped by shared rank)."""
  groups: dict[str, list[str]] = {}
  for r in ranking:
    groups.setdefault(r["label"], []).append(r["type"])
  parts = [f"{k} {', '.join(v)}" for k, v in groups.items() if k != "—"]
  if "—" in groups:
    parts.append(f"no interval: {', '.join(groups['—'])}")
  return "; ".join(parts) if parts else "no type covered"


def measured_once(points: Sequence[Mapping[str, Any]], metric: str
                  ) -> list[dict[str, Any]] | None:
  """The SAEs with `metric` as `[{"type", "id", "l0", "ce_increase", "value", "lo", "hi"}]`
  (best first, by `METRICS`' direction) when no type has it on two configurations although
  some type has two (seeds of one configuration count once); None otherwise (a curve to read,
  or a grid of one configuration per type, read as such)."""
  configs = matched.seed_configs(points)

  def n_configs(pts):  # type -> number of configurations among pts
    by_type: dict[str, set] = {}
    for p in pts:
      by_type.setdefault(p["type"], set()).add(configs[p["id"]])
    return [len(c) for c in by_type.values()]

  have = [p for p in points if metric in p["metrics"] and math.isfinite(p["metrics"][metric][0])]
  if not have or max(n_configs(have)) > 1 or max(n_configs(points)) <= 1:
    return None
  sign = -1.0 if METRICS[metric][1] else 1.0
  rows = [{"type": p["type"], "id": p["id"], **{a: p.get(a) for a in AXES},
           **dict(zip(("value", "lo", "hi"), p["metrics"][metric]))} for p in have]
  return sorted(rows, key=lambda r: (sign * r["value"], comparison.type_sort_key(r["type"]),
                                     r["id"]))


# ------------------------------------------------------------------------------------------------
# The leaderboard.


def language_board(report: Mapping[str, Any], *, quantiles: Sequence[float] = QUANTILES,
                   max_gap_factor: float = matched.MAX_GAP_FACTOR, n_boot: int = stats.N_BOOT,
                   confidence: float = stats.CONFIDENCE, seed: int = 0) -> dict[str, Any]:
  """One language's leaderboard from its report.json dict.

  Returns:
    `{"language", "types", "metrics" (present ones with a curve), "measured_once" ({metric:
    `measured_once` output} for the others), "n_seeds_max", "axes": {axis:
    {"reference_points", "how", "metrics": {metric: {"curves": {type: [configuration]},
    "points": [{"x", "entries": {type: read_curve output}, "ranking": rank output}]}}}}}`.
  """
  points = sae_points(report)
  types = sorted({p["type"] for p in points}, key=comparison.type_sort_key)
  present = [m for m in METRICS if any(m in p["metrics"] for p in points)]
  once = {m: measured_once(points, m) for m in present}
  present = [m for m in present if once[m] is None]
  board = {"language": (report.get("run") or {}).get("language"), "types": types,
           "metrics": present, "max_gap_factor": float(max_gap_factor),
           "measured_once": {m: v for m, v in once.items() if v is not None},
           "n_seeds_max": 0, "axes": {}}
  for ai, axis in enumerate(AXES):
    spans = curves([dict(p, metrics={axis: (0.0, math.nan, math.nan)}) for p in points],
                   axis, axis)  # every configuration with a finite axis value
    board["n_seeds_max"] = max([c["n_seeds"] for cs in spans.values() for c in cs] +
                               [board["n_seeds_max"]])
    refs, how = reference_points(spans, quantiles)
    per_metric = {}
    for mi, m in enumerate(present):
      cs = curves(points, axis, m)
      pts = []
      for ri, x in enumerate(refs):
        entries = {}
        for ti, t in enumerate(types):
          rng = np.random.default_rng([seed, ai, mi, ri, ti])
          entries[t] = (read_curve(cs[t], x, max_gap_factor=max_gap_factor, n_boot=n_boot,
                                   confidence=confidence, rng=rng) if t in cs else
                        {"x": x, "value": None, "lo": None, "hi": None, "method": None,
                         "covered": False, "note": f"{NOT_COVERED}: no SAE with this metric"})
        pts.append({"x": x, "entries": entries, "ranking": rank(entries, METRICS[m][1])})
      per_metric[m] = {"curves": cs, "points": pts}
    board["axes"][axis] = {"reference_points": refs, "how": how, "metrics": per_metric}
  return board


def label_reports(reports: Sequence[tuple[str, Mapping[str, Any]]]) -> dict[str, Any]:
  """(source name, report) pairs -> language label -> report; a language given twice is
  labelled `language (source)`."""
  langs = [str((r.get("run") or {}).get("language") or os.path.basename(s)) for s, r in reports]
  out = {}
  for (source, r), lang in zip(reports, langs):
    label = lang if langs.count(lang) == 1 else f"{lang} ({source})"
    if label in out:
      raise ValueError(f"{source} is given twice; pass each workdir once.")
    out[label] = r
  return out


def best(board: Mapping[str, Any]) -> dict[str, dict[str, list[dict[str, Any]]]]:
  """The answer to "which types are best here": per axis and metric, at each reference point,
  the types ranked 1 (ties included: no type's interval is entirely better than theirs).

  Returns:
    `{axis: {metric: [{"x", "best": [types], "value": {type: reading}, "covered": number of
    types covered, "unranked": covered types without an interval}]}}`; "best" is empty when no
    covered type has an interval.
  """
  out: dict[str, dict[str, list[dict[str, Any]]]] = {}
  for axis, a in board["axes"].items():
    for m in board["metrics"]:
      rows = []
      for p in a["metrics"][m]["points"]:
        top = [r for r in p["ranking"] if r["rank"] == 1]
        rows.append({"x": p["x"], "best": [r["type"] for r in top],
                     "value": {r["type"]: r["value"] for r in top},
                     "covered": len(p["ranking"]),
                     "unranked": [r["type"] for r in p["ranking"] if r["rank"] is None]})
      out.setdefault(axis, {})[m] = rows
  return out


def leaderboard(reports: Mapping[str, Mapping[str, Any]], **kwargs) -> dict[str, Any]:
  """The cross-language leaderboard: `{"languages": {label: language_board(...)}, "best":
  {label: best(...)}, "summary": {metric: {type: {label: rank label at the middle reference CE
  increase, or "not covered"}}}}` (kwargs as `language_board`)."""
  if not reports:
    raise ValueError("the leaderboard needs at least one report.json (one WORKDIR).")
  boards = {lang: language_board(r, **kwargs) for lang, r in reports.items()}
  summary: dict[str, dict[str, dict[str, str]]] = {}
  for lang, b in boards.items():
    mid = middle_point(b, "ce_increase")
    for m in b["metrics"]:
      labels = {}
      if mid is not None:
        p = b["axes"]["ce_increase"]["metrics"][m]["points"][mid]
        labels = {r["type"]: r["label"] for r in p["ranking"]}
      for t in b["types"]:
        summary.setdefault(m, {}).setdefault(t, {})[lang] = labels.get(t, NOT_COVERED)
  return {"languages": boards, "best": {lang: best(b) for lang, b in boards.items()},
          "summary": summary}


def middle_point(board: Mapping[str, Any], axis: str) -> int | None:
  """Index of the middle reference point of `axis` (None when there is none)."""
  n = len(board["axes"][axis]["reference_points"])
  return (n - 1) // 2 if n else None
