"""The report of a run: `report.md`, `report.json` and PNG plots from the jobs' JSON outputs.

`write_report` is called by the eval job and the pipeline; it only reads the dicts below (every
number in the report comes from them) and never touches a checkpoint. This module holds
`write_report` (the report's data, in report.json); `report/markdown.py` renders report.md; the data logic is in `comparison.py` (SAE types, grids,
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
  the null's `fraction_as_predicted_interval`, `n_right_sign`, `mean_effect_se`, `null`,
  `n_null_too_small`, and per pair `p_value`, `null_quantile`).
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
from jaxsae.report import coeff_trajectories
from jaxsae.report import markdown
from jaxsae.report import menon as menon_lib
from jaxsae.report import plots as plots_lib

_GRAM_COMBOS = ("corrected/all", "corrected/sentence", "original/all", "original/sentence")
_METRICS = ("l0", "alive", "dead", "ce_increase", "kl", "ce_recovered_zero", "ce_recovered_mean",
            "ev_token_mean", "ev_ratio_of_sums", "nmse", "top1_agreement",
            "grammatical_mass_spliced", "norm_ratio", "b_dec_norm", "ce_increase_se", "kl_se")
# Per configuration (seeds pooled): the metrics of the seed table, as mean ± SE over seeds.
_SEED_METRICS = ("l0", "alive", "ce_increase", "kl", "ev_token_mean", "grammaticality")


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
    if hp.get("activation") == "jumprelu":  # the initial threshold sets its L0 at short budgets
      parts.append(f"θ0={comparison.format_number(hp.get('jumprelu_init_threshold'))}")
  if hp.get("causal"):
    parts.append(f"β={comparison.format_number(hp.get('causal_coeff'))}")
    mix = hp.get("causal_lambda")  # how the interpolation weight is drawn
    if mix == "fixed":
      mix = comparison.format_number(hp.get("causal_lambda_value"))
    if mix:
      parts.append(f"interp={mix}")
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
  if len({r["hparams"].get("seed", 0) for r in rows}) > 1:  # name the seed where there are seeds
    for r in rows:
      r["key_hparam"] = f"{r['key_hparam']} s{r['hparams'].get('seed', 0)}".strip()
  return rows


def ground_truth_table(ground: Mapping[str, Any], rows: Sequence[Mapping[str, Any]]
                       ) -> dict[str, Any]:
  """The report's ground-truth rows: per variant (in `rows` order) MCC against its null, the
  matched latents' F1, absorption, hedging (mean over children), split latents, the 1-sparse
  probe and the 1- and 5-sparse probes' differences from the same probes on the raw activations,
  and shrinkage (γ: the best rescaling of x̂; ‖x̂‖/‖x‖)."""
  out = []
  for r in rows:
    g = (ground.get("variants") or {}).get(r["id"])
    if not g:
      continue
    probe = g.get("probing") or {}
    shrink = g.get("shrinkage") or {}
    out.append({
        "id": r["id"], "type": r["type"], "key_hparam": r["key_hparam"], "l0": r["l0"],
        "mcc": g.get("mcc"), "mcc_null": g.get("mcc_null"),
        "f1": (g.get("matched") or {}).get("f1"),
        "absorption": (g.get("absorption") or {}).get("pooled"),
        "hedging": (g.get("hedging") or {}).get("mean"),
        "split_latents": g.get("split_latents"),
        "probe_k1": (probe.get("k=1") or {}).get("accuracy"),
        "probe_k1_minus_raw": (probe.get("minus_raw") or {}).get("k=1"),
        "probe_k5_minus_raw": (probe.get("minus_raw") or {}).get("k=5"),
        "gamma": shrink.get("gamma"), "norm_ratio": shrink.get("norm_ratio")})
  raw = (ground.get("probing_raw") or {})
  return {"features": len(ground.get("features") or []),
          "families": len(ground.get("hierarchy") or {}),
          "raw_probe_accuracy": {k: v.get("accuracy") for k, v in raw.items()
                                 if isinstance(v, Mapping) and "accuracy" in v},
          "variants": out}


def seed_table(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
  """Per configuration with several seeds (`matched.seed_configs`; frozen variants left out):
  its ids and, for each of `_SEED_METRICS`, the mean over seeds with its SE
  (`stats.mean_se`)."""
  configs = matched.seed_configs([r for r in rows if not r["frozen"]])
  by_key: dict[str, list[Mapping[str, Any]]] = {}
  for r in rows:
    if r["id"] in configs:
      by_key.setdefault(configs[r["id"]], []).append(r)
  out = []
  for members in by_key.values():
    if len(members) < 2:
      continue
    first = members[0]
    out.append({
        "ids": [m["id"] for m in members], "type": first["type"],
        "key_hparam": _key_hparam(first["hparams"]), "n_seeds": len(members),
        **{m: stats.mean_se([comparison.as_float(r[m]) if r[m] is not None else np.nan
                             for r in members]) for m in _SEED_METRICS}})
  return sorted(out, key=lambda c: (comparison.type_sort_key(c["type"]), c["ids"][0]))


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


def _corr_names(features: Mapping[str, Any] | None) -> list[str]:
  features = features or {}
  if features.get("corr_columns") is not None:
    return [str(n) for n in features["corr_columns"]]
  return [c["name"] for c in features.get("columns") or []]


def write_report(out_dir: str, *, summary: Mapping[str, Any], eval_results: Mapping[str, Any],
                 features: Mapping[str, Any] | None = None,
                 causal: Mapping[str, Any] | None = None, lm: Mapping[str, Any] | None = None,
                 meta: Mapping[str, Any] | None = None, grammaticality: str | None = None,
                 ground_truth: Mapping[str, Any] | None = None,
                 training_records: Sequence[Mapping[str, Any]] | None = None,
                 top_corr_latents: int = 16) -> dict[str, str]:
  """Writes `report.md`, `report.json` and the PNG plots (linked relatively) into `out_dir`.

  Args:
    out_dir: directory (created if needed).
    summary, eval_results, features, causal, lm, meta: see the module docstring.
    ground_truth: `analysis.ground_truth.ground_truth_summary` of the variants (the analysis
      stage's ground_truth.json), or None.
    grammaticality: the `<mode>/<positions>` generation combo of the headline spliced
      grammaticality (default: `headline_combo`, the corrected splice at the grid's training
      positions); every combo is listed in its own table.
    training_records: the grid's metrics.jsonl records, for the Menon section's L0 during
      training across α (`coeff_trajectories`); None leaves that part out.
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
    # How far the LM's generated lengths are from its language's (`lm.lengths.length_match`).
    rep["clean"]["lm"]["length_match"] = (lm.get("length") or {}).get("match")
  n_gen = generations(eval_results.get("grammaticality_settings"))
  rep["clean"]["eval"]["generations"] = n_gen
  rep["clean"]["eval"]["grammaticality_interval"] = wilson(
      rep["clean"]["eval"]["grammaticality"], n_gen)
  rep["grammaticality_combo"] = combo
  rep["grammaticality_combos"] = combos
  rep["variants"] = rows
  rep["seeds"] = seed_table(rows)

  # Trade-offs (frozen variants drawn as crosses) and the matched comparison (left out).
  configs = matched.seed_configs(rows)
  rep["matched"] = {
      y: matched.matched_comparison(
          comparison.points_by_type(rows, "ce_increase", y, "ce_increase_se"), "ce_increase",
          y, configs=configs, x_se="ce_increase_se")
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

  # Menon et al.'s grid in both splice modes, beside the paper's findings (None without the
  # original mode).
  rep["menon"] = menon_lib.section(rows, n_gen, rep["run"]["language"], training_records)
  # Does each coefficient ladder set L0? (from the training records; empty without them)
  rep["coeff_sensitivity"] = coeff_trajectories.by_type(
      coeff_trajectories.families(rows, training_records or []))

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
      plot(f"corr_{markdown.safe_name(vid)}", plots_lib.plot_correlation, corr, corr_names,
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
        "threshold", "n_strong", "n_null_too_small", "n_testable", "n_tested",
        "n_as_predicted",
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
  rep["ground_truth"] = ground_truth_table(ground_truth, rows) if ground_truth else None
  rep["plots"] = plots

  md_path = os.path.join(out_dir, "report.md")
  with open(md_path, "w") as f:
    f.write("\n".join(markdown.render(rep)) + "\n")
  json_path = os.path.join(out_dir, "report.json")
  jsonio.write(json_path, jsonio.jsonable(rep))
  return {"report.md": md_path, "report.json": json_path, **paths}
