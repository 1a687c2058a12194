"""The leaderboard's figures (`leaderboard.py`): per language, a Pareto plot per metric and a
heatmap of SAE types × metrics.

Both draw on matplotlib's Agg canvas (no pyplot state; the same board gives the same PNG), write
one PNG and return its path. They read a `leaderboard.language_board` dict and the metric table
`metrics` (name -> (display name, higher is better)), given by the caller so this module needs
nothing from `leaderboard.py`:

- `plot_pareto`: one panel per metric, the metric against CE increase, one line per SAE type
  through its configurations (seed means), vertical error bars = SE over seeds (with one seed,
  the SAE's own interval), horizontal ones = the CE increase's SE over seeds; the reference CE
  increases as dotted lines;
- `plot_heatmap`: types × metrics at the middle reference CE increase; colour = the value
  normalised per metric over the covered types (1 = best, 0 = worst, whatever the metric's
  direction), text = value and rank; "not covered" cells grey.
"""

from __future__ import annotations

import math
import os
from typing import Any, Mapping

import matplotlib
import matplotlib.colors
import matplotlib.figure
import numpy as np

from jaxsae.analysis import comparison
from jaxsae.report import plots

CE_LINTHRESH = 1e-3  # linear within ±1e-3 nats when CE increases touch or cross 0
_GREY = "#d0d0d0"


def _colours(types) -> dict[str, Any]:
  cmap = matplotlib.colormaps["tab20"]
  ordered = sorted(types, key=comparison.type_sort_key)
  return {t: matplotlib.colors.to_hex(cmap(i % 20)) for i, t in enumerate(ordered)}




def _check(board: Mapping[str, Any], metrics: Mapping[str, Any]) -> None:
  if not isinstance(board, Mapping) or "ce_increase" not in board.get("axes", {}):
    raise ValueError("pass one language's board (leaderboard.language_board(report)), not the "
                     "whole leaderboard.")
  unknown = [m for m in board["metrics"] if m not in metrics]
  if unknown:
    raise ValueError(f"metrics {unknown} have no entry in `metrics` (name -> (display name, "
                     "higher is better)); pass leaderboard.METRICS.")


def plot_pareto(path: str, board: Mapping[str, Any], metrics: Mapping[str, Any], *,
                title: str = "") -> str:
  """Each metric against CE increase, one line per SAE type (module docstring)."""
  _check(board, metrics)
  ms = board["metrics"]
  axis = board["axes"]["ce_increase"]
  cols = min(len(ms), 3) or 1
  rows = max(math.ceil(len(ms) / cols), 1)
  fig = plots.new_figure(4.6 * cols + 1.8, 3.6 * rows)
  colours = _colours(board["types"])
  for i, m in enumerate(ms):
    ax = fig.add_subplot(rows, cols, i + 1)
    xs_all = []
    for t, cs in axis["metrics"][m]["curves"].items():
      x = np.array([c["x"] for c in cs])
      y = np.array([c["y"] for c in cs])
      several = np.array([c["n_seeds"] > 1 for c in cs])
      y_se = np.array([c["y_se"] for c in cs], np.float64)
      lo = np.where(several, y - y_se, np.array([c["lo"] for c in cs], np.float64))
      hi = np.where(several, y + y_se, np.array([c["hi"] for c in cs], np.float64))
      yerr = np.nan_to_num(np.abs(np.stack([y - lo, hi - y])))
      xerr = np.nan_to_num(np.array([c["x_se"] for c in cs], np.float64))
      ax.errorbar(x, y, yerr=yerr, xerr=xerr, color=colours[t], marker="o", ms=3.5, lw=1.1,
                  capsize=2, label=t)
      xs_all += list(x)
    for xr in axis["reference_points"]:
      ax.axvline(xr, color="black", ls=":", lw=0.8)
    if xs_all and min(xs_all) > 0 and max(xs_all) / min(xs_all) > 20:
      ax.set_xscale("log")
    elif xs_all and min(xs_all) <= 0 and max(np.abs(xs_all)) > 20 * CE_LINTHRESH:
      ax.set_xscale("symlog", linthresh=CE_LINTHRESH)
    name, higher = metrics[m][0], metrics[m][1]
    ax.set_xlabel("CE increase (nats)")
    ax.set_ylabel(f"{name} ({'higher' if higher else 'lower'} is better)")
    ax.set_title(name, fontsize=9)
    ax.grid(alpha=0.3)
  handles, labels = [], []
  for ax in fig.axes:
    for h, lab in zip(*ax.get_legend_handles_labels()):
      if lab not in labels:
        handles.append(h)
        labels.append(lab)
  if handles:
    fig.legend(handles, labels, loc="center right", fontsize=7)
  if title:
    fig.suptitle(f"{title}: metric vs CE increase (dotted: reference points)", fontsize=10)
  fig.tight_layout(rect=(0, 0, 1 - 1.6 / fig.get_figwidth(), 1))
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, format="png", metadata={"Software": None})
  return path


