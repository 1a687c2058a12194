"""SAE grid training: vmap equivalence, compilation count, frozen LM, resume, NaN isolation,
input validation and multi-device equivalence."""

import json
import math
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fakes
from experiments.configs import sae_e2e
from jaxsae import grammars
from jaxsae.grid import grid_setup
from jaxsae.grid import grid_step
from jaxsae.grid import sae_groups
from jaxsae.grid import resample as resample_lib
from jaxsae.grid import sweep as sweep_lib
from jaxsae.grid import train_sae as ts
from jaxsae.grid import trained as trained_lib
from jaxsae.lm import model as model_lib


def _write_lm(directory: str, language: str) -> str:
  return fakes.write_smoke_lm(directory, language)


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory):
  return _write_lm(str(tmp_path_factory.mktemp("lm") / "dyck2"), "dyck2")


_config = fakes.smoke_sae_config  # (also used by the multi-device subprocess below)


def _train(config, steps=None):
  """Runs the grid in-process; returns (setup, final state)."""
  setup, lm, root = ts.prepare(config)
  state = grid_setup.place_state(grid_setup.init_grid(setup, lm, root), setup)
  chunk = ts.make_chunk_fn(setup, config.log_every, state)
  hypers = tuple(grid_step.group_hyper(s) for s in setup.specs)
  key = jax.random.fold_in(root, grid_setup.DATA_STREAM)
  for _ in range((steps or config.steps) // config.log_every):
    state, metrics = chunk(state, hypers, lm.params, key)
  return setup, state, metrics, chunk


def _assert_variant_equals_alone(lm_dir, group_params, i, fields, **overrides):
  """Variant `i` of a trained group equals the SAE of `fields` trained alone. One index per
  test suffices (each run compiles its own program): every value in a group differs, so a grid
  that mixed up variants' values, seeds or slices differs at any index other than 0."""
  _, alone, _, _ = _train(_config(lm_dir, [{"set": fields}], **overrides))
  for a, b in zip(jax.tree.leaves(group_params), jax.tree.leaves(alone.groups[0].params)):
    np.testing.assert_allclose(np.asarray(a)[i], np.asarray(b)[0], rtol=2e-5, atol=2e-6)


CASES = [
    ("local", "relu", {}),
    ("local", "topk", {"k": 3}),
    ("local", "batchtopk", {"k": 3}),
    ("local", "jumprelu", {}),
    ("e2e", "relu", {}),
    ("e2e_ds", "topk", {"k": 4}),
    ("local", "topk", {"k": 3, "auxk": True, "dead_tokens": 1}),
    ("e2e", "batchtopk", {"k": 3, "auxk": True, "k_aux": 5, "dead_tokens": 1}),
    ("local", "relu", {"matryoshka": [0.25, 0.5]}),
    ("local", "batchtopk", {"k": 3, "matryoshka": [0.125, 0.5], "auxk": True,
                            "dead_tokens": 1}),
    ("local", "gated", {"pre_bias": True}),
    ("local", "relu", {"target_site": "mlp_out.0"}),  # transcoders (config.site mlp_in.0)
    ("e2e", "topk", {"k": 3, "target_site": "mlp_out.1"}),
    ("e2e", "relu", {"p_anneal": True, "p_end": 0.2, "p_anneal_start": 1, "p_anneal_steps": 2}),
    ("e2e", "relu", {"resample_steps": [2], "dead_tokens": 1}),
]


@pytest.mark.parametrize("loss, activation, extra", CASES)
def test_grid_equals_separate_runs(lm_dir, loss, activation, extra):
  coeffs = [0.5, 2.0, 8.0]
  common = {"loss": loss, "activation": activation, "expansion": 2, **extra}
  site = ({"site": "mlp_in." + extra["target_site"].partition(".")[2]}
          if "target_site" in extra else {})
  together = _config(lm_dir, [{"product": {"sparsity_coeff": coeffs}, "zip": {},
                               "set": common}], **site)
  setup, state, _, _ = _train(together)
  assert len(setup.specs) == 1 and setup.specs[0].size == 3
  _assert_variant_equals_alone(lm_dir, state.groups[0].params, 1,
                               {**common, "sparsity_coeff": coeffs[1]}, **site)


@pytest.mark.parametrize("loss, activation", [("local", "topk"), ("e2e", "batchtopk")])
def test_sparse_decode_grid_equals_dense_decode(lm_dir, loss, activation):
  """Decoding from the active latents changes a grid's numbers only within float tolerance."""
  out = {}
  for decode in ("dense", "sparse"):
    config = _config(lm_dir, [{"product": {"seed": [0, 1]},
                               "set": {"loss": loss, "activation": activation, "k": 3,
                                       "expansion": 2, "sparsity_coeff": 0.5,
                                       "decode": decode}}])
    setup, state, metrics, _ = _train(config)
    assert setup.specs[0].sae.decode == decode
    out[decode] = (state.groups[0], metrics[0])
  (dense_state, dense_m), (sparse_state, sparse_m) = out["dense"], out["sparse"]
  for a, b in zip(jax.tree.leaves(sparse_state.params), jax.tree.leaves(dense_state.params)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(sparse_state.sae_state.threshold, dense_state.sae_state.threshold,
                             rtol=1e-5)
  assert set(sparse_m) == set(dense_m)
  for name in dense_m:
    np.testing.assert_allclose(sparse_m[name], dense_m[name], rtol=1e-4, atol=1e-6,
                               err_msg=name)


def test_one_trace_per_group_whatever_the_group_size(lm_dir, monkeypatch):
  traces = []
  original = grid_step._group_step  # pylint: disable=protected-access

  def counting(state, hyper, batch, lm_params, step, spec, setup):
    traces.append(spec.name)
    return original(state, hyper, batch, lm_params, step, spec, setup)

  monkeypatch.setattr(grid_step, "_group_step", counting)
  for n in (1, 5):
    traces.clear()
    sweep = [{"product": {"sparsity_coeff": list(np.linspace(0.1, 1, n))}, "set": {"loss": "local"}},
             {"product": {"sparsity_coeff": list(np.linspace(0.1, 1, n))}, "set": {"loss": "e2e"}}]
    _, _, _, chunk = _train(_config(lm_dir, sweep, steps=6))
    assert sorted(traces) == ["g0", "g1"]  # one trace per group, across all 3 calls
    assert chunk._cache_size() == 1  # pylint: disable=protected-access


def test_lm_is_frozen_and_gets_no_gradient(lm_dir):
  config = _config(lm_dir, [{"product": {"loss": ["e2e", "e2e_ds"]}}])
  setup, lm, root = ts.prepare(config)
  before = jax.tree.map(np.array, lm.params)
  state = grid_setup.init_grid(setup, lm, root)
  batch = grid_step.make_batch(lm.params, jnp.int32(0), jax.random.key(1), setup)
  spec = setup.specs[0]
  hyper = grid_step.group_hyper(spec)
  one = lambda t: jax.tree.map(lambda x: x[0], t)

  def loss_wrt_lm(lm_params):
    return grid_step._variant_loss(one(state.groups[0].params), one(state.groups[0].sae_state),  # pylint: disable=protected-access
                                   one(hyper.hparams), one(hyper.coeffs), batch, lm_params, spec,
                                   setup)[0]

  grads = jax.grad(loss_wrt_lm)(lm.params)
  assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(grads))
  _train(config)
  for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(lm.params)):
    np.testing.assert_array_equal(a, b)


