"""Evaluation: identity / zero SAEs spliced in, exact accumulation over batches against NumPy,
transcoders against `model.apply` with MLP l's output replaced,
vmap equivalence, one compilation per group, input validation, and the eval job on a tiny trained
grid. (The formulas alone: metrics_test.py; generation with SAEs spliced in:
spliced_generation_test.py.)"""
# pylint: disable=protected-access,cell-var-from-loop

import ast
import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fakes
from experiments import main as main_lib
from experiments.configs import eval as eval_configs
from jaxsae import eval_job
from jaxsae.evaluation import eval_passes
from jaxsae.evaluation import evaluate as ev
from jaxsae.evaluation import partial
from jaxsae.evaluation import spliced_generation
from jaxsae.grid import grid_step
from jaxsae.grid import sae as sae_lib
from jaxsae.grid import sae_groups
from jaxsae.grid import train_sae
from jaxsae.lm import model as model_lib

D = 32  # the smoke LM's width


# ------------------------------------------------------------------------------------------------
# Fixtures: an untrained smoke LM, its grid setup, and LM params scaled up so that ablating the
# site changes the predictions noticeably (an untrained LM's outputs are nearly uniform).


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory):
  return fakes.write_smoke_lm(tmp_path_factory.mktemp("lm") / "dyck2")


_sae_config = fakes.smoke_sae_config


@pytest.fixture(scope="module")
def setup_and_lm(lm_dir):
  setup, lm, _ = train_sae.prepare(_sae_config(lm_dir, [{"set": {"loss": "local"}}]))
  lm_params = jax.tree.map(lambda p: 8.0 * p, lm.params)
  return setup, lm_params


@pytest.fixture(scope="module")
def data(setup_and_lm):
  setup, _ = setup_and_lm
  return eval_passes.heldout(setup, seed=3, num_batches=2, batch_size=4)


def _spec(sweep, d_model=D):
  specs, _ = sae_groups.build_groups(sweep, d_model)
  assert len(specs) == 1
  return specs[0]


def _crafted_group(n_variants: int, w_decs):
  """A ReLU group of width 3D without biases: w_enc = [I, -I, 0], w_dec given per variant."""
  spec = _spec([{"product": {"seed": list(range(n_variants))},
                 "set": {"expansion": 3, "enc_bias": False, "dec_bias": False,
                         "decoder_norm": "none", "init": "menon"}}])
  eye = np.eye(D, dtype=np.float32)
  w_enc = np.concatenate([eye, -eye, np.zeros_like(eye)], axis=1)
  params = {"w_enc": jnp.asarray(np.stack([w_enc] * n_variants)),
            "w_dec": jnp.asarray(np.stack(w_decs))}
  hyper = grid_step.group_hyper(spec)
  return spec, params, hyper


def _identity_w_dec(rng):
  eye = np.eye(D, dtype=np.float32)
  # The third block never fires, so its decoder rows do not matter: random, to prove it.
  return np.concatenate([eye, -eye, rng.normal(size=(D, D)).astype(np.float32)], axis=0)


def _flat(data, k=None):
  sl = slice(None) if k is None else slice(k, k + 1)
  return data.tokens_KBT[sl], data.mask_KBT[sl], data.next_KBT[sl], data.valid_KBTV[sl]


# ------------------------------------------------------------------------------------------------
# The pipeline.


