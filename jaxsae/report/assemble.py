"""The report of a run: `report.md`, `report.json` and PNG plots from the jobs' JSON outputs.

`write_report` is called by the eval job and the pipeline; it only reads the dicts below (every
number in the report comes from them) and never touches a checkpoint. This module holds
`write_report` and the markdown; the data logic is in `comparison.py` (SAE types, grids,
feature recovery and causal predictability per type) and `matched.py` (Pareto fronts and the
matched comparison), the figures are drawn by `report/plots.py`.

Inputs (JSON-able dicts; metric values may be floats or the strings "nan" / "inf" / "-inf"):

- `summary`: the `sae` job's `summary.json` (`train_sae.run`)::

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
                         "ce_recovered_mean", "ev_token_mean", "norm_ratio", "b_dec_norm", ...,
                         "grammaticality/<mode>/<positions>", "grammaticality_std/<mode>/..."}}}

- `features` (optional): `analysis.summarise(...)` output, `{"columns": [{"name", "kind",
  "label"}], "variants": {id: {"labels": {column: {"latent", "corr", ...}}, "matching_score",
  "mean_best_abs_corr", "n_labels_corr_ge_0.8", ...}}}`, optionally with `"corr": {id:
  [F, K] array}` (correlations of chosen SAEs) for heatmaps, whose K columns are named by
  `"corr_columns"` (default: the `columns` names, in order).
- `causal` (optional): `{id: causality.causal_predictability(...) output}` (`n_strong`,
  `n_tested`, `n_as_predicted`, `fraction_as_predicted`, `mean_effect`, `median_effect`,
  `pairs`, `not_as_predicted`: [{"latent", "label", "corr", "signed_effect", ...}]; optionally
  the null's `fraction_as_predicted_interval`, `n_right_sign`, `mean_effect_se`, `null`, and
  per pair `p_value`, `null_quantile`).
- `lm` (optional): the LM job's `summary.json` (`grammatical_fraction`,
  `grammatical_fraction_std`, `eval_ce`, `grammatical_next_token_mass`, `steps`, ...).
- `meta` (optional): `{"commit", "machine", "date", "stage_seconds": {stage: seconds}}`.

SAE types (`comparison.sae_type`) colour the plots and group the comparisons. Frozen variants
(training hit a non-finite value) are listed but left out of Pareto fronts and matched
comparisons; NaN metrics are shown as "nan" and never plotted. Sections whose input is missing
are replaced by a one-line note.

The matched comparison (Braun et al.'s question, `matched.py`): for every configuration of a
non-reference type, the reference type's L0 (or alive latents) at the same CE increase, read off
the reference Pareto front only where it covers the point (between neighbouring front points at
most `matched.MAX_GAP_FACTOR`× apart in CE increase, interpolated in log CE increase; "not
covered" otherwise, never extrapolated). Variants that differ only in `seed` are one
configuration (seed means), and with several seeds the ratios carry bootstrap intervals over
seeds. The sentences say how many points are covered.

The causal summary per SAE type (`causal_by_type`): for each type with causal results, the
number of SAEs tested, the mean over them of `fraction_as_predicted` and of `mean_effect`, and
next to them the type's cost, as medians over its live (not frozen) SAEs: NMSE (explained
variance when eval.json has no NMSE), CE increase and headline spliced grammaticality. When a
`causal-X` type and its base type `X` both have causal results, one sentence compares them.
"""

from __future__ import annotations

import os
import re
from typing import Any, Mapping, Sequence

import numpy as np

from jaxsae.analysis import comparison
from jaxsae.analysis import matched
from jaxsae.core import jsonio
from jaxsae.core import stats
from jaxsae.report import plots as plots_lib

_GRAM_COMBOS = ("corrected/all", "corrected/sentence", "original/all", "original/sentence")
_METRICS = ("l0", "alive", "dead", "ce_increase", "kl", "ce_recovered_zero", "ce_recovered_mean",
            "ev_token_mean", "ev_ratio_of_sums", "nmse", "top1_agreement",
            "grammatical_mass_spliced", "norm_ratio", "b_dec_norm")