def test_resume_is_bit_exact(lm_dir, tmp_path):
  sweep = [{"product": {"sparsity_coeff": [1.0, 4.0]}, "set": {"loss": "local"}},
           {"set": {"loss": "e2e", "activation": "topk", "k": 4}},
           # p-annealing across the resume, and resampling after it (from restored counters).
           {"set": {"loss": "local", "sparsity_coeff": 4.0, "p_anneal": True,
                    "p_anneal_start": 2, "p_anneal_steps": 4, "resample_steps": [3, 6],
                    "dead_tokens": 1}}]
  # The schedule's horizon is fixed (decay_steps), so the shorter first run is a prefix.
  straight = _config(lm_dir, sweep, steps=8, log_every=2, checkpoint_every=2, decay_steps=8)
  ts.run(straight, str(tmp_path / "a"))
  first = _config(lm_dir, sweep, steps=4, log_every=2, checkpoint_every=2, decay_steps=8)
  ts.run(first, str(tmp_path / "b"))
  ts.run(straight, str(tmp_path / "b"))  # same workdir, more steps: resumes at 4
  for name in ("a", "b"):
    assert json.load(open(tmp_path / name / "summary.json"))["steps"] == 8
  sa = json.load(open(tmp_path / "a" / "summary.json"))["variants"]
  sb = json.load(open(tmp_path / "b" / "summary.json"))["variants"]
  assert sa == sb
  lines = lambda n: [json.loads(l) for l in open(tmp_path / n / "metrics.jsonl")]
  assert lines("a") == lines("b")
  assert [l["step"] for l in lines("b") if l.get("resampled", 0) > 0] == [4, 6]  # steps 3, 6
  # The grid reads back from the workdir alone, at the final step and equal in both runs.
  ta, tb = trained_lib.load(str(tmp_path / "a")), trained_lib.load(str(tmp_path / "b"))
  assert int(ta.state.step) == 8 and [s.ids for s in ta.setup.specs] == [
      s.ids for s in tb.setup.specs]
  for x, y in zip(jax.tree.leaves(ta.state), jax.tree.leaves(tb.state)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  with pytest.raises(FileNotFoundError, match="not an sae job workdir"):
    trained_lib.load(str(tmp_path))


def test_variant_takes_one_sae_out_of_its_group(lm_dir):
  sweep = [{"zip": {"sparsity_coeff": [1.0, 4.0, 8.0], "seed": [0, 1, 2]},
            "set": {"loss": "local"}},
           {"product": {"k": [2, 4]}, "set": {"loss": "e2e", "activation": "topk"}}]
  setup, lm, root = ts.prepare(_config(lm_dir, sweep))
  state = grid_setup.init_grid(setup, lm, root)
  hypers = tuple(grid_step.group_hyper(s) for s in setup.specs)
  trained = trained_lib.TrainedGrid(config=None, setup=setup, lm=lm, state=state,
                                   hypers=hypers)
  seen = []
  for gi, spec in enumerate(setup.specs):
    for i, vid in enumerate(spec.ids):
      v = trained.variant(vid)
      assert (v.spec_index, v.position) == (gi, i)
      assert v.sae_config == spec.sae and v.splice_mode == spec.splice_mode
      for got, stacked in ((v.params, state.groups[gi].params),
                           (v.sae_state, state.groups[gi].sae_state),
                           (v.hparams, hypers[gi].hparams)):
        assert jax.tree.structure(got) == jax.tree.structure(stacked)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(stacked)):
          np.testing.assert_array_equal(np.asarray(a), np.asarray(b)[i])
      seen.append(np.concatenate([np.ravel(x) for x in jax.tree.leaves(v.params)]))
  # Different SAEs (own seeds), not the same slice over and over.
  assert not any(np.array_equal(seen[0], x) for x in seen[1:3])  # the local group's others
  with pytest.raises(ValueError, match="v999.*v000, v001"):
    trained.variant("v999")