def heatmap_cells(board: Mapping[str, Any], metrics: Mapping[str, Any]
                  ) -> tuple[np.ndarray, list[list[str]]]:
  """The heatmap's [types, metrics] colour values (normalised, NaN = not covered) and texts, at
  the middle reference CE increase."""
  _check(board, metrics)
  axis = board["axes"]["ce_increase"]
  types, ms = board["types"], board["metrics"]
  norm = np.full((len(types), len(ms)), math.nan)
  text = [["not\ncovered"] * len(ms) for _ in types]
  refs = axis["reference_points"]
  if not refs:
    return norm, text
  mid = (len(refs) - 1) // 2
  for j, m in enumerate(ms):
    p = axis["metrics"][m]["points"][mid]
    labels = {r["type"]: r["label"] for r in p["ranking"]}
    vals = {t: e["value"] for t, e in p["entries"].items() if e["covered"]}
    if not vals:
      continue
    lo, hi = min(vals.values()), max(vals.values())
    for i, t in enumerate(types):
      if t not in vals:
        continue
      v = vals[t]
      s = 0.5 if hi == lo else (v - lo) / (hi - lo)
      norm[i, j] = s if metrics[m][1] else 1 - s
      text[i][j] = f"{v:.3g}\n#{labels.get(t, '—')}"
  return norm, text


def plot_heatmap(path: str, board: Mapping[str, Any], metrics: Mapping[str, Any], *,
                 title: str = "") -> str:
  """SAE types × metrics at the middle reference CE increase (module docstring)."""
  norm, text = heatmap_cells(board, metrics)
  types, ms = board["types"], board["metrics"]
  fig = plots.new_figure(1.5 * len(ms) + 2.6, 0.42 * len(types) + 1.6)
  ax = fig.add_subplot(1, 1, 1)
  cmap = matplotlib.colormaps["viridis"].with_extremes(bad=_GREY)
  im = ax.imshow(np.ma.masked_invalid(norm), cmap=cmap, vmin=0, vmax=1, aspect="auto")
  for i in range(len(types)):
    for j in range(len(ms)):
      dark = math.isfinite(norm[i, j]) and norm[i, j] < 0.6
      ax.text(j, i, text[i][j], ha="center", va="center", fontsize=6,
              color="white" if dark else "black")
  ax.set_xticks(range(len(ms)), [metrics[m][0] for m in ms], rotation=30, ha="right",
                fontsize=7)
  ax.set_yticks(range(len(types)), types, fontsize=7)
  refs = board["axes"]["ce_increase"]["reference_points"]
  at = f"CE increase {refs[(len(refs) - 1) // 2]:.3g}" if refs else "no reference point"
  ax.set_title(f"{title + ': ' if title else ''}{at} (colour: 1 = best; #rank)", fontsize=9)
  fig.colorbar(im, ax=ax, fraction=0.046)
  return plots.save(fig, path)