def test_identity_and_zero_saes_spliced(setup_and_lm, data):
  setup, lm_params = setup_and_lm
  rng = np.random.default_rng(0)
  spec, params, hyper = _crafted_group(2, [_identity_w_dec(rng), np.zeros((3 * D, D), np.float32)])
  tokens, mask, nxt, valid = _flat(data)
  m = ev.evaluate_group(spec, params, None, hyper, lm_params, tokens, mask, setup,
                        next_BT=nxt, valid_BTV=valid)
  m = {k: np.asarray(v) for k, v in m.items()}
  ident, zero = 0, 1
  assert m["ce_zero_ablation"][0] - m["ce_clean"][0] > 0.05  # the baseline is informative
  np.testing.assert_allclose(m["kl"][ident], 0.0, atol=1e-6)
  np.testing.assert_allclose(m["ce_increase"][ident], 0.0, atol=1e-5)
  np.testing.assert_allclose(m["ce_recovered_zero"][ident], 1.0, atol=1e-3)
  np.testing.assert_allclose(m["ce_recovered_mean"][ident], 1.0, atol=1e-3)
  np.testing.assert_allclose(m["total_variation"][ident], 0.0, atol=1e-6)
  assert m["top1_agreement"][ident] == 1.0
  assert m["mse"][ident] == 0.0 and m["ev_token_mean"][ident] == 1.0
  assert m["ev_ratio_of_sums"][ident] == 1.0
  np.testing.assert_allclose(m["ev_layernorm"][ident], 1.0, atol=1e-6)
  np.testing.assert_allclose(
      m["grammatical_mass_spliced"][ident], m["grammatical_mass_clean"][ident], atol=1e-6)
  for h in ("resid_post.1",):
    assert m[f"ds_mse/{h}"][ident] < 1e-10
    np.testing.assert_allclose(m[f"ds_ev/{h}"][ident], 1.0, atol=1e-5)
  # The zero-output SAE is the zero ablation.
  np.testing.assert_allclose(m["ce_recovered_zero"][zero], 0.0, atol=1e-3)
  np.testing.assert_allclose(m["ce_spliced"][zero], m["ce_zero_ablation"][zero], rtol=1e-5)
  np.testing.assert_allclose(m["nmse"][zero], 1.0, rtol=1e-6)

  # L0 and latent counts against NumPy on the clean activations: codes are relu(±x) and 0.
  acts = [np.asarray(model_lib.apply(lm_params, jnp.asarray(t), setup.model_config,
                                     stop_at=setup.site).acts[setup.site]) for t in tokens]
  x_MD = np.concatenate([a[mk] for a, mk in zip(acts, mask)])  # masked tokens, batch order
  codes_MF = np.concatenate([x_MD > 0, x_MD < 0, np.zeros_like(x_MD, bool)], axis=1)
  np.testing.assert_allclose(m["l0"][ident], codes_MF.sum(1).mean(), rtol=1e-6)
  np.testing.assert_allclose(m["frac_zeros"][ident], 1 - codes_MF.sum(1).mean() / (3 * D),
                             rtol=1e-6)
  fired = codes_MF.sum(0)
  np.testing.assert_array_equal(m["firing_counts"][ident], fired)
  assert m["dead"][ident] == (fired == 0).sum() >= D
  assert m["alive"][ident] == (fired > 0).sum()
  assert m["dense"][ident] == (fired > 0.1 * len(x_MD)).sum()
  assert m["window_tokens"][ident] == len(x_MD) == mask.sum()


def test_shrinkage_metrics_by_hand(setup_and_lm, data):
  """‖x̂‖/‖x‖ and ‖b_dec‖ of crafted SAEs: x̂ = x (ratio 1), x̂ = 0 (ratio 0), and x̂ = x/2 + b
  (ratio by hand from the clean activations; ‖b‖ = 5)."""
  setup, lm_params = setup_and_lm
  rng = np.random.default_rng(4)
  spec = _spec([{"product": {"seed": [0, 1, 2]},
                 "set": {"expansion": 3, "enc_bias": False, "dec_bias": True,
                         "decoder_norm": "none", "init": "menon"}}])
  eye = np.eye(D, dtype=np.float32)
  w_enc = np.concatenate([eye, -eye, np.zeros_like(eye)], axis=1)
  ident = _identity_w_dec(rng)
  b = np.zeros((D,), np.float32)
  b[:2] = [3.0, 4.0]
  params = {"w_enc": jnp.asarray(np.stack([w_enc] * 3)),
            "w_dec": jnp.asarray(np.stack([ident, np.zeros_like(ident), 0.5 * ident])),
            "b_dec": jnp.asarray(np.stack([np.zeros_like(b), np.zeros_like(b), b]))}
  tokens, mask, nxt, valid = _flat(data)
  m = ev.evaluate_group(spec, params, None, grid_step.group_hyper(spec), lm_params, tokens,
                        mask, setup, next_BT=nxt, valid_BTV=valid)
  acts = [np.asarray(model_lib.apply(lm_params, jnp.asarray(t), setup.model_config,
                                     stop_at=setup.site).acts[setup.site]) for t in tokens]
  x_MD = np.concatenate([a[mk] for a, mk in zip(acts, mask)]).astype(np.float64)
  want = np.mean(np.linalg.norm(0.5 * x_MD + b, axis=1) / np.linalg.norm(x_MD, axis=1))
  np.testing.assert_allclose(np.asarray(m["norm_ratio"]), [1.0, 0.0, want], rtol=1e-5,
                             atol=1e-6)
  np.testing.assert_allclose(np.asarray(m["b_dec_norm"]), [0.0, 0.0, 5.0], rtol=1e-6)
  # Without a decoder bias there is no norm to report.
  spec0, params0, hyper0 = _crafted_group(1, [ident])
  m0 = ev.evaluate_group(spec0, params0, None, hyper0, lm_params, tokens, mask, setup,
                         next_BT=nxt, valid_BTV=valid)
  assert np.isnan(np.asarray(m0["b_dec_norm"])).all()


