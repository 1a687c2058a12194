"""Pareto fronts and the matched comparison of SAE types (Braun et al.'s question).

For every configuration of a non-reference SAE type (e2e, TopK, ...), the reference type's
(local SAEs') L0 or alive latents at the same CE increase, read off the reference Pareto front,
and the ratio of the two. The rule that makes the ratio a measurement and not an extrapolation:

- *Coverage.* The reference value at x is interpolated only between two neighbouring front
  points x_i < x < x_{i+1} whose CE increases differ by at most `max_gap_factor` in log space
  (x_{i+1} / x_i ≤ max_gap_factor, both > 0), linearly in log x:

      y(x) = y_i + (y_{i+1} − y_i) · log(x / x_i) / log(x_{i+1} / x_i);

  a point exactly on a front point takes its value. Anything else (outside the front's range,
  across a wider gap, next to a front point with CE increase ≤ 0, where log space has no gap) is
  "not covered" and gets no ratio.
- *Seeds.* Variants that differ only in their `seed` sweep field are one configuration
  (`seed_configs`); a configuration's x and y are its seed means. With several seeds somewhere,
  the ratio and the per-type median ratio get percentile bootstrap intervals over seeds: each
  resample redraws every configuration's seeds with replacement (reference and compared alike),
  rebuilds the front from the resampled means and re-reads the ratio (`stats`). The interval is
  given only when at least the interval's confidence (95%) of the resamples are covered; else
  the note says the coverage is unstable over seeds.

Functions: `pareto_front`, `seed_configs`, `interpolate_front`, `matched_comparison` and
`matched_sentences` (the comparison in words, with intervals and "k of n points covered").
Frozen variants (training hit a non-finite value) are left out.
"""

from __future__ import annotations

import json
import math
from typing import Any, Mapping, Sequence

import numpy as np

from jaxsae.analysis import comparison
from jaxsae.core import stats

REFERENCE = "local"
MAX_GAP_FACTOR = 4.0  # neighbouring front points at most this far apart in CE increase (ratio)


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


def seed_configs(rows: Sequence[Mapping[str, Any]]) -> dict[str, str]:
  """Variant id -> configuration key; variants that differ only in `hparams["seed"]` (and share
  a type) share a key. Rows without `hparams` are their own configuration.

  Args:
    rows: variants as `report.json`'s `variants` (`id`, `hparams`, optionally `type`).
  """
  out = {}
  for r in rows:
    hp = r.get("hparams")
    if not isinstance(hp, Mapping) or not hp:
      out[r["id"]] = f"id:{r['id']}"
      continue
    t = r.get("type") or comparison.sae_type(hp)
    rest = {k: v for k, v in hp.items() if k != "seed"}
    out[r["id"]] = f"{t}:{json.dumps(rest, sort_keys=True, default=str)}"
  return out


def interpolate_front(x: float, front_x: Sequence[float], front_y: Sequence[float], *,
                      max_gap_factor: float = MAX_GAP_FACTOR) -> tuple[float | None, str | None]:
  """The front's y at `x` under the coverage rule (module docstring).

  Args:
    x: the query (finite).
    front_x, front_y: the front, ordered by increasing x (`pareto_front` order).
    max_gap_factor: the widest ratio x_{i+1} / x_i interpolated across (≥ 1).

  Returns:
    (y, None) when covered, else (None, why not).
  """
  if not max_gap_factor >= 1:
    raise ValueError(f"max_gap_factor={max_gap_factor} must be >= 1 (a ratio of CE increases).")
  fx = np.asarray(front_x, np.float64)
  fy = np.asarray(front_y, np.float64)
  if not fx.size:
    return None, "no front"
  on = np.nonzero(fx == x)[0]
  if on.size:
    return float(fy[on[0]]), None
  if not fx[0] < x < fx[-1]:
    return None, f"outside range [{fx[0]:.4g}, {fx[-1]:.4g}]"
  i = int(np.searchsorted(fx, x, side="right")) - 1
  x0, x1 = fx[i], fx[i + 1]
  if x0 <= 0:
    return None, (f"not covered: front point at CE increase {x0:.3g} ≤ 0 (no gap in log "
                  "space)")
  if x1 / x0 > max_gap_factor:
    return None, (f"not covered: front points {x0:.3g} and {x1:.3g} are {x1 / x0:.3g}× apart "
                  f"(> {max_gap_factor:g}×)")
  t = math.log(x / x0) / math.log(x1 / x0)
  return float(fy[i] + t * (fy[i + 1] - fy[i])), None


def _value(point: Mapping[str, Any], key: str, kind: str) -> float:
  if key not in point:
    raise ValueError(f"{kind} point {point.get('id', '?')!r} has no {key!r}; every point needs "
                     f"the compared metrics (keys of eval.json's variants).")
  v = comparison.as_float(point[key])
  return math.nan if v is None else v


