"""Report: `write_report` on synthetic runs in the real schemas (files, valid PNGs, numbers
parsed back, NaN / frozen variants, missing optional inputs), and the per-type causal summary
with its sentence parsed back against the inputs. The data logic it renders (SAE types, Pareto
fronts, matched comparisons, grids, feature recovery) is tested in comparison_test.py."""

import itertools
import json
import math
import os
import re
import struct

import numpy as np
import pytest

import fakes
from jaxsae.grid import sae_groups
from jaxsae.grid import sweep as sweep_lib
from jaxsae.report import assemble

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _hparams(**fields):
  """Every sweep field (registry defaults) with `fields` set, JSON-ified as summary.json has it."""
  variant, = sweep_lib.expand([{"set": fields}], sae_groups.registry())
  return {k: sweep_lib.to_json(v) for k, v in variant.values.items()}


def _line_l0(x):
  return 50.0 - 100.0 * x  # the local front: (0.1, 40), (0.2, 30), (0.3, 20), (0.4, 10)


_features = fakes.feature_summaries


# ------------------------------------------------------------------------------------------------
# write_report on a synthetic run.


def _variant(hp, frozen=False, **metrics):
  return {"group": "g0", "hparams": hp, "frozen": frozen, "bad_step": 7 if frozen else -1,
          "metrics": {"loss": 0.1, "l0": metrics.get("l0", 1.0)}}


def _eval_variant(hp, l0, alive, ce, gram, ev, frozen=False):
  return {"group": "g0", "frozen": frozen, "bad_step": 7 if frozen else -1,
          "splice_mode": "corrected", "hparams": hp, "l0": l0, "alive": alive, "dead": 3,
          "ce_increase": ce, "kl": 0.5 * ce if isinstance(ce, float) else ce,
          "ce_recovered_zero": 0.9, "ce_recovered_mean": 0.8, "ev_token_mean": ev,
          "nmse": 0.1, "grammaticality/corrected/all": gram,
          "grammaticality_std/corrected/all": 0.01,
          "grammaticality/corrected/sentence": gram, "grammaticality_std/corrected/sentence": 0.02}


def _synthetic_run(single_type=False):
  """A run whose local SAEs lie on a line, e2e at half their L0, a frozen NaN TopK variant."""
  hps, evals = {}, {}
  xs = [0.1, 0.2, 0.3, 0.4]
  for i, (coeff, exp) in enumerate(itertools.product([0.5, 2.0], [2, 4])):
    vid = f"v{i:03d}"
    hps[vid] = _hparams(loss="local", sparsity_coeff=coeff, expansion=exp)
    evals[vid] = dict(l0=_line_l0(xs[i]), alive=100.0 - 100 * xs[i], ce=xs[i], gram=0.5 + i / 10,
                      ev=0.9 - i / 10)
  if not single_type:
    hps["v004"] = _hparams(loss="e2e", sparsity_coeff=1.0)
    evals["v004"] = dict(l0=0.5 * _line_l0(0.25), alive=0.8 * (100 - 25), ce=0.25, gram=0.7,
                         ev=0.2)
    hps["v005"] = _hparams(loss="e2e_ds", sparsity_coeff=1.0)
    evals["v005"] = dict(l0=3.0, alive=20.0, ce=0.95, gram=0.2, ev=0.1)
    for j, k in enumerate([4, 8]):
      vid = f"v{6 + j:03d}"
      hps[vid] = _hparams(loss="local", activation="topk", k=k, expansion=2)
      evals[vid] = dict(l0=float(k), alive=30.0, ce=0.2, gram=0.9, ev=0.8)
    evals["v007"].update(l0="nan", ce="nan", gram="nan", ev="inf")  # the frozen one
  frozen = {"v007"} if not single_type else set()
  summary = {"language": "dyck2", "site": "resid_post.0", "steps": 40, "lm_step": 100,
             "token_capacity": 64,
             "variants": {v: _variant(hp, v in frozen) for v, hp in hps.items()}}
  eval_results = {
      "language": "dyck2", "site": "resid_post.0", "steps": 40,
      "clean": {"ce_clean": 0.61234, "ce_zero_ablation": 2.5, "ce_mean_ablation": 1.5,
                "grammatical_mass_clean": 0.987654, "grammaticality": 0.953125,
                "grammaticality_std": 0.0123},
      "grammaticality_settings": {"num_batches": 2, "batch_size": 64},
      "variants": {v: _eval_variant(hps[v], frozen=v in frozen, **e) for v, e in evals.items()}}
  return summary, eval_results


