"""The leaderboard's files: `leaderboard.md` (rendered from `leaderboard.leaderboard`'s dict),
`leaderboard.json` and the plots (`leaderboard_plots`). Definitions: `leaderboard.py`.
"""

from __future__ import annotations

import math
import os
from typing import Any, Mapping, Sequence

from jaxsae.analysis import matched
from jaxsae.core import jsonio
from jaxsae.core import stats
from jaxsae.report import leaderboard as board_lib
from jaxsae.report import leaderboard_plots
from jaxsae.report import markdown


def best_text(rows: Sequence[Mapping[str, Any]], axis: str) -> str:
  """One line per axis and metric: "CE increase 0.01: topk (0.52), gated (0.51) [of 9 ranked];
  ..." (ranked: the covered types with an interval, among which these are first)."""
  parts = []
  for r in rows:
    if r["best"]:
      ranked = r["covered"] - len(r["unranked"])
      what = (", ".join(f"{t} ({r['value'][t]:.3g})" for t in r["best"])
              + f" [of {ranked} ranked]")
    elif r["covered"]:
      what = "no interval to rank"
    else:
      what = "no type covered"
    parts.append(f"{board_lib.AXES[axis]} {r['x']:.3g}: {what}")
  return "; ".join(parts)


def _lower(m: str) -> str:
  return "" if board_lib.METRICS[m][1] else " (lower is better)"


def _title(m: str) -> str:
  """A metric's display name, marked when lower is better."""
  return board_lib.METRICS[m][0] + _lower(m)


def _cell(e: Mapping[str, Any], label: str | None) -> str:
  if not e.get("covered"):
    return board_lib.NOT_COVERED
  text = stats.format_estimate({"value": e["value"],
                                "lo": math.nan if e.get("lo") is None else e["lo"],
                                "hi": math.nan if e.get("hi") is None else e["hi"]})
  return f"{text} ({label})" if label and label != "—" else text


def render(board: Mapping[str, Any], plots: Mapping[str, Mapping[str, str]] | None = None
           ) -> list[str]:
  """leaderboard.md's lines; `plots`: language -> plot name -> relative path."""
  plots = plots or {}
  lines = ["# SAE leaderboard", "",
           "Per language and metric, each SAE type's metric read off its curve (every "
           "configuration, seeds pooled) at reference CE increases and L0s: interpolated in log "
           "x between neighbouring configurations at most "
           f"{matched.MAX_GAP_FACTOR:g}× apart, never extrapolated (\"{board_lib.NOT_COVERED}\" "
           "otherwise). Intervals: bootstrap over seeds (one seed: the SAEs' own intervals). "
           "Rank = 1 + the number of types whose interval is entirely better; overlapping "
           "intervals are not distinguishable and may share a rank (`2=`).", ""]
  langs = list(board["languages"])
  if any(b["metrics"] for b in board["languages"].values()):
    lines += ["## Best per language", "",
              "At each reference point, the types ranked 1: no other type's interval is "
              "entirely better (ties listed together, with their readings).", ""]
    for lang, b in board["languages"].items():
      if not b["metrics"]:
        continue
      lines += [f"**{lang}**", "", "| metric | at matched CE increase | at matched L0 |",
                "|---|---|---|"]
      for m in b["metrics"]:
        cells = [best_text(board["best"][lang][axis][m], axis) for axis in board_lib.AXES]
        lines.append(f"| {_title(m)} | " + " | ".join(cells) + " |")
      for m in b.get("measured_once") or {}:
        lines.append(f"| {_title(m)} | measured on one configuration per type, at different "
                     f"costs: not compared (see \"{lang}\" below) | — |")
      lines.append("")
  if board["summary"]:
    lines += ["## Ranks at the middle reference CE increase", ""]
    for m, by_type in board["summary"].items():
      lines += [f"**{board_lib.METRICS[m][0]}**" + _lower(m), "",
                "| type | " + " | ".join(langs) + " |", "|---" * (len(langs) + 1) + "|"]
      lines += [f"| {t} | " + " | ".join(v.get(lang, "—") for lang in langs) + " |"
                for t, v in by_type.items()]
      lines.append("")
  for lang, b in board["languages"].items():
    lines += [f"## {lang}", "", f"{len(b['types'])} SAE types; up to {b['n_seeds_max']} seeds "
              "per configuration."]
    for name, rel in (plots.get(lang) or {}).items():
      lines += ["", f"![{name}]({rel})"]
    lines.append("")
    lines += measured_once_lines(b.get("measured_once") or {})
    if not b["metrics"]:
      if not b.get("measured_once"):
        lines += ["No ground-truth or causal metrics in this report (run the analysis stage).",
                  ""]
      continue
    for axis, a in b["axes"].items():
      refs = a["reference_points"]
      name = board_lib.AXES[axis]
      lines += [f"### At matched {name}", "",
                f"Reference {name}s: {', '.join(f'{x:.3g}' for x in refs) or 'none'} "
                f"({a['how']}).", ""]
      if not refs:
        continue
      for m in b["metrics"]:
        pts = a["metrics"][m]["points"]
        lines += [f"**{board_lib.METRICS[m][0]}**" + _lower(m), "",
                  "| type | " + " | ".join(f"{name} {x:.3g}" for x in refs) + " |",
                  "|---" * (len(refs) + 1) + "|"]
        labels = [{r["type"]: r["label"] for r in p["ranking"]} for p in pts]
        for t in b["types"]:
          lines.append(f"| {t} | " + " | ".join(
              _cell(p["entries"][t], lab.get(t)) for p, lab in zip(pts, labels)) + " |")
        lines += [""] + [f"- {name} {p['x']:.3g}: {board_lib.ranking_text(p['ranking'])}"
                         for p in pts] + [""]
  return lines


