"""SAE export: bit-exact round trips, the NumPy reference forward of the format against
`sae.splice` / `sae.forward`, cfg.json's SAELens fields, trained grids, the export job, and bad
input. (Loading the files with SAELens itself: tests/interop_test.py.)"""

import dataclasses
import json
import os
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fakes
from experiments import main as main_lib
from experiments.configs import export as export_configs
from jaxsae.core import checkpoint as ckpt_lib
from jaxsae.grid import sae as sae_lib
from jaxsae.grid import sae_groups
from jaxsae.grid import sae_config
from jaxsae.grid import train_sae
from jaxsae.grid import trained as trained_lib
from jaxsae.interop import export as export_lib
from jaxsae.interop import saelens as saelens_lib

D, F = 8, 24

# name -> (SAEConfig overrides, hparams overrides, BatchTopK threshold or None)
CASES = {
    "relu_prebias_decbias": (dict(pre_bias=True, decoder_norm="none"), {}, None),
    "relu_forward": (dict(decoder_norm="forward"), {}, None),
    "relu_menon_prebias_forward": (dict(init="menon", enc_bias=True, dec_bias=False,
                                        pre_bias=True, decoder_norm="forward"), {}, None),
    "topk_prebias_forward": (dict(activation="topk", k_max=6, pre_bias=True), dict(k=4), None),
    "topk_nobias": (dict(activation="topk", k_max=5, enc_bias=False, dec_bias=False,
                         decoder_norm="none"), dict(k=5), None),
    "jumprelu_prebias_forward": (dict(activation="jumprelu", pre_bias=True), {}, None),
    "jumprelu_project": (dict(activation="jumprelu", decoder_norm="project"), {}, None),
    "batchtopk_threshold": (dict(activation="batchtopk", k_max=4, pre_bias=True), dict(k=3), 0.4),
    "batchtopk_fresh": (dict(activation="batchtopk", k_max=4), dict(k=2), None),
    "relu_input_recon": (dict(input_norm=True, recon_norm=True, pre_bias=True), {}, None),
    "relu_input": (dict(input_norm=True, pre_bias=True), {}, None),
    "topk_input_forward": (dict(activation="topk", k_max=5, input_norm=True), dict(k=3), None),
    "sparsemax_no_kds": (dict(activation="sparsemax_no_kds", enc_bias=False, init="menon",
                              pre_bias=True, decoder_norm="forward"), {}, None),
    "sparsemax_recon_dist": (dict(activation="sparsemax_recon_dist", enc_bias=False,
                                  init="menon", pre_bias=True, input_norm=True), {}, None),
    "sparsemax_dist": (dict(activation="sparsemax_dist", enc_bias=False, init="menon",
                            decoder_norm="none"), {}, None),
    "gated_prebias": (dict(activation="gated", pre_bias=True, decoder_norm="none"), {}, None),
    "gated_input_forward": (dict(activation="gated", input_norm=True), {}, None),
    # AuxK / Matryoshka train differently; the SAE is a plain TopK / BatchTopK one.
    "topk_auxk_matryoshka": (dict(activation="topk", k_max=5, k_aux=4, matryoshka=(6, 12)),
                             dict(k=3, dead_tokens=100), None),
}


def _variant(name, seed=0):
  """A non-trivial variant: init, then every tensor perturbed (biases and pre-bias nonzero)."""
  return fakes.perturbed_sae(CASES[name], D, F, seed)


def _export(tmp_path, name, **kwargs):
  params, config, hparams, state = _variant(name)
  path = export_lib.export_sae(str(tmp_path), params, config, hparams, site="resid_post.0",
                               language="dyck2", variant_id=name, state=state, **kwargs)
  return path, (params, config, hparams, state)


def _assert_tree_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    x, y = np.asarray(x), np.asarray(y)
    assert x.dtype == y.dtype and x.shape == y.shape
    np.testing.assert_array_equal(x, y)


# ------------------------------------------------------------------------------------------------
# One SAE.