def _md_table_rows(md, first_header):
  """The rows (dicts by header) of the markdown table whose first header is `first_header`."""
  lines = md.splitlines()
  start = next(i for i, l in enumerate(lines) if l.startswith(f"| {first_header} |"))
  headers = [c.strip() for c in lines[start].strip("|").split("|")]
  rows = []
  for line in lines[start + 2:]:
    if not line.startswith("|"):
      break
    rows.append(dict(zip(headers, (c.strip() for c in line.strip("|").split("|")))))
  return rows


def _png_size(path):
  with open(path, "rb") as f:
    head = f.read(24)
  assert head[:8] == PNG_MAGIC and head[12:16] == b"IHDR", path
  return struct.unpack(">II", head[16:24])


def test_write_report_full(tmp_path):
  summary, eval_results = _synthetic_run()
  rng = np.random.default_rng(2)
  names = ["depth", "open", "type=a", "type=b"]
  features = _features(sorted(summary["variants"]), names, rng)
  features["corr"] = {"v000": rng.uniform(-1, 1, (16, 4)), "v004": rng.uniform(-1, 1, (16, 4))}
  features["corr"]["v004"][3, 1] = np.nan
  pair = {"latent": 5, "label": "open", "corr": 0.7, "signed_effect": -0.031,
          "as_predicted": False}
  causal = {"v004": {"threshold": 0.5, "n_strong": 3, "n_testable": 2, "n_tested": 2,
                     "n_as_predicted": 1, "fraction_as_predicted": 0.5, "mean_effect": 0.0123,
                     "median_effect": 0.0123, "pairs": [pair], "not_as_predicted": [pair]}}
  lm = {"language": "dyck2", "steps": 100, "grammatical_fraction": 0.9612,
        "grammatical_fraction_std": 0.0071, "eval_ce": 0.6031, "grammatical_next_token_mass": 0.99}
  meta = {"commit": "abc1234", "machine": "2 CPU cores", "date": "2025-01-01",
          "stage_seconds": {"lm": 12.5, "sae": 30.25, "eval": 4.0}}
  paths = assemble.write_report(str(tmp_path), summary=summary, eval_results=eval_results,
                              features=features, causal=causal, lm=lm, meta=meta)
  for name in ("report.md", "report.json", "l0_vs_ce", "alive_vs_ce", "l0_vs_grammaticality",
               "grid_grammaticality", "grid_ev_token_mean", "feature_recovery", "corr_v000",
               "corr_v004"):
    assert os.path.getsize(paths[name]) > 0, name
  for name, path in paths.items():
    if path.endswith(".png"):
      w, h = _png_size(path)
      assert w > 100 and h > 100, name
  md = open(paths["report.md"]).read()
  rep = json.load(open(paths["report.json"]))

  # Numbers parsed back from report.md equal the inputs.
  rows = {r["id"]: r for r in _md_table_rows(md, "id")}
  assert set(rows) == set(summary["variants"])
  for vid, ev in eval_results["variants"].items():
    r = rows[vid]
    for col, key in (("L0", "l0"), ("alive", "alive"), ("CE increase", "ce_increase"),
                     ("EV", "ev_token_mean"), ("KL", "kl")):
      want = float(ev[key])
      got = float(r[col])
      assert (math.isnan(got) and math.isnan(want)) or got == pytest.approx(want, rel=1e-3), \
          (vid, col)
    gram = float(ev["grammaticality/corrected/all"])
    if math.isnan(gram):
      assert r["spliced gram."] == "nan"
    else:  # 'p [lo, hi]': the Wilson interval over the 2 x 64 generations, computed here
      mean, lo, hi = map(float, re.fullmatch(r"(\S+) \[(\S+), (\S+)\]",
                                             r["spliced gram."]).groups())
      k, n, z = round(gram * 128), 128, 1.959964
      centre = (k / n + z * z / (2 * n)) / (1 + z * z / n)
      half = z / (1 + z * z / n) * math.sqrt(k / n * (1 - k / n) / n + z * z / (4 * n * n))
      assert mean == pytest.approx(gram, abs=5e-4)
      assert (lo, hi) == (pytest.approx(centre - half, abs=5e-4), pytest.approx(centre + half,
                                                                              abs=5e-4))
    assert float(r["clean gram."]) == pytest.approx(0.953125, rel=1e-3)
  assert rows["v007"]["frozen"] == "FROZEN (step 7)" and rows["v000"]["frozen"] == ""
  assert rows["v007"]["EV"] == "inf" and rows["v004"]["type"] == "e2e"
  clean = _md_table_rows(md, "source")
  mean = clean[0]["grammaticality [Wilson 95%]"].split(" [")[0]
  assert float(mean) == pytest.approx(0.953, abs=1e-3)
  assert int(clean[0]["generations"]) == 128
  assert float(clean[1]["CE (nats)"]) == pytest.approx(0.6031)
  for text in ("abc1234", "2 CPU cores", "| sae | 30.25 |"):
    assert text in md

  # The matched comparison, in words and in JSON: the local front interpolated in log CE
  # increase between its points at 0.2 and 0.3 (1.5× apart, covered).
  t = math.log(0.25 / 0.2) / math.log(0.3 / 0.2)
  l0_ratio = 0.5 * _line_l0(0.25) / (30.0 + t * (20.0 - 30.0))
  alive_ratio = 0.8 * 75.0 / (80.0 + t * (70.0 - 80.0))
  assert (f"e2e SAEs need a median {l0_ratio:.2g}× the L0 of local SAEs at the same CE increase "
          "(1 of 1 points covered: interpolated between local front points at most 4× apart in "
          "CE increase, never extrapolated; one seed per configuration, no interval).") in md
  assert f"e2e SAEs need a median {alive_ratio:.2g}× the alive latents of local SAEs" in md
  assert rep["matched"]["l0"]["by_type"]["e2e"]["median_ratio"] == pytest.approx(l0_ratio)
  assert rep["matched"]["l0"]["by_type"]["e2e_ds"]["n_in_range"] == 0
  points = {p["id"]: p for p in rep["matched"]["l0"]["points"]}
  assert points["v006"]["ratio"] == pytest.approx(4.0 / _line_l0(0.2))
  assert "v007" not in points  # frozen: left out

  # Grids: the local sparsity_coeff × expansion grid holds each variant's grammaticality.
  g = rep["grids"]["grammaticality"]["local"]
  assert g["row_field"] == "sparsity_coeff" and g["cols"] == [2, 4]
  for vid in ("v000", "v001", "v002", "v003"):
    hp = summary["variants"][vid]["hparams"]
    i, j = g["rows"].index(hp["sparsity_coeff"]), g["cols"].index(hp["expansion"])
    assert g["values"][i][j] == pytest.approx(eval_results["variants"][vid][
        "grammaticality/corrected/all"])
  assert rep["grids"]["grammaticality"]["topk"]["row_field"] == "k"

  # Feature recovery and causal sections carry their inputs.
  best = rep["feature_recovery"]["by_type"]["local"]["best_variant"]
  want = max(("v000", "v001", "v002", "v003"),
             key=lambda v: features["variants"][v]["matching_score"])
  assert best == want
  assert f"Best SAE {want} (matching score " \
         f"{features['variants'][want]['matching_score']:.4g}" in md
  causal_rows = _md_table_rows(md, "latent")
  assert causal_rows[0]["label"] == "open" and float(causal_rows[0]["signed effect"]) == -0.031
  assert rep["feature_recovery"]["heatmaps"]["v000"]["latents"] == \
      np.argsort(-np.abs(features["corr"]["v000"]).max(1), kind="stable")[:16].tolist()
  assert "## Notes" not in md
  for name in ("l0_vs_ce", "corr_v004"):
    assert f"]({name}.png)" in md


