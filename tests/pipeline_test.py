"""The main job: the smoke pipeline end to end, skipping finished stages, and a run killed
mid-stage that, rerun, ends with the same numbers as an uninterrupted one."""

import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

from experiments.configs import pipeline as pipeline_configs
from jaxsae import pipeline
from jaxsae.analysis import stage as analysis_stage
from jaxsae.evaluation import evaluate
from jaxsae.grid import train_sae
from jaxsae.lm import train_lm

ROOT = pathlib.Path(__file__).resolve().parents[1]
_VALIDATORS = {"lm": train_lm, "sae": train_sae, "eval": evaluate, "analysis": analysis_stage}


def _config(**sae):
  c = pipeline_configs.get_config("smoke,language=dyck2")
  c.sae.checkpoint_every = 2  # a checkpoint after every host call, so a kill loses nothing
  for k, v in sae.items():
    c.sae[k] = v
  c.lock()
  return c


def _numbers(workdir):
  """What the run computed (timings and paths dropped)."""
  ev = json.load(open(os.path.join(workdir, "eval", "eval.json")))
  ev.pop("seconds", None)
  ev.pop("sae_workdir", None)
  summary = json.load(open(os.path.join(workdir, "sae", "summary.json")))
  features = json.load(open(os.path.join(workdir, "analysis", "features.json")))
  causal = json.load(open(os.path.join(workdir, "analysis", "causal.json")))
  causal["ground_truth"] = json.load(open(os.path.join(workdir, "analysis",
                                                       "ground_truth.json")))
  return ev, summary, features, causal


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("straight"))
  records = pipeline.run(_config(), workdir)
  return workdir, records


def test_smoke_pipeline_writes_a_report(straight):
  workdir, records = straight
  assert all(records[s]["done"] for s in pipeline.STAGES)
  for name in ("report.md", "report.json", "stages.json", "config.json"):
    assert os.path.getsize(os.path.join(workdir, name)) > 0
  pngs = [f for f in os.listdir(workdir) if f.endswith(".png")]
  assert pngs and all(open(os.path.join(workdir, f), "rb").read(8) == b"\x89PNG\r\n\x1a\n"
                      for f in pngs)
  ev, summary, features, causal = _numbers(workdir)
  assert set(ev["variants"]) == set(summary["variants"]) == set(features["variants"])
  assert causal["chosen"] and set(causal["chosen"]) <= set(summary["variants"])
  ground = causal["ground_truth"]["variants"]
  assert set(ground) == set(summary["variants"])
  assert all(0.0 <= g["mcc"]["value"] <= 1.0 for g in ground.values())
  text = open(os.path.join(workdir, "report.md")).read()
  assert "dyck2" in text and "## Ground-truth features" in text


def test_rerun_skips_finished_stages(straight, monkeypatch):
  workdir, records = straight
  calls = []
  for stage in pipeline.STAGES:
    monkeypatch.setitem(pipeline._STAGE_FNS, stage, lambda *a, s=stage: calls.append(s))  # pylint: disable=protected-access
  again = pipeline.run(_config(), workdir)
  assert calls == [] and again == records
  # A changed eval config re-runs eval and everything after it, not the training stages.
  c = _config()
  c.unlock()
  c.eval.num_batches += 1
  pipeline.run(c, workdir)
  assert calls == ["eval", "report"]


def test_killed_mid_stage_then_rerun_equals_straight(straight, tmp_path, monkeypatch):
  workdir = str(tmp_path / "killed")
  original = train_sae._append_jsonl  # pylint: disable=protected-access
  calls = []

  def dies_on_second_call(path, records):
    calls.append(path)
    if len(calls) == 2:
      raise KeyboardInterrupt("killed mid-stage")
    return original(path, records)

  monkeypatch.setattr(train_sae, "_append_jsonl", dies_on_second_call)
  # Every stage's config is validated once per pipeline call, up front, and not again by the
  # stage (the first call runs lm and part of sae; the second sae again, eval and analysis).
  validated = []
  for stage, module in _VALIDATORS.items():
    monkeypatch.setattr(module, "validate_config",
                        lambda *a, s=stage, f=module.validate_config, **k: (validated.append(s),
                                                                            f(*a, **k))[1])
  with pytest.raises(KeyboardInterrupt):
    pipeline.run(_config(), workdir)
  assert sorted(validated) == sorted(_VALIDATORS)
  assert not json.load(open(os.path.join(workdir, "stages.json")))["sae"]["done"]
  monkeypatch.setattr(train_sae, "_append_jsonl", original)
  pipeline.run(_config(), workdir)
  assert sorted(validated) == sorted(list(_VALIDATORS) * 2)
  assert _numbers(workdir) == _numbers(straight[0])