def test_accumulation_is_exact_over_batches_and_window(setup_and_lm, data):
  """A random TopK group against NumPy over the concatenated held-out set (not batch means)."""
  setup, lm_params = setup_and_lm
  spec = _spec([{"product": {"seed": [0, 1]},
                 "set": {"activation": "topk", "k": 3, "expansion": 2}}])
  state = grid_step.init_group(spec, setup, None)
  hyper = grid_step.group_hyper(spec)
  tokens, mask, nxt, valid = _flat(data)
  assert mask[0].sum() != mask[1].sum()  # unequal batches: a mean of batch means would differ
  window = int(mask[0].sum()) + 3  # ends inside the second batch
  m = ev.evaluate_group(spec, state.params, state.sae_state, hyper, lm_params, tokens, mask,
                        setup, next_BT=nxt, valid_BTV=valid, window_tokens=window)
  mc = setup.model_config
  ref = ev.reference(lm_params, data, setup)

  @jax.jit
  def forward(p_i, h_i, t, mk):
    """Clean and spliced runs the plain way: `model.apply` with the SAE as a replacement."""
    fn = sae_lib.splice_fn(p_i, spec.sae, h_i, spec.splice_mode, mask=mk)
    clean = model_lib.apply(lm_params, t, mc, collect=(setup.site,))
    spliced = model_lib.apply(lm_params, t, mc, replace={setup.site: fn}, collect=(setup.site,))
    x = clean.acts[setup.site]
    return (x, spliced.acts[setup.site], sae_lib.encode(p_i, x, spec.sae, h_i),
            jax.nn.log_softmax(clean.logits), jax.nn.log_softmax(spliced.logits))

  for i in range(spec.padded):
    p_i = jax.tree.map(lambda a: a[i], state.params)
    h_i = jax.tree.map(lambda a: a[i], hyper.hparams)
    xs, outs, codes, kl, tv, ce, ce_clean = [], [], [], [], [], [], []
    for t, mk, nx in zip(tokens, mask, nxt):
      x, out, code, lp, lq = (np.asarray(a, np.float64) for a in forward(p_i, h_i, t, mk))
      xs.append(x[mk])
      outs.append(out[mk])
      codes.append(code[mk])
      pred = mk & (nx != setup.grammar.pad_id)
      lp, lq = lp[pred], lq[pred]
      kl.append((np.exp(lp) * (lp - lq)).sum(-1))
      tv.append(0.5 * np.abs(np.exp(lp) - np.exp(lq)).sum(-1))
      ce.append(-np.take_along_axis(lq, nx[pred][:, None], -1)[:, 0])
      ce_clean.append(-np.take_along_axis(lp, nx[pred][:, None], -1)[:, 0])
    x, out, c = np.concatenate(xs), np.concatenate(outs), np.concatenate(codes)
    mu = x.mean(0)
    np.testing.assert_allclose(np.asarray(ref.mean_D), mu, rtol=1e-5, atol=1e-6)
    err = ((out - x) ** 2).sum(-1)
    expect = {
        "mse": err.mean() / D, "nmse": err.sum() / (x ** 2).sum(),
        "ev_token_mean": np.mean(1 - err / ((x - mu) ** 2).sum(-1)),
        "ev_ratio_of_sums": 1 - err.sum() / ((x - mu) ** 2).sum(),
        "l0": (c != 0).sum(1).mean(), "kl": np.concatenate(kl).mean(),
        "total_variation": np.concatenate(tv).mean(), "ce_spliced": np.concatenate(ce).mean(),
        "ce_clean": np.concatenate(ce_clean).mean()}
    for k, v in expect.items():
      np.testing.assert_allclose(float(m[k][i]), v, rtol=2e-4, atol=1e-6, err_msg=k)
    np.testing.assert_array_equal(np.asarray(m["firing_counts"][i]), (c[:window] != 0).sum(0))
    assert float(m["window_tokens"][i]) == window