def test_write_report_minimal_single_type(tmp_path):
  summary, eval_results = _synthetic_run(single_type=True)
  paths = assemble.write_report(str(tmp_path), summary=summary, eval_results=eval_results)
  md = open(paths["report.md"]).read()
  rep = json.load(open(paths["report.json"]))
  assert "feature_recovery" not in paths and not any(k.startswith("corr_") for k in paths)
  assert rep["feature_recovery"] is None and rep["causal"] is None and rep["meta"] is None
  assert rep["causal_by_type"] is None and rep["causal_by_type_text"] == []
  assert "## Feature recovery\n\n_Not computed for this run (no `features` input)._" in md
  assert "## Causal predictability\n\n_Not computed for this run (no `causal` input)._" in md
  assert "_Run metadata (commit, machine, date, stage times) not given._" in md
  assert "No matched comparison of L0: only local SAEs: nothing to compare." in md
  assert rep["run"]["types"] == ["local"]
  assert len(_md_table_rows(md, "source")) == 1  # no LM-job row without `lm`
  for name in ("l0_vs_ce", "alive_vs_ce", "l0_vs_grammaticality"):
    _png_size(paths[name])


def test_write_report_matched_comparison_over_seeds(tmp_path):
  summary, eval_results = _synthetic_run()
  for vid in list(summary["variants"]):  # a second seed of every variant, L0 10% higher
    new = f"{vid}s1"
    hp = dict(summary["variants"][vid]["hparams"], seed=1)
    summary["variants"][new] = dict(summary["variants"][vid], hparams=hp)
    ev = dict(eval_results["variants"][vid], hparams=hp)
    ev["l0"] = 1.1 * float(ev["l0"])
    eval_results["variants"][new] = ev
  paths = assemble.write_report(str(tmp_path), summary=summary, eval_results=eval_results)
  md = open(paths["report.md"]).read()
  rep = json.load(open(paths["report.json"]))
  m = rep["matched"]["l0"]
  assert m["n_seeds_max"] == 2 and all(f["n_seeds"] == 2 for f in m["reference_front"])
  e2e = next(p for p in m["points"] if p["type"] == "e2e")
  assert e2e["ids"] == ["v004", "v004s1"] and e2e["n_seeds"] == 2
  iv = e2e["ratio_interval"]
  assert iv["lo"] <= e2e["ratio"] <= iv["hi"] and iv["lo"] < iv["hi"]
  assert m["by_type"]["e2e"]["median_ratio_interval"] is not None
  assert "bootstrap over up to 2 seeds" in md
  line = next(l for l in md.splitlines() if l.startswith("| v004,v004s1 | e2e |"))
  cells = [c.strip() for c in line.strip("|").split("|")]
  assert cells[2] == "2" and float(cells[6]) == pytest.approx(e2e["ratio"], rel=1e-3)
  assert cells[7] == f"[{iv['lo']:.3g}, {iv['hi']:.3g}]"