def test_bad_pipeline_args_fail_clearly():
  with pytest.raises(ValueError, match="stages="):
    pipeline_configs.get_config("stages=lm+bogus")
  with pytest.raises(ValueError, match="unknown language"):
    pipeline_configs.get_config("language=klingon")
  with pytest.raises(ValueError, match="at most one"):
    pipeline_configs.get_config("smoke,full")


def test_bad_stage_configs_fail_before_anything_runs(tmp_path):
  c = _config()
  c.unlock()
  c.analysis.causal_variants = "some"
  with pytest.raises(ValueError, match="causal_variants='some'"):
    pipeline.run(c, str(tmp_path / "p"))
  c.analysis.causal_variants = "all"
  for bad in (18, 0):  # too few null latents for any effect to pass at 95%
    c.analysis.null_latents = bad
    with pytest.raises(ValueError, match=f"null_latents={bad!r} must be an int >= 19"):
      pipeline.run(c, str(tmp_path / "p"))
  c.analysis.null_latents = 19
  c.sae.sweep = [{"set": {"loss": "nope"}}]
  with pytest.raises(ValueError, match="nope"):
    pipeline.run(c, str(tmp_path / "p"))
  # A transcoder grid with causal predictability on (it would splice at the wrong site).
  c.sae.site = "mlp_in.0"
  c.sae.sweep = [{"product": {"target_site": ["mlp_out.0"]}, "set": {"loss": "e2e"}}]
  assert c.analysis.causal
  with pytest.raises(ValueError, match="analysis.causal=False for transcoder grids"):
    pipeline.run(c, str(tmp_path / "p"))
  c.analysis.causal = False
  pipeline.validate_config(c)  # passes without the causal part
  assert not os.path.exists(tmp_path / "p")


def test_rerun_of_the_analysis_keeps_the_rest_and_recomputes_the_same(straight, tmp_path):
  """A copy of the finished run: the analysis and report run again with the workdir's own config,
  lm / sae / eval are kept, and the re-run computes the same numbers (deterministic)."""
  workdir = str(tmp_path / "copy")
  shutil.copytree(straight[0], workdir)
  before = json.load(open(os.path.join(workdir, "stages.json")))
  os.remove(os.path.join(workdir, "analysis", "causal.json"))  # what a re-run must rewrite
  records = pipeline.rerun(workdir, ["analysis"])
  assert {s: records[s] for s in ("lm", "sae", "eval")} == {
      s: before[s] for s in ("lm", "sae", "eval")}
  assert records["analysis"]["done"] and records["report"]["done"]
  assert records["analysis"]["finished"] >= before["analysis"]["finished"]
  assert _numbers(workdir) == _numbers(straight[0])
  assert not os.path.exists(os.path.join(workdir, "analysis.prev", "causal.json"))
  assert os.path.exists(os.path.join(workdir, "analysis.prev", "features.json"))
  # Only the report: nothing else runs.
  again = pipeline.rerun(workdir, ["report"])
  assert {s: again[s] for s in ("lm", "sae", "eval", "analysis")} == {
      s: records[s] for s in ("lm", "sae", "eval", "analysis")}


def test_rerun_refuses_what_it_cannot_do(straight, tmp_path):
  with pytest.raises(ValueError, match="choose among"):
    pipeline.rerun(straight[0], ["sae"])
  with pytest.raises(ValueError, match="choose among"):
    pipeline.rerun(straight[0], [])
  with pytest.raises(ValueError, match="no pipeline config.json"):
    pipeline.rerun(str(tmp_path), ["analysis"])
  unfinished = str(tmp_path / "unfinished")
  shutil.copytree(straight[0], unfinished)
  records = json.load(open(os.path.join(unfinished, "stages.json")))
  records["eval"]["done"] = False
  json.dump(records, open(os.path.join(unfinished, "stages.json"), "w"))
  with pytest.raises(ValueError, match="'eval' .* is not finished.*finish the run first"):
    pipeline.rerun(unfinished, ["analysis"])
  assert json.load(open(os.path.join(unfinished, "stages.json"))) == records  # nothing changed
  records["eval"]["done"], records["analysis"]["done"] = True, False
  json.dump(records, open(os.path.join(unfinished, "stages.json"), "w"))
  with pytest.raises(ValueError,
                     match=r"'analysis' .* rerun from that stage \(stages=\['analysis'\]\)"):
    pipeline.rerun(unfinished, ["report"])


def test_rerun_command_reports_a_bad_stage(tmp_path):
  proc = subprocess.run([sys.executable, "-m", "experiments.rerun", f"--workdir={tmp_path}",
                         "--stages=sae"], cwd=ROOT, capture_output=True, text=True, check=False)
  assert proc.returncode != 0 and "choose among ('analysis', 'report')" in proc.stderr