# ------------------------------------------------------------------------------------------------
# Numbers.


# ------------------------------------------------------------------------------------------------
# The report.


def _key_hparam(hp: Mapping[str, Any]) -> str:
  parts = [f"×{hp['expansion']}"] if "expansion" in hp else []
  if hp.get("activation") in ("topk", "batchtopk"):
    parts.append(f"k={comparison.format_number(hp.get('k'))}")
  elif not str(hp.get("activation", "relu")).startswith("sparsemax"):
    sym = "α" if hp.get("sparsity_reduction") == "sum_batch" else "λ"
    parts.append(f"{sym}={comparison.format_number(hp.get('sparsity_coeff'))}")
  if hp.get("causal"):
    parts.append(f"β={comparison.format_number(hp.get('causal_coeff'))}")
  return " ".join(parts)


def generations(settings: Mapping[str, Any] | str | None) -> int | None:
  """How many generations a grammaticality fraction counts: `num_batches × batch_size` of the
  eval job's `grammaticality_settings`, or the LM job's "B x S" string; None if unknown."""
  if isinstance(settings, str):
    m = re.fullmatch(r"\s*(\d+)\s*x\s*(\d+)\s*", settings)
    return int(m.group(1)) * int(m.group(2)) if m else None
  if isinstance(settings, Mapping) and settings.get("num_batches") and settings.get("batch_size"):
    return int(settings["num_batches"]) * int(settings["batch_size"])
  return None


def wilson(fraction: float | None, n: int | None) -> list[float] | None:
  """The Wilson 95% interval of a grammaticality fraction over `n` generations (None if either
  is unknown or not finite)."""
  if fraction is None or n is None or not np.isfinite(fraction):
    return None
  lo, hi = stats.wilson_interval(int(round(fraction * n)), n)
  return [lo, hi]


def _frac(p, interval) -> str:
  """A fraction with its 95% interval, e.g. '0.984 [0.945, 0.996]'."""
  if p is None:
    return comparison.format_number(p)
  if not interval:
    return comparison.format_number(p)
  return f"{p:.3f} [{interval[0]:.3f}, {interval[1]:.3f}]"


def _variant_rows(summary, eval_results, combo: str | None) -> list[dict[str, Any]]:
  ev = eval_results["variants"]
  n_gen = generations(eval_results.get("grammaticality_settings"))
  rows = []
  for vid in sorted(set(summary["variants"]) | set(ev)):
    s, e = summary["variants"].get(vid, {}), ev.get(vid, {})
    hp = dict(s.get("hparams") or e.get("hparams") or {})
    row = {"id": vid, "type": comparison.sae_type(hp), "group": s.get("group", e.get("group")),
           "key_hparam": _key_hparam(hp), "hparams": hp,
           "frozen": bool(s.get("frozen", e.get("frozen", False))),
           "bad_step": s.get("bad_step", e.get("bad_step", -1)), "evaluated": vid in ev}
    for m in _METRICS:
      row[m] = comparison.as_float(e.get(m))
    row["grammaticality"] = (comparison.as_float(e.get(f"grammaticality/{combo}"))
                             if combo else None)
    row["grammaticality_std"] = (comparison.as_float(e.get(f"grammaticality_std/{combo}"))
                                 if combo else None)
    row["grammaticality_interval"] = wilson(row["grammaticality"], n_gen)
    row["grammaticality_by_combo"] = {
        k.split("/", 1)[1]: {
            "mean": comparison.as_float(v),
            "std": comparison.as_float(e.get(f"grammaticality_std/{k.split('/', 1)[1]}"))}
        for k, v in e.items() if k.startswith("grammaticality/")}
    row["training_metrics"] = dict(s.get("metrics", {}))
    rows.append(row)
  return rows


def _combos(eval_results) -> list[str]:
  found = {k.split("/", 1)[1] for v in eval_results["variants"].values() for k in v
           if k.startswith("grammaticality/")}
  return [c for c in _GRAM_COMBOS if c in found] + sorted(found - set(_GRAM_COMBOS))