def test_write_report_without_grammaticality_and_all_nan(tmp_path):
  summary, eval_results = _synthetic_run()
  for v in eval_results["variants"].values():
    for k in [k for k in v if k.startswith("grammaticality")]:
      del v[k]
    v["ce_increase"] = "nan"
  paths = assemble.write_report(str(tmp_path), summary=summary, eval_results=eval_results)
  assert "l0_vs_grammaticality" not in paths and "l0_vs_ce" not in paths
  rep = json.load(open(paths["report.json"]))
  assert rep["grammaticality_combo"] is None
  assert all(a["n"] == 0 for a in rep["matched"]["l0"]["by_type"].values())
  assert "grammaticality_batches=0" in open(paths["report.md"]).read()


def test_write_report_rejects_mismatched_inputs(tmp_path):
  summary, eval_results = _synthetic_run()
  with pytest.raises(ValueError, match="grammaticality='original/all'"):
    assemble.write_report(str(tmp_path), summary=summary, eval_results=eval_results,
                        grammaticality="original/all")
  other = dict(eval_results, site="resid_post.1")
  with pytest.raises(ValueError, match="different runs"):
    assemble.write_report(str(tmp_path), summary=summary, eval_results=other)
  extra = dict(eval_results, variants=dict(eval_results["variants"], v999={}))
  with pytest.raises(ValueError, match="v999"):
    assemble.write_report(str(tmp_path), summary=summary, eval_results=extra)
  with pytest.raises(ValueError, match="'variants'"):
    assemble.write_report(str(tmp_path), summary={}, eval_results=eval_results)


