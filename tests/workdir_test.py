"""What a workdir guarantees, tried as a user would: kill -9 anywhere, then rerun, ends with the
files of an uninterrupted run; one writer at a time; readers write nothing; inputs are pinned;
torn files are repaired or refused with the fix."""

import glob
import json
import os
import random
import shutil
import signal
import subprocess
import sys

import pytest

import fakes
from experiments.configs import eval as eval_configs
from experiments.configs import export as export_configs
from experiments.configs import lm as lm_configs
from experiments.configs import pipeline as pipeline_configs
from experiments.configs import sae_menon
from jaxsae import pipeline
from jaxsae.core import checkpoint as ckpt_lib
from jaxsae.core import workdir as workdir_lib
from jaxsae.evaluation import evaluate
from jaxsae.grid import train_sae as ts
from jaxsae.grid import trained as trained_lib
from jaxsae.interop import export
from jaxsae.lm import bundle
from jaxsae.lm import lm_step
from jaxsae.lm import train_lm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SWEEP = [{"product": {"sparsity_coeff": [1.0, 4.0]}, "set": {"loss": "local"}}]
STEPS = dict(steps=6, log_every=2, checkpoint_every=2, decay_steps=6)

# The SAE job in a child process, optionally SIGKILLing itself at a named point:
#   none        run to the end
#   torn:N      in the N-th metrics append, after writing half of its text
#   save:N      in the N-th checkpoint save, after the state item is written and before the
#               meta item and the step directory are renamed into place
#   summary     after the last checkpoint, before summary.json
#   timer:S     S seconds after start, wherever the job is
_JOB = """
import json, os, signal, sys, threading
sys.path.insert(0, "tests")
import fakes
from jaxsae.grid import train_sae as ts
point, workdir, lm_dir = sys.argv[1:4]
die = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)
name, _, n = point.partition(":")
calls = []
if name == "torn":
  append = ts._append_jsonl
  def torn(path, records):
    calls.append(1)
    if len(calls) == int(n):
      text = "".join(json.dumps(r) + "\\n" for r in records)
      with open(path, "a") as f:
        f.write(text[: len(text) // 2])
      die()
    append(path, records)
  ts._append_jsonl = torn
elif name == "save":
  from orbax.checkpoint._src.path import atomicity
  finalize = atomicity.AtomicRenameTemporaryPath.finalize
  def dies(self, *a, **k):
    calls.append(1)
    if len(calls) == 3 * (int(n) - 1) + 2:  # three renames per save: state, meta, the step
      die()
    return finalize(self, *a, **k)
  atomicity.AtomicRenameTemporaryPath.finalize = dies
elif name == "summary":
  ts._summary = die
elif name == "timer":
  threading.Timer(float(n), die).start()
config = fakes.smoke_sae_config(lm_dir, json.loads(os.environ["SWEEP"]), **json.loads(
    os.environ["STEPS"]))
ts.run(config, workdir)
"""


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory):
  return fakes.write_smoke_lm(tmp_path_factory.mktemp("lm") / "dyck2")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
  """A compilation cache shared by the child processes (each would compile the same grid)."""
  return str(tmp_path_factory.mktemp("jax_cache"))


def _job(point, workdir, lm_dir, cache):
  env = dict(os.environ, SWEEP=json.dumps(SWEEP), STEPS=json.dumps(STEPS),
             JAX_COMPILATION_CACHE_DIR=cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0", JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-c", _JOB, point, str(workdir), lm_dir], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=300)
  return out.returncode, out.stderr[-3000:]


@pytest.fixture(scope="module")
def straight(tmp_path_factory, lm_dir, cache):
  """The uninterrupted run."""
  workdir = tmp_path_factory.mktemp("straight") / "sae"
  rc, err = _job("none", workdir, lm_dir, cache)
  assert rc == 0, err
  return str(workdir)


