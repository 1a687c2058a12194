"""Configs: the Menon grid's shape and switches, its smoke run end to end, bad args, and that
every shipped config builds (with its `smoke` switch where it has one)."""

import glob
import importlib
import json
import os

import pytest

from experiments import main as main_lib
from experiments.configs import bench as bench_configs
from experiments.configs import eval as eval_configs
from experiments.configs import lm as lm_configs
from experiments.configs import pipeline as pipeline_configs
from experiments.configs import sae_causal
from experiments.configs import sae_menon
from experiments.configs import study as study_configs
from jaxsae import pipeline
from jaxsae.grid import sae_groups
from jaxsae.grid import train_sae
from jaxsae.lm import lm_step
from jaxsae.lm import train_lm

D_MODEL = 128  # the spec's LM width (the default lm config)
SMOKE_D_MODEL = 32  # the smoke LM's width

CONFIG_DIR = os.path.join(os.path.dirname(__file__), "..", "experiments", "configs")
CONFIG_MODULES = sorted(
    os.path.splitext(os.path.basename(p))[0] for p in glob.glob(os.path.join(CONFIG_DIR, "*.py"))
    if "def get_config(" in open(p).read())


def _write_lm(directory: str, language: str) -> str:
  """An untrained smoke-size LM workdir (the SAE trainer needs config.json + a checkpoint)."""
  return train_lm.write_untrained(lm_configs.get_config(f"language={language},smoke"), directory)


def _groups(config, d_model=D_MODEL):
  specs, _ = sae_groups.build_groups(list(config.sweep), d_model)
  return specs


# ------------------------------------------------------------------------------------------------
# sae_menon: the grid.


def test_menon_default_is_44_variants_in_8_groups():
  config = sae_menon.get_config()
  specs = _groups(config)
  assert sum(s.size for s in specs) == 44
  assert len(specs) == 8
  kinds = sorted((s.sae.activation, s.sae.width) for s in specs)
  assert kinds == sorted((a, e * D_MODEL) for a in ("relu", "topk") for e in (1, 2, 4, 8))
  for s in specs:
    assert s.loss.preset == "local"
    assert s.loss.sparsity_reduction == "sum_batch"
    assert s.sae.init == "menon"
    assert (s.sae.enc_bias, s.sae.dec_bias, s.sae.pre_bias) == (False, False, False)
    assert (s.sae.decoder_norm, s.sae.input_norm, s.sae.recon_norm) == ("none", False, False)
    assert list(s.lr) == pytest.approx([1e-5] * s.size)
    assert list(s.coeffs.out_to_in) == [1.0] * s.size
    if s.sae.activation == "relu":
      assert s.size == 6
      assert list(s.coeffs.sparsity) == pytest.approx([1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0])
    else:
      assert s.size == 5
      assert list(s.hparams.k) == [8, 16, 32, 64, 128]
      assert s.sae.k_max == 128  # k = 128 = width at expansion 1 is allowed
      assert list(s.coeffs.sparsity) == [0.0] * 5


def test_menon_optimisation_profile():
  config = sae_menon.get_config()
  assert (config.site, config.positions) == ("resid_post.0", "sentence")
  assert (config.batch_size, config.steps, config.schedule) == (128, 5000, "constant")
  assert config.grad_clip == float("inf")
  assert (config.adam_b1, config.adam_b2, config.adam_eps) == (0.9, 0.999, 1e-8)
  assert (config.language, config.lm_workdir) == ("dyck2", "workdirs/lm_dyck2")
  train_sae.validate_config(config)


# ------------------------------------------------------------------------------------------------
# sae_menon: the switches.


def test_menon_language_and_lm_workdir():
  c = sae_menon.get_config("language=english")
  assert (c.language, c.lm_workdir) == ("english", "workdirs/lm_english")
  c = sae_menon.get_config("language=english,lm_workdir=/x/lm")
  assert c.lm_workdir == "/x/lm"


def test_menon_steps():
  c = sae_menon.get_config("steps=150")
  assert c.steps == 150 and c.checkpoint_every == 150
  train_sae.validate_config(c)
  c = sae_menon.get_config("steps=3000")
  assert (c.steps, c.checkpoint_every) == (3000, 1000)
  train_sae.validate_config(c)


def test_menon_pre_bias_turns_on_pre_and_encoder_bias():
  for s in _groups(sae_menon.get_config("pre_bias")):
    assert (s.sae.pre_bias, s.sae.enc_bias, s.sae.dec_bias) == (True, True, False)
    assert s.sae.pre_bias_init == "zero"