@pytest.mark.parametrize("name", sorted(CASES))
def test_round_trip_is_bit_exact(tmp_path, name):
  path, (params, config, hparams, state) = _export(tmp_path, name, extra={"note": [1, 2.5]})
  assert path == os.path.join(str(tmp_path), name)
  assert sorted(os.listdir(path)) == sorted(
      ["cfg.json", "sae_weights.safetensors", "jaxsae.json", "jaxsae_params.npz"])
  params2, config2, hparams2, meta = export_lib.load_sae(path)
  assert config2 == config
  _assert_tree_equal(params2, params)
  _assert_tree_equal(hparams2, hparams)
  _assert_tree_equal(meta["state"], state)
  assert (meta["variant_id"], meta["language"], meta["site"]) == (name, "dyck2", "resid_post.0")
  assert meta["extra"] == {"note": [1, 2.5]}


@pytest.mark.parametrize("splice_mode", sae_lib.SPLICE_MODES)
@pytest.mark.parametrize("name", sorted(CASES))
def test_numpy_forward_of_the_export_equals_the_spliced_sae(tmp_path, name, splice_mode):
  # SAELens-loadable exports reproduce `sae.splice` in the variant's mode; refused ones (their
  # files are ours only) reproduce `sae.forward`.
  path, (params, config, hparams, state) = _export(tmp_path, name, splice_mode=splice_mode)
  tensors, cfg = export_lib.load_weights(path)
  meta = export_lib.load_sae(path)[3]
  x_BTD = 1.5 * np.asarray(jax.random.normal(jax.random.key(3), (3, 5, D)), np.float32)
  if meta["saelens"]["loadable"]:
    x_hat, codes, aux = sae_lib.splice(params, jnp.asarray(x_BTD), config, hparams,
                                       mode=splice_mode, state=state)
  else:
    x_hat, codes, aux = sae_lib.forward(params, jnp.asarray(x_BTD), config, hparams, state=state)
  kind = config.activation.replace("sparsemax_", "") if config.is_sparsemax else None
  x_hat_np, codes_np = saelens_lib.numpy_forward(tensors, cfg, x_BTD, return_codes=True,
                                                sparsemax_kind=kind)
  np.testing.assert_allclose(codes_np, np.asarray(codes), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(x_hat_np, np.asarray(x_hat), rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(codes_np != 0, np.asarray(codes) != 0)
  assert np.abs(np.asarray(codes)).sum() > 0  # the comparison is not between all-zero codes
  if config.activation == "jumprelu" or float(np.asarray(state.threshold)) > 0:
    # The threshold cuts some positive pre-activations (it is not a plain ReLU here).
    pre = np.asarray(aux["pre_acts"])
    assert np.any((pre > 0) & (np.asarray(codes) == 0))


def test_exported_tensors_are_the_effective_ones(tmp_path):
  # Pre-bias with a decoder bias: b_dec absorbs b_pre, b_enc absorbs b_dec_ours @ w_enc.
  path, (params, config, _, _) = _export(tmp_path, "relu_prebias_decbias")
  t, cfg = export_lib.load_weights(path)
  assert cfg["apply_b_dec_to_input"] is True
  np.testing.assert_allclose(t["b_dec"], params["b_dec"] + params["b_pre"], rtol=1e-6)
  np.testing.assert_allclose(t["b_enc"], params["b_enc"] + params["b_dec"] @ params["w_enc"],
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(t["W_enc"], params["w_enc"])
  # Menon's pre-bias SAE (no decoder bias): b_dec is b_pre exactly, b_enc unchanged; the
  # forward-normalised decoder is exported with unit rows.
  path, (params, config, _, _) = _export(tmp_path, "relu_menon_prebias_forward")
  t, cfg = export_lib.load_weights(path)
  np.testing.assert_array_equal(t["b_dec"], params["b_pre"])
  np.testing.assert_array_equal(t["b_enc"], params["b_enc"])
  raw = np.asarray(params["w_dec"])
  assert not np.allclose(np.linalg.norm(raw, axis=1), 1)
  np.testing.assert_allclose(np.linalg.norm(t["W_dec"], axis=1), 1, rtol=1e-5)
  np.testing.assert_allclose(t["W_dec"], raw / np.linalg.norm(raw, axis=1, keepdims=True),
                             rtol=1e-5, atol=1e-6)
  # No pre-bias: nothing subtracted, biases as trained.
  path, (params, _, _, _) = _export(tmp_path, "relu_forward")
  t, cfg = export_lib.load_weights(path)
  assert cfg["apply_b_dec_to_input"] is False
  np.testing.assert_array_equal(t["b_dec"], params["b_dec"])
  # JumpReLU thresholds are exp(log_threshold); BatchTopK's is its scalar, per latent.
  path, (params, _, _, _) = _export(tmp_path, "jumprelu_prebias_forward")
  np.testing.assert_allclose(export_lib.load_weights(path)[0]["threshold"],
                             np.exp(np.asarray(params["log_threshold"])), rtol=1e-6)
  path, _ = _export(tmp_path, "batchtopk_threshold")
  np.testing.assert_array_equal(export_lib.load_weights(path)[0]["threshold"],
                                np.full((F,), 0.4, np.float32))
  # Gated, pre-bias and decoder bias: the gate bias folds as b_enc, the magnitude bias through
  # the magnitude path's weights w_enc·exp(r_mag); W_enc and r_mag as trained.
  path, (params, _, _, _) = _export(tmp_path, "gated_prebias")
  t, cfg = export_lib.load_weights(path)
  assert cfg["apply_b_dec_to_input"] is True and "b_enc" not in t
  shift = np.asarray(params["b_dec"] @ params["w_enc"])
  np.testing.assert_allclose(t["b_gate"], params["b_enc"] + shift, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(t["b_mag"], params["b_mag"] + shift * np.exp(params["r_mag"]),
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(t["W_enc"], params["w_enc"])
  np.testing.assert_array_equal(t["r_mag"], params["r_mag"])
  np.testing.assert_allclose(t["b_dec"], params["b_dec"] + params["b_pre"], rtol=1e-6)


_SAELENS_KEYS = ["d_in", "d_sae", "dtype", "device", "apply_b_dec_to_input",
                 "normalize_activations", "reshape_activations", "metadata", "architecture"]


@pytest.mark.parametrize("name, architecture, extra_keys, norm, loadable", [
    ("relu_prebias_decbias", "standard", {}, "none", True),
    ("topk_prebias_forward", "topk", {"k": 4, "rescale_acts_by_decoder_norm": False}, "none",
     True),
    ("jumprelu_project", "jumprelu", {}, "none", True),
    ("batchtopk_threshold", "jumprelu", {}, "none", True),
    ("relu_input", "standard", {}, "constant_norm_rescale", True),
    ("relu_input_recon", "standard", {}, "jaxsae_input_recon", False),
    ("sparsemax_recon_dist", "jaxsae_sparsemax", {}, "jaxsae_input", False),
    ("gated_prebias", "gated", {}, "none", True),
    ("gated_input_forward", "gated", {}, "constant_norm_rescale", True),
])
def test_cfg_json_is_saelens_6(tmp_path, name, architecture, extra_keys, norm, loadable):
  path, (_, config, hparams, _) = _export(tmp_path, name, model_name="tiny-dyck2",
                                          context_size=48)
  with open(os.path.join(path, "cfg.json")) as f:
    cfg = json.load(f)
  # SAELens' SAEConfig.to_dict() keys, in its order, and nothing else.
  assert list(cfg) == _SAELENS_KEYS[:-1] + list(extra_keys) + ["architecture"]
  assert (cfg["d_in"], cfg["d_sae"]) == (D, F)
  assert cfg["architecture"] == architecture
  assert {k: cfg[k] for k in extra_keys} == extra_keys
  assert cfg["normalize_activations"] == norm
  md = cfg["metadata"]
  assert int(md["sae_lens_version"].split(".")[0]) >= 6
  assert (md["hook_name"], md["model_name"], md["context_size"]) == (
      "blocks.0.hook_resid_post", "tiny-dyck2", 48)
  assert (cfg["dtype"], cfg["device"], cfg["reshape_activations"]) == ("float32", "cpu", "none")
  assert isinstance(cfg["apply_b_dec_to_input"], bool)
  meta = export_lib.load_sae(path)[3]
  assert meta["saelens"]["loadable"] is loadable
  with open(os.path.join(path, "jaxsae.json")) as f:
    block = json.load(f)
  # Every field, less the opt-in ones these SAEs leave off (AuxK, Matryoshka, ...); reads back
  # equal.
  assert block["sae_config"] == {k: v for k, v in dataclasses.asdict(config).items()
                                 if k not in sae_config.OPT_IN_FIELDS}
  assert sae_lib.SAEConfig(**block["sae_config"]) == config
  assert block["hparams"]["k"] == int(hparams.k)
  tensors, _ = export_lib.load_weights(path)
  shapes = {k: v.shape for k, v in tensors.items()}
  gate = "b_gate" if config.activation == "gated" else "b_enc"
  assert (shapes["W_enc"], shapes[gate], shapes["W_dec"], shapes["b_dec"]) == (
      (D, F), (F,), (F, D), (D,))
  if config.activation == "gated":  # SAELens' GatedSAE parameters, and no b_enc
    assert sorted(shapes) == ["W_dec", "W_enc", "b_dec", "b_gate", "b_mag", "r_mag"]
    assert shapes["r_mag"] == shapes["b_mag"] == (F,)
  assert all(v.dtype == np.float32 for v in tensors.values())


@pytest.mark.parametrize("site, hook", [
    ("resid_pre.1", "blocks.1.hook_resid_pre"), ("attn_out.0", "blocks.0.hook_attn_out"),
    ("mlp_out.1", "blocks.1.hook_mlp_out"), ("ln_final", "unembed.hook_in")])
def test_default_model_name_and_hook_names(tmp_path, site, hook):
  params, config, hparams, _ = _variant("relu_forward")
  path = export_lib.export_sae(str(tmp_path), params, config, hparams, site=site,
                               language="expr_prefix", variant_id="v001")
  md = export_lib.load_weights(path)[1]["metadata"]
  assert (md["model_name"], md["hook_name"]) == ("jaxsae-expr_prefix", hook)


# ------------------------------------------------------------------------------------------------
# Bad input.


def test_bad_input_raises_clearly(tmp_path):
  params, config, hparams, _ = _variant("topk_prebias_forward")
  kw = dict(site="resid_post.0", language="dyck2", variant_id="v000")
  stacked = jax.tree.map(lambda a: jnp.stack([a, a]), params)
  with pytest.raises(ValueError, match="leading variant axis"):
    export_lib.export_sae(str(tmp_path), stacked, config, hparams, **kw)
  with pytest.raises(ValueError, match=r"needs \['b_dec', 'b_enc', 'b_pre', 'w_dec', 'w_enc'\]"):
    export_lib.export_sae(str(tmp_path), {k: v for k, v in params.items() if k != "b_pre"},
                          config, hparams, **kw)
  with pytest.raises(ValueError, match="one variant's scalars"):
    export_lib.export_sae(str(tmp_path), params, config,
                          jax.tree.map(lambda a: jnp.stack([a, a]), hparams), **kw)
  with pytest.raises(ValueError, match="SAEHparams.k must lie in"):
    export_lib.export_sae(str(tmp_path), params, config,
                          sae_lib.default_hparams(config, k=9), **kw)
  with pytest.raises(ValueError, match="variant_id='a/b'"):
    export_lib.export_sae(str(tmp_path), params, config, hparams,
                          **dict(kw, variant_id="a/b"))
  with pytest.raises(ValueError, match="extra must be JSON-serialisable"):
    export_lib.export_sae(str(tmp_path), params, config, hparams, extra={"x": object()}, **kw)
  with pytest.raises(ValueError, match="site=''"):
    export_lib.export_sae(str(tmp_path), params, config, hparams, **dict(kw, site=""))
  with pytest.raises(ValueError, match="site='block0' is not a model site"):
    export_lib.export_sae(str(tmp_path), params, config, hparams, **dict(kw, site="block0"))
  with pytest.raises(ValueError, match="splice_mode='raw'"):
    export_lib.export_sae(str(tmp_path), params, config, hparams, splice_mode="raw", **kw)
  assert not os.path.exists(tmp_path / "v000")  # nothing half-written
  with pytest.raises(FileNotFoundError, match="not an exported SAE directory"):
    export_lib.load_sae(str(tmp_path / "missing"))
  os.makedirs(tmp_path / "foreign")
  with open(tmp_path / "foreign" / "cfg.json", "w") as f:
    json.dump({"d_in": D, "d_sae": F, "architecture": "standard"}, f)
  with pytest.raises(ValueError, match="no jaxsae.json"):
    export_lib.load_sae(str(tmp_path / "foreign"))
  path = export_lib.export_sae(str(tmp_path), params, config, hparams, **kw)
  tensors, cfg = export_lib.load_weights(path)
  with pytest.raises(ValueError, match="d_in=8"):
    saelens_lib.numpy_forward(tensors, cfg, np.zeros((2, D + 1), np.float32))


# ------------------------------------------------------------------------------------------------
# Trained grids and the job.


@pytest.fixture(scope="module")
def sae_dir(tmp_path_factory):
  """A tiny trained grid (2 steps): two ReLU variants and one BatchTopK variant."""
  root = tmp_path_factory.mktemp("grid")
  c = fakes.smoke_sae_config(
      fakes.write_smoke_lm(root / "lm"),
      [{"product": {"sparsity_coeff": [1.0, 4.0]}, "set": {"loss": "local", "expansion": 2}},
       {"set": {"loss": "local", "activation": "batchtopk", "k": 3, "expansion": 2,
                "pre_bias": True}}],
      steps=2, log_every=2, checkpoint_every=2)
  workdir = str(root / "sae")
  train_sae.run(c, workdir)
  return workdir


@pytest.fixture(scope="module")
def trained(sae_dir):
  return trained_lib.load(sae_dir)


def _grid_rows(trained):
  """variant id -> (params, hparams, state, spec) read straight from the grid."""
  rows = {}
  for g, spec in enumerate(trained.setup.specs):
    gs = trained.state.groups[g]
    for j, vid in enumerate(spec.ids):
      row = lambda tree, j=j: jax.tree.map(lambda a: np.asarray(a)[j], tree)
      rows[vid] = (row(gs.params), row(trained.hypers[g].hparams), row(gs.sae_state), spec)
  return rows


def test_export_trained_writes_every_variant_and_reloads_the_grid(trained, tmp_path):
  paths = export_lib.export_trained(trained, str(tmp_path))
  rows = _grid_rows(trained)
  assert len(rows) == 3
  assert sorted(os.listdir(tmp_path)) == sorted(rows)
  assert [os.path.basename(p) for p in paths] == sorted(rows)
  for path in paths:
    params, config, hparams, meta = export_lib.load_sae(path)
    want_params, want_hparams, want_state, spec = rows[meta["variant_id"]]
    assert config == spec.sae
    _assert_tree_equal(params, want_params)
    _assert_tree_equal(hparams, want_hparams)
    _assert_tree_equal(meta["state"], want_state)
    assert meta["extra"]["group"] == spec.name and meta["extra"]["step"] == 2
    assert meta["site"] == trained.setup.site and meta["language"] == "dyck2"
    assert meta["cfg"]["metadata"]["context_size"] == trained.setup.forward_len
    assert meta["splice_mode"] == spec.splice_mode
  # The BatchTopK variant tracked a positive threshold, exported per latent.
  btk = [p for p in paths if export_lib.load_sae(p)[1].activation == "batchtopk"]
  assert len(btk) == 1
  thr = float(np.asarray(export_lib.load_sae(btk[0])[3]["state"].threshold))
  assert thr > 0
  np.testing.assert_array_equal(export_lib.load_weights(btk[0])[0]["threshold"],
                                np.full((trained.setup.specs[1].sae.width,), thr, np.float32))


def test_export_trained_drops_padding_and_selects_ids(trained, tmp_path):
  # Pad every group by one junk row, as a 2-device variant axis would.
  specs = tuple(dataclasses.replace(s, padded=s.size + 1) for s in trained.setup.specs)
  pad = lambda tree: jax.tree.map(
      lambda a: np.concatenate([np.asarray(a), np.asarray(a)[-1:] + 1]), tree)
  state = dataclasses.replace(trained.state, groups=tuple(pad(g) for g in trained.state.groups))
  hypers = tuple(pad(h) for h in trained.hypers)
  padded = dataclasses.replace(trained, setup=dataclasses.replace(trained.setup, specs=specs),
                               state=state, hypers=hypers)
  ids = sorted(_grid_rows(trained))
  paths = export_lib.export_trained(padded, str(tmp_path), [ids[2], ids[0]])
  assert [os.path.basename(p) for p in paths] == [ids[2], ids[0]]
  assert sorted(os.listdir(tmp_path)) == sorted([ids[0], ids[2]])
  rows = _grid_rows(trained)
  for p in paths:
    params, _, _, meta = export_lib.load_sae(p)
    _assert_tree_equal(params, rows[meta["variant_id"]][0])
  with pytest.raises(ValueError, match=r"unknown variant id\(s\) \['v999'\]"):
    export_lib.export_trained(trained, str(tmp_path), ["v999"])


def test_export_job(sae_dir, trained, tmp_path):
  assert main_lib.JOBS["export"] == "jaxsae.interop.export"
  ids = sorted(_grid_rows(trained))
  config = export_configs.get_config(f"sae_workdir={sae_dir},variants={ids[0]}+{ids[2]}")
  assert (config.job, config.variants, config.step) == ("export", f"{ids[0]},{ids[2]}", 0)
  config.lock()
  summary = export_lib.run(config, str(tmp_path))
  assert sorted(os.listdir(tmp_path / "export")) == ["export.json", ids[0], ids[2]]
  assert summary["step"] == 2 and sorted(summary["variants"]) == [ids[0], ids[2]]
  with open(tmp_path / "summary.json") as f:
    assert json.load(f) == summary
  with open(tmp_path / "export" / "export.json") as f:
    manifest = json.load(f)
  assert sorted(manifest) == [ids[0], ids[2]]
  assert all(m["loadable"] and m["dir"] == summary["variants"][v] for v, m in manifest.items())
  assert summary["saelens_loadable"] == [ids[0], ids[2]] and summary["saelens_refused"] == []
  # The grid's LM for TransformerLens and its token streams (tests/interop_test.py loads them).
  assert sorted(os.listdir(summary["lm_dir"])) == ["config.json", "model.safetensors"]
  with open(os.path.join(summary["data_dir"], "dataset.json")) as f:
    assert json.load(f)["splits"]["train"]["rows"] == 8 * trained.lm.config["batch_size"]
  rows = _grid_rows(trained)
  for vid, path in summary["variants"].items():
    params, _, _, meta = export_lib.load_sae(path)
    assert meta["variant_id"] == vid
    _assert_tree_equal(params, rows[vid][0])


def test_export_job_bad_input_fails_before_loading(sae_dir, tmp_path):
  config = export_configs.get_config(f"sae_workdir={tmp_path / 'nowhere'}")
  with pytest.raises(FileNotFoundError, match="is not an sae job workdir"):
    export_lib.run(config, str(tmp_path))
  config = export_configs.get_config(f"sae_workdir={sae_dir},variants=v000+v999")
  with pytest.raises(ValueError, match=r"unknown variant id\(s\) \['v999'\]"):
    export_lib.run(config, str(tmp_path))
  assert not os.path.exists(tmp_path / "export")
  with pytest.raises(ValueError, match="train_batches=0 must be >= 1"):
    export_configs.get_config("train_batches=0")
  with pytest.raises(ValueError, match="step=-1 must be >= 0"):
    export_configs.get_config("step=-1")
  config = export_configs.get_config(f"sae_workdir={sae_dir},step=7")
  with pytest.raises(FileNotFoundError,
                     match=r"no checkpoint at step 7; it holds steps \[2\]"):
    export_lib.run(config, str(tmp_path))
  assert not os.path.exists(tmp_path / "export")
  with pytest.raises(ValueError, match="unknown config setting 'workdir'"):
    export_configs.get_config("workdir=x")


def test_transcoder_variants_are_not_exported(tmp_path):
  specs, _ = sae_groups.build_groups(
      [{"set": {"loss": "local"}}, {"set": {"loss": "local", "target_site": "mlp_out.0"}}], 8)
  trained = types.SimpleNamespace(setup=types.SimpleNamespace(specs=tuple(specs)))
  with pytest.raises(ValueError, match="transcoders"):
    export_lib.export_trained(trained, str(tmp_path), variant_ids=[specs[1].ids[0]])
  assert not os.listdir(tmp_path)