def _outputs(workdir):
  """Every output of the SAE job that must not depend on interruptions: summary, metrics,
  variants, the kept checkpoints (step -> content digest) and the recorded inputs."""
  read = lambda name: open(os.path.join(workdir, name)).read()
  digests = {}
  for meta in glob.glob(os.path.join(workdir, "checkpoints", "*", "meta", "metadata")):
    digests[meta.split(os.sep)[-3]] = json.load(open(meta))["digest"]
  return {"summary.json": read("summary.json"), "metrics.jsonl": read("metrics.jsonl"),
          "variants.json": read("variants.json"), "inputs.json": read("inputs.json"),
          "checkpoints": digests}


def _tree(directory):
  """path -> (size, mtime) of everything under `directory` (to show nothing was written)."""
  out = {}
  for p in glob.glob(os.path.join(directory, "**"), recursive=True):
    st = os.stat(p)
    out[os.path.relpath(p, directory)] = (st.st_size if os.path.isfile(p) else 0, st.st_mtime_ns)
  return out


def test_finished_run_has_every_record(straight):
  summary = json.load(open(os.path.join(straight, "summary.json")))
  assert summary["steps"] == 6 and len(summary["variants"]) == 2
  for v in summary["variants"].values():
    assert v["metrics"]["step"] == 6 and {"loss", "l0", "lr"} <= set(v["metrics"])


# Named points, then a random instant (seeded: the test id shows it).
_POINTS = ["save:2", "torn:3", "summary"] + [
    f"timer:{random.Random(seed).uniform(1.0, 3.0):.2f}" for seed in (0,)]


@pytest.mark.parametrize("point", _POINTS)
def test_kill_9_then_rerun_equals_the_uninterrupted_run(straight, lm_dir, cache, tmp_path, point):
  workdir = tmp_path / "sae"
  rc, err = _job(point, workdir, lm_dir, cache)
  if not point.startswith("timer"):
    assert rc == -signal.SIGKILL, err
  if point.startswith("torn"):
    assert not open(workdir / "metrics.jsonl").read().endswith("\n")  # really torn
  if point.startswith("save"):
    assert glob.glob(str(workdir / "checkpoints" / "*.orbax-checkpoint-tmp*"))
  rc, err = _job("none", workdir, lm_dir, cache)
  assert rc == 0, err
  assert _outputs(str(workdir)) == _outputs(straight)


def test_rerun_of_a_finished_job_keeps_every_output(straight, tmp_path):
  workdir = str(tmp_path / "sae")
  shutil.copytree(straight, workdir)
  before = _outputs(workdir)
  config = json.load(open(os.path.join(workdir, "config.json")))
  ts.run(fakes.smoke_sae_config(config["lm_workdir"], SWEEP, **STEPS), workdir)
  assert _outputs(workdir) == before


# ------------------------------------------------------------------------------------------------
# One writer.

_HOLDER = """
import sys
from jaxsae.core import workdir
with workdir.lock(sys.argv[1], command="the holder"):
  print("locked", flush=True)
  sys.stdin.read()
"""