@pytest.mark.parametrize("norm, expected", [
    ("none", (False, False, "none")),
    ("input", (True, False, "none")),
    ("input_recon", (True, True, "none")),
    ("input_dec", (True, False, "forward")),
])
def test_menon_norm(norm, expected):
  specs = _groups(sae_menon.get_config(f"norm={norm}"))
  assert len(specs) == 8
  for s in specs:
    assert (s.sae.input_norm, s.sae.recon_norm, s.sae.decoder_norm) == expected


def test_menon_sparsemax_adds_three_encoders_per_expansion():
  specs = _groups(sae_menon.get_config("sparsemax"))
  assert sum(s.size for s in specs) == 44 + 12
  assert len(specs) == 8 + 12
  sparse = [s for s in specs if s.sae.is_sparsemax]
  assert sorted((s.sae.activation, s.sae.width) for s in sparse) == sorted(
      (a, e * D_MODEL) for a in sae_menon.SPARSEMAX for e in (1, 2, 4, 8))
  for s in sparse:
    assert s.size == 1 and not s.sae.enc_bias and float(s.coeffs.sparsity[0]) == 0.0


def test_menon_switches_combine():
  specs = _groups(sae_menon.get_config("pre_bias,norm=input_dec,sparsemax,language=expr_prefix"))
  assert sum(s.size for s in specs) == 56
  assert all(s.sae.pre_bias and s.sae.decoder_norm == "forward" for s in specs)


def test_menon_smoke_is_small():
  c = sae_menon.get_config("smoke")
  specs = _groups(c, SMOKE_D_MODEL)
  assert sum(s.size for s in specs) == 8 and len(specs) == 4
  assert c.steps <= 4 and c.batch_size <= 4
  train_sae.validate_config(c)
  assert sum(s.size for s in _groups(sae_menon.get_config("smoke,sparsemax"), SMOKE_D_MODEL)) == 14


@pytest.mark.parametrize("arg, message", [
    ("language=klingon", "unknown language 'klingon'"),
    ("norm=recon", "unknown norm 'recon'"),
    ("steps=75", "multiple of log_every=50"),
    ("steps=-50", "steps=-50 must be >= 1"),
    ("steps=0", "steps=0 must be >= 1; omit it for the config's default"),
    ("steps=abc", r"steps='abc' is not an int; write steps=<int>"),
    ("smoke,steps=3", "multiple of log_every=2"),
    ("width=4", "unknown config setting 'width'"),
    ("prebias", "unknown config switch 'prebias'"),
])
def test_menon_bad_args_raise_clearly(arg, message):
  with pytest.raises(ValueError, match=message):
    sae_menon.get_config(arg)


# ------------------------------------------------------------------------------------------------
# sae_menon: the smoke config end to end.


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory):
  return _write_lm(str(tmp_path_factory.mktemp("lm") / "dyck2"), "dyck2")


def test_menon_smoke_runs_end_to_end(lm_dir, tmp_path):
  config = sae_menon.get_config(f"smoke,lm_workdir={lm_dir}")
  config.lock()  # as experiments.main does
  summary = train_sae.run(config, str(tmp_path / "sae"))
  assert summary["steps"] == config.steps and summary["language"] == "dyck2"
  variants = summary["variants"]
  assert len(variants) == 8
  for v in variants.values():
    assert not v["frozen"]
    assert v["metrics"]["step"] == config.steps
    assert all(isinstance(v["metrics"][k], float) for k in ("loss", "out_to_in", "l0"))
  for v in variants.values():
    if v["hparams"]["activation"] == "topk":
      assert 0 < v["metrics"]["l0"] <= v["hparams"]["k"]
  for name in ("config.json", "variants.json", "metrics.jsonl", "summary.json"):
    assert os.path.exists(tmp_path / "sae" / name)


def test_menon_wrong_language_for_the_lm_fails_before_compiling(lm_dir):
  config = sae_menon.get_config(f"smoke,language=english,lm_workdir={lm_dir}")
  with pytest.raises(ValueError, match="trained on 'dyck2'"):
    train_sae.prepare(config)


# ------------------------------------------------------------------------------------------------
# Every shipped config.


def test_config_modules_are_found():
  assert {"grammar", "lm", "sae_e2e", "sae_menon"} <= set(CONFIG_MODULES)


def _accepts_smoke(module) -> bool:
  try:
    module.get_config("smoke")
  except ValueError as e:
    if "unknown config switch 'smoke'" in str(e):
      return False
    raise
  return True