def _configs(points, x, y, kind, configs, x_se=None) -> list[dict[str, Any]]:
  """Points grouped into configurations: ids, per-seed finite (x, y) arrays, seed means, and
  with `x_se` the mean of the seeds' finite x standard errors (`x_se`, NaN without one)."""
  by_key: dict[Any, dict[str, Any]] = {}
  for p in points:
    vid = p.get("id")
    key = configs.get(vid, f"id:{vid}") if configs is not None else f"id:{vid}"
    c = by_key.setdefault(key, {"ids": [], "per_seed": [], "xs": [], "ys": [], "ses": []})
    px, py = _value(p, x, kind), _value(p, y, kind)
    c["ids"].append(vid)
    c["per_seed"].append({"id": vid, "x": px, "y": py})
    if math.isfinite(px) and math.isfinite(py):
      c["xs"].append(px)
      c["ys"].append(py)
      se = _value(p, x_se, kind) if x_se is not None and x_se in p else math.nan
      if math.isfinite(se):
        c["ses"].append(se)
  out = []
  for c in by_key.values():
    c["xs"], c["ys"] = np.array(c["xs"]), np.array(c["ys"])
    c["x"] = float(c["xs"].mean()) if c["xs"].size else math.nan
    c["y"] = float(c["ys"].mean()) if c["ys"].size else math.nan
    # Seeds share the held-out sequences, so their errors correlate: the mean SE, not the SE
    # of a mean of independent estimates.
    c["x_se"] = float(np.mean(c.pop("ses"))) if c["ses"] else math.nan
    out.append(c)
  return out


def _ratio_over_x(px, se, py, front_x, front_y, max_gap_factor, confidence):
  """The ratio over x's own interval px ± z·se: {"x_lo", "x_hi", "lo", "hi"} when the whole
  interval is covered, else (None, why). Read at 17 points, log-spaced."""
  z = stats.z_value(confidence)
  x_lo, x_hi = px - z * se, px + z * se
  if x_lo <= 0:
    return None, (f"{comparison.format_number(px)} ± {comparison.format_number(z * se)} "
                  "reaches 0: not resolved from no increase")
  ratios = []
  for xv in np.geomspace(x_lo, x_hi, 17):
    ref_y, why = interpolate_front(float(xv), front_x, front_y, max_gap_factor=max_gap_factor)
    if ref_y is None or ref_y <= 0:
      return None, (f"its 95% interval [{comparison.format_number(x_lo)}, "
                    f"{comparison.format_number(x_hi)}] leaves the covered front ({why})")
    ratios.append(py / ref_y)
  return {"x_lo": x_lo, "x_hi": x_hi, "lo": float(min(ratios)), "hi": float(max(ratios))}, None


def _ratios(rx, ry, ox, oy, max_gap_factor):
  """Per compared configuration: the ratio y / reference y, or NaN when not covered."""
  front = pareto_front(rx, ry)
  out = np.full(len(ox), math.nan)
  for j in range(len(ox)):
    if not (math.isfinite(ox[j]) and math.isfinite(oy[j])):
      continue
    ref_y, _ = interpolate_front(ox[j], rx[front], ry[front], max_gap_factor=max_gap_factor)
    if ref_y is not None and ref_y > 0:
      out[j] = oy[j] / ref_y
  return out


def _resampled_means(cs, rng):
  xs, ys = np.empty(len(cs)), np.empty(len(cs))
  for i, c in enumerate(cs):
    n = c["xs"].size
    if n == 0:
      xs[i] = ys[i] = math.nan
    else:
      pick = rng.integers(0, n, n) if n > 1 else np.zeros(1, np.int64)
      xs[i], ys[i] = c["xs"][pick].mean(), c["ys"][pick].mean()
  return xs, ys


def _interval(samples, confidence) -> tuple[dict[str, Any] | None, float]:
  """Percentile interval of resampled values (NaN = not covered) and the covered fraction."""
  ok = np.isfinite(samples)
  covered = float(ok.mean()) if samples.size else 0.0
  if not samples.size or covered < confidence:
    return None, covered
  lo, hi = np.quantile(samples[ok], [(1 - confidence) / 2, (1 + confidence) / 2])
  return {"lo": float(lo), "hi": float(hi), "se": float(samples[ok].std()),
          "n_boot": int(samples.size), "confidence": float(confidence),
          "method": "percentile bootstrap over seeds"}, covered