def test_nan_variant_is_frozen_and_isolated(lm_dir):
  sweep = [{"zip": {"lr": [1e-3, 1e30, 1e-3], "sparsity_coeff": [1.0, 1.0, 3.0]},
            "set": {"loss": "e2e"}}]
  setup, state, metrics, _ = _train(_config(lm_dir, sweep, steps=4))
  g = state.groups[0]
  np.testing.assert_array_equal(np.asarray(g.frozen), [False, True, False])
  assert int(g.bad_step[1]) >= 0 and int(g.bad_step[0]) == -1
  assert all(np.isfinite(np.asarray(x)[[0, 2]]).all() for x in jax.tree.leaves(g.params))
  clean_sweep = [{"zip": {"lr": [1e-3, 1e-3], "sparsity_coeff": [1.0, 3.0]},
                  "set": {"loss": "e2e"}}]
  _, ref, _, _ = _train(_config(lm_dir, clean_sweep, steps=4))
  for a, b in zip(jax.tree.leaves(g.params), jax.tree.leaves(ref.groups[0].params)):
    np.testing.assert_allclose(np.asarray(a)[[0, 2]], np.asarray(b), rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("sweep, overrides, error, fragment", [
    ([{"set": {"activation": "topk", "k": 999, "expansion": 2}}], {}, sweep_lib.SweepError,
     "k=999 must lie in [1, width=64]"),
    ([{"set": {"sparsity_coeff": -1.0}}], {}, sweep_lib.SweepError, "must be a finite number >= 0"),
    ([], {}, sweep_lib.SweepError, "the sweep is empty"),
    ([{"set": {}}], {"site": "resid_mid.0"}, ValueError, "is not a site of the model"),
    ([{"set": {}}], {"language": "english"}, ValueError, "was trained on 'dyck2'"),
    ([{"set": {}}], {"lm_workdir": "/nonexistent"}, FileNotFoundError, "no trained LM"),
    ([{"set": {}}], {"positions": "words"}, ValueError, "config.positions"),
    ([{"set": {}}], {"adam_b1": 1.5}, ValueError, "config.adam_b1=1.5 must lie in [0, 1)"),
    ([{"set": {}}], {"adam_b2": 1.0}, ValueError, "config.adam_b2=1.0 must lie in [0, 1)"),
    ([{"set": {}}], {"adam_eps": -1.0}, ValueError, "config.adam_eps=-1.0 must be a finite"),
    ([{"set": {}}], {"warmup_steps": -5}, ValueError, "config.warmup_steps=-5 must be an int"),
    ([{"set": {}}], {"decay_steps": -1}, ValueError, "config.decay_steps=-1 must be an int"),
    ([{"set": {}}], {"lr_floor": float("nan")}, ValueError, "config.lr_floor=nan must lie"),
    ([{"set": {}}], {"grad_clip": float("nan")}, ValueError, "config.grad_clip=nan must be"),
    ([{"set": {}}], {"keep_checkpoints": 0}, ValueError, "config.keep_checkpoints=0 must be"),
    ([{"set": {}}], {"token_capacity": -2}, ValueError, "config.token_capacity=-2 must be"),
    ([{"set": {}}], {"steps": 0}, ValueError, "config.steps=0 must be a positive int"),
    ([{"set": {"lr": float("inf")}}], {}, sweep_lib.SweepError, "must be a finite number > 0"),
    ([{"set": {"seed": 2**32 + 1}}], {}, sweep_lib.SweepError, "larger values wrap"),
    ([{"set": {"seed": -1}}], {}, sweep_lib.SweepError, "seed=-1: must be an int in [0, 2^31)"),
    ([{"set": {"threshold_decay": 1.5}}], {}, sweep_lib.SweepError, "must lie in [0, 1]"),
    ([{"set": {"loss": "e2e_ds", "include_final_resid": False}}], {"site": "resid_post.1"},
     ValueError, "no resid_post follows"),
])
def test_bad_input_fails_before_compiling(lm_dir, sweep, overrides, error, fragment):
  config = _config(lm_dir, sweep, **overrides)
  with pytest.raises(error) as err:
    # What the job checks before it compiles: its validation pass, then the setup (which
    # needs the LM: the site, the language, the sweep at the LM's width).
    ts.validate_config(config)
    ts.prepare(config)
  assert fragment in str(err.value), str(err.value)


_MULTI = r"""
import json, sys
import jax, numpy as np
sys.path[:0] = [{root!r}, {root!r} + "/tests"]
import train_sae_test as t
from jaxsae.grid import train_sae as ts
cfg = t._config({lm!r}, t.MULTI_SWEEP, mesh_variant_devices={nv})
_, state, _, _ = t._train(cfg)
leaves = [np.asarray(x)[: {n}].tolist() for g in state.groups for x in jax.tree.leaves(g.params)]
print(json.dumps({{"devices": len(jax.devices()), "leaves": leaves}}))
"""
MULTI_SWEEP = [{"product": {"sparsity_coeff": [0.5, 1.0, 2.0]}, "set": {"loss": "local"}},
               {"product": {"sparsity_coeff": [1.0, 4.0]}, "set": {"loss": "e2e"}}]


@pytest.mark.parametrize("nv", [4, 2])
def test_sharded_over_four_devices_equals_one(lm_dir, nv):
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
             JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-c", _MULTI.format(root=root, lm=lm_dir, nv=nv, n=2)],
                       env=env, capture_output=True, text=True, timeout=600, cwd=root)
  assert out.returncode == 0, out.stderr[-3000:]
  multi = json.loads(out.stdout.strip().splitlines()[-1])
  assert multi["devices"] == 4
  _, state, _, _ = _train(_config(lm_dir, MULTI_SWEEP))
  single = [np.asarray(x)[:2] for g in state.groups for x in jax.tree.leaves(g.params)]
  for a, b in zip(multi["leaves"], single):
    np.testing.assert_allclose(np.asarray(a), b, rtol=1e-4, atol=1e-5)