@pytest.mark.parametrize("name", CONFIG_MODULES)
def test_every_config_builds(name):
  module = importlib.import_module(f"experiments.configs.{name}")
  assert "python -m experiments.main" in (module.__doc__ or ""), (
      f"{name}.py's docstring must give the command that runs it")
  args = [None] + (["smoke"] if _accepts_smoke(module) else [])
  for arg in args:
    config = module.get_config(arg)
    assert config.job in main_lib.JOBS, f"{name}:{arg}: unknown job {config.job!r}"
    json.dumps(config.to_dict())  # what the jobs write to config.json
    config.lock()
    d_model = SMOKE_D_MODEL if arg == "smoke" else D_MODEL
    if config.job == "lm":
      train_lm.validate_config(config)
      assert lm_step.model_config_for(config).d_model == d_model
    elif config.job == "sae":
      train_sae.validate_config(config)
      assert sum(s.size for s in _groups(config, d_model)) >= 1
    elif config.job == "pipeline":
      assert set(pipeline.validate_config(config)) == {"lm", "sae", "eval", "analysis"}


# (module, the `:arg` of a config, the same options as `build` keyword arguments)
BUILDS = [
    ("lm", None, {}),
    ("lm", "language=english,seed=3,smoke", dict(language="english", seed=3, size="smoke")),
    ("lm", "language=expr_prefix,full,steps=10,batch_size=3,max_len=40",
     dict(language="expr_prefix", size="full", steps=10, batch_size=3, max_len=40)),
    ("eval", "smoke,sae_workdir=w,seed=2,window_tokens=5,splice_mode=original",
     dict(size="smoke", sae_workdir="w", seed=2, window_tokens=5, splice_mode="original")),
    ("eval", "num_batches=3,grammaticality_batches=0",
     dict(num_batches=3, grammaticality_batches=0)),
    ("grammar", "smoke,language=english", dict(language="english", size="smoke")),
    ("export", "variants=v000+v002,step=4,lm=false",
     dict(variants="v000,v002", step=4, lm=False)),
    ("sae_e2e", "smoke,language=english,steps=6", dict(language="english", size="smoke", steps=6)),
    ("sae_menon", "smoke,sparsemax,pre_bias,norm=input_dec,lm_workdir=x",
     dict(size="smoke", sparsemax=True, pre_bias=True, norm="input_dec", lm_workdir="x")),
    ("sae_causal", "smoke,finetune,target=clean,distance=kl",
     dict(size="smoke", finetune=True, target="clean", distance="kl")),
    ("sae_causal", "steps=100", dict(steps=100)),
    ("pipeline", None, {}),
    ("pipeline", "smoke,language=dyck2,seed=4,grid=causal,stages=lm+sae",
     dict(size="smoke", language="dyck2", seed=4, grid="causal", stages=("lm", "sae"))),
    ("pipeline", "full", dict(size="full")),
    ("study", None, {}),
    ("study", "study=menon,language=dyck2,full,seeds=2",
     dict(study="menon", language="dyck2", size="full", seeds=2)),
    ("study", "study=causal,smoke", dict(study="causal", size="smoke")),
    ("study", "study=bench,language=expr_prefix,full",
     dict(study="bench", language="expr_prefix", size="full")),
    ("bench", "language=dyck2,seed=42,seeds=2,smoke",
     dict(language="dyck2", seed=42, seeds=2, size="smoke")),
]