def matched_comparison(grouped: Mapping[str, Sequence[Mapping[str, Any]]],
                       x: str = "ce_increase", y: str = "l0", reference: str = REFERENCE, *,
                       max_gap_factor: float = MAX_GAP_FACTOR,
                       configs: Mapping[str, Any] | None = None, n_boot: int = stats.N_BOOT,
                       confidence: float = stats.CONFIDENCE, seed: int = 0,
                       x_se: str | None = None) -> dict[str, Any]:
  """Each non-reference configuration's y against the reference front's y at the same x.

  Args:
    grouped: SAE type -> points, each a mapping with `id` and the keys `x` and `y` (values may
      be "nan" strings), e.g. `comparison.points_by_type(rows, x, y)`. Frozen points
      (`"frozen": True`) are left out.
    x, y: the metric names compared (e.g. `ce_increase` and `l0` or `alive`).
    reference: the type the others are measured against.
    max_gap_factor: the coverage rule's widest interpolated gap (module docstring).
    configs: variant id -> configuration key (`seed_configs(rows)`); ids sharing a key are
      seeds of one configuration. Default: every variant its own configuration.
    n_boot, confidence, seed: the bootstrap over seeds (used when some configuration has
      several seeds); deterministic from `seed`.
    x_se: the points' key of x's standard error (e.g. `ce_increase_se`, the paired SE over
      held-out sequences). With it, a covered point's ratio is also read over its own x
      interval x ± z·SE (`ratio_over_x`: the ratio's range there); a point whose interval
      reaches 0 or leaves the covered front is covered but not resolved in x.

  Returns:
    `{"x", "y", "reference", "max_gap_factor", "n_seeds_max", "reference_front": [{"id",
    "ids", "x", "y", "n_seeds"}], "points": [{"id" (ids joined by ','), "ids", "type", "x",
    "y" (seed means), "n_seeds", "per_seed": [{"id", "x", "y"}], "reference_y", "ratio",
    "ratio_interval" ({"lo", "hi", "se", "n_boot", ...} or None), "boot_covered" (fraction of
    resamples covered, or None), "in_range" (covered), "x_se", "ratio_over_x" ({"x_lo", "x_hi",
    "lo", "hi"} or None), "x_note" (why not resolved), "note"}], "by_type": {type: {"n"
    (configurations with finite x and y), "n_in_range" (of those, with a ratio),
    "n_x_resolved" (of those, resolved in x; None without `x_se`), "median_ratio",
    "min_ratio", "max_ratio", "median_ratio_interval"}}, "note"}` (`note` is None unless the
    comparison could not be made at all).
  """
  if not isinstance(grouped, Mapping):
    raise ValueError("matched_comparison needs a dict SAE type -> list of points (dicts with "
                     "'id' and the metrics); build it with comparison.points_by_type(rows, x, y).")
  live = {t: [p for p in ps if not p.get("frozen", False)] for t, ps in grouped.items()}
  live = {t: ps for t, ps in live.items() if ps}
  by_cfg = {t: _configs(ps, x, y, t, configs, x_se) for t, ps in live.items()}
  ref = by_cfg.get(reference, [])
  rx = np.array([c["x"] for c in ref], np.float64)
  ry = np.array([c["y"] for c in ref], np.float64)
  front = pareto_front(rx, ry) if ref else np.zeros((0,), np.int64)
  others = [t for t in sorted(live, key=comparison.type_sort_key) if t != reference]
  n_seeds_max = max((c["xs"].size for cs in by_cfg.values() for c in cs), default=0)
  out = {"x": x, "y": y, "reference": reference, "max_gap_factor": float(max_gap_factor),
         "n_seeds_max": int(n_seeds_max), "points": [], "by_type": {}, "note": None,
         "reference_front": [{"id": ",".join(map(str, ref[i]["ids"])), "ids": ref[i]["ids"],
                              "x": float(rx[i]), "y": float(ry[i]),
                              "n_seeds": int(ref[i]["xs"].size)} for i in front]}
  if not others:
    out["note"] = f"only {reference} SAEs: nothing to compare"
  elif not front.size:
    out["note"] = f"no {reference} SAE with finite {x} and {y}: nothing to compare with"
  for ti, t in enumerate(others):
    cs = by_cfg[t]
    recs = []
    for c in cs:
      px, py = c["x"], c["y"]
      rec = {"id": ",".join(map(str, c["ids"])), "ids": c["ids"], "type": t, "x": px, "y": py,
             "n_seeds": int(c["xs"].size), "per_seed": c["per_seed"], "reference_y": None,
             "ratio": None, "ratio_interval": None, "boot_covered": None, "in_range": False,
             "x_se": c["x_se"] if math.isfinite(c["x_se"]) else None, "ratio_over_x": None,
             "x_note": None, "note": None}
      if not (math.isfinite(px) and math.isfinite(py)):
        rec["note"] = "not finite"
      elif not front.size:
        rec["note"] = f"no {reference} front"
      else:
        ref_y, why = interpolate_front(px, rx[front], ry[front], max_gap_factor=max_gap_factor)
        if ref_y is None:
          rec["note"] = why
        elif ref_y > 0:
          rec.update(reference_y=ref_y, in_range=True, ratio=py / ref_y)
          if rec["x_se"] is not None:
            rec["ratio_over_x"], rec["x_note"] = _ratio_over_x(
                px, rec["x_se"], py, rx[front], ry[front], max_gap_factor, confidence)
        else:
          rec.update(reference_y=ref_y, in_range=True,
                     note=f"reference {y} is {ref_y:.4g}: no ratio")
      recs.append(rec)
    covered = [i for i, r in enumerate(recs) if r["ratio"] is not None]
    ratios = [recs[i]["ratio"] for i in covered]
    agg = {"n": sum(math.isfinite(r["x"]) and math.isfinite(r["y"]) for r in recs),
           "n_in_range": len(ratios),
           "n_x_resolved": (sum(recs[i]["ratio_over_x"] is not None for i in covered)
                            if any(recs[i]["x_se"] is not None for i in covered) else None),
           "median_ratio": float(np.median(ratios)) if ratios else None,
           "min_ratio": float(np.min(ratios)) if ratios else None,
           "max_ratio": float(np.max(ratios)) if ratios else None,
           "median_ratio_interval": None}
    several = max([c["xs"].size for c in cs + ref], default=0) > 1
    if several and front.size:
      rng = np.random.default_rng([seed, ti])
      boot = np.empty((n_boot, len(cs)))
      for b in range(n_boot):
        bx, by = _resampled_means(ref, rng)
        ox, oy = _resampled_means(cs, rng)
        boot[b] = _ratios(bx, by, ox, oy, max_gap_factor)
      for i, rec in enumerate(recs):
        if rec["ratio"] is not None:
          rec["ratio_interval"], rec["boot_covered"] = _interval(boot[:, i], confidence)
          if rec["ratio_interval"] is None:
            rec["note"] = (f"coverage unstable over seeds ({rec['boot_covered']:.0%} of "
                           "resamples covered): no interval")
      if covered:
        sub = boot[:, covered]
        med = np.where(np.all(np.isfinite(sub), axis=1), np.median(sub, axis=1), math.nan)
        agg["median_ratio_interval"], _ = _interval(med, confidence)
    out["points"] += recs
    out["by_type"][t] = agg
  return out