def test_smoke_config_runs_through_the_job(lm_dir, tmp_path):
  config = _config(lm_dir, sae_e2e.get_config("smoke").sweep)
  summary = ts.run(config, str(tmp_path))
  assert summary["steps"] == config.steps
  variants = json.load(open(tmp_path / "variants.json"))["variants"]
  assert set(summary["variants"]) == {v["id"] for v in variants} and len(variants) == 6
  for v in summary["variants"].values():
    m = v["metrics"]
    for key in ("loss", "sparsity", "out_to_in", "l0", "explained_variance", "dead_fraction",
                "grad_norm", "lr"):
      assert key in m, key
    if v["hparams"]["loss"] != "local":
      assert "logits_kl" in m
  lines = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  assert {l["step"] for l in lines} == {2, 4}
  assert summary["diverged"] == {}
  for vid, v in summary["variants"].items():  # the loss before the run's first update
    (first,) = [l for l in lines if l["variant"] == vid and l["step"] == 2]
    assert v["metrics"]["initial_loss"] == first["first_step_loss"]
    assert "first_step_loss" not in v["metrics"]
  # The grid's workdir is no LM workdir: said so, naming the LM to use instead.
  with pytest.raises(ValueError, match=r"this is an SAE workdir, not an LM workdir; point "
                                       r"lm_workdir at the LM it was trained on"):
    ts.prepare(_config(str(tmp_path), [{"set": {}}]))


def test_diverging_variant_is_flagged_with_its_hparams(lm_dir, tmp_path, caplog):
  sweep = [{"zip": {"lr": [1e-3, 1e6, 1e-3], "sparsity_coeff": [1.0, 1.0, 3.0]},
            "set": {"loss": "local"}}]
  summary = ts.run(_config(lm_dir, sweep, steps=4), str(tmp_path))
  assert "lr=1e+06 is above 1" in caplog.text
  (vid, verdict), = summary["diverged"].items()
  assert verdict["hparams"]["lr"] == 1e6 and verdict["ratio"] > 100
  assert not summary["variants"][vid]["frozen"]  # finite: the NaN guard does not see it
  others = [v for k, v in summary["variants"].items() if k != vid]
  assert len(others) == 2 and all(v["divergence"] is None for v in others)
  assert f"variant {vid} (group g0" in caplog.text and "diverged" in caplog.text
  assert json.load(open(tmp_path / "summary.json"))["diverged"] == summary["diverged"]


# ------------------------------------------------------------------------------------------------
# The causal-interpolation term in the grid.

CAUSAL = {"loss": "local", "activation": "topk", "k": 4, "expansion": 2, "causal": True}


@pytest.mark.parametrize("mode", [
    {"causal_lambda": "token", "causal_target": "sae", "causal_distance": "mse"},
    {"causal_lambda": "step", "causal_target": "clean", "causal_distance": "kl",
     "causal_ramp": 2},
])
def test_causal_beta_grid_equals_separate_runs(lm_dir, mode):
  betas = [0.5, 1.0, 100.0]
  common = {**CAUSAL, **mode}
  setup, state, metrics, _ = _train(_config(lm_dir, [{"product": {"causal_coeff": betas},
                                                     "set": common}]))
  assert len(setup.specs) == 1 and setup.specs[0].loss.causal
  assert np.all(np.asarray(metrics[0]["causal"]) > 0)
  _assert_variant_equals_alone(lm_dir, state.groups[0].params, 1,
                               {**common, "causal_coeff": betas[1]})


def _one_variant_loss(lm_dir, values, preset_fields=None):
  """(loss fn of the first variant's params, params) on one batch."""
  config = _config(lm_dir, [{"set": {**CAUSAL, **values}}])
  setup, lm, root = ts.prepare(config)
  state = grid_setup.init_grid(setup, lm, root)
  batch = grid_step.make_batch(lm.params, jnp.int32(0), jax.random.key(1), setup)
  spec, hyper = setup.specs[0], grid_step.group_hyper(setup.specs[0])
  one = lambda t: jax.tree.map(lambda x: x[0], t)
  rng = jax.random.key(5)

  def loss(params):
    return grid_step._variant_loss(params, one(state.groups[0].sae_state), one(hyper.hparams),  # pylint: disable=protected-access
                            one(hyper.coeffs), batch, lm.params, spec, setup, rng,
                            one(hyper.causal).lambda_value)
  return loss, one(state.groups[0].params)


def test_causal_term_vanishes_at_lambda_zero(lm_dir):
  # λ = 0: every token carries its own reconstruction, exactly the plain SAE splice, so the
  # interpolated run reproduces the SAE-spliced logits (the 'sae' target) and the term is 0.
  for preset in ("local", "e2e"):
    loss, params = _one_variant_loss(lm_dir, {"loss": preset, "causal_lambda": "fixed",
                                              "causal_lambda_value": 0.0, "causal_coeff": 1.0})
    total, (metrics, *_) = loss(params)
    # 0 up to float rounding: the two model runs may be fused differently by XLA (1e-16 seen).
    assert abs(float(metrics["causal"])) < 1e-12
  loss, params = _one_variant_loss(lm_dir, {"causal_lambda": "fixed", "causal_lambda_value": 0.5,
                                            "causal_coeff": 1.0})
  assert float(loss(params)[1][0]["causal"]) > 0


