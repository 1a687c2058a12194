"""Menon et al.'s spliced-grammaticality grid, both splice modes, beside the paper's pattern.

`section` builds report.json's `menon` entry from the report's variant rows when the evaluation
generated in the `original` splice mode (the paper's convention); `render` writes its Markdown.

Per SAE type with a k / α × expansion grid (`comparison.grid_row_field`) and per splice mode,
every cell holds the fraction of generations that are grammatical with its Wilson 95% interval
(several SAEs in one cell, e.g. seeds: their generations pooled). Beside them, the paper's
findings (`specs/sae.md`, "Grids to reproduce"; original conventions) as claims checked against
the cells' intervals:

- "≈ 0": every cell's interval lies below `NEAR_ZERO`;
- "≈ 1": every cell's interval lies above `NEAR_ONE`;
- "≈ 0.99 for most": more than half of the cells lie above `NEAR_ONE`;
- "rises with k and width": the Spearman correlation of the cells with log k and with the
  expansion (over the cells), each positive, and the corners (smallest k, every width; largest k
  at the largest width) against the paper's ≈ 0.1 and ≈ 0.92.

A claim holds (`agrees` true), fails (false), or is undecided (None) when a cell's interval
straddles the bound. Claims that name no language apply to every language.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np

from jaxsae.analysis import comparison
from jaxsae.core import stats
from jaxsae.report import coeff_trajectories

NEAR_ZERO = 0.1  # "≈ 0": the Wilson interval's upper end below this
NEAR_ONE = 0.9  # "≈ 1": the Wilson interval's lower end above this

# (type family, languages or None for all, claim kind, the paper's words). Family: the SAE type
# (`comparison.sae_type`) with Menon's sum-over-batch L1 ReLU SAEs as `local`; `sparsemax` covers
# the three sparsemax encoders.
PAPER_CLAIMS = (
    ("local", ("dyck2", "english"), "zero", "L1 (sum over the batch): ≈ 0 at every α and width"),
    ("local", ("expr_prefix",), "expr_l1",
     "L1: ≈ 1.0 at α ≤ 1e-2, ≈ 0 above (the sum-reduced L1 is ~10⁵× a per-token penalty)"),
    ("topk", ("expr_prefix",), "one", "TopK, no norm: ≈ 1.0"),
    ("topk", ("english",), "most_one", "TopK, no norm: ≈ 0.99 for most (k, width)"),
    ("topk", ("dyck2",), "rises",
     "TopK, no norm: rises with k and width, from ≈ 0.1 (k 8) to ≈ 0.92 (k 128, ×8)"),
    ("topk+input_recon_norm", None, "zero",
     "TopK under the input + recon normalisation: ≈ 0 (a splicing artefact)"),
    ("sparsemax", None, "zero", "sparsemax encoders: ≈ 0 (the same artefact)"),
)
PAPER_CORNERS = {"low": 0.1, "high": 0.92}  # Dyck-2 TopK: k 8 (any width); k 128 at ×8


def _family(t: str) -> str:
  return "sparsemax" if t.startswith("sparsemax") else t


def _combo_value(row: Mapping[str, Any], mode: str) -> float | None:
  """A variant's grammaticality in `mode` (sentence positions first), None if not generated."""
  combos = row.get("grammaticality_by_combo") or {}
  combo = next((c for c in (f"{mode}/sentence", f"{mode}/all") if c in combos), None)
  return comparison.as_float(combos[combo]["mean"]) if combo else None


def _cell_tables(rows: Sequence[Mapping[str, Any]], mode: str, n_gen: int
                 ) -> dict[str, dict[str, Any]]:
  """SAE type -> Menon grid (`comparison.grid_table`) of pooled grammaticality in `mode`."""
  out = {}
  for t in sorted({r["type"] for r in rows}, key=comparison.type_sort_key):
    field = comparison.grid_row_field(t)
    members = [{"hparams": r["hparams"], "g": _combo_value(r, mode)} for r in rows
               if r["type"] == t and not r.get("frozen")]
    g = comparison.grid_table([m for m in members if m["g"] is not None], "g",
                              row_field=field)
    if g is None:
      continue
    grid = []
    for values, counts in zip(g["values"], g["counts"]):
      line = []
      for mean, saes in zip(values, counts):
        if not saes:
          line.append(None)
          continue
        n = n_gen * saes
        lo, hi = stats.wilson_interval(int(round(mean * n)), n)
        line.append({"mean": mean, "lo": lo, "hi": hi, "n": n, "saes": saes})
      grid.append(line)
    out[t] = {"row_field": field, "col_field": "expansion", "rows": g["rows"],
              "cols": g["cols"], "cells": grid}
  return out