def measured_once_lines(once: Mapping[str, Sequence[Mapping[str, Any]]]) -> list[str]:
  """Per metric measured on one configuration per type: its SAEs, best first, with L0 and CE
  increase (`leaderboard.measured_once`)."""
  lines = []
  for m, rows in once.items():
    lines += [f"### {_title(m)}, measured on one configuration per type", "",
              "No type has this metric on two configurations, so there is no curve to read at "
              "a matched cost; each SAE is listed at its own L0 and CE increase, best first "
              "(not ranked: compare only SAEs of similar cost).", "",
              f"| type | SAE | L0 | CE increase | {board_lib.METRICS[m][0]} [95% CI] |",
              "|---|---|---|---|---|"]
    for r in rows:
      est = {k: math.nan if r.get(k) is None else r[k] for k in ("value", "lo", "hi")}
      cost = ["—" if r.get(a) is None else f"{r[a]:.3g}" for a in ("l0", "ce_increase")]
      lines.append(f"| {r['type']} | {r['id']} | {' | '.join(cost)} | "
                   f"{stats.format_estimate(est)} |")
    lines.append("")
  return lines


def safe_name(label: str) -> str:
  """A file-name-safe form of a language label."""
  return markdown.safe_name(label).strip("_") or "language"


def write(out_dir: str, reports: Mapping[str, Mapping[str, Any]], **kwargs) -> dict[str, str]:
  """Writes leaderboard.md, leaderboard.json and the plots into `out_dir`.

  Args:
    out_dir: directory (created if needed).
    reports: language label -> report.json dict (`label_reports`).
    **kwargs: as `language_board`.

  Returns:
    name -> path of every file written.
  """
  board = board_lib.leaderboard(reports, **kwargs)
  os.makedirs(out_dir, exist_ok=True)
  paths, rel = {}, {}
  for lang, b in board["languages"].items():
    rel[lang] = {}
    if not b["metrics"]:
      continue
    for kind, fn in (("pareto", leaderboard_plots.plot_pareto),
                     ("heatmap", leaderboard_plots.plot_heatmap)):
      name = f"{kind}_{safe_name(lang)}"
      paths[name] = fn(os.path.join(out_dir, f"{name}.png"), b, board_lib.METRICS, title=lang)
      rel[lang][kind] = f"{name}.png"
  md = os.path.join(out_dir, "leaderboard.md")
  with open(md, "w") as f:
    f.write("\n".join(render(board, rel)) + "\n")
  js = os.path.join(out_dir, "leaderboard.json")
  jsonio.write(js, jsonio.jsonable(dict(board, plots=rel)))
  return {"leaderboard.md": md, "leaderboard.json": js, **paths}