def test_group_equals_variants_one_by_one_and_compiles_once(setup_and_lm, data):
  setup, lm_params = setup_and_lm
  ks = [1, 4, 16]
  common = {"activation": "topk", "expansion": 2, "loss": "e2e"}
  spec = _spec([{"product": {"k": ks}, "set": common}])
  state = grid_step.init_group(spec, setup, None)
  hyper = grid_step.group_hyper(spec)
  tokens, mask, nxt, valid = _flat(data)
  before = eval_passes.group_pass._cache_size()
  together = ev.evaluate_group(spec, state.params, state.sae_state, hyper, lm_params, tokens,
                               mask, setup, next_BT=nxt, valid_BTV=valid, positions="all",
                               variant_loop="vmap")
  # two batches, three variants: one compile
  assert eval_passes.group_pass._cache_size() == before + 1
  assert len(set(np.asarray(together["l0"]).round(3))) == 3  # the variants do differ
  mapped = ev.evaluate_group(spec, state.params, state.sae_state, hyper, lm_params, tokens,
                             mask, setup, next_BT=nxt, valid_BTV=valid, positions="all",
                             variant_loop="map")
  for name, v in mapped.items():
    np.testing.assert_allclose(np.asarray(v), np.asarray(together[name]), rtol=1e-4, atol=1e-6,
                               err_msg=name)
  for i, k in enumerate(ks):
    # A group of one (the same static config, so the N=1 program compiles once for all three).
    one = lambda tree: jax.tree.map(lambda a: a[i:i + 1], tree)
    spec1 = dataclasses.replace(spec, ids=spec.ids[i:i + 1], size=1, padded=1)
    assert int(one(hyper.hparams).k[0]) == k
    alone = ev.evaluate_group(spec1, one(state.params), one(state.sae_state), one(hyper),
                              lm_params, tokens, mask, setup, next_BT=nxt, valid_BTV=valid,
                              positions="all", variant_loop="vmap")
    for name, v in alone.items():
      np.testing.assert_allclose(np.asarray(together[name][i]), np.asarray(v[0]), rtol=1e-4,
                                 atol=1e-6, err_msg=name)


def test_bad_inputs_raise_before_compiling(setup_and_lm, data):
  setup, lm_params = setup_and_lm
  spec, params, hyper = _crafted_group(2, [np.zeros((3 * D, D), np.float32)] * 2)
  tokens, mask, _, _ = _flat(data)
  call = lambda **kw: ev.evaluate_group(spec, kw.pop("params", params), None, hyper, lm_params,
                                        kw.pop("tokens", tokens), mask, setup, **kw)
  with pytest.raises(ValueError, match="positions='middle'"):
    call(positions="middle")
  with pytest.raises(ValueError, match="splice_mode='raw'"):
    call(splice_mode="raw")
  with pytest.raises(ValueError, match="leading axis of spec.padded=2"):
    call(params=jax.tree.map(lambda a: a[:1], params))
  with pytest.raises(ValueError, match="same shape"):
    call(tokens=tokens[:, :, :-1])
  with pytest.raises(ValueError, match="window_tokens=-1"):
    call(window_tokens=-1)
  with pytest.raises(ValueError, match="variant_loop='scan'"):
    call(variant_loop="scan")


# ------------------------------------------------------------------------------------------------
# The eval job end to end.