def _cells(table: Mapping[str, Any]) -> list[tuple[Any, Any, dict]]:
  return [(rv, c, cell) for rv, line in zip(table["rows"], table["cells"])
          for c, cell in zip(table["cols"], line) if cell]


def _all(cells, test) -> bool | None:
  verdicts = [test(cell) for _, _, cell in cells]
  if not verdicts:
    return None
  if all(v is True for v in verdicts):
    return True
  return False if any(v is False for v in verdicts) else None


def _below(bound):
  return lambda c: True if c["hi"] < bound else False if c["lo"] >= bound else None


def _above(bound):
  return lambda c: True if c["lo"] > bound else False if c["hi"] <= bound else None


def _spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
  if len(x) < 3 or len(set(x)) < 2 or len(set(y)) < 2:
    return None
  rx = np.argsort(np.argsort(x, kind="stable"), kind="stable").astype(float)
  ry = np.argsort(np.argsort(y, kind="stable"), kind="stable").astype(float)
  return float(np.corrcoef(rx, ry)[0, 1])


def _fmt(cell) -> str:
  return f"{cell['mean']:.3f} [{cell['lo']:.3f}, {cell['hi']:.3f}]" if cell else "—"


def check_claim(kind: str, table: Mapping[str, Any]) -> dict[str, Any]:
  """One claim against one grid: `{"agrees": bool | None, "ours": text, ...}`."""
  cells = _cells(table)
  means = [c["mean"] for _, _, c in cells]
  span = (f"{len(cells)} cells, {comparison.format_number(min(means))}–"
          f"{comparison.format_number(max(means))}") if cells else "no cells"
  if kind == "zero":
    return {"agrees": _all(cells, _below(NEAR_ZERO)), "ours": span}
  if kind == "one":
    return {"agrees": _all(cells, _above(NEAR_ONE)), "ours": span}
  if kind == "most_one":
    n_high = sum(_above(NEAR_ONE)(c) is True for _, _, c in cells)
    return {"agrees": n_high > len(cells) / 2 if cells else None,
            "ours": f"{span}; {n_high} above {NEAR_ONE}"}
  if kind == "expr_l1":
    low = [x for x in cells if isinstance(x[0], (int, float)) and x[0] <= 1e-2]
    high = [x for x in cells if isinstance(x[0], (int, float)) and x[0] > 1e-2]
    parts = (_all(low, _above(NEAR_ONE)), _all(high, _below(NEAR_ZERO)))
    agrees = False if False in parts else None if None in parts else True
    def span_of(part):
      m = [c["mean"] for _, _, c in part]
      return (f"{comparison.format_number(min(m))}–{comparison.format_number(max(m))}" if m
              else "no cells")
    return {"agrees": agrees, "ours": f"α ≤ 1e-2: {span_of(low)}; above: {span_of(high)}"}
  if kind == "rises":
    ks = [float(rv) for rv, _, _ in cells]
    widths = [float(c) for _, c, _ in cells]
    rho_k = _spearman([math.log(k) for k in ks], means)
    rho_w = _spearman(widths, means)
    k_lo, k_hi, w_hi = min(ks), max(ks), max(widths)
    low = [c for rv, _, c in cells if float(rv) == k_lo]
    high = [c for rv, w, c in cells if float(rv) == k_hi and float(w) == w_hi]
    agrees = None if rho_k is None or rho_w is None else rho_k > 0 and rho_w > 0
    return {"agrees": agrees, "spearman_log_k": rho_k, "spearman_width": rho_w,
            "lowest_k": [dict(c) for c in low], "highest_corner": [dict(c) for c in high],
            "ours": (f"Spearman ρ with log k {comparison.format_number(rho_k)}, with width "
                     f"{comparison.format_number(rho_w)}; k {comparison.format_number(k_lo)}: "
                     f"{', '.join(_fmt(c) for c in low)} (paper ≈ {PAPER_CORNERS['low']}); "
                     f"k {comparison.format_number(k_hi)} ×{comparison.format_number(w_hi)}: "
                     f"{', '.join(_fmt(c) for c in high)} (paper ≈ {PAPER_CORNERS['high']})")}
  raise ValueError(f"unknown claim kind {kind!r}")


