"""report.md from the report dict of `assemble.write_report` (the single source of every number).

`render(rep)` returns the markdown lines; the helpers format cells: numbers through
`comparison.format_number`, fractions with their Wilson intervals, estimates through
`stats.format_estimate`.
"""

from __future__ import annotations

import re
from typing import Any, Mapping, Sequence

import numpy as np

from jaxsae.analysis import comparison
from jaxsae.core import stats
from jaxsae.report import coeff_trajectories
from jaxsae.report import menon as menon_lib


def safe_name(name: str) -> str:
  """A file-name-safe form of a variant id (plots are named after it)."""
  return re.sub(r"[^A-Za-z0-9_.-]+", "_", str(name))


def frac(p, interval) -> str:
  """A fraction with its 95% interval, e.g. '0.984 [0.945, 0.996]'."""
  if p is None:
    return comparison.format_number(p)
  if not interval:
    return comparison.format_number(p)
  return f"{p:.3f} [{interval[0]:.3f}, {interval[1]:.3f}]"


def md_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
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


def render(rep: Mapping[str, Any]) -> list[str]:
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
      out += md_table(["stage", "seconds"],
                       [[k, comparison.as_float(v)] for k, v in stages.items()])
  else:
    out += ["", "_Run metadata (commit, machine, date, stage times) not given._", ""]

  out += ["## Clean model", ""]
  ce, cl = rep["clean"]["eval"], rep["clean"].get("lm")
  table = [["eval job (held-out)", frac(ce["grammaticality"], ce["grammaticality_interval"]),
            ce["generations"], ce["ce_clean"], ce["grammatical_mass_clean"]]]
  if cl:
    table.append(["LM job", frac(cl["grammatical_fraction"],
                                  cl["grammatical_fraction_interval"]),
                  cl["generations"], cl["eval_ce"], cl["grammatical_next_token_mass"]])
  out += md_table(["source", "grammaticality [Wilson 95%]", "generations", "CE (nats)",
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
  out += _length_match(cl.get("length_match") if cl else None)

  out += ["## Variants", ""]
  clean_g = ce["grammaticality"]
  combo = rep["grammaticality_combo"]
  out += [f"Spliced grammaticality: generation combo `{combo}` (mode/positions), with its Wilson "
          f"95% interval over {ce['generations'] or '?'} generations; CE recovered "
          "against zero ablation; EV = token-mean explained variance; ‖x̂‖/‖x‖ = token mean of "
          "the reconstruction's norm over the activation's (shrinkage below 1); ‖b_dec‖ = the norm of "
          "the bias added to every reconstruction (decoder bias plus pre-bias).", ""]
  out += md_table(
      ["id", "type", "key hparams", "L0", "alive", "CE increase", "KL", "CE recovered",
       "EV", "‖x̂‖/‖x‖", "‖b_dec‖", "spliced gram.", "clean gram.", "frozen"],
      [[r["id"], r["type"], r["key_hparam"], r["l0"], r["alive"],
        _with_se(r["ce_increase"], r.get("ce_increase_se")), r["kl"],
        r["ce_recovered_zero"], r["ev_token_mean"], r["norm_ratio"], r["b_dec_norm"],
        frac(r["grammaticality"], r["grammaticality_interval"]), clean_g,
        f"FROZEN (step {r['bad_step']})" if r["frozen"] else ""] for r in rep["variants"]])
  if len(rep["grammaticality_combos"]) > 1:
    cs = rep["grammaticality_combos"]
    out += ["Spliced grammaticality by splice mode / positions:", ""]
    out += md_table(["id"] + cs, [[r["id"]] + [
        r["grammaticality_by_combo"].get(c, {}).get("mean") for c in cs] for r in rep["variants"]])
  out += ["CE increase ± SE: the SE over held-out sequences, paired (the same sequences clean "
          "and spliced; `evaluation.eval_passes.ratio_se`).", ""]
  out += img("l0_vs_grammaticality", "spliced grammaticality vs L0")
  out += _seed_section(rep.get("seeds") or [])
  out += coeff_trajectories.render_by_type(rep.get("coeff_sensitivity") or [], md_table)

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
      out += md_table(["id", "type", "seeds", "CE increase", y_name,
                        f"{m['reference']} at same CE", "ratio", "95% interval",
                        "ratio over CE ± 1.96 SE", "note"],
                       [[p["id"], p["type"], p["n_seeds"], p["x"], p["y"], p["reference_y"],
                         p["ratio"], _ratio_interval(p["ratio_interval"]),
                         _ratio_over_x(p), p["note"] or ""] for p in pts])
  out += ["Frozen variants are left out of the comparison.", ""]
  out += img("l0_vs_ce", "CE increase vs L0") + img("alive_vs_ce", "CE increase vs alive")

  out += ["## Grid (Menon layout)", ""]
  if rep["grids"]:
    for metric, grids in rep["grids"].items():
      for t, g in grids.items():
        out += [f"{comparison.METRIC_NAMES.get(metric, metric)}, {t} (rows "
                f"{g['row_field'] or '—'}, columns {g['col_field']}):", ""]
        out += md_table([g["row_field"] or ""] + [comparison.format_number(c) for c in g["cols"]],
                         [[v if isinstance(v, str) else comparison.format_number(v)] + list(vals)
                          for v, vals in zip(g["rows"], g["values"])])
      out += img(f"grid_{metric}", f"grid of {metric}")
  else:
    out += ["_No SAE type spans a k/α × expansion grid in this run._", ""]
  out += menon_lib.render(rep.get("menon"), md_table)

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
      out += md_table(["label", "best latent", "corr", "type mean best |corr|"],
                       [[n, b["latent"], b["corr"], r["mean_best_abs_corr"].get(n)]
                        for n, b in r["best_latents"].items()])
    out += md_table(["id", "matching score", "mean best |corr|", "labels ≥ 0.8", "dead"],
                     [[vid, v["matching_score"], v["mean_best_abs_corr"],
                       v["n_labels_corr_ge_0.8"], v["dead_latents"]]
                      for vid, v in fr["per_variant"].items()])
    out += img("feature_recovery", "feature recovery")
    for vid in fr["heatmaps"]:
      out += img(f"corr_{safe_name(vid)}", f"correlations of {vid}")
  else:
    out += ["_Not computed for this run (no `features` input)._", ""]

  out += ["## Causal predictability", ""]
  cz, by_type = rep["causal"], rep["causal_by_type"]
  if by_type:
    fid = comparison.fidelity_metric(by_type)
    fid_name = "NMSE" if fid == "nmse" else comparison.METRIC_NAMES[fid]
    out += ["A pair acts as predicted when its signed effect (expected token classes moved in "
            "the direction of the correlation) is positive and beats the same effect of random "
            "live latents of the SAE unrelated to the label at 95% (one-sided permutation test). "
            "Pairs whose label leaves fewer unrelated live latents than the test needs "
            f"({stats.min_null_size()}) are not tested (\"null too small\").", ""]
    out += ["Per SAE type: means over the SAEs tested, and pooled over their pairs (Wilson 95% "
            "interval; mean signed effect ± SE over pairs); medians over all of the type's live "
            f"SAEs (spliced grammaticality: `{rep['grammaticality_combo']}`).", ""]
    out += md_table(["type", "SAEs tested", "fraction as predicted", "mean effect", "pairs",
                      "null too small", "pooled fraction [95% CI]", "pair effect ± SE",
                      f"median {fid_name}", "median CE increase", "median spliced gram."],
                     [[t, v["n_saes"], v["fraction_as_predicted"], v["mean_effect"],
                       v.get("n_pairs"), v.get("n_null_too_small"),
                       stats.format_estimate(v.get("pooled_fraction")),
                       stats.format_estimate(v.get("pooled_mean_effect"), style="se"), v[fid],
                       v["ce_increase"], v["grammaticality"]] for t, v in by_type.items()])
    out += [f"- {line}" for line in rep["causal_by_type_text"]]
    out += [""] if rep["causal_by_type_text"] else []
  if cz:
    out += md_table(["id", "type", "strong pairs", "null too small", "tested", "as predicted",
                      "fraction", "95% interval", "right sign", "mean effect", "± SE",
                      "null latents"],
                     [[vid, c["type"], c["n_strong"], c.get("n_null_too_small"), c["n_tested"],
                       c["n_as_predicted"],
                       c["fraction_as_predicted"], _interval(c["fraction_as_predicted_interval"]),
                       c["n_right_sign"], c["mean_effect"], c["mean_effect_se"], c["null_size"]]
                      for vid, c in cz.items()])
    for vid, c in cz.items():
      bad = c["not_as_predicted"]
      if bad:
        out += [f"{vid}: pairs not acting as predicted:", ""]
        out += md_table(["latent", "label", "corr", "signed effect", "p", "null 95% quantile"],
                         [[p["latent"], p["label"], p["corr"], p["signed_effect"], p["p_value"],
                           p["null_quantile"]] for p in bad])
  else:
    out += ["_Not computed for this run (no `causal` input)._", ""]

  out += _ground_truth_section(rep.get("ground_truth"))
  if rep["notes"]:
    out += ["## Notes", ""] + [f"- {n}" for n in rep["notes"]]
  return out


def _with_se(value, se) -> str:
  """'value ± se' with the decimals the SE resolves (the value alone without an SE)."""
  if se is None or not np.isfinite(se) or value is None:
    return comparison.format_number(value)
  return stats.format_estimate({"value": value, "se": se}, style="se")


def _length_match(m: Mapping[str, Any] | None) -> list[str]:
  """The LM's generated lengths against its language's (`lm.lengths.length_match`)."""
  if not m:
    return []
  null = m["tv_null"]
  lens = m["mean_length"]
  out = [f"Generated lengths against held-out sentences (quantile buckets of the data's "
         f"lengths): total variation {comparison.format_number(m['tv'])}; sampling alone gives "
         f"{comparison.format_number(null['mean'])} (95th percentile "
         f"{comparison.format_number(null['p95'])}) for {null['sample_size']} sentences of the "
         f"data; mean length {comparison.format_number(lens['generated'])} generated vs "
         f"{comparison.format_number(lens['data'])} in the data.", ""]
  out += md_table(["lengths", "generations", "grammatical [Wilson 95%]"],
                  [[b["lengths"] if isinstance(b["lengths"], str)
                    else f"{b['lengths'][0]}–{b['lengths'][1]}", b["generations"],
                    stats.format_estimate(b["grammatical"])] for b in m["buckets"]])
  return out


def _seed_section(seeds: Sequence[Mapping[str, Any]]) -> list[str]:
  """Per configuration with several seeds: mean ± SE over its seeds."""
  if not seeds:
    return []
  names = {"l0": "L0", "alive": "alive", "ce_increase": "CE increase", "kl": "KL",
           "ev_token_mean": "EV", "grammaticality": "spliced gram."}
  out = ["### Over seeds", "", "Configurations trained with several SAE seeds: mean ± SE over "
         "the seeds (the spread of training, not of the held-out sample).", ""]
  out += md_table(["type", "key hparams", "seeds"] + list(names.values()),
                  [[c["type"], c["key_hparam"], c["n_seeds"]]
                   + [stats.format_estimate(c[m], style="se") for m in names] for c in seeds])
  return out


def _ground_truth_section(gt: Mapping[str, Any] | None) -> list[str]:
  """Recovery of the grammar's exact features (`analysis.ground_truth`)."""
  if not gt or not gt["variants"]:
    return []
  raw = gt["raw_probe_accuracy"]
  out = ["## Ground-truth features", "",
         f"Against the grammar's {gt['features']} binary features ({gt['families']} parent → "
         "child families): MCC = mean |corr| of latents matched one-to-one to features "
         "(Hungarian), ± SE over features, beside the MCC of random codes (null); F1 of the "
         "matched latents; absorption = parent tokens where the parent's latent is silent and "
         "a child's latent fires instead (Wilson 95%); hedging = the share of a child "
         "latent's firing mass on parent tokens that are not the child's (mean ± SE over "
         "children); split = latents per feature with "
         "precision ≥ 0.9; 1-sparse probe = held-out accuracy of the best single latent, and "
         "its paired difference from the best single raw dimension; − raw (5) the same for "
         "the best probe on 5 latents against 5 raw dimensions (raw: "
         f"{stats.format_estimate(raw.get('k=1'), style='se')}; all raw dimensions: "
         f"{stats.format_estimate(raw.get('full'), style='se')}); γ = the rescaling of x̂ "
         "that best fits x (> 1: shrunk).", ""]
  out += md_table(["id", "type", "key hparams", "L0", "MCC", "null", "F1", "absorption",
                   "hedging", "split", "1-probe", "− raw", "− raw (5)", "γ"],
                  [[v["id"], v["type"], v["key_hparam"], v["l0"],
                    stats.format_estimate(v["mcc"], style="se"), v["mcc_null"],
                    stats.format_estimate(v["f1"], style="se"),
                    stats.format_estimate(v["absorption"]),
                    stats.format_estimate(v.get("hedging"), style="se"),
                    stats.format_estimate(v["split_latents"], style="se"),
                    stats.format_estimate(v["probe_k1"], style="se"),
                    stats.format_estimate(v["probe_k1_minus_raw"], style="se"),
                    stats.format_estimate(v.get("probe_k5_minus_raw"), style="se"), v["gamma"]]
                   for v in gt["variants"]])
  return out


def _ratio_over_x(point: Mapping[str, Any]) -> str:
  """The ratio's range over the point's CE-increase interval, or why it is not resolved."""
  r = point.get("ratio_over_x")
  if r is not None:
    return _interval([r["lo"], r["hi"]])
  return f"not resolved: {point['x_note']}" if point.get("x_note") else "—"