def test_second_writer_is_refused_for_every_job_and_a_crash_frees_the_lock(straight, lm_dir,
                                                                          tmp_path):
  busy = str(tmp_path / "busy")
  holder = subprocess.Popen([sys.executable, "-c", _HOLDER, busy], cwd=ROOT,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "locked"
    before = _tree(busy)
    jobs = [
        (train_lm.run, lm_configs.get_config("language=dyck2,smoke")),
        (ts.run, fakes.smoke_sae_config(lm_dir, SWEEP, **STEPS)),
        (evaluate.run, eval_configs.get_config(f"smoke,sae_workdir={straight}")),
        (export.run, export_configs.get_config(f"sae_workdir={straight}")),
        (pipeline.run, pipeline_configs.get_config("smoke,language=dyck2")),
    ]
    for run, config in jobs:
      with pytest.raises(workdir_lib.LockedError, match=f"pid {holder.pid} .*the holder"):
        run(config, busy)
    assert _tree(busy) == before
  finally:
    holder.kill()  # SIGKILL: no clean-up runs
    holder.wait()
  with workdir_lib.lock(busy):  # the kernel released it with the process
    with workdir_lib.lock(busy):  # re-entrant in one process
      pass


# ------------------------------------------------------------------------------------------------
# Readers write nothing.


def test_readers_leave_a_directory_being_written_untouched(straight, lm_dir, tmp_path):
  lm = str(tmp_path / "lm")
  shutil.copytree(lm_dir, lm)
  ck = os.path.join(lm, "checkpoints")
  # What a writer mid-save has on disk: orbax's temporary directory of the next step.
  os.makedirs(os.path.join(ck, "4.orbax-checkpoint-tmp", "state.orbax-checkpoint-tmp"))
  with open(os.path.join(ck, "4.orbax-checkpoint-tmp", "state.orbax-checkpoint-tmp", "d"),
            "w") as f:
    f.write("half-written")
  # And a newer checkpoint without orbax's state metadata (an incomplete copy).
  shutil.copytree(os.path.join(ck, "0"), os.path.join(ck, "2"))
  os.remove(os.path.join(ck, "2", "state", "_METADATA"))
  before, grid_before = _tree(lm), _tree(straight)
  loaded = bundle.load(lm)
  assert loaded.step == 0  # step 2 skipped as incomplete, not moved
  trained_lib.load(straight)
  assert _tree(lm) == before and _tree(straight) == grid_before
  with ckpt_lib.Checkpointer(ck, read_only=True) as reader:
    with pytest.raises(ckpt_lib.CheckpointError, match=r"state/_METADATA\) is missing"):
      reader.restore(jax_template(lm), step=2)


def jax_template(lm):
  import jax  # pylint: disable=g-import-not-at-top
  import ml_collections  # pylint: disable=g-import-not-at-top
  config = ml_collections.ConfigDict(json.load(open(os.path.join(lm, "config.json"))))
  return jax.eval_shape(lambda: lm_step.init_state(config))


# ------------------------------------------------------------------------------------------------
# Pinned inputs, checked before anything is written.


def _copy(straight, tmp_path, name="sae"):
  workdir = str(tmp_path / name)
  shutil.copytree(straight, workdir)
  return workdir


def test_a_swapped_lm_is_refused(straight, lm_dir, tmp_path):
  lm = str(tmp_path / "lm")
  shutil.copytree(lm_dir, lm)
  workdir = _copy(straight, tmp_path)
  # The grid's config may point at a copy of its LM (the LM is pinned by content)...
  config = json.load(open(os.path.join(workdir, "config.json")))
  config["lm_workdir"] = lm
  json.dump(config, open(os.path.join(workdir, "config.json"), "w"), indent=1)
  assert trained_lib.load(workdir).lm.workdir == lm
  # ...but not at another LM of the same shape in its place.
  other = lm_configs.get_config("language=dyck2,smoke")
  other.seed += 1
  shutil.rmtree(lm)
  train_lm.write_untrained(other, lm)
  before = _tree(workdir)
  with pytest.raises(workdir_lib.InputMismatchError, match="the LM in .*digest"):
    ts.run(fakes.smoke_sae_config(lm, SWEEP, **dict(STEPS, steps=8)), workdir)
  with pytest.raises(workdir_lib.InputMismatchError, match="digest"):
    trained_lib.load(workdir)
  assert _tree(workdir) == before


def test_workdirs_move_with_their_inputs(straight, lm_dir, tmp_path):
  # A pipeline-like tree (lm/ next to sae/) moved elsewhere still loads: the grid finds its LM
  # through the relative path it recorded.
  tree = tmp_path / "old"
  shutil.copytree(lm_dir, tree / "lm")
  shutil.copytree(straight, tree / "sae")
  config = json.load(open(tree / "sae" / "config.json"))
  config["lm_workdir"] = str(tree / "lm")
  json.dump(config, open(tree / "sae" / "config.json", "w"), indent=1)
  inputs = json.load(open(tree / "sae" / "inputs.json"))
  inputs["lm"]["path"] = "../lm"
  json.dump(inputs, open(tree / "sae" / "inputs.json", "w"))
  fingerprint = json.load(open(tree / "sae" / "checkpoints" / "fingerprint.json"))
  assert not os.path.isabs(fingerprint["lm_workdir"])  # no absolute path to go stale
  shutil.move(str(tree), str(tmp_path / "new"))
  trained = trained_lib.load(str(tmp_path / "new" / "sae"))
  assert trained.lm.workdir == str(tmp_path / "new" / "lm")


def test_mismatched_configs_are_refused_before_writing(straight, lm_dir, tmp_path):
  workdir = _copy(straight, tmp_path)
  before = _tree(workdir)
  menon = sae_menon.get_config(f"language=dyck2,smoke,lm_workdir={lm_dir}")
  with pytest.raises(ckpt_lib.ConfigMismatchError, match="sweep"):
    ts.run(menon, workdir)
  assert _tree(workdir) == before
  lm = str(tmp_path / "lm")
  shutil.copytree(lm_dir, lm)
  lm_before = _tree(lm)
  with pytest.raises(ckpt_lib.ConfigMismatchError, match="language"):
    train_lm.run(lm_configs.get_config("language=dyck2_p03,smoke"), lm)
  assert _tree(lm) == lm_before


def test_checkpoints_without_fingerprint_do_not_resume(straight, lm_dir, tmp_path):
  workdir = _copy(straight, tmp_path)
  os.remove(os.path.join(workdir, "checkpoints", "fingerprint.json"))
  with pytest.raises(ckpt_lib.ConfigMismatchError, match="no fingerprint.json"):
    ts.run(fakes.smoke_sae_config(lm_dir, SWEEP, **dict(STEPS, batch_size=16)), workdir)
  with pytest.raises(ckpt_lib.ConfigMismatchError, match="no fingerprint.json"):
    trained_lib.load(workdir)


def test_an_edited_config_json_is_refused(straight, tmp_path):
  workdir = _copy(straight, tmp_path)
  path = os.path.join(workdir, "config.json")
  config = json.load(open(path))
  config["sweep"][0]["product"]["sparsity_coeff"] = [1.0, 5.0]  # a dynamic field
  json.dump(config, open(path, "w"), indent=1)
  with pytest.raises(ckpt_lib.ConfigMismatchError, match="(?s)edited after training.*sweep"):
    trained_lib.load(workdir)
  with pytest.raises(ckpt_lib.ConfigMismatchError, match="edited after training"):
    export.run(export_configs.get_config(f"sae_workdir={workdir}"), str(tmp_path / "out"))


def test_an_export_workdir_pins_its_grid(straight, tmp_path):
  out = str(tmp_path / "out")
  summary = export.run(export_configs.get_config(f"sae_workdir={straight}"), out)
  assert summary["step"] == 6
  again = export.run(export_configs.get_config(f"sae_workdir={straight}"), out)  # same grid: ok
  assert again == summary
  before = _tree(out)
  with pytest.raises(workdir_lib.InputMismatchError, match="step: 6 .* != 4"):
    export.run(export_configs.get_config(f"sae_workdir={straight},step=4"), out)
  assert _tree(out) == before
  with pytest.raises(FileNotFoundError, match=r"no checkpoint at step 3; it holds steps \[4, 6\]"):
    trained_lib.load(straight, 3)


# ------------------------------------------------------------------------------------------------
# Torn files.


def test_torn_metrics_are_repaired_and_never_duplicated(tmp_path):
  path = str(tmp_path / "metrics.jsonl")
  records = [{"step": s, "variant": v, "loss": s / 7} for s in (2, 4, 6) for v in ("a", "b")]
  text = "".join(json.dumps(r) + "\n" for r in records)
  with open(path, "w") as f:
    f.write(text + text[:25])  # a kill mid-append
  assert workdir_lib.read_records(path) == records
  assert workdir_lib.resume_records(path, 4) == records[:4]
  assert workdir_lib.read_records(path) == records[:4]
  assert open(path).read() == text[: text.index('{"step": 6')]
  # Records past the resumed step go, so appending them again leaves one copy of each.
  workdir_lib.append_records(path, records[4:])
  assert workdir_lib.read_records(path) == records
  with open(path, "a") as f:
    f.write("not json\n" + text)
  with pytest.raises(ValueError, match=r"metrics.jsonl line 7 is not JSON.*delete that line"):
    workdir_lib.read_records(path)


def test_a_torn_stages_json_names_the_file_and_the_fix(tmp_path):
  workdir = tmp_path / "pipe"
  workdir.mkdir()
  (workdir / "stages.json").write_text('{"lm": {"fingerprint": "ab')
  with pytest.raises(ValueError, match=r"stages.json is not valid JSON.*Delete it and rerun"):
    pipeline.run(pipeline_configs.get_config("smoke,language=dyck2"), str(workdir))
  assert sorted(os.listdir(workdir)) == [".lock", "stages.json"]


# ------------------------------------------------------------------------------------------------
# config.json's format.


def _set_format(path, fmt):
  config = json.load(open(path))
  config["format"] = fmt
  json.dump(config, open(path, "w"), indent=1)


def test_config_json_carries_its_format_and_a_newer_one_is_refused(straight, lm_dir, tmp_path):
  workdir = _copy(straight, tmp_path)
  lm = str(tmp_path / "lm")
  shutil.copytree(lm_dir, lm)
  for d in (workdir, lm):
    assert json.load(open(os.path.join(d, "config.json")))["format"] == workdir_lib.CONFIG_FORMAT
  # What the jobs read back has no format field: a grid loads and its config is the one run.
  assert "format" not in trained_lib.load(workdir).config
  newer = workdir_lib.CONFIG_FORMAT + 1
  _set_format(os.path.join(lm, "config.json"), newer)
  with pytest.raises(workdir_lib.ConfigFormatError, match=f"format {newer}, newer than .*git pull"):
    bundle.load(lm)
  _set_format(os.path.join(workdir, "config.json"), newer)
  before = _tree(workdir)
  with pytest.raises(workdir_lib.ConfigFormatError, match="written by a newer version"):
    trained_lib.load(workdir)
  assert _tree(workdir) == before  # refused without writing
  _set_format(os.path.join(workdir, "config.json"), "1")
  with pytest.raises(workdir_lib.ConfigFormatError, match="format='1'"):
    trained_lib.load(workdir)


def test_old_config_files_get_the_fields_their_format_lacks(tmp_path):
  sae = fakes.smoke_sae_config(str(tmp_path / "lm"), SWEEP).to_dict()
  workdir_lib.write_config(str(tmp_path), sae)
  assert workdir_lib.read_config(str(tmp_path)) == json.loads(json.dumps(sae))
  # A file written before formats were recorded (format 0) that lacks a later field reads
  # with the value the code of that time used; one that has the field keeps its value.
  old = {k: v for k, v in sae.items() if k != "variant_loop"}
  assert workdir_lib.upgrade_config(old)["variant_loop"] == "auto"
  assert workdir_lib.upgrade_config(dict(sae, variant_loop="vmap"))["variant_loop"] == "vmap"
  lm = lm_configs.build(size="smoke").to_dict()
  del lm["eval"]["top_k"]
  assert workdir_lib.upgrade_config(lm)["eval"]["top_k"] == 0
  # A pipeline config of format 1 lacks the analysis's null size: 64, the size the code used.
  pipe = pipeline_configs.get_config("smoke,language=dyck2").to_dict()
  del pipe["analysis"]["null_latents"]
  assert workdir_lib.upgrade_config(dict(pipe, format=1))["analysis"]["null_latents"] == 64
  # The current format is complete: nothing is filled in.
  assert workdir_lib.upgrade_config(dict(old, format=workdir_lib.CONFIG_FORMAT)) == old