def test_write_report_rejects_correlations_of_the_wrong_width(tmp_path):
  summary, eval_results = _synthetic_run()
  features = _features(["v000"], ["depth", "open"], np.random.default_rng(3))
  features["corr"] = {"v000": np.zeros((8, 3))}
  with pytest.raises(ValueError, match=r"K=2"):
    assemble.write_report(str(tmp_path), summary=summary, eval_results=eval_results,
                        features=features)
  features["corr_columns"] = ["depth", "open", "type=a"]  # names given with the matrices
  paths = assemble.write_report(str(tmp_path), summary=summary, eval_results=eval_results,
                              features=features)
  _png_size(paths["corr_v000"])


# ------------------------------------------------------------------------------------------------
# The causal summary per SAE type.


def _causal_run(rng, with_nmse=True):
  """Local, causal-local and TopK SAEs with random metrics (one causal-local SAE frozen), and
  causal results for every causal-local SAE, two local ones and one TopK one."""
  hps, evals, causal = {}, {}, {}
  kinds = [("local", {}), ("local", {}), ("local", {}), ("local", {}),
           ("causal", {"causal": True, "causal_coeff": 1.0}),
           ("causal", {"causal": True, "causal_coeff": 2.0}),
           ("causal", {"causal": True, "causal_coeff": 4.0}),
           ("causal", {"causal": True, "causal_coeff": 8.0}),
           ("topk", {"activation": "topk", "k": 4})]
  for i, (kind, fields) in enumerate(kinds):
    vid = f"v{i:03d}"
    hps[vid] = _hparams(loss="local", **fields)
    evals[vid] = _eval_variant(hps[vid], l0=float(rng.uniform(1, 20)), alive=30.0,
                               ce=float(rng.uniform(-1e-4, 0.05)), gram=float(rng.uniform(0.5, 1)),
                               ev=float(rng.uniform(0.5, 1)), frozen=vid == "v007")
    evals[vid]["nmse"] = float(rng.uniform(0.01, 0.3))
    if not with_nmse:
      del evals[vid]["nmse"]
    if kind == "causal" or vid in ("v001", "v002", "v008"):
      causal[vid] = {"threshold": 0.5, "n_strong": 4, "n_testable": 4, "n_tested": 4,
                     "n_as_predicted": 2, "fraction_as_predicted": float(rng.random()),
                     "mean_effect": float(rng.normal(0, 0.01)), "median_effect": 0.0,
                     "pairs": [], "not_as_predicted": []}
  summary = {"language": "dyck2", "site": "resid_post.0", "steps": 40, "lm_step": 100,
             "variants": {v: _variant(hp, v == "v007") for v, hp in hps.items()}}
  eval_results = {"language": "dyck2", "site": "resid_post.0", "steps": 40,
                  "clean": {"ce_clean": 0.6, "grammaticality": 0.95},
                  "variants": evals}
  return summary, eval_results, causal