def test_causal_gradient_matches_finite_differences(lm_dir):
  # The clean target does not depend on the SAE (the 'sae' target is held constant on purpose,
  # so finite differences of the whole function would not match its gradient).
  loss, params = _one_variant_loss(lm_dir, {"activation": "relu", "causal_lambda": "fixed",
                                            "causal_lambda_value": 0.3, "causal_coeff": 1.0,
                                            "sparsity_coeff": 0.0, "out_to_in_coeff": 0.0,
                                            "causal_distance": "kl", "causal_target": "clean"})
  f = jax.jit(lambda p: loss(p)[0])
  grads = jax.grad(f)(params)
  rng = np.random.default_rng(0)
  direction = jax.tree.map(lambda x: jnp.asarray(0.1 * rng.normal(size=x.shape), x.dtype),
                           params)
  analytic = sum(float(jnp.sum(g * d)) for g, d in zip(jax.tree.leaves(grads),
                                                         jax.tree.leaves(direction)))
  eps = 1e-3
  shift = lambda s: jax.tree.map(lambda p, d: p + s * eps * d, params, direction)
  numeric = (float(f(shift(1))) - float(f(shift(-1)))) / (2 * eps)
  assert abs(analytic) > 1e-4
  np.testing.assert_allclose(numeric, analytic, rtol=2e-2)


def test_causal_pretraining_phase_is_plain_training(lm_dir):
  # Before causal_start the causal variant trains exactly like the plain one (β ramp at 0,
  # same lr); the term is still logged.
  plain = {k: v for k, v in CAUSAL.items() if k != "causal"}
  _, a, ma, _ = _train(_config(lm_dir, [{"set": {**CAUSAL, "causal_coeff": 5.0,
                                                 "causal_start": 100, "causal_lr_scale": 0.1,
                                                 "causal_reset_opt": True}}]))
  _, b, _, _ = _train(_config(lm_dir, [{"set": plain}]))
  for x, y in zip(jax.tree.leaves(a.groups[0].params), jax.tree.leaves(b.groups[0].params)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=2e-5, atol=2e-6)
  assert float(np.asarray(ma[0]["causal_beta"])[0]) == 0.0
  assert float(np.asarray(ma[0]["causal"])[0]) > 0


# ------------------------------------------------------------------------------------------------
# AuxK.

AUXK = {"loss": "local", "activation": "topk", "k": 2, "expansion": 2, "auxk": True,
        "dead_tokens": 1, "decode": "dense"}


def test_auxk_coeff_grid_equals_separate_runs_and_zero_is_plain_topk(lm_dir):
  alphas = [0.0, 1 / 32, 1.0]
  setup, state, metrics, _ = _train(_config(lm_dir, [{"product": {"auxk_coeff": alphas},
                                                     "set": AUXK}]))
  (spec,) = setup.specs
  assert spec.sae.k_aux == setup.model_config.d_model // 2
  # Logged at every alpha (also 0); some latents are dead (not fired in the previous step).
  assert np.all(np.asarray(metrics[0]["auxk"])[:3] > 0)
  assert np.all(np.asarray(metrics[0]["auxk_dead_fraction"])[:3] > 0)
  since = np.asarray(state.groups[0].sae_state.since_fired)
  assert since.shape == (spec.padded, spec.sae.width) and since.max() > 0 and since.min() == 0
  _assert_variant_equals_alone(lm_dir, state.groups[0].params, 2,
                               {**AUXK, "auxk_coeff": alphas[2]})
  plain = {k: v for k, v in AUXK.items() if k not in ("auxk", "dead_tokens")}
  _, ref, ref_metrics, _ = _train(_config(lm_dir, [{"set": plain}]))
  assert "auxk" not in ref_metrics[0]
  for a, b in zip(jax.tree.leaves(state.groups[0].params), jax.tree.leaves(ref.groups[0].params)):
    np.testing.assert_array_equal(np.asarray(a)[0], np.asarray(b)[0])  # alpha 0: no effect
  # alpha > 0 moves the encoder (the dead latents' columns).
  assert not np.array_equal(np.asarray(state.groups[0].params["w_enc"])[2],
                            np.asarray(ref.groups[0].params["w_enc"])[0])


@pytest.mark.parametrize("sweep, fragment", [
    ([{"set": {"auxk": True}}], "auxk=True needs activation topk or batchtopk"),
    ([{"set": {"auxk": True, "activation": "topk", "k": 2, "k_aux": 10**6}}],
     "k_aux=1000000 exceeds the width"),
    ([{"set": {"auxk": True, "activation": "topk", "k": 2, "dead_tokens": 0}}],
     "dead_tokens=0: must be an int in [1, 2^31)"),
])
def test_auxk_bad_input_fails_before_compiling(lm_dir, sweep, fragment):
  with pytest.raises(sweep_lib.SweepError) as err:
    ts.prepare(_config(lm_dir, sweep))
  assert fragment in str(err.value), str(err.value)


# ------------------------------------------------------------------------------------------------
# Matryoshka.

MATRYOSHKA = {"loss": "local", "activation": "relu", "expansion": 2, "sparsity_coeff": 1.0,
              "matryoshka": [0.25, 0.5]}


