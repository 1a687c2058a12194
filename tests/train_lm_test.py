"""Tests for jaxsae.lm.train_lm: learning, exact resume, errors, and the `lm` config end to end."""

import json
import os

import jax
import numpy as np
import pytest

from experiments.configs import lm as lm_config
from jaxsae import grammars
from jaxsae.core import checkpoint as ckpt_lib
from jaxsae.lm import lm_step
from jaxsae.lm import train_lm

_TIMING = ("tokens_per_s", "train_seconds")


def _config(**overrides):
  """The smoke config (tiny model), longer; only traced fields differ, so every test shares
  one compilation of each function with the smoke test."""
  c = lm_config.get_config("smoke")
  c.eval.final_gen_batches = 1
  c.num_steps = 8
  c.optim.warmup_steps = 2
  c.keep_checkpoints = 3
  for k, v in overrides.items():
    node = c
    *parents, last = k.split(".")
    for p in parents:
      node = node[p]
    node[last] = v
  return c


def _records(workdir, kinds=("train", "eval")):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    recs = [json.loads(line) for line in f]
  return [{k: v for k, v in r.items() if k not in _TIMING} for r in recs if r["kind"] in kinds]


def _final_params(workdir, config):
  with ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints")) as ck:
    restored = ck.restore(jax.eval_shape(lambda: lm_step.init_state(config)))
  return restored


def _assert_trees_equal(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      x, y = jax.random.key_data(x), jax.random.key_data(y)
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
  """8 steps in one run (the reference for the resume tests)."""
  workdir = str(tmp_path_factory.mktemp("straight"))
  summary = train_lm.run(_config(), workdir)
  return workdir, summary


def test_summary_and_files(straight):
  workdir, summary = straight
  for key in ("grammatical_fraction", "grammatical_fraction_std", "eval_ce", "steps",
              "train_seconds", "language", "param_count"):
    assert key in summary
  assert summary["steps"] == 8 and summary["language"] == "dyck2"
  with open(os.path.join(workdir, "summary.json")) as f:
    assert json.load(f) == json.loads(json.dumps(summary))
  with open(os.path.join(workdir, "config.json")) as f:
    assert json.load(f)["num_steps"] == 8
  train = _records(workdir, ("train",))
  assert [r["step"] for r in train] == [2, 4, 6, 8]
  assert all(np.isfinite(r["loss"]) for r in train)
  assert [r["step"] for r in _records(workdir, ("eval",))] == [2, 4, 6, 8]


def test_short_training_lowers_the_loss(tmp_path):
  config = _config(num_steps=40, **{"optim.peak_lr": 1e-2, "eval_every": 40,
                                    "checkpoint_every": 40})
  train_lm.run(config, str(tmp_path))
  losses = [r["loss"] for r in _records(str(tmp_path), ("train",))]
  assert losses[-1] < losses[0] - 0.5, losses


def test_resume_is_bit_identical(straight, tmp_path):
  ref_dir, ref_summary = straight
  workdir = str(tmp_path)
  train_lm.run(_config(num_steps=4), workdir)  # first half, then a fresh `run` continues
  summary = train_lm.run(_config(num_steps=8), workdir)
  assert _records(workdir) == _records(ref_dir)
  config = _config()
  _assert_trees_equal(_final_params(workdir, config).state, _final_params(ref_dir, config).state)
  for k in ("eval_ce", "grammatical_fraction", "grammatical_next_token_mass", "steps"):
    assert summary[k] == ref_summary[k]


def test_finished_run_is_not_retrained(straight, tmp_path):
  ref_dir, _ = straight
  workdir = str(tmp_path / "w")
  import shutil  # pylint: disable=g-import-not-at-top
  shutil.copytree(ref_dir, workdir)
  before = _records(workdir, ("train", "eval", "final"))
  summary = train_lm.run(_config(), workdir)
  assert _records(workdir, ("train", "eval", "final")) == before  # nothing ran
  os.remove(os.path.join(workdir, "summary.json"))
  again = train_lm.run(_config(), workdir)  # summary only (a kill before summary.json)
  # From the checkpoint and metrics.jsonl: the same summary, and the 'final' record replaced,
  # not duplicated.
  assert _records(workdir, ("train", "eval", "final")) == before
  assert os.path.exists(os.path.join(workdir, "summary.json"))
  assert again == summary and again["steps"] == 8


def test_config_mismatch_names_fields(straight):
  workdir, _ = straight
  with pytest.raises(ckpt_lib.ConfigMismatchError) as err:
    train_lm.run(_config(**{"optim.peak_lr": 5e-3, "mask_decorator": True}), workdir)
  msg = str(err.value)
  assert "optim.peak_lr" in msg and "mask_decorator" in msg and "new --workdir" in msg


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_corrupted_checkpoint_falls_back_and_stays_exact(straight, tmp_path):
  ref_dir, _ = straight
  workdir = str(tmp_path / "w")
  import shutil  # pylint: disable=g-import-not-at-top
  shutil.copytree(ref_dir, workdir)
  os.remove(os.path.join(workdir, "summary.json"))
  step8 = os.path.join(workdir, "checkpoints", "8")
  with open(os.path.join(step8, "state", "_METADATA"), "w") as f:
    f.write("{broken")
  train_lm.run(_config(), workdir)  # falls back to step 6 and retrains 6 -> 8
  assert os.listdir(os.path.join(workdir, "checkpoints_corrupt"))[0].startswith("8-")
  config = _config()
  _assert_trees_equal(_final_params(workdir, config).state, _final_params(ref_dir, config).state)
  assert _records(workdir) == _records(ref_dir)


def test_nan_loss_raises_naming_the_step_and_keeps_the_checkpoint(tmp_path):
  workdir = str(tmp_path)
  train_lm.run(_config(num_steps=4), workdir)
  with pytest.raises(FloatingPointError, match=r"at step 5 .*checkpoints/4 \(intact\)"):
    train_lm.run(_config(num_steps=8, debug_nan_step=5), workdir)
  config = _config()
  restored = _final_params(workdir, config)
  assert restored.step == 4
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(restored.state.params))
  summary = train_lm.run(_config(num_steps=8), workdir)  # resumes cleanly without the hook
  assert summary["steps"] == 8