def _expected_causal(summary, eval_results, causal, fid):
  """Per type, from the inputs: the mean causal numbers over the tested SAEs and the medians of
  the live SAEs' metrics."""
  types = {"v000": "local", "v001": "local", "v002": "local", "v003": "local",
           "v004": "causal-local", "v005": "causal-local", "v006": "causal-local",
           "v007": "causal-local", "v008": "topk"}
  out = {}
  for t in ("local", "causal-local", "topk"):
    tested = [v for v in sorted(causal) if types[v] == t]
    live = [v for v in summary["variants"] if types[v] == t and
            not summary["variants"][v]["frozen"]]
    med = lambda key: float(np.median([float(eval_results["variants"][v][key]) for v in live]))
    out[t] = {"n": len(tested),
              "fraction": float(np.mean([causal[v]["fraction_as_predicted"] for v in tested])),
              "effect": float(np.mean([causal[v]["mean_effect"] for v in tested])),
              "fid": med(fid), "ce": med("ce_increase"),
              "gram": med("grammaticality/corrected/all")}
  return out


@pytest.mark.parametrize("with_nmse", [True, False])
def test_write_report_causal_summary_per_type(tmp_path, with_nmse):
  summary, eval_results, causal = _causal_run(np.random.default_rng(7), with_nmse)
  fid, fid_name = ("nmse", "NMSE") if with_nmse else ("ev_token_mean", "explained variance")
  paths = assemble.write_report(str(tmp_path), summary=summary, eval_results=eval_results,
                              causal=causal)
  md = open(paths["report.md"]).read()
  rep = json.load(open(paths["report.json"]))
  want = _expected_causal(summary, eval_results, causal, fid)

  # The table right under the section's title, parsed back.
  section = md.split("## Causal predictability\n\n", 1)[1].split("\n## ", 1)[0]
  assert section.startswith("A pair acts as predicted when its signed effect")
  table = {r["type"]: r for r in _md_table_rows(section, "type")}
  assert list(table) == ["local", "causal-local", "topk"]
  for t, w in want.items():
    r = table[t]
    assert int(r["SAEs tested"]) == w["n"]
    for col, key in (("fraction as predicted", "fraction"), ("mean effect", "effect"),
                     (f"median {fid_name}", "fid"), ("median CE increase", "ce"),
                     ("median spliced gram.", "gram")):
      assert float(r[col]) == pytest.approx(w[key], rel=1e-3), (t, col)
    j = rep["causal_by_type"][t]
    assert j["n_saes"] == w["n"] and j["fraction_as_predicted"] == pytest.approx(w["fraction"])
    assert j[fid] == pytest.approx(w["fid"]) and j["ce_increase"] == pytest.approx(w["ce"])
    assert j["grammaticality"] == pytest.approx(w["gram"])
  assert rep["causal_by_type"]["causal-local"]["n_variants"] == 3  # v007 frozen

  # One sentence, causal-local against local (topk has no causal counterpart).
  sentences = [l[2:] for l in section.splitlines() if l.startswith("- ")]
  assert sentences == rep["causal_by_type_text"] and len(sentences) == 1
  m = re.fullmatch(r"causal-local SAEs: (\S+) of tested pairs act as predicted \(pooled \S+ "
                   r"\[\S+, \S+\] of \d+ pairs\) vs (\S+) \(pooled \S+ \[\S+, \S+\] of \d+ pairs\) "
                   r"for local; median CE increase (\S+) vs (\S+), " + fid_name + r" (\S+) vs (\S+), "
                   r"spliced grammaticality (\S+) vs (\S+)\.", sentences[0])
  assert m, sentences[0]
  c, b = want["causal-local"], want["local"]
  for got, w in zip(m.groups(), [c["fraction"], b["fraction"], c["ce"], b["ce"], c["fid"],
                                 b["fid"], c["gram"], b["gram"]]):
    assert float(got) == pytest.approx(w, rel=5e-3), sentences[0]


def test_write_report_causal_summary_needs_both_types(tmp_path):
  summary, eval_results, causal = _causal_run(np.random.default_rng(8))
  only_causal = {v: c for v, c in causal.items() if v in ("v004", "v005")}
  paths = assemble.write_report(str(tmp_path), summary=summary, eval_results=eval_results,
                              causal=only_causal)
  rep = json.load(open(paths["report.json"]))
  assert list(rep["causal_by_type"]) == ["causal-local"]
  assert rep["causal_by_type"]["causal-local"]["n_saes"] == 2
  assert rep["causal_by_type_text"] == []