def test_matryoshka_coeff_grid_equals_separate_runs_and_zero_is_plain(lm_dir):
  weights = [0.0, 1.0, 3.0]
  setup, state, metrics, _ = _train(_config(lm_dir, [{"product": {"matryoshka_coeff": weights},
                                                     "set": MATRYOSHKA}]))
  (spec,) = setup.specs
  f = spec.sae.width
  assert spec.sae.matryoshka == (f // 4, f // 2)
  m = metrics[0]
  for w in spec.sae.matryoshka:  # logged at every weight, also 0
    assert np.all(np.asarray(m[f"matryoshka/{w}"])[:3] > 0)
  np.testing.assert_allclose(m["matryoshka"], sum(m[f"matryoshka/{w}"] for w in
                                                  spec.sae.matryoshka), rtol=1e-6)
  _assert_variant_equals_alone(lm_dir, state.groups[0].params, 2,
                               {**MATRYOSHKA, "matryoshka_coeff": weights[2]})
  plain = {k: v for k, v in MATRYOSHKA.items() if k != "matryoshka"}
  _, ref, ref_metrics, _ = _train(_config(lm_dir, [{"set": plain}]))
  assert "matryoshka" not in ref_metrics[0]
  for a, b in zip(jax.tree.leaves(state.groups[0].params), jax.tree.leaves(ref.groups[0].params)):
    np.testing.assert_allclose(np.asarray(a)[0], np.asarray(b)[0], rtol=1e-6, atol=1e-7)
  # Weighted prefixes lower the inner prefixes' reconstruction error against weight 0.
  assert float(np.asarray(m["matryoshka"])[2]) < float(np.asarray(m["matryoshka"])[0])


def test_matryoshka_bad_fractions_fail_before_compiling(lm_dir):
  for value, fragment in (([0.5, 0.25], "strictly increasing fractions in (0, 1)"),
                          ([0.001], "each must be distinct and in [1, F)")):
    with pytest.raises(sweep_lib.SweepError) as err:
      ts.prepare(_config(lm_dir, [{"set": {"matryoshka": value}}]))
    assert fragment in str(err.value), str(err.value)


# ------------------------------------------------------------------------------------------------
# Gated.


def test_gated_aux_coeff_grid_equals_separate_runs_and_trains_the_gate(lm_dir):
  common = {"loss": "local", "activation": "gated", "expansion": 2, "sparsity_coeff": 0.0}
  weights = [0.0, 1.0]
  setup, state, metrics, _ = _train(_config(lm_dir, [{"product": {"gated_aux_coeff": weights},
                                                     "set": common}]))
  assert np.all(np.asarray(metrics[0]["gated_aux"])[:2] > 0)  # logged at weight 0 too
  g = state.groups[0].params
  init_setup, lm, root = ts.prepare(_config(lm_dir, [{"set": common}]))
  b0 = np.asarray(grid_setup.init_grid(init_setup, lm, root).groups[0].params["b_enc"])[0]
  # No sparsity and no auxiliary term: nothing reaches the gate bias; the auxiliary term does.
  np.testing.assert_array_equal(np.asarray(g["b_enc"])[0], b0)
  assert not np.array_equal(np.asarray(g["b_enc"])[1], b0)
  _assert_variant_equals_alone(lm_dir, g, 1, {**common, "gated_aux_coeff": weights[1]})


def test_jumprelu_threshold_lr_scale_multiplies_only_the_threshold_step(lm_dir):
  common = {"loss": "local", "activation": "jumprelu", "expansion": 2, "sparsity_coeff": 1.0,
            "jumprelu_init_threshold": 0.05, "jumprelu_bandwidth": 0.05}
  scales = [1.0, 10.0]
  one_step = dict(steps=1, log_every=1, warmup_steps=1)
  setup, state, _, _ = _train(_config(
      lm_dir, [{"product": {"jumprelu_threshold_lr_scale": scales}, "set": common}], **one_step))
  assert len(setup.specs) == 1  # a per-variant value: one group
  init_setup, lm, root = ts.prepare(_config(lm_dir, [{"set": common}], **one_step))
  init = grid_setup.init_grid(init_setup, lm, root).groups[0].params
  p = {k: np.asarray(v) for k, v in state.groups[0].params.items()}
  theta0 = np.asarray(init["log_threshold"])[0]
  step1, step10 = p["log_threshold"][0] - theta0, p["log_threshold"][1] - theta0
  assert np.abs(step1).max() > 0
  np.testing.assert_allclose(step10, 10 * step1, rtol=1e-4, atol=1e-9)
  for name, value in p.items():  # the first step of every other parameter is the same
    if name != "log_threshold":
      np.testing.assert_array_equal(value[0], value[1], err_msg=name)
  _assert_variant_equals_alone(lm_dir, state.groups[0].params, 0, common, **one_step)


# ------------------------------------------------------------------------------------------------
# Transcoders: an SAE at mlp_in.{l} that stands for mlp_out.{l}.


def _transcoder_step0(lm_dir, loss):
  """(setup, lm, batch, params of variant 0, its metrics) at init for a relu transcoder."""
  config = _config(lm_dir, [{"set": {"loss": loss, "target_site": "mlp_out.1",
                                     "expansion": 2, "sparsity_coeff": 0.5}}], site="mlp_in.1")
  setup, lm, root = ts.prepare(config)
  state = grid_setup.init_grid(setup, lm, root)
  key = jax.random.key(4)
  batch = grid_step.make_batch(lm.params, jnp.int32(0), key, setup)
  spec, hyper = setup.specs[0], grid_step.group_hyper(setup.specs[0])
  one = lambda t: jax.tree.map(lambda x: x[0], t)
  params = one(state.groups[0].params)
  _, (metrics, *_) = grid_step._variant_loss(  # pylint: disable=protected-access
      params, one(state.groups[0].sae_state), one(hyper.hparams), one(hyper.coeffs), batch,
      lm.params, spec, setup)
  return setup, lm, batch, key, params, metrics


def _relu_sae_np(params, x_ND):
  p = {k: np.asarray(v, np.float64) for k, v in params.items()}
  w_dec = p["w_dec"] / np.linalg.norm(p["w_dec"], axis=-1, keepdims=True)  # decoder_norm forward
  return np.maximum(x_ND @ p["w_enc"] + p["b_enc"], 0) @ w_dec + p["b_dec"]


def test_transcoder_local_loss_is_the_mse_to_the_mlp_output(lm_dir):
  """The batch's target is MLP 1 applied to its input, and the local loss at init is the mean
  over selected tokens × dims of (transcoder(x_in) − MLP(x_in))², computed here in NumPy."""
  setup, lm, batch, _, params, metrics = _transcoder_step0(lm_dir, "local")
  mlp = {k: np.asarray(v["kernel"], np.float64) for k, v in lm.params["block_1"]["mlp"].items()}
  u = np.asarray(batch.acts_BTD, np.float64) @ mlp["c_fc"]
  gelu = 0.5 * u * (1 + np.vectorize(math.erf)(u / math.sqrt(2)))
  np.testing.assert_allclose(batch.target_BTD, gelu @ mlp["c_proj"], rtol=1e-4, atol=1e-6)
  mask = np.asarray(batch.mask_BT)
  x, y = (np.asarray(a, np.float64)[mask] for a in (batch.acts_BTD, batch.target_BTD))
  assert 0 < len(x) <= setup.capacity
  mse = np.mean(np.square(_relu_sae_np(params, x) - y))
  np.testing.assert_allclose(metrics["out_to_in"], mse, rtol=1e-5)
  np.testing.assert_allclose(metrics["loss"], mse + 0.5 * metrics["sparsity"], rtol=1e-5)


def test_transcoder_e2e_loss_is_kl_with_the_mlp_replaced(lm_dir):
  """The e2e loss is KL(clean ‖ the model whose MLP 1 output is the transcoder's at the
  selected tokens), with the spliced model run by `model.apply` and the KL in NumPy."""
  setup, lm, _, key, params, metrics = _transcoder_step0(lm_dir, "e2e")
  data = grammars.sample(jax.random.fold_in(key, 0), setup.grammar, setup.batch_size,
                         setup.max_len)
  tokens = data.tokens[:, : setup.forward_len]
  mask = np.asarray(grammars.selected_mask(setup.grammar, data, setup.positions,
                                           setup.forward_len))
  mc = setup.model_config
  clean = model_lib.apply(lm.params, tokens, mc, collect=("mlp_in.1",))
  x = np.asarray(clean.acts["mlp_in.1"], np.float64)
  tc = jnp.asarray(_relu_sae_np(params, x.reshape(-1, x.shape[-1])).reshape(x.shape),
                   jnp.float32)
  spliced = model_lib.apply(lm.params, tokens, mc,
                            replace={"mlp_out.1": lambda m: jnp.where(mask[..., None], tc, m)})
  def log_softmax(logits):
    z = np.asarray(logits, np.float64)
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))
  logp, logq = log_softmax(clean.logits), log_softmax(spliced.logits)
  kl = np.sum(np.exp(logp) * (logp - logq), axis=-1)[mask].mean()
  assert kl > 1e-5  # the splice changes the predictions
  np.testing.assert_allclose(metrics["logits_kl"], kl, rtol=2e-3)