@pytest.fixture(scope="module")
def tiny_grid(lm_dir, tmp_path_factory):
  """A trained grid of two groups (the sparsity reduction is static) of two variants, sharing
  one SAE config, and its summary."""
  sae_dir = str(tmp_path_factory.mktemp("grid") / "sae")
  config = _sae_config(lm_dir, [{"product": {"sparsity_coeff": [1.0, 4.0],
                                             "sparsity_reduction": ["e2e_sae", "sum_batch"]},
                                 "set": {"loss": "local", "expansion": 2}}],
                       steps=2, log_every=2, checkpoint_every=2)
  config.lock()
  return sae_dir, train_sae.run(config, sae_dir)


def _tiny_eval_config(sae_dir):
  eval_config = eval_configs.get_config(f"smoke,sae_workdir={sae_dir}")
  eval_config.grammaticality_positions = ("sentence",)  # both are tested above; keep it short
  eval_config.lock()
  return eval_config


def test_eval_job_on_a_tiny_trained_grid(tiny_grid, tmp_path):
  sae_dir, summary = tiny_grid
  assert main_lib.JOBS["eval"] == "jaxsae.eval_job"
  eval_config = _tiny_eval_config(sae_dir)
  assert eval_config.job == "eval"
  result = eval_job.run(eval_config, str(tmp_path / "eval"))
  assert not os.path.exists(tmp_path / "eval" / partial.DIRNAME)  # removed once written
  with open(tmp_path / "eval" / "eval.json") as f:
    written = json.load(f)
  assert written["variants"].keys() == summary["variants"].keys() == result["variants"].keys()
  assert len(written["variants"]) == 4
  for vid, v in written["variants"].items():
    assert v["frozen"] is False and v["group"] in ("g0", "g1")
    for k in ("l0", "mse", "ev_token_mean", "ce_spliced", "kl", "ce_recovered_zero",
              "ds_mse/resid_post.1", "grammatical_mass_spliced",
              "grammaticality/corrected/sentence", "grammaticality/original/sentence"):
      assert isinstance(v[k], (float, str)), (vid, k)
    assert sum(v["density_histogram"]) == v["alive"]
  clean = written["clean"]
  assert 0 <= clean["grammaticality"] <= 1 and isinstance(clean["ce_clean"], float)
  assert written["heldout"]["tokens"] > 0
  # The job also writes the report, with the numbers of eval.json.
  report_json = json.load(open(tmp_path / "eval" / "report.json"))
  assert {r["id"] for r in report_json["variants"]} == set(written["variants"])
  text = open(tmp_path / "eval" / "report.md").read()
  assert "Clean model" in text and all(vid in text for vid in written["variants"])
  with pytest.raises(ValueError, match="sae_workdir is required"):
    eval_job.run(eval_configs.get_config("smoke"), str(tmp_path / "none"))
  with pytest.raises(ValueError, match="sae_workdir is required"):
    ev.run(eval_configs.get_config("smoke"), str(tmp_path / "none"))


def test_evaluation_imports_no_later_package():
  # Evaluation comes before analysis, the report, interop and the pipeline: the eval job that
  # also writes the report is `jaxsae.eval_job`.
  root = os.path.join(os.path.dirname(ev.__file__))
  for name in sorted(os.listdir(root)):
    if name.endswith(".py"):
      tree = ast.parse(open(os.path.join(root, name)).read())
      imported = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module]
      imported += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
      later = [m for m in imported if m.startswith(("jaxsae.analysis", "jaxsae.report",
                                                    "jaxsae.interop", "jaxsae.pipeline",
                                                    "jaxsae.eval_job"))]
      assert not later, (name, later)


