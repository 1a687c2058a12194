"""The report's plots: matplotlib figures of the numbers `comparison.py` derives, as PNG files.

Every function draws on matplotlib's Agg canvas (no pyplot state, safe in threads and on
headless machines), writes one PNG and returns its path; `report.write_report` calls them, and
notebooks can call them on the same inputs:

- `plot_tradeoff` (and its presets `plot_l0_vs_ce`, `plot_alive_vs_ce`,
  `plot_l0_vs_grammaticality`): a metric against another per SAE type, with each type's Pareto
  front (`matched.pareto_front`); CE increases (1e-4 .. a few nats, sometimes slightly
  negative) on a symmetric-log axis;
- `plot_grids`: heatmaps of `comparison.grid_table` grids (Menon et al.'s k/α × expansion
  layout);
- `plot_correlation`: the latent × label correlations of one SAE, its `top_latents` rows;
- `plot_feature_recovery`: best |corr| per label and matching score per SAE type
  (`comparison.feature_recovery`).

SAE types (`comparison.sae_type`) get fixed colours, in the canonical type order. Points with a
non-finite coordinate are never drawn; frozen variants are drawn as crosses and left off the
fronts. The points come from `comparison.points_by_type(rows, ..., include_frozen=True)`.
"""

from __future__ import annotations

import math
import os
from typing import Any, Mapping, Sequence

import matplotlib.colors
import matplotlib.figure
from matplotlib.backends import backend_agg
import numpy as np

from jaxsae.analysis import comparison
from jaxsae.analysis import matched

CE_LINTHRESH = 1e-3  # CE increase axes: linear within ±1e-3 nats, logarithmic beyond


def _colours(types: Sequence[str]) -> dict[str, Any]:
  palette = [matplotlib.colors.to_hex(c) for c in
             ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown",
              "tab:pink", "tab:gray", "tab:olive", "tab:cyan")]
  ordered = sorted(types, key=comparison.type_sort_key)
  return {t: palette[i % len(palette)] for i, t in enumerate(ordered)}


def new_figure(width: float, height: float) -> matplotlib.figure.Figure:
  """A figure on its own Agg canvas (no pyplot state; safe in threads and tests)."""
  fig = matplotlib.figure.Figure(figsize=(width, height), dpi=100)
  backend_agg.FigureCanvasAgg(fig)
  return fig