def _ratio_text(value: float, interval: Mapping[str, Any] | None) -> str:
  if interval is None:
    return f"{value:.2g}×"
  return f"{value:.2g}× [{interval['lo']:.2g}, {interval['hi']:.2g}]"


def matched_sentences(result: Mapping[str, Any]) -> list[str]:
  """The matched comparison in words, one sentence per compared type (numbers from `result`),
  e.g. "e2e SAEs need a median 0.31× [0.25, 0.4] the L0 of local SAEs at the same CE increase
  (3 of 4 points covered: interpolated between local front points at most 4× apart in CE
  increase; interval: bootstrap over up to 3 seeds)."."""
  x_name, y_name = (comparison.METRIC_NAMES.get(result[k], result[k]) for k in ("x", "y"))
  ref = result["reference"]
  if result.get("note") and not result["by_type"]:
    return [f"No matched comparison of {y_name}: {result['note']}."]
  gap = result.get("max_gap_factor", MAX_GAP_FACTOR)
  rule = (f"interpolated between {ref} front points at most {gap:g}× apart in {x_name}, never "
          "extrapolated")
  seeds = result.get("n_seeds_max", 1)
  lines = []
  for t, agg in result["by_type"].items():
    cov = f"{agg['n_in_range']} of {agg['n']} points covered"
    if agg["median_ratio"] is None:
      front = result["reference_front"]
      why = result.get("note") or (
          f"no {t} SAE is covered by the {ref} Pareto front (range "
          f"[{comparison.format_number(front[0]['x'])}, "
          f"{comparison.format_number(front[-1]['x'])}]; {rule})" if front else "no front")
      lines.append(f"{t} vs {ref}, {y_name}: no matched comparison ({why}; {cov}).")
      continue
    iv = agg.get("median_ratio_interval")
    if seeds > 1:
      unc = (f"95% interval: bootstrap over up to {seeds} seeds" if iv is not None else
             f"no interval: coverage unstable over {seeds} seeds")
    else:
      unc = "one seed per configuration, no interval"
    res = agg.get("n_x_resolved")
    resolved = ("" if res is None else
                f"; {res} of the {agg['n_in_range']} covered resolved in {x_name}, their "
                f"{x_name}'s 95% interval inside the covered front")
    lines.append(f"{t} SAEs need a median {_ratio_text(agg['median_ratio'], iv)} the {y_name} "
                 f"of {ref} SAEs at the same {x_name} ({cov}: {rule}; {unc}{resolved}).")
  return lines