def test_a_stopped_evaluation_resumes_from_its_finished_parts(tiny_grid, tmp_path, monkeypatch):
  sae_dir, _ = tiny_grid
  eval_config = _tiny_eval_config(sae_dir)
  whole = ev.run(eval_config, str(tmp_path / "whole"))
  monkeypatch.setattr(ev, "GROUPS_PER_PART", 1)  # two parts of held-out metrics
  # Stop the job after the first group's generations are saved.
  saves = []
  real_save = partial.Store.save_generations

  def save_then_stop(self, *args):
    real_save(self, *args)
    saves.append(args[:2])
    raise RuntimeError("stopped")

  monkeypatch.setattr(partial.Store, "save_generations", save_then_stop)
  workdir = tmp_path / "resumed"
  with pytest.raises(RuntimeError, match="stopped"):
    ev.run(eval_config, str(workdir))
  assert saves == [(0, "corrected/sentence")]
  parts = sorted(os.listdir(workdir / partial.DIRNAME))
  assert [p.split("-")[0] for p in parts] == ["generations", "metrics"]
  assert sorted(os.listdir(workdir / partial.DIRNAME / parts[1])) == [
      "clean.npz", "group-0.npz", "group-1.npz"]
  # The rerun reads both groups' metrics and group 0's generations, and generates group 1's.
  monkeypatch.setattr(partial.Store, "save_generations", real_save)
  evaluated, dispatched = [], []
  real_evaluate, real_dispatch = ev._evaluate, spliced_generation.dispatch_group
  monkeypatch.setattr(ev, "_evaluate", lambda groups, *a, **k: (
      evaluated.append([g.spec.name for g in groups]), real_evaluate(groups, *a, **k))[1])
  monkeypatch.setattr(spliced_generation, "dispatch_group", lambda setup, lm, sae, *a, **k: (
      dispatched.append(k["mode"]), real_dispatch(setup, lm, sae, *a, **k))[1])
  resumed = ev.run(eval_config, str(workdir))
  assert evaluated == [] and dispatched == ["corrected"]
  assert not os.path.exists(workdir / partial.DIRNAME)
  strip = lambda r: {k: v for k, v in r.items() if k not in ("seconds", "grammaticality_settings")}
  assert json.dumps(strip(resumed), sort_keys=True) == json.dumps(strip(whole), sort_keys=True)
  assert resumed["grammaticality_settings"] == whole["grammaticality_settings"]


def test_parts_of_another_grid_or_other_settings_are_not_read(tmp_path):
  grid = {"path": "/a", "step": 2, "digest": "d", "config": "c"}
  store = partial.Store(str(tmp_path), grid, {"seed": 0}, {"seed": 0})
  store.save_metrics(0, {"l0": np.array([1.5, 2.5])})
  store.save_clean({"tokens": 7.0, "seq/ce": np.array([0.25])})
  store.save_generations(1, "original/all", {"t": 1.0}, np.ones((1, 2, 3, 4), np.int32),
                         np.zeros((1, 2, 3), bool))
  moved = partial.Store(str(tmp_path), dict(grid, path="/b"), {"seed": 0}, {"seed": 0})
  np.testing.assert_array_equal(moved.load_metrics(0)["l0"], [1.5, 2.5])
  assert moved.load_clean()["tokens"] == 7.0 and isinstance(moved.load_clean()["tokens"], float)
  tokens, finished = moved.load_generations(1, "original/all", {"t": 1.0})
  assert tokens.dtype == np.int32 and tokens.shape == (1, 2, 3, 4) and not finished.any()
  assert moved.load_generations(1, "original/all", {"t": 0.5}) is None
  assert moved.load_generations(1, "corrected/all", {"t": 1.0}) is None
  assert moved.load_metrics(1) is None
  for other in (partial.Store(str(tmp_path), dict(grid, step=3), {"seed": 0}, {"seed": 0}),
                partial.Store(str(tmp_path), grid, {"seed": 1}, {"seed": 0})):
    assert other.load_metrics(0) is None
  assert partial.Store(str(tmp_path), grid, {"seed": 1}, {"seed": 0}).load_generations(
      1, "original/all", {"t": 1.0}) is not None  # new metrics settings keep the generations
  store.clear()
  assert not os.path.exists(tmp_path / partial.DIRNAME)


# ------------------------------------------------------------------------------------------------
# Transcoders: site mlp_in.0, output in place of mlp_out.0.


@pytest.fixture(scope="module")
def transcoder_setup(lm_dir):
  config = _sae_config(lm_dir, [{"set": {"loss": "local", "target_site": "mlp_out.0"}}],
                       site="mlp_in.0")
  setup, lm, _ = train_sae.prepare(config)
  return setup, jax.tree.map(lambda p: 8.0 * p, lm.params)


