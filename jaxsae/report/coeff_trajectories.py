"""Does the sparsity coefficient change training? L0 during training across a coefficient sweep.

A family is a set of SAEs identical in every hyperparameter but `sparsity_coeff` (same type,
width, seed, data order), with at least `MIN_COEFFS` positive coefficients. For each family,
`families` reads the grid's metrics.jsonl records at a few steps (fractions of the last common
step) and gives L0 per coefficient, its relative spread across the coefficients
((max − min) / max), and the penalty's share of the loss at the first logged step.

Why: under Adam the update of a parameter is invariant to scaling its gradient. When the
penalty's gradient dominates the reconstruction's in every parameter, α only scales the loss and
SAEs with α 10⁵ apart follow the same trajectory. A small spread over a wide α range is that
signature; a spread near 1 says α sets the sparsity, as intended. One seed per family: these
are the runs' own numbers, with no interval (every family member saw the same batches).
"""

from __future__ import annotations

import json
from typing import Any, Mapping, Sequence

from jaxsae.analysis import comparison
from jaxsae.core import stats

MIN_COEFFS = 3
FRACTIONS = (0.0, 0.1, 0.2, 0.4, 1.0)  # steps shown, as fractions of the last common step


def _key(row: Mapping[str, Any]) -> str:
  hp = {k: v for k, v in row["hparams"].items() if k != "sparsity_coeff"}
  return json.dumps([row["type"], hp], sort_keys=True, default=str)


def _at_or_before(steps: Sequence[int], target: float) -> int:
  eligible = [s for s in steps if s <= target]
  return eligible[-1] if eligible else steps[0]


def family(members: Sequence[Mapping[str, Any]], records: Sequence[Mapping[str, Any]],
           fractions: Sequence[float] = FRACTIONS, metric: str = "l0"
           ) -> dict[str, Any] | None:
  """One family's trajectories (see the module docstring), None without common logged steps.

  Args:
    members: report rows (`id`, `type`, `hparams` with `sparsity_coeff`) of one family.
    records: metrics.jsonl records (`step`, `variant`, `metric`, `loss`, `sparsity`).
    fractions: the steps shown, as fractions of the last step every member logged.
    metric: the record field followed (L0 by default).
  """
  members = sorted(members, key=lambda r: float(r["hparams"]["sparsity_coeff"]))
  ids = [r["id"] for r in members]
  by = {vid: {} for vid in ids}
  for rec in records:
    if rec.get("variant") in by and metric in rec:
      by[rec["variant"]][int(rec["step"])] = rec
  common = sorted(set.intersection(*(set(v) for v in by.values())))
  if not common:
    return None
  steps = sorted({_at_or_before(common, f * common[-1]) for f in fractions})
  values, spread = [], []
  for s in steps:
    line = [comparison.as_float(by[vid][s][metric]) for vid in ids]
    values.append(line)
    finite = [v for v in line if comparison.is_finite(v)]
    top = max((abs(v) for v in finite), default=0.0)
    spread.append((max(finite) - min(finite)) / top if len(finite) > 1 and top > 0 else None)
  coeffs = [float(r["hparams"]["sparsity_coeff"]) for r in members]
  share = []
  for vid, a in zip(ids, coeffs):
    rec = by[vid][common[0]]
    loss, sp = comparison.as_float(rec.get("loss")), comparison.as_float(rec.get("sparsity"))
    share.append(a * sp / loss if comparison.is_finite(loss) and comparison.is_finite(sp)
                 and loss else None)
  hp = members[0]["hparams"]
  finite_spread = [s for s in spread if s is not None]
  return {"type": members[0]["type"], "expansion": hp.get("expansion"),
          "seed": hp.get("seed", 0), "variants": ids, "coeffs": coeffs, "metric": metric,
          "steps": steps, "values": values, "spread": spread,
          "max_spread": max(finite_spread) if finite_spread else None,
          "first_step": common[0], "penalty_share_first_step": share}


def families(rows: Sequence[Mapping[str, Any]], records: Sequence[Mapping[str, Any]],
             fractions: Sequence[float] = FRACTIONS, metric: str = "l0") -> list[dict[str, Any]]:
  """Every family of `rows` with at least `MIN_COEFFS` positive coefficients (frozen variants
  left out), ordered by type and expansion."""
  groups: dict[str, list[Mapping[str, Any]]] = {}
  for r in rows:
    a = r["hparams"].get("sparsity_coeff")
    if r.get("frozen") or not isinstance(a, (int, float)) or a <= 0:
      continue
    groups.setdefault(_key(r), []).append(r)
  by_variant: dict[str, list[Mapping[str, Any]]] = {}
  for rec in records:  # one pass over the records, not one per family
    by_variant.setdefault(rec.get("variant"), []).append(rec)
  out = []
  for members in groups.values():
    n_coeffs = len({float(r["hparams"]["sparsity_coeff"]) for r in members})
    if n_coeffs < MIN_COEFFS or n_coeffs != len(members):
      continue  # too short a ladder, or two SAEs at one coefficient: not a clean sweep
    own = [rec for r in members for rec in by_variant.get(r["id"], [])]
    fam = family(members, own, fractions, metric)
    if fam is not None:
      out.append(fam)
  out.sort(key=lambda f: (comparison.type_sort_key(f["type"]), f["expansion"] or 0, f["seed"]))
  return out