@pytest.mark.parametrize("size", ["smoke", "default", "full"])
def test_bench_grid_is_every_architecture_by_loss_by_ladder_by_seed(size):
  c = bench_configs.build(language="dyck2", seeds=2, size=size)
  specs = _groups(c.sae)
  n_arch, n_loss = len(study_configs.BENCH_ARCHS), len(study_configs.BENCH_LOSSES)
  ladder = 1 if size == "smoke" else 7
  assert len(specs) == n_arch * n_loss
  assert sum(s.size for s in specs) == n_arch * n_loss * ladder * 2
  assert sorted(s.get("loss") for b in c.sae.sweep for s in [b["set"]]) == sorted(
      list(study_configs.BENCH_LOSSES) * n_arch)
  for block in c.sae.sweep:
    fields = block["set"]
    if fields.get("p_anneal"):  # p leaves 1 after a quarter of the run and reaches p_end at 3/4
      start, steps = fields["p_anneal_start"], fields["p_anneal_steps"]
      assert fields["p_anneal_rescale"] and 0 <= start < start + steps <= c.sae.steps
      if size != "smoke":
        assert (start, start + steps) == (c.sae.steps // 4, 3 * c.sae.steps // 4)
    else:
      assert "p_anneal_start" not in fields
    if fields["activation"] == "jumprelu":
      assert fields["jumprelu_threshold_lr_scale"] == study_configs.BENCH_JUMPRELU_LR_SCALE[size]


def test_bench_config_is_the_bench_study():
  assert (bench_configs.get_config("language=expr_prefix,seed=42").to_dict()
          == study_configs.get_config("study=bench,language=expr_prefix,seed=42").to_dict())
  with pytest.raises(ValueError, match="study"):
    bench_configs.get_config("study=menon")


def test_every_config_module_has_a_builder():
  assert {name for name, _, _ in BUILDS} == set(CONFIG_MODULES) - {"sae_base", "args"}


@pytest.mark.parametrize("name,arg,kwargs", BUILDS)
def test_builders_equal_get_config_of_the_same_options(name, arg, kwargs):
  module = importlib.import_module(f"experiments.configs.{name}")
  # Field order included: config.json and the fingerprints are written from to_dict().
  assert (json.dumps(module.build(**kwargs).to_dict(), default=str)
          == json.dumps(module.get_config(arg).to_dict(), default=str))


@pytest.mark.parametrize("size", ["smoke", "default", "full"])
def test_the_pipeline_config_is_made_of_the_stage_builders(size):
  c = pipeline_configs.build(language="dyck2", seed=5, size=size)
  assert c.lm.to_dict() == lm_configs.build(language="dyck2", seed=5, size=size).to_dict()
  e = eval_configs.build(seed=5, size="smoke" if size == "smoke" else "default")
  assert c.eval.keys() == e.keys()
  if size != "default":  # the default pipeline sets its own evaluation budget
    assert c.eval.to_dict() == e.to_dict()


def test_builders_refuse_unknown_sizes():
  with pytest.raises(ValueError, match="size='huge'"):
    lm_configs.build(size="huge")
  with pytest.raises(ValueError, match="size='full'"):
    sae_menon.build(size="full")
  with pytest.raises(ValueError, match="stages=.*choose a subset"):
    pipeline_configs.build(stages=("lm", "bogus"))


@pytest.mark.parametrize("name", ["sae_e2e", "sae_causal"])
def test_sae_config_smoke_runs_end_to_end(name, lm_dir, tmp_path):
  module = importlib.import_module(f"experiments.configs.{name}")
  config = module.get_config(f"smoke,language=dyck2,lm_workdir={lm_dir}")
  config.lock()
  summary = train_sae.run(config, str(tmp_path / "sae"))
  assert summary["steps"] == config.steps
  for v in summary["variants"].values():
    assert not v["frozen"] and v["metrics"]["step"] == config.steps
    if v["hparams"].get("causal"):
      assert v["metrics"]["causal"] > 0 and "causal_beta" in v["metrics"]


def test_causal_config_grid():
  specs = _groups(sae_causal.get_config())
  causal = [s for s in specs if s.loss.causal]
  assert sum(s.size for s in causal) == 12 and sum(s.size for s in specs) == 13
  for s in specs:
    assert s.sae.activation == "topk" and s.sae.width == 2 * D_MODEL
    assert set(s.hparams.k.tolist()) == {16}
  assert sorted({float(b) for s in causal for b in s.coeffs.causal}) == [0.5, 1.0, 100.0]
  fixed = [s for s in causal if s.loss.causal_lambda == "fixed"]
  assert sorted({round(float(v), 6) for s in fixed for v in s.causal.lambda_value}) == [0.02, 0.2]
  ft = _groups(sae_causal.get_config("finetune,steps=1000"))
  starts = {int(v) for s in ft if s.loss.causal for v in s.causal.start}
  assert starts == {500} and all(bool(v) for s in ft if s.loss.causal
                                 for v in s.causal.reset_opt)
  with pytest.raises(ValueError, match="target="):
    sae_causal.get_config("target=other")


# ------------------------------------------------------------------------------------------------
# The `:arg` settings of every config: domains and parse errors.


@pytest.mark.parametrize("module, arg, message", [
    ("lm", "steps=0", "steps=0 must be >= 1; omit it"),
    ("lm", "batch_size=0", "batch_size=0 must be >= 1"),
    ("lm", "max_len=-3", "max_len=-3 must be >= 1"),
    ("lm", "steps=abc", r"config setting steps='abc' is not an int; write steps=<int>"),
    ("lm", "seed=1.5", "seed='1.5' is not an int"),
    ("lm", "steps=5,steps=6", "given twice"),
    ("sae_e2e", "steps=0", "steps=0 must be >= 1"),
    ("sae_causal", "steps=0", "steps=0 must be >= 1"),
    ("eval", "num_batches=0", "num_batches=0 must be >= 1"),
    ("eval", "batch_size=0", "batch_size=0 must be >= 1"),
    ("eval", "grammaticality_batch_size=0", "grammaticality_batch_size=0 must be >= 1"),
    ("eval", "grammaticality_batches=-1", "grammaticality_batches=-1 must be >= 0"),
    ("eval", "window_tokens=-1", "window_tokens=-1 must be >= 0"),
    ("export", "step=x", "step='x' is not an int"),
    ("pipeline", "seed=x", "seed='x' is not an int"),
])
def test_bad_settings_name_the_setting_and_the_form(module, arg, message):
  mod = importlib.import_module(f"experiments.configs.{module}")
  with pytest.raises(ValueError, match=message):
    mod.get_config(arg)


def test_settings_not_given_keep_defaults_and_zero_keeps_its_documented_meaning():
  assert lm_configs.get_config("smoke").num_steps == 4
  assert lm_configs.get_config("smoke,steps=6").num_steps == 6
  assert lm_configs.get_config("language=english").batch_size == 128
  ev = importlib.import_module("experiments.configs.eval")
  smoke = ev.get_config("smoke")
  assert (smoke.num_batches, smoke.grammaticality_batches, smoke.window_tokens) == (2, 1, 0)
  # 0 is documented for these two: skip spliced generation / every held-out token.
  zero = ev.get_config("smoke,grammaticality_batches=0,window_tokens=0")
  assert (zero.grammaticality_batches, zero.window_tokens) == (0, 0)
  export = importlib.import_module("experiments.configs.export")
  assert export.get_config("step=0").step == 0  # 0: the latest checkpoint (documented)


def test_bool_settings_are_strict():
  from experiments.configs import args as args_lib  # pylint: disable=g-import-not-at-top
  parse = lambda a: args_lib.parse(a, switches=(), keys={"flag": False, "x": 1.0})
  assert parse("flag=yes")["flag"] and not parse("flag=0")["flag"]
  with pytest.raises(ValueError, match=r"flag='maybe' is not a bool \(true / false\)"):
    parse("flag=maybe")
  with pytest.raises(ValueError, match="x='nan' must be a finite number"):
    parse("x=nan")


def test_frontier_extends_the_local_ladder_and_held_out_data_only_where_named():
  def ladder(language):
    c = study_configs.build(study="frontier", language=language, seeds=1)
    local = [b["product"]["sparsity_coeff"] for b in c.sae.sweep
             if b["set"].get("loss") == "local" and "sparsity_coeff" in b["product"]]
    return local[0], c.eval.num_batches

  common = study_configs.FRONTIER_LAMBDAS["local"]
  expr, expr_batches = ladder("expr_prefix")
  assert expr[:len(common)] == common and len(expr) == len(common) + 5
  assert expr == sorted(expr) and min(expr[len(common):]) > max(common)
  dyck, dyck_batches = ladder("dyck2")
  assert dyck == common and expr_batches == 4 * dyck_batches


@pytest.mark.parametrize("size", ["smoke", "full"])
def test_menon_l1_study_is_menon_l1_arm_below_its_alphas(size):
  c = study_configs.build(study="menon_l1", language="expr_prefix", seed=42, size=size)
  menon = study_configs.build(study="menon", language="expr_prefix", seed=42, size=size)
  (block,) = c.sae.sweep
  (menon_l1,) = [b for b in menon.sae.sweep if b["set"].get("activation") == "relu"
                 and not b["set"].get("input_norm")]
  assert block["set"] == menon_l1["set"]  # Menon's L1 SAEs: sum-over-batch, lr 1e-5, no biases
  assert block["set"]["sparsity_reduction"] == "sum_batch"
  alphas = block["product"]["sparsity_coeff"]
  assert max(alphas) <= min(menon_l1["product"]["sparsity_coeff"])  # at or below the paper's
  assert block["product"]["expansion"] == study_configs.MENON_L1_EXPANSIONS
  assert sum(s.size for s in _groups(c.sae)) == len(alphas) * 2
  for name in ("schedule", "grad_clip", "steps", "batch_size"):
    assert c.sae[name] == menon.sae[name]
  assert tuple(c.eval.grammaticality_modes) == ("original", "corrected")
  with pytest.raises(ValueError, match="needs the switch full"):
    study_configs.build(study="menon_l1", language="expr_prefix", size="default")