@pytest.mark.parametrize("site, target, extra, match", [
    ("resid_pre.0", "mlp_out.0", {}, "set config.site='mlp_in.0'"),
    ("mlp_in.0", "mlp_out.1", {}, "set target_site='mlp_out.0'"),
    ("mlp_in.1", "", {}, "set target_site='mlp_out.1'"),
    ("mlp_in.0", "mlp_out.0", {"pre_bias": True}, "pre_bias=True"),
    ("mlp_in.0", "attn_out.0", {}, "'mlp_out.<l>'"),
])
def test_transcoder_site_mismatch_is_refused_before_compiling(lm_dir, site, target, extra, match):
  config = _config(lm_dir, [{"set": {"target_site": target, **extra}}], site=site)
  with pytest.raises(ValueError, match=re.escape(match)):
    ts.prepare(config)


def test_transcoder_field_is_recorded_only_when_set():
  specs, _ = sae_groups.build_groups(
      [{"set": {"loss": "local"}}, {"set": {"loss": "e2e", "target_site": "mlp_out.0"}}], 8)
  plain, transcoder = specs
  assert "target_site" not in plain.values[0] and plain.target_site == ""
  assert transcoder.values[0]["target_site"] == "mlp_out.0"
  assert transcoder.target_site == "mlp_out.0"


# ------------------------------------------------------------------------------------------------
# p-annealing.

PANNEAL = {"loss": "local", "activation": "relu", "expansion": 2, "sparsity_coeff": 1.0,
           "p_anneal": True, "p_anneal_start": 1, "p_anneal_steps": 2}