def headline_combo(summary: Mapping[str, Any], eval_results: Mapping[str, Any]) -> str | None:
  """The `<mode>/<positions>` combo of the headline spliced grammaticality: the corrected splice
  at the positions the grid was trained on (an SAE trained on sentence tokens has never seen the
  decorator), else the first combo eval.json has; None when it has none."""
  combos = _combos(eval_results)
  trained_on = "sentence" if summary.get("positions", "sentence") == "sentence" else "all"
  preferred = f"corrected/{trained_on}"
  return preferred if preferred in combos else (combos[0] if combos else None)


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


def _md_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
  cell = lambda v: v if isinstance(v, str) else comparison.format_number(v)
  lines = ["| " + " | ".join(h.replace("|", "\\|") for h in headers) + " |",
           "|" + "---|" * len(headers)]
  lines += ["| " + " | ".join(cell(v).replace("|", "\\|") for v in r) + " |" for r in rows]
  return lines + [""]


def _ratio_interval(interval: Mapping[str, Any] | None) -> str:
  if interval is None:
    return "—"
  return _interval([interval["lo"], interval["hi"]])


def _interval(lo_hi: Sequence[Any] | None) -> str:
  if not lo_hi:
    return "—"
  return (f"[{comparison.format_number(lo_hi[0], 3)}, "
          f"{comparison.format_number(lo_hi[1], 3)}]")


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
      grammaticality (default: `headline_combo`, the corrected splice at the grid's training
      positions); every combo is listed in its own table.
    top_corr_latents: latents shown in each correlation heatmap.

  Returns:
    name -> path of every file written (`report.md`, `report.json`, one per plot).
  """
  _check_inputs(summary, eval_results)
  combos = _combos(eval_results)
  if grammaticality is not None and grammaticality not in combos:
    raise ValueError(f"grammaticality={grammaticality!r} is not in eval_results; it has "
                     f"{combos or 'no spliced grammaticality (grammaticality_batches=0)'}.")
  combo = grammaticality or headline_combo(summary, eval_results)
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
                "types": sorted(set(types.values()), key=comparison.type_sort_key)}
  rep["meta"] = dict(meta) if meta else None
  rep["clean"] = {"eval": {k: comparison.as_float(clean_e.get(k)) for k in (
      "grammaticality", "grammaticality_std", "ce_clean", "grammatical_mass_clean",
      "ce_zero_ablation", "ce_mean_ablation")}}
  if lm:
    rep["clean"]["lm"] = {k: comparison.as_float(lm.get(k)) for k in (
        "grammatical_fraction", "grammatical_fraction_std", "eval_ce",
        "grammatical_next_token_mass", "steps")}
    rep["clean"]["lm"]["generations"] = generations(lm.get("generations"))
    rep["clean"]["lm"]["grammatical_fraction_interval"] = wilson(
        rep["clean"]["lm"]["grammatical_fraction"], rep["clean"]["lm"]["generations"])
  n_gen = generations(eval_results.get("grammaticality_settings"))
  rep["clean"]["eval"]["generations"] = n_gen
  rep["clean"]["eval"]["grammaticality_interval"] = wilson(
      rep["clean"]["eval"]["grammaticality"], n_gen)
  rep["grammaticality_combo"] = combo
  rep["grammaticality_combos"] = combos
  rep["variants"] = rows

  # Trade-offs (frozen variants drawn as crosses) and the matched comparison (left out).
  configs = matched.seed_configs(rows)
  rep["matched"] = {
      y: matched.matched_comparison(comparison.points_by_type(rows, "ce_increase", y),
                                    "ce_increase", y, configs=configs)
      for y in ("l0", "alive")}
  rep["matched_text"] = {y: matched.matched_sentences(m) for y, m in rep["matched"].items()}
  has = lambda m: any(comparison.is_finite(r[m]) for r in rows)
  points = lambda *m: comparison.points_by_type(rows, *m, include_frozen=True)
  if has("l0") and has("ce_increase"):
    plot("l0_vs_ce", plots_lib.plot_l0_vs_ce, points("l0", "ce_increase"))
  if has("alive") and has("ce_increase"):
    plot("alive_vs_ce", plots_lib.plot_alive_vs_ce, points("alive", "ce_increase"))
  if has("l0") and has("grammaticality"):
    plot("l0_vs_grammaticality", plots_lib.plot_l0_vs_grammaticality,
         points("l0", "grammaticality"), clean_e.get("grammaticality"))

  # Menon-layout grids.
  rep["grids"] = {}
  for metric in ("grammaticality", "ev_token_mean"):
    grids = {}
    for t in rep["run"]["types"]:
      g = comparison.grid_table([r for r in rows if r["type"] == t], metric,
                                row_field=comparison.grid_row_field(t))
      if g is not None:
        grids[t] = g
    if grids:
      rep["grids"][metric] = grids
      plot(f"grid_{metric}", plots_lib.plot_grids, grids,
           comparison.METRIC_NAMES.get(metric, metric),
           **({"vmin": 0.0, "vmax": 1.0} if metric == "grammaticality" else {}))

  # Feature recovery and correlation heatmaps.
  rep["feature_recovery"] = None
  if features:
    rec = comparison.feature_recovery(features, types)
    rep["feature_recovery"] = {
        "by_type": rec,
        "per_variant": {vid: {k: v.get(k) for k in ("matching_score", "mean_best_abs_corr",
                                                    "n_labels_corr_ge_0.8", "dead_latents")}
                        for vid, v in sorted(features["variants"].items())},
        "heatmaps": {}}
    if rec:
      plot("feature_recovery", plots_lib.plot_feature_recovery, rec)
    for vid, corr in sorted((features.get("corr") or {}).items()):
      corr = np.asarray(corr, np.float64)
      plot(f"corr_{_safe(vid)}", plots_lib.plot_correlation, corr, corr_names,
           top=top_corr_latents, title=f"{vid} ({types.get(vid, '?')})")
      lat = plots_lib.top_latents(corr, top_corr_latents)
      rep["feature_recovery"]["heatmaps"][vid] = {
          "latents": lat, "max_abs_corr": np.abs(np.nan_to_num(corr[lat])).max(axis=1)}
  else:
    notes.append("feature recovery: no `features` input (run analysis.summarise).")
  if not features or not features.get("corr"):
    notes.append("correlation heatmaps: no correlation matrices given (`features['corr']`).")

  # Causal predictability, per SAE and per type (with the type's cost).
  rep["causal"] = None
  rep["causal_by_type"] = None
  rep["causal_by_type_text"] = []
  if causal:
    rep["causal_by_type"] = comparison.causal_by_type(causal, rows)
    rep["causal_by_type_text"] = comparison.causal_sentences(rep["causal_by_type"])
    rep["causal"] = {vid: {"type": types.get(vid), **{k: c.get(k) for k in (
        "threshold", "n_strong", "n_testable", "n_tested", "n_as_predicted",
        "fraction_as_predicted", "fraction_as_predicted_interval", "n_right_sign",
        "mean_effect", "mean_effect_se", "median_effect")},
        "null_size": (c.get("null") or {}).get("size"),
        "not_as_predicted": [{k: p.get(k) for k in ("latent", "label", "corr", "signed_effect",
                                                    "p_value", "null_quantile")}
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
  jsonio.write(json_path, jsonio.jsonable(rep))
  return {"report.md": md_path, "report.json": json_path, **paths}


def _render(rep: Mapping[str, Any]) -> list[str]:
  """report.md lines from the report dict (the single source of every number)."""
  run, meta, plots = rep["run"], rep["meta"], rep["plots"]
  img = lambda name, alt: [f"![{alt}]({plots[name]})", ""] if name in plots else []
  out = [f"# SAE report: {run['language']} at {run['site']}", ""]

  out += ["## Run", ""]
  out += [f"- language: {run['language']}", f"- site: {run['site']}",
          f"- SAE steps: {comparison.format_number(run['steps'])}; LM step: "
          f"{comparison.format_number(run['lm_step'])}",
          f"- variants: {run['n_variants']} in {run['n_groups']} groups, {run['n_frozen']} "
          f"frozen; types: {', '.join(run['types'])}"]
  if meta:
    out += [f"- commit: {meta.get('commit', '—')}", f"- machine: {meta.get('machine', '—')}",
            f"- date: {meta.get('date', '—')}", ""]
    stages = meta.get("stage_seconds") or {}
    if stages:
      out += _md_table(["stage", "seconds"],
                       [[k, comparison.as_float(v)] for k, v in stages.items()])
  else:
    out += ["", "_Run metadata (commit, machine, date, stage times) not given._", ""]

  out += ["## Clean model", ""]
  ce, cl = rep["clean"]["eval"], rep["clean"].get("lm")
  table = [["eval job (held-out)", _frac(ce["grammaticality"], ce["grammaticality_interval"]),
            ce["generations"], ce["ce_clean"], ce["grammatical_mass_clean"]]]
  if cl:
    table.append(["LM job", _frac(cl["grammatical_fraction"],
                                  cl["grammatical_fraction_interval"]),
                  cl["generations"], cl["eval_ce"], cl["grammatical_next_token_mass"]])
  out += _md_table(["source", "grammaticality [Wilson 95%]", "generations", "CE (nats)",
                    "grammatical mass"], table)
  out += ["The two CEs average over different tokens: the eval job's over the held-out "
          "sequences' selected positions (next-token CE at the SAE's positions), the LM job's "
          "over every non-pad target of its own held-out batches, the near-deterministic "
          "decorator included (unless the LM masked it).", ""]
  out += [f"Zero-ablation CE {comparison.format_number(ce['ce_zero_ablation'])}, mean-ablation CE "
          f"{comparison.format_number(ce['ce_mean_ablation'])} (the baselines of CE "
          "recovered).", ""]
  if not cl:
    out += ["_LM job summary not given._", ""]

  out += ["## Variants", ""]
  clean_g = ce["grammaticality"]
  combo = rep["grammaticality_combo"]
  out += [f"Spliced grammaticality: generation combo `{combo}` (mode/positions), with its Wilson "
          f"95% interval over {ce['generations'] or '?'} generations; CE recovered "
          "against zero ablation; EV = token-mean explained variance; ‖x̂‖/‖x‖ = token mean of "
          "the reconstruction's norm over the activation's (shrinkage below 1); ‖b_dec‖ = the norm of "
          "the bias added to every reconstruction (decoder bias plus pre-bias).", ""]
  out += _md_table(
      ["id", "type", "key hparams", "L0", "alive", "CE increase", "KL", "CE recovered", "EV",
       "‖x̂‖/‖x‖", "‖b_dec‖", "spliced gram.", "clean gram.", "frozen"],
      [[r["id"], r["type"], r["key_hparam"], r["l0"], r["alive"], r["ce_increase"], r["kl"],
        r["ce_recovered_zero"], r["ev_token_mean"], r["norm_ratio"], r["b_dec_norm"],
        _frac(r["grammaticality"], r["grammaticality_interval"]), clean_g,
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
    y_name = comparison.METRIC_NAMES[y]
    if pts:
      out += [f"Per configuration ({y_name}; reference = {m['reference']} Pareto front, "
              f"{len(m['reference_front'])} points; CE increase and {y_name} are means over "
              "seeds):", ""]
      out += _md_table(["id", "type", "seeds", "CE increase", y_name,
                        f"{m['reference']} at same CE", "ratio", "95% interval", "note"],
                       [[p["id"], p["type"], p["n_seeds"], p["x"], p["y"], p["reference_y"],
                         p["ratio"], _ratio_interval(p["ratio_interval"]), p["note"] or ""]
                        for p in pts])
  out += ["Frozen variants are left out of the comparison.", ""]
  out += img("l0_vs_ce", "CE increase vs L0") + img("alive_vs_ce", "CE increase vs alive")

  out += ["## Grid (Menon layout)", ""]
  if rep["grids"]:
    for metric, grids in rep["grids"].items():
      for t, g in grids.items():
        out += [f"{comparison.METRIC_NAMES.get(metric, metric)}, {t} (rows "
                f"{g['row_field'] or '—'}, columns {g['col_field']}):", ""]
        out += _md_table([g["row_field"] or ""] + [comparison.format_number(c) for c in g["cols"]],
                         [[v if isinstance(v, str) else comparison.format_number(v)] + list(vals)
                          for v, vals in zip(g["rows"], g["values"])])
      out += img(f"grid_{metric}", f"grid of {metric}")
  else:
    out += ["_No SAE type spans a k/α × expansion grid in this run._", ""]

  out += ["## Feature recovery", ""]
  fr = rep["feature_recovery"]
  if fr:
    for t, r in fr["by_type"].items():
      out += [f"### {t}", "",
              f"Best SAE {r['best_variant']} (matching score "
              f"{comparison.format_number(r['matching_score'])}; mean over the type's "
              f"{len(r['variants'])} SAEs {comparison.format_number(r['mean_matching_score'])}). "
              f"Labels with |corr| ≥ {comparison.STRONG_CORR}: "
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
  cz, by_type = rep["causal"], rep["causal_by_type"]
  if by_type:
    fid = comparison.fidelity_metric(by_type)
    fid_name = "NMSE" if fid == "nmse" else comparison.METRIC_NAMES[fid]
    out += ["A pair acts as predicted when its signed effect (expected token classes moved in "
            "the direction of the correlation) is positive and beats the same effect of random "
            "live latents of the SAE at 95% (one-sided permutation test).", ""]
    out += ["Per SAE type: means over the SAEs tested, and pooled over their pairs (Wilson 95% "
            "interval; mean signed effect ± SE over pairs); medians over all of the type's live "
            f"SAEs (spliced grammaticality: `{rep['grammaticality_combo']}`).", ""]
    out += _md_table(["type", "SAEs tested", "fraction as predicted", "mean effect", "pairs",
                      "pooled fraction [95% CI]", "pair effect ± SE", f"median {fid_name}",
                      "median CE increase", "median spliced gram."],
                     [[t, v["n_saes"], v["fraction_as_predicted"], v["mean_effect"],
                       v.get("n_pairs"), stats.format_estimate(v.get("pooled_fraction")),
                       stats.format_estimate(v.get("pooled_mean_effect"), style="se"), v[fid],
                       v["ce_increase"], v["grammaticality"]] for t, v in by_type.items()])
    out += [f"- {line}" for line in rep["causal_by_type_text"]]
    out += [""] if rep["causal_by_type_text"] else []
  if cz:
    out += _md_table(["id", "type", "strong pairs", "tested", "as predicted", "fraction",
                      "95% interval", "right sign", "mean effect", "± SE", "null latents"],
                     [[vid, c["type"], c["n_strong"], c["n_tested"], c["n_as_predicted"],
                       c["fraction_as_predicted"], _interval(c["fraction_as_predicted_interval"]),
                       c["n_right_sign"], c["mean_effect"], c["mean_effect_se"], c["null_size"]]
                      for vid, c in cz.items()])
    for vid, c in cz.items():
      bad = c["not_as_predicted"]
      if bad:
        out += [f"{vid}: pairs not acting as predicted:", ""]
        out += _md_table(["latent", "label", "corr", "signed effect", "p", "null 95% quantile"],
                         [[p["latent"], p["label"], p["corr"], p["signed_effect"], p["p_value"],
                           p["null_quantile"]] for p in bad])
  else:
    out += ["_Not computed for this run (no `causal` input)._", ""]

  if rep["notes"]:
    out += ["## Notes", ""] + [f"- {n}" for n in rep["notes"]]
  return out