def section(rows: Sequence[Mapping[str, Any]], n_gen: int | None, language: str | None,
            records: Sequence[Mapping[str, Any]] | None = None) -> dict[str, Any] | None:
  """report.json's `menon` entry, or None when no variant was generated in the original mode
  (or the generation count is unknown). With the grid's metrics.jsonl `records`, the entry's
  `coeff_trajectories` follows L0 through training across α (`coeff_trajectories.families`)."""
  modes = [m for m in ("original", "corrected")
           if any(k.startswith(f"{m}/") for r in rows
                  for k in (r.get("grammaticality_by_combo") or {}))]
  if "original" not in modes or not n_gen:
    return None
  tables = {m: _cell_tables(rows, m, n_gen) for m in modes}
  claims = []
  for family, languages, kind, words in PAPER_CLAIMS:
    if languages is not None and language not in languages:
      continue
    for t in tables["original"]:
      if _family(t) != family:
        continue
      claim = {"type": t, "kind": kind, "paper": words}
      for m in modes:
        claim[m] = check_claim(kind, tables[m][t]) if t in tables[m] else None
      claims.append(claim)
  return {"language": language, "modes": modes, "generations_per_sae": n_gen,
          "near_zero": NEAR_ZERO, "near_one": NEAR_ONE, "tables": tables, "claims": claims,
          "coeff_trajectories": coeff_trajectories.families(rows, records or [])}


def _verdict(result: Mapping[str, Any] | None) -> str:
  if not result:
    return "—"
  word = {True: "agrees", False: "differs", None: "undecided"}[result["agrees"]]
  return f"**{word}**: {result['ours']}"


def render(menon: Mapping[str, Any] | None, md_table) -> list[str]:
  """The report's "Menon et al.'s grid" section (empty when there is none)."""
  if not menon:
    return []
  out = ["## Menon et al.'s grid: spliced grammaticality in both splice modes", "",
         f"Fraction of {menon['generations_per_sae']} generations per SAE that are grammatical "
         "with the SAE spliced in at the tokens it was trained on, with Wilson 95% intervals "
         "(SAEs sharing a cell pooled). `original` is the paper's convention (a normalised "
         "reconstruction spliced as it is); `corrected` rescales it to ‖x‖. A claim holds when "
         f"every cell's interval lies on its side of the bound (≈ 0: below {menon['near_zero']}; "
         f"≈ 1: above {menon['near_one']}); undecided when an interval straddles it.", ""]
  if menon["claims"]:
    out += md_table(["SAE type", "the paper (original mode)"] + [f"ours, {m}"
                                                                 for m in menon["modes"]],
                    [[c["type"], c["paper"]] + [_verdict(c.get(m)) for m in menon["modes"]]
                     for c in menon["claims"]])
  for mode in menon["modes"]:
    for t, g in menon["tables"][mode].items():
      out += [f"{t}, `{mode}` (rows {g['row_field'] or '—'}, columns expansion):", ""]
      out += md_table([g["row_field"] or ""] + [f"×{comparison.format_number(c)}"
                                                 for c in g["cols"]],
                      [[rv if isinstance(rv, str) else comparison.format_number(rv)]
                       + [_fmt(cell) for cell in line]
                       for rv, line in zip(g["rows"], g["cells"])])
  return out + coeff_trajectories.render(menon.get("coeff_trajectories") or [], md_table)