def _crafted_transcoders(rng, scales):
  """ReLU transcoders of width 2D without biases: codes relu(h W_enc), output codes W_dec."""
  spec = _spec([{"product": {"seed": list(range(len(scales)))},
                 "set": {"expansion": 2, "enc_bias": False, "dec_bias": False,
                         "decoder_norm": "none", "init": "menon",
                         "target_site": "mlp_out.0"}}])
  w_enc = rng.normal(size=(len(scales), D, 2 * D)).astype(np.float32) / np.sqrt(D)
  w_dec = np.stack([s * rng.normal(size=(2 * D, D)) for s in scales]).astype(np.float32)
  return spec, {"w_enc": jnp.asarray(w_enc), "w_dec": jnp.asarray(w_dec / np.sqrt(2 * D))}


@pytest.mark.parametrize("positions", ["sentence", "all"])
def test_transcoder_metrics_against_model_apply_with_the_mlp_replaced(transcoder_setup,
                                                                      positions):
  """Codes come from mlp_in.0, errors are against the clean mlp_out.0, and the spliced run is
  `model.apply` with mlp_out.0 replaced by the transcoder of mlp_in.0 (NumPy by hand)."""
  setup, lm_params = transcoder_setup
  mc = setup.model_config
  data = eval_passes.heldout(setup, seed=3, num_batches=2, batch_size=4)
  spec, params = _crafted_transcoders(np.random.default_rng(7), [1.0, 0.0])
  tokens, mask, nxt, valid = _flat(data)
  m = ev.evaluate_group(spec, params, None, grid_step.group_hyper(spec), lm_params, tokens,
                        mask, setup, next_BT=nxt, valid_BTV=valid, positions=positions)
  m = {k: np.asarray(v, np.float64) for k, v in m.items()}
  sites = ("mlp_in.0", "mlp_out.0", "resid_post.0", "resid_post.1")

  @jax.jit
  def runs(w_enc, w_dec, t, at_BT):
    clean = model_lib.apply(lm_params, t, mc, collect=sites)
    h, y = clean.acts["mlp_in.0"], clean.acts["mlp_out.0"]
    out = jax.nn.relu(h @ w_enc) @ w_dec
    put = lambda value: lambda y_: jnp.where(at_BT[..., None], value, y_)
    spliced = model_lib.apply(lm_params, t, mc, replace={"mlp_out.0": put(out)}, collect=sites)
    zero = model_lib.apply(lm_params, t, mc, replace={"mlp_out.0": put(jnp.zeros_like(y))})
    h_spliced = spliced.acts["mlp_in.0"]  # upstream of the splice: the clean input
    return (h, y, h_spliced, jax.nn.relu(h @ w_enc), spliced.acts, clean.acts,
            jax.nn.log_softmax(clean.logits), jax.nn.log_softmax(spliced.logits),
            jax.nn.log_softmax(zero.logits))

  for i in range(2):
    ys, outs, codes, ce, ce0, kl, ds = [], [], [], [], [], [], {h: [] for h in sites[2:]}
    for t, mk, nx in zip(tokens, mask, nxt):
      at = np.ones_like(mk) if positions == "all" else mk
      h, y, h_spliced, code, sp, cl, lp, lq, lz = jax.device_get(
          runs(params["w_enc"][i], params["w_dec"][i], t, at))
      np.testing.assert_array_equal(h_spliced, h)
      ys.append(np.asarray(y[mk], np.float64))
      outs.append(np.asarray(sp["mlp_out.0"][mk], np.float64))
      codes.append(code[mk])
      for s_ in sites[2:]:
        ds[s_].append(((np.float64(sp[s_]) - cl[s_])[mk] ** 2).sum(-1))
      pred = mk & (nx != setup.grammar.pad_id)
      pick = lambda l: -np.take_along_axis(np.float64(l[pred]), nx[pred][:, None], -1)[:, 0]
      ce.append(pick(lq))
      ce0.append(pick(lz))
      p_ = np.exp(np.float64(lp[pred]))
      kl.append((p_ * (np.float64(lp[pred]) - lq[pred])).sum(-1))
    y, out = np.concatenate(ys), np.concatenate(outs)
    err = ((out - y) ** 2).sum(-1)
    mu = y.mean(0)
    expect = {"mse": err.mean() / D, "mse_sae_space": err.mean() / D,
              "nmse": err.sum() / (y ** 2).sum(),
              "ev_token_mean": np.mean(1 - err / ((y - mu) ** 2).sum(-1)),
              "l0": (np.concatenate(codes) != 0).sum(1).mean(),
              "ce_spliced": np.concatenate(ce).mean(), "kl": np.concatenate(kl).mean(),
              "ce_zero_ablation": np.concatenate(ce0).mean(),
              **{f"ds_mse/{s_}": np.concatenate(v).mean() / D for s_, v in ds.items()}}
    for k, v in expect.items():
      np.testing.assert_allclose(m[k][i], v, rtol=2e-4, atol=1e-6, err_msg=f"{k} [{i}]")
  # The transcoder that outputs 0 is the zero ablation of the MLP; the other changes the model.
  np.testing.assert_allclose(m["ce_spliced"][1], m["ce_zero_ablation"][1], rtol=1e-6)
  np.testing.assert_allclose(m["nmse"][1], 1.0, rtol=1e-6)
  assert m["kl"][0] > 1e-4 and m["ce_zero_ablation"][0] - m["ce_clean"][0] > 1e-3
  # resid_post.0 differs from the clean one by the MLP-output error alone.
  np.testing.assert_allclose(m["ds_mse/resid_post.0"], m["mse"], rtol=1e-4)