def save(fig: matplotlib.figure.Figure, path: str) -> str:
  """Writes `fig` as a PNG at `path` (folders made), without the software-version metadata, so
  the same figure gives the same bytes; returns `path`."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.tight_layout()
  fig.savefig(path, format="png", metadata={"Software": None})
  return path


def _spans_decades(values: Sequence[float], floor: float) -> bool:
  """Whether the largest |value| is more than 20× the smallest non-zero one (or `floor`)."""
  a = np.abs(np.asarray(values, np.float64))
  a = a[a > 0]
  return bool(a.size) and float(a.max()) > 20 * max(float(a.min()), floor)


def plot_tradeoff(path: str, points_by_type: Mapping[str, Sequence[Mapping[str, Any]]],
                  x: str, y: str, *, higher_x_better: bool = False,
                  higher_y_better: bool = False, hline: float | None = None,
                  hline_label: str = "", title: str = "", yscale: str = "linear",
                  linthresh: float = CE_LINTHRESH) -> str:
  """Scatter of y against x coloured by SAE type, with each type's Pareto front drawn.

  Points with a non-finite coordinate are not drawn; frozen points (`"frozen": True`) are drawn
  as crosses and left off the fronts. x uses a log scale when positive and spanning > 20×.

  Args:
    path: the PNG to write.
    points_by_type: SAE type -> points (mappings with the keys x, y and optionally `frozen`).
    x, y: metric keys.
    higher_x_better, higher_y_better: directions for the fronts.
    hline: optional horizontal reference line (e.g. the clean model's grammaticality).
    hline_label: its legend entry.
    title: axes title.
    yscale: "linear", "log", or "symlog" (logarithmic beyond ±`linthresh`, linear within: for
      values spanning decades that can touch or cross 0, like CE increases). "symlog" falls
      back to linear when the drawn |y| span less than 20× above `linthresh` (within one
      decade a symlog axis would carry no tick labels).
    linthresh: the linear range of "symlog".

  Raises:
    ValueError: an unknown `yscale` or a non-positive `linthresh`.
  """
  if yscale not in ("linear", "log", "symlog"):
    raise ValueError(f"yscale={yscale!r} is unknown; use 'linear', 'log' or 'symlog'.")
  if not linthresh > 0:
    raise ValueError(f"linthresh={linthresh} must be > 0 (the symlog axis's linear range).")
  fig = new_figure(6.4, 4.4)
  ax = fig.add_subplot(1, 1, 1)
  colours = _colours(list(points_by_type))
  all_x, all_y = [], []
  for t in sorted(points_by_type, key=comparison.type_sort_key):
    pts = [p for p in points_by_type[t]
           if comparison.is_finite(p.get(x)) and comparison.is_finite(p.get(y))]
    live = [p for p in pts if not p.get("frozen", False)]
    dead = [p for p in pts if p.get("frozen", False)]
    xs = np.array([comparison.as_float(p[x]) for p in live])
    ys = np.array([comparison.as_float(p[y]) for p in live])
    all_x += list(xs) + [comparison.as_float(p[x]) for p in dead]
    all_y += list(ys) + [comparison.as_float(p[y]) for p in dead]
    if live:
      ax.scatter(xs, ys, color=colours[t], label=t, s=24, alpha=0.85)
      front = matched.pareto_front(xs, ys, higher_x_better=higher_x_better,
                                   higher_y_better=higher_y_better)
      ax.plot(xs[front], ys[front], color=colours[t], lw=1.2, alpha=0.9)
    if dead:
      ax.scatter([comparison.as_float(p[x]) for p in dead],
                 [comparison.as_float(p[y]) for p in dead],
                 color=colours[t], marker="x", s=30, label=f"{t} (frozen)")
  if hline is not None and comparison.is_finite(hline):
    ax.axhline(comparison.as_float(hline), color="black", ls="--", lw=1,
               label=hline_label or None)
  if all_x and min(all_x) > 0 and max(all_x) / min(all_x) > 20:
    ax.set_xscale("log")
  if yscale == "symlog" and _spans_decades(all_y, linthresh):
    ax.set_yscale("symlog", linthresh=linthresh)
  elif yscale == "log":
    ax.set_yscale("log")
  x_name, y_name = (comparison.METRIC_NAMES.get(m, m) for m in (x, y))
  ax.set_xlabel(x_name)
  ax.set_ylabel(y_name)
  ax.set_title(title or f"{y_name} vs {x_name}")
  ax.grid(alpha=0.3)
  if ax.get_legend_handles_labels()[0]:
    ax.legend(fontsize=7)
  return save(fig, path)


def plot_l0_vs_ce(path: str, points_by_type) -> str:
  """CE increase against L0 per SAE type, with Pareto fronts (the e2e paper's figure); CE
  increase on a symlog axis (linear within ±`CE_LINTHRESH`) when it spans decades."""
  return plot_tradeoff(path, points_by_type, "l0", "ce_increase", yscale="symlog")


def plot_alive_vs_ce(path: str, points_by_type) -> str:
  """CE increase (symlog axis) against alive latents per SAE type, with Pareto fronts."""
  return plot_tradeoff(path, points_by_type, "alive", "ce_increase", yscale="symlog")


def plot_l0_vs_grammaticality(path: str, points_by_type, clean: float | None = None) -> str:
  """Spliced grammaticality against L0 per SAE type; the clean model's as a horizontal line."""
  return plot_tradeoff(path, points_by_type, "l0", "grammaticality", higher_y_better=True,
                       hline=clean, hline_label="clean model")


def plot_grids(path: str, grids: Mapping[str, Mapping[str, Any]], title: str = "", *,
               vmin: float | None = None, vmax: float | None = None) -> str:
  """Heatmaps of `comparison.grid_table` outputs, one panel per SAE type (NaN cells blank; colour
  range `vmin`..`vmax`, default each panel's own)."""
  n = max(len(grids), 1)
  fig = new_figure(3.6 * n, 3.4)
  for i, (t, g) in enumerate(grids.items()):
    ax = fig.add_subplot(1, n, i + 1)
    vals = np.ma.masked_invalid(np.asarray(g["values"], np.float64))
    im = ax.imshow(vals, cmap="viridis", aspect="auto", vmin=vmin, vmax=vmax)
    for r in range(vals.shape[0]):
      for c in range(vals.shape[1]):
        if not np.ma.is_masked(vals[r, c]):
          ax.text(c, r, f"{vals[r, c]:.2g}", ha="center", va="center", fontsize=7, color="w")
    ax.set_xticks(range(len(g["cols"])), [comparison.format_number(v) for v in g["cols"]])
    ax.set_yticks(range(len(g["rows"])),
                  [v if isinstance(v, str) else comparison.format_number(v) for v in g["rows"]])
    ax.set_xlabel(g["col_field"])
    ax.set_ylabel(g["row_field"] or "")
    ax.set_title(t, fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046)
  if title:
    fig.suptitle(title, fontsize=10)
  return save(fig, path)


def top_latents(corr_FK: Any, top: int = 16) -> np.ndarray:
  """Indices of the `top` latents with the largest max |corr| over labels (NaN counts 0)."""
  corr = np.nan_to_num(np.asarray(corr_FK, np.float64))
  if corr.ndim != 2:
    raise ValueError(f"corr must be [F, K], got shape {corr.shape}.")
  order = np.argsort(-np.abs(corr).max(axis=1), kind="stable")
  return order[:top]


def plot_correlation(path: str, corr_FK: Any, names: Sequence[str], *, top: int = 16,
                     title: str = "") -> str:
  """Latent × label correlation heatmap of one SAE: the `top` latents by max |corr| (rows),
  labels on the x axis."""
  corr = np.asarray(corr_FK, np.float64)
  if corr.ndim != 2 or corr.shape[1] != len(names):
    raise ValueError(f"corr has shape {corr.shape} but {len(names)} label names were given; "
                     "pass features['columns'] names in the matrix's column order.")
  rows = top_latents(corr, top)
  fig = new_figure(max(4.0, 0.35 * len(names) + 2), max(3.0, 0.25 * len(rows) + 1.8))
  ax = fig.add_subplot(1, 1, 1)
  im = ax.imshow(np.ma.masked_invalid(corr[rows]), cmap="RdBu_r", vmin=-1, vmax=1, aspect="auto")
  ax.set_xticks(range(len(names)), list(names), rotation=90, fontsize=7)
  ax.set_yticks(range(len(rows)), [str(int(r)) for r in rows], fontsize=7)
  ax.set_ylabel("latent")
  ax.set_title(title or "latent × label correlation", fontsize=9)
  fig.colorbar(im, ax=ax, fraction=0.046)
  return save(fig, path)


def plot_feature_recovery(path: str, recovery: Mapping[str, Mapping[str, Any]]) -> str:
  """Bars per SAE type: mean best |corr| per label, and the mean matching score."""
  types = list(recovery)
  names = list(next(iter(recovery.values()))["mean_best_abs_corr"]) if recovery else []
  cats = names + ["matching score"]
  fig = new_figure(max(5.0, 0.45 * len(cats) * max(len(types), 1) ** 0.5 + 2), 4.0)
  ax = fig.add_subplot(1, 1, 1)
  colours = _colours(types)
  width = 0.8 / max(len(types), 1)
  for i, t in enumerate(types):
    r = recovery[t]
    vals = [r["mean_best_abs_corr"].get(n, math.nan) for n in names] + [r["mean_matching_score"]]
    vals = np.nan_to_num(np.asarray(vals, np.float64))
    ax.bar(np.arange(len(cats)) + (i - (len(types) - 1) / 2) * width, vals, width,
           color=colours[t], label=t)
  ax.axhline(comparison.STRONG_CORR, color="black", ls=":", lw=1)
  ax.set_xticks(range(len(cats)), cats, rotation=90, fontsize=7)
  ax.set_ylim(0, 1)
  ax.set_ylabel("mean best |corr|")
  ax.set_title("feature recovery per SAE type", fontsize=9)
  if types:
    ax.legend(fontsize=7)
  return save(fig, path)