def render(fams: Sequence[Mapping[str, Any]], md_table) -> list[str]:
  """Markdown: one table per family (rows: steps; columns: coefficients), with the spread."""
  if not fams:
    return []
  out = ["### The sparsity coefficient during training", "",
         "L0 at a few steps of training for SAEs that differ only in the sparsity coefficient "
         "α (one seed, the same batches for every α). Under Adam, α only rescales the loss once "
         "the penalty's gradient dominates the reconstruction's; the trajectories then coincide. "
         "Spread: (max − min) / max of L0 across α at that step; penalty share: α·sparsity / "
         "loss at the first logged step.", ""]
  fmt = comparison.format_number
  for f in fams:
    shares = ", ".join("—" if s is None else f"{s:.2f}" for s in f["penalty_share_first_step"])
    top = "—" if f["max_spread"] is None else f"{f['max_spread']:.3f}"
    out += [f"{f['type']} ×{fmt(f['expansion'])}, seed {f['seed']}: largest spread {top} over α "
            f"{fmt(f['coeffs'][0])}–{fmt(f['coeffs'][-1])}; penalty share at step "
            f"{f['first_step']}: {shares}.", ""]
    out += md_table(["step"] + [f"α {fmt(a)}" for a in f["coeffs"]] + ["spread"],
                    [[str(s)] + [fmt(v) for v in line] + ["—" if sp is None else f"{sp:.3f}"]
                     for s, line, sp in zip(f["steps"], f["values"], f["spread"])])
  return out


def by_type(fams: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
  """The families pooled over seeds per (type, expansion, coefficient ladder): L0 at the last
  step at the smallest and the largest coefficient, and the last step's spread, each as mean ±
  SE over the seeds (SE None with one seed)."""
  pooled: dict[tuple, list[Mapping[str, Any]]] = {}
  for f in fams:
    pooled.setdefault((f["type"], f["expansion"], tuple(f["coeffs"])), []).append(f)

  def mean_se(xs):
    est = stats.mean_se([x for x in xs if comparison.is_finite(x)])
    se = est["se"] if est["n"] > 1 else None
    return (est["value"], se) if est["n"] else (None, None)

  out = []
  for (t, e, coeffs), group in pooled.items():
    lo, lo_se = mean_se([f["values"][-1][0] for f in group])
    hi, hi_se = mean_se([f["values"][-1][-1] for f in group])
    sp, sp_se = mean_se([f["spread"][-1] for f in group])
    out.append({"type": t, "expansion": e, "coeffs": list(coeffs), "seeds": len(group),
                "metric": group[0]["metric"], "l0_at_min": lo, "l0_at_min_se": lo_se,
                "l0_at_max": hi, "l0_at_max_se": hi_se, "final_spread": sp,
                "final_spread_se": sp_se})
  out.sort(key=lambda r: (comparison.type_sort_key(r["type"]), r["expansion"] or 0))
  return out


def render_by_type(rows: Sequence[Mapping[str, Any]], md_table) -> list[str]:
  """Markdown: does the sparsity coefficient set L0? One line per type and width."""
  if not rows:
    return []
  fmt = comparison.format_number

  def pm(m, se):
    return "—" if m is None else fmt(m) if se is None else f"{fmt(m)} ± {fmt(se)}"

  out = ["### Does the sparsity coefficient set L0?", "",
         "For SAEs that differ only in the sparsity coefficient: L0 at the end of training at the "
         "smallest and the largest coefficient, and the spread (max − min) / max of L0 across "
         "the coefficients, mean ± SE over seeds. A spread near 0 over a wide ladder says the "
         "coefficient does not set the sparsity (e.g. an optimizer step too small to move a "
         "threshold, or a penalty that dominates Adam's updates at every value).", ""]
  out += md_table(["type", "expansion", "seeds", "coefficients", "L0 at the smallest",
                   "L0 at the largest", "spread"],
                  [[r["type"], fmt(r["expansion"]), str(r["seeds"]),
                    f"{fmt(r['coeffs'][0])}–{fmt(r['coeffs'][-1])} ({len(r['coeffs'])})",
                    pm(r["l0_at_min"], r["l0_at_min_se"]), pm(r["l0_at_max"], r["l0_at_max_se"]),
                    pm(r["final_spread"], r["final_spread_se"])] for r in rows])
  return out