@pytest.mark.parametrize("positions, found, expected", [
    ("sentence", ("corrected/all", "corrected/sentence"), "corrected/sentence"),
    ("all", ("corrected/all", "corrected/sentence"), "corrected/all"),
    ("sentence", ("corrected/all", "original/all"), "corrected/all"),  # not evaluated there
    ("all", ("original/sentence",), "original/sentence"),
    ("sentence", (), None),
])
def test_headline_combo_follows_the_training_positions(positions, found, expected):
  eval_results = {"variants": {"v000": {f"grammaticality/{c}": 0.5 for c in found}}}
  assert assemble.headline_combo({"positions": positions, "variants": {}}, eval_results) == expected


def test_eval_report_headline_is_the_training_positions_combo(tmp_path):
  """Without an explicit combo (the eval job's call), a grid trained on sentence tokens is read
  at sentence positions even where 'corrected/all' is also evaluated."""
  summary = {"positions": "sentence", "variants": {"v000": {
      "group": "g0", "hparams": _hparams(), "frozen": False, "metrics": {}}}}
  eval_results = {"clean": {}, "variants": {"v000": {
      "l0": 2.0, "ce_increase": 0.1, "grammaticality/corrected/all": 0.0,
      "grammaticality/corrected/sentence": 0.9}}}
  assemble.write_report(str(tmp_path), summary=summary, eval_results=eval_results)
  rep = json.loads((tmp_path / "report.json").read_text())
  assert rep["grammaticality_combo"] == "corrected/sentence"
  assert rep["variants"][0]["grammaticality"] == 0.9


def test_grammaticality_carries_wilson_intervals_over_its_generations():
  assert assemble.generations({"num_batches": 5, "batch_size": 128}) == 640
  assert assemble.generations("2 x 64") == 128 and assemble.generations("?") is None
  lo, hi = assemble.wilson(0.5, 640)
  # Independent: the normal approximation is close to Wilson at p = 0.5, n = 640.
  assert abs(lo - (0.5 - 1.96 * (0.25 / 640) ** 0.5)) < 1e-3 and abs(hi + lo - 1) < 1e-12
  lo, hi = assemble.wilson(1.0, 64)
  assert hi == 1.0 and 0.9 < lo < 0.96  # not degenerate at k = n
  assert assemble.wilson(None, 64) is None and assemble.wilson(0.5, None) is None


def test_seed_table_and_paired_se_cells(tmp_path):
  summary, eval_results = _synthetic_run()
  for vid in list(summary["variants"]):  # two more seeds of every variant: L0 +10%, +30%
    for seed, f in ((1, 1.1), (2, 1.3)):
      new = f"{vid}s{seed}"
      hp = dict(summary["variants"][vid]["hparams"], seed=seed)
      summary["variants"][new] = dict(summary["variants"][vid], hparams=hp)
      ev = dict(eval_results["variants"][vid], hparams=hp)
      ev["l0"] = f * float(ev["l0"])
      eval_results["variants"][new] = ev
  eval_results["variants"]["v000"]["ce_increase_se"] = 0.0123
  paths = assemble.write_report(str(tmp_path), summary=summary, eval_results=eval_results)
  rep = json.load(open(paths["report.json"]))
  md = open(paths["report.md"]).read()
  row = next(c for c in rep["seeds"] if c["ids"][0] == "v000")
  assert row["ids"] == ["v000", "v000s1", "v000s2"] and row["n_seeds"] == 3
  l0 = float(eval_results["variants"]["v000"]["l0"]) * np.array([1.0, 1.1, 1.3])
  assert row["l0"]["value"] == pytest.approx(l0.mean())
  assert row["l0"]["se"] == pytest.approx(l0.std(ddof=1) / np.sqrt(3))
  assert "### Over seeds" in md
  variants = {r["id"]: r for r in _md_table_rows(md, "id")}
  assert variants["v000"]["CE increase"].endswith("± 0.012")
  assert variants["v000s1"]["key hparams"].endswith("s1")
  assert "±" not in variants["v001"]["CE increase"]  # no SE given: the value alone