def test_huge_learning_rate_is_detected(tmp_path):
  with pytest.raises(FloatingPointError, match=r"at step \d+"):
    train_lm.run(_config(**{"optim.peak_lr": 1e30}), str(tmp_path))


@pytest.mark.parametrize("field,value,match", [
    ("language", "klingon", "config.language='klingon' is unknown"),
    ("batch_size", 0, "config.batch_size=0 must be a positive"),
    ("model.d_model", 33, "divisible"),
    ("max_len", 12, r"config.max_len=12 is too short .* use max_len >= 20"),
    ("max_len", 100, "exceeds config.model.context"),
    ("eval_every", 3, "multiple of config.steps_per_call"),
    ("optim.b2", 1.0, r"config.optim.b2=1.0 must lie in \[0, 1\)"),
    ("optim.b1", 1.5, r"config.optim.b1=1.5 must lie in \[0, 1\)"),
    ("optim.warmup_steps", -5, "config.optim.warmup_steps=-5 must be an integer >= 0"),
    ("optim.peak_lr", float("inf"), "config.optim.peak_lr=inf must be a finite number > 0"),
    ("optim.peak_lr", float("nan"), "config.optim.peak_lr=nan must be a finite number > 0"),
    ("optim.end_lr", float("inf"), "config.optim.end_lr=inf must be a finite number >= 0"),
    ("optim.grad_clip", float("nan"), r"config.optim.grad_clip=nan must be > 0"),
    ("num_steps", 0, "config.num_steps=0 must be a positive"),
    ("eval.max_new_tokens", 80, "exceed config.model.context"),
])
def test_config_validation(field, value, match, tmp_path):
  with pytest.raises(ValueError, match=match):
    train_lm.run(_config(**{field: value}), str(tmp_path))
  assert not os.path.exists(os.path.join(str(tmp_path), "checkpoints"))  # failed before work


def test_learning_rate_above_one_is_accepted_with_a_warning(caplog):
  train_lm.validate_config(_config(**{"optim.peak_lr": 10.0}))
  assert "config.optim.peak_lr=10 is above 1" in caplog.text
  caplog.clear()
  train_lm.validate_config(_config())
  assert "is above" not in caplog.text


def test_diverging_run_is_flagged_in_the_summary(straight, tmp_path, caplog):
  assert straight[1]["divergence"] is None
  # lr 10: finite, but the CE grows to ~2e3, far above the uniform guess ln 13 = 2.56.
  summary = train_lm.run(_config(**{"optim.peak_lr": 10.0}), str(tmp_path))
  verdict = summary["divergence"]
  assert verdict is not None and verdict["ratio"] > 100
  assert verdict["reference"] == pytest.approx(np.log(grammars.get("dyck2").vocab_size))
  with open(os.path.join(str(tmp_path), "summary.json")) as f:
    assert json.load(f)["divergence"] == verdict
  assert "The run diverged" in caplog.text


def test_lm_smoke_config_end_to_end(tmp_path):
  from experiments import main  # pylint: disable=g-import-not-at-top
  config = lm_config.get_config("smoke")
  assert main.JOBS[config.job] == "jaxsae.lm.train_lm"
  summary = train_lm.run(config, str(tmp_path))
  with open(os.path.join(str(tmp_path), "summary.json")) as f:
    on_disk = json.load(f)
  for key in train_lm.SUMMARY_KEYS:
    assert key in on_disk, key
  assert summary["steps"] == config.num_steps == on_disk["steps"]
  assert 0.0 <= on_disk["grammatical_fraction"] <= 1.0


def test_every_language_has_a_valid_config():
  from jaxsae import grammars  # pylint: disable=g-import-not-at-top
  for name in grammars.names():
    for arg in ("", ",smoke", ",full"):
      train_lm.validate_config(lm_config.get_config(f"language={name}{arg}"))
  with pytest.raises(ValueError, match="unknown config switch"):
    lm_config.get_config("fast")