def test_p_end_grid_equals_separate_runs_and_p_end_one_is_plain(lm_dir):
  ends = [1.0, 0.5, 0.2]
  config = _config(lm_dir, [{"product": {"p_end": ends}, "set": PANNEAL}])
  setup, state, metrics, _ = _train(config)
  (spec,) = setup.specs
  assert spec.sae.p_anneal and spec.values[0]["p_end"] == 1.0
  # The logged p is the chunk's mean of the schedule: 1 at step 0, then linear over 2 steps.
  s = np.arange(config.log_every) + config.steps - config.log_every
  frac = np.where(s < 1, 0.0, np.minimum(s / 2, 1.0))
  for i, p_end in enumerate(ends):
    np.testing.assert_allclose(np.asarray(metrics[0]["sparsity_p"])[i],
                               np.mean(1 + (p_end - 1) * frac), rtol=1e-6)
  _assert_variant_equals_alone(lm_dir, state.groups[0].params, 2, {**PANNEAL, "p_end": ends[2]})
  plain = {k: v for k, v in PANNEAL.items() if not k.startswith("p_anneal")}
  ref_setup, ref, ref_metrics, _ = _train(_config(lm_dir, [{"set": plain}]))
  assert "sparsity_p" not in ref_metrics[0] and "p_end" not in ref_setup.specs[0].values[0]
  for a, b in zip(jax.tree.leaves(state.groups[0].params), jax.tree.leaves(ref.groups[0].params)):
    np.testing.assert_array_equal(np.asarray(a)[0], np.asarray(b)[0])  # p_end 1: no annealing
    assert not np.array_equal(np.asarray(a)[2], np.asarray(b)[0])


def test_p_anneal_rescale_is_per_variant_and_off_is_plain_annealing(lm_dir):
  config = _config(lm_dir, [{"product": {"p_anneal_rescale": [False, True]},
                             "set": {**PANNEAL, "p_end": 0.5}}])
  setup, state, metrics, _ = _train(config)
  (spec,) = setup.specs  # one group: the flag is traced
  assert [v["p_anneal_rescale"] for v in spec.values] == [False, True]
  _, alone, _, _ = _train(_config(lm_dir, [{"set": {**PANNEAL, "p_end": 0.5}}]))
  moved = []
  for a, b in zip(jax.tree.leaves(state.groups[0].params), jax.tree.leaves(alone.groups[0].params)):
    np.testing.assert_allclose(np.asarray(a)[0], np.asarray(b)[0], rtol=2e-5, atol=2e-6)
    moved.append(np.max(np.abs(np.asarray(a)[1] - np.asarray(b)[0])))
  assert max(moved) > 1e-4, moved  # the rescaled variant trains differently
  # Rescaled, the logged penalty stays near the L1 scale; unscaled Σ|c|^0.5 differs from it.
  sp = np.asarray(metrics[-1]["sparsity"])
  assert np.all(np.isfinite(sp)) and sp[0] != sp[1]


def test_p_anneal_bad_input_fails_before_compiling(lm_dir):
  for sweep, fragment in (([{"set": {"p_anneal": True, "sparsity_p": 2.0}}],
                           "anneals p from 1, but sparsity_p=2.0"),
                          ([{"set": {"p_anneal": True, "p_end": 1.5}}],
                           "p_end=1.5: must lie in (0, 1]")):
    with pytest.raises(sweep_lib.SweepError) as err:
      ts.prepare(_config(lm_dir, sweep))
    assert fragment in str(err.value), str(err.value)


# ------------------------------------------------------------------------------------------------
# Dead-latent resampling.

RESAMPLE = {"loss": "local", "activation": "relu", "expansion": 2, "sparsity_coeff": 30.0,
            "dead_tokens": 1}


def test_resampling_touches_only_the_dead_latents_at_its_step(lm_dir):
  out = {}
  for steps in ((), (3,)):
    config = _config(lm_dir, [{"set": {**RESAMPLE, "resample_steps": list(steps)}}],
                     steps=3, log_every=1)
    setup, state, metrics, _ = _train(config)
    out[steps] = (setup.specs[0], state.groups[0], metrics[0])
  spec, resampled, m = out[(3,)]
  _, plain, plain_m = out[()]
  assert spec.sae.resample_steps == (3,) and spec.values[0]["dead_tokens"] == 1
  assert "resampled" not in plain_m and "dead_tokens" not in out[()][0].values[0]
  n = int(np.asarray(m["resampled"])[0])
  assert n > 0
  p, q = resampled.params, plain.params
  changed = np.any(np.asarray(p["w_dec"])[0] != np.asarray(q["w_dec"])[0], axis=-1)
  assert changed.sum() == n
  # The others are bit-identical to training without resampling; the new ones follow the recipe.
  for name, axis in resample_lib.LATENT_AXIS.items():
    if name in p:
      keep = lambda a: np.take(np.asarray(a)[0], np.flatnonzero(~changed), axis=axis)
      np.testing.assert_array_equal(keep(p[name]), keep(q[name]))
      for moments in (resampled.opt_state[1].mu, resampled.opt_state[1].nu):
        np.testing.assert_array_equal(
            np.take(np.asarray(moments[name])[0], np.flatnonzero(changed), axis=axis), 0.0)
  np.testing.assert_array_equal(p["b_dec"], q["b_dec"])
  np.testing.assert_allclose(np.linalg.norm(np.asarray(p["w_dec"])[0][changed], axis=-1), 1.0,
                             rtol=1e-5)
  np.testing.assert_array_equal(np.asarray(p["b_enc"])[0][changed], 0.0)
  np.testing.assert_array_equal(np.asarray(resampled.sae_state.since_fired)[0][changed], 0)


def test_resample_bad_input_fails_before_compiling(lm_dir):
  for sweep, fragment in (([{"set": {"resample_steps": [4, 2]}}], "strictly increasing step"),
                          ([{"set": {"resample_steps": [2], "activation": "sparsemax_no_kds"}}],
                           "resample_steps needs an encoder with w_enc")):
    with pytest.raises(sweep_lib.SweepError) as err:
      ts.prepare(_config(lm_dir, sweep))
    assert fragment in str(err.value), str(err.value)