def test_lm_length_match_is_reported(tmp_path):
  from jaxsae.lm import lengths  # pylint: disable=g-import-not-at-top
  summary, eval_results = _synthetic_run()
  rng = np.random.default_rng(0)
  data, gen = rng.integers(2, 20, 500), rng.integers(2, 10, 200)
  match = lengths.length_match(gen, np.ones(200, bool), gen % 3 > 0, data)
  lm = {"language": "dyck2", "steps": 100, "grammatical_fraction": 0.9, "generations": "2 x 100",
        "length": {"match": match}}
  paths = assemble.write_report(str(tmp_path), summary=summary, eval_results=eval_results, lm=lm)
  rep = json.load(open(paths["report.json"]))
  assert rep["clean"]["lm"]["length_match"]["tv"] == pytest.approx(match["tv"])
  md = open(paths["report.md"]).read()
  assert f"total variation {match['tv']:.3g}" in md or f"total variation {match['tv']:.4g}" in md
  rows = _md_table_rows(md, "lengths")
  assert sum(int(r["generations"]) for r in rows) == 200


def test_ground_truth_section_reads_the_summary(tmp_path):
  summary, eval_results = _synthetic_run()
  est = lambda v, se=0.01: {"value": v, "se": se, "lo": v - 2 * se, "hi": v + 2 * se, "n": 5}
  ground = {"features": ["a", "b", "c"], "hierarchy": {"a": ["b", "c"]},
            "probing_raw": {"k=1": {"accuracy": est(0.7)}, "full": {"accuracy": est(0.9)}},
            "variants": {"v000": {"mcc": est(0.81), "mcc_null": 0.2, "matched": {"f1": est(0.6)},
                                  "absorption": {"pooled": est(0.25)},
                                  "hedging": {"mean": est(0.125, 0.02)},
                                  "split_latents": est(1.5), "shrinkage": {"gamma": 1.25},
                                  "probing": {"k=1": {"accuracy": est(0.8)},
                                              "minus_raw": {"k=1": est(0.1),
                                                            "k=5": est(-0.02)}}}}}
  paths = assemble.write_report(str(tmp_path), summary=summary, eval_results=eval_results,
                                ground_truth=ground)
  rep = json.load(open(paths["report.json"]))
  gt = rep["ground_truth"]
  assert gt["features"] == 3 and gt["families"] == 1 and len(gt["variants"]) == 1
  md = open(paths["report.md"]).read()
  assert "3 binary features (1 parent → child families)" in md
  row = _md_table_rows(md[md.index("## Ground-truth features"):], "id")[0]
  assert row["id"] == "v000" and row["MCC"] == "0.810 ± 0.010" and row["γ"] == "1.25"
  assert row["absorption"].startswith("0.25") and row["hedging"] == "0.125 ± 0.020"
  assert row["− raw"] == "0.100 ± 0.010" and row["− raw (5)"] == "-0.020 ± 0.010"
  assert gt["variants"][0]["hedging"]["value"] == 0.125


@pytest.mark.parametrize("hp, expected", [
    ({"expansion": 4, "activation": "topk", "k": 8}, "×4 k=8"),
    ({"expansion": 2, "activation": "relu", "sparsity_coeff": 0.01,
      "sparsity_reduction": "sum_batch"}, "×2 α=0.01"),
    ({"expansion": 4, "activation": "jumprelu", "sparsity_coeff": 1.0,
      "jumprelu_init_threshold": 0.7}, "×4 λ=1 θ0=0.7"),
    ({"expansion": 1, "activation": "sparsemax_dist"}, "×1"),
])
def test_key_hparam_names_what_tells_configurations_apart(hp, expected):
  assert assemble._key_hparam(hp) == expected  # pylint: disable=protected-access