def test_transcoder_and_sae_groups_need_their_own_grids_setup(setup_and_lm, transcoder_setup,
                                                              data):
  """A group is evaluated as a transcoder iff its grid is one: a mismatched setup is refused
  before anything runs."""
  spec, params = _crafted_transcoders(np.random.default_rng(0), [1.0])
  setup, lm_params = setup_and_lm
  tokens, mask, _, _ = _flat(data)
  with pytest.raises(ValueError, match=r"target_site='mlp_out.0' but the setup's groups have "
                                       r"''"):
    ev.evaluate_group(spec, params, None, grid_step.group_hyper(spec), lm_params, tokens, mask,
                      setup)
  plain, plain_params, hyper = _crafted_group(1, [np.zeros((3 * D, D), np.float32)])
  with pytest.raises(ValueError, match=r"target_site='' but the setup's groups have "
                                       r"'mlp_out.0'"):
    ev.evaluate_group(plain, plain_params, None, hyper, transcoder_setup[1], tokens, mask,
                      transcoder_setup[0])


def test_eval_job_on_a_tiny_transcoder_grid(lm_dir, tmp_path):
  sae_dir = str(tmp_path / "sae")
  config = _sae_config(lm_dir, [{"product": {"sparsity_coeff": [1.0, 4.0],
                                             "loss": ["local", "e2e"]},
                                 "set": {"expansion": 2, "target_site": "mlp_out.1"}}],
                       site="mlp_in.1", steps=2, log_every=2, checkpoint_every=2)
  config.lock()
  summary = train_sae.run(config, sae_dir)
  eval_config = eval_configs.get_config(f"smoke,sae_workdir={sae_dir}")
  eval_config.grammaticality_positions = ("all",)
  eval_config.lock()
  result = ev.run(eval_config, str(tmp_path / "eval"))
  written = json.load(open(tmp_path / "eval" / "eval.json"))
  assert written["variants"].keys() == summary["variants"].keys() == result["variants"].keys()
  assert len(written["variants"]) == 4 and written["site"] == "mlp_in.1"
  for vid, v in written["variants"].items():
    for k in ("l0", "mse", "ev_token_mean", "ce_spliced", "kl", "ce_recovered_zero",
              "ds_mse/resid_post.1", "grammatical_mass_spliced",
              "grammaticality/corrected/all", "grammaticality/original/all"):
      assert isinstance(v[k], float) and np.isfinite(v[k]), (vid, k, v[k])
    # Splice modes coincide for transcoders: generated once, reported under both.
    assert v["grammaticality/corrected/all"] == v["grammaticality/original/all"]
    assert v["ds_mse/resid_post.1"] > 0 and 0 < v["l0"] <= 2 * D
