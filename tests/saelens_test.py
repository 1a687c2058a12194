"""SAELens directories read back (`saelens.load`): exports round-trip to the same spliced SAE,
hook names invert, and what has no exact counterpart is refused. (SAELens itself:
tests/interop_test.py.)"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors import numpy as safetensors_np

import fakes
from jaxsae.grid import sae as sae_lib
from jaxsae.interop import export as export_lib
from jaxsae.interop import saelens as saelens_lib
from jaxsae.lm import model as model_lib

D, F = 8, 24

CASES = {
    "relu_prebias_decbias": (dict(pre_bias=True, decoder_norm="none"), {}, None),
    "relu_forward": (dict(decoder_norm="forward"), {}, None),
    "topk_prebias_forward": (dict(activation="topk", k_max=6, pre_bias=True), dict(k=4), None),
    "jumprelu_project": (dict(activation="jumprelu", decoder_norm="project"), {}, None),
    "batchtopk_threshold": (dict(activation="batchtopk", k_max=4, pre_bias=True), dict(k=3), 0.4),
    "relu_input": (dict(input_norm=True, pre_bias=True), {}, None),
    "topk_input_menon": (dict(activation="topk", k_max=5, input_norm=True, init="menon",
                              dec_bias=False, pre_bias=True), dict(k=3), None),
    "gated_prebias_decbias": (dict(activation="gated", pre_bias=True, decoder_norm="none"), {},
                              None),
    "gated_input_forward": (dict(activation="gated", input_norm=True), {}, None),
}


def _variant(name):
  return fakes.perturbed_sae(CASES[name], D, F, seed=2)


@pytest.mark.parametrize("splice_mode", sae_lib.SPLICE_MODES)
@pytest.mark.parametrize("name", sorted(CASES))
def test_export_then_load_is_the_same_spliced_sae(tmp_path, name, splice_mode):
  params, config, hparams, state = _variant(name)
  path = export_lib.export_sae(str(tmp_path), params, config, hparams, site="resid_pre.1",
                               language="dyck2", variant_id=name, state=state,
                               splice_mode=splice_mode)
  imp = saelens_lib.load(path)
  assert imp.site == "resid_pre.1"
  x = 1.5 * jax.random.normal(jax.random.key(4), (3, 5, D))
  want_out, want_codes, _ = sae_lib.splice(params, x, config, hparams, mode=splice_mode,
                                           state=state)
  out, codes, _ = sae_lib.splice(imp.params, x, imp.sae_config, imp.hparams,
                                 mode=imp.splice_mode)
  np.testing.assert_allclose(np.asarray(codes), np.asarray(want_codes), rtol=0, atol=1e-5)
  np.testing.assert_allclose(np.asarray(out), np.asarray(want_out), rtol=0, atol=1e-5)
  np.testing.assert_array_equal(np.asarray(codes) != 0, np.asarray(want_codes) != 0)
  assert imp.sae_config.input_norm == (config.input_norm and splice_mode == "corrected")
  assert imp.sae_config.activation == {"batchtopk": "jumprelu"}.get(config.activation,
                                                                    config.activation)
  if config.uses_k:
    assert int(imp.hparams.k) == (int(hparams.k) if config.activation == "topk" else 0)


def test_topk_rescaled_by_decoder_norm_is_folded(tmp_path):
  # SAELens' trained TopK SAEs scale pre-activations by ‖W_dec_j‖ and decode with unit rows.
  rng = np.random.default_rng(0)
  t = {"W_enc": rng.normal(size=(D, F)), "b_enc": rng.normal(size=F),
       "W_dec": 3 * rng.normal(size=(F, D)), "b_dec": rng.normal(size=D)}
  t = {k: v.astype(np.float32) for k, v in t.items()}
  cfg = {"d_in": D, "d_sae": F, "dtype": "float32", "device": "cpu",
         "apply_b_dec_to_input": True, "normalize_activations": "none",
         "reshape_activations": "none", "metadata": {"hook_name": "blocks.0.hook_resid_post"},
         "k": 3, "rescale_acts_by_decoder_norm": True, "architecture": "topk"}
  safetensors_np.save_file(t, str(tmp_path / "sae_weights.safetensors"))
  with open(tmp_path / "cfg.json", "w") as f:
    json.dump(cfg, f)
  imp = saelens_lib.load(str(tmp_path))
  x = rng.normal(size=(6, D)).astype(np.float32)
  n = np.linalg.norm(t["W_dec"], axis=-1)
  pre = ((x - t["b_dec"]) @ t["W_enc"] + t["b_enc"]) * n
  keep = np.argsort(-pre, axis=-1)[:, :3]
  codes = np.zeros_like(pre)
  np.put_along_axis(codes, keep, np.maximum(np.take_along_axis(pre, keep, -1), 0), -1)
  out = codes @ (t["W_dec"] / n[:, None]) + t["b_dec"]
  got_out, got_codes, _ = sae_lib.splice(imp.params, jnp.asarray(x), imp.sae_config,
                                         imp.hparams)
  np.testing.assert_allclose(np.asarray(got_codes), codes, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(got_out), out, rtol=1e-5, atol=1e-5)
  assert imp.site == "resid_post.0"


def test_hook_names_invert():
  config = model_lib.ModelConfig(vocab_size=5, n_layers=3, d_model=8, n_heads=2, d_mlp=16,
                                 context=8)
  for site in model_lib.site_names(config):
    if site.startswith("mlp_in."):  # ln_2's scaled output: no TransformerLens hook holds it
      with pytest.raises(ValueError, match="no TransformerLens hook"):
        saelens_lib.hook_name(site)
      continue
    assert saelens_lib.site_of(saelens_lib.hook_name(site)) == site
  assert saelens_lib.site_of("blocks.0.attn.hook_z") is None
  with pytest.raises(ValueError, match="not a model site"):
    saelens_lib.hook_name("block_0")


def test_what_has_no_counterpart_is_refused(tmp_path):
  params, config, hparams, _ = _variant("relu_forward")
  path = export_lib.export_sae(str(tmp_path), params, config, hparams, site="resid_post.0",
                               language="dyck2", variant_id="v")
  cfg_path = os.path.join(path, "cfg.json")
  with open(cfg_path) as f:
    cfg = json.load(f)
  for field, value, match in (("architecture", "matching_pursuit",
                               "architecture='matching_pursuit'"),
                              ("normalize_activations", "layer_norm", "'layer_norm' is not"),
                              ("reshape_activations", "hook_z", "hook_z")):
    with open(cfg_path, "w") as f:
      json.dump({**cfg, field: value}, f)
    with pytest.raises(ValueError, match=match):
      saelens_lib.load(path)
  with pytest.raises(FileNotFoundError, match="not an SAELens SAE directory"):
    saelens_lib.load(str(tmp_path / "missing"))


def test_gated_sae_in_saelens_layout_is_read_by_its_formula(tmp_path):
  # A gated SAE as SAELens writes it (b_gate, r_mag, b_mag, no b_enc; no pre-bias, so b_dec is
  # added at the output only), against SAELens' GatedSAE formula written out here.
  rng = np.random.default_rng(1)
  t = {"W_enc": rng.normal(size=(D, F)), "b_gate": rng.normal(size=F),
       "r_mag": 0.3 * rng.normal(size=F), "b_mag": rng.normal(size=F),
       "W_dec": rng.normal(size=(F, D)), "b_dec": rng.normal(size=D)}
  t = {k: v.astype(np.float32) for k, v in t.items()}
  cfg = {"d_in": D, "d_sae": F, "dtype": "float32", "device": "cpu",
         "apply_b_dec_to_input": False, "normalize_activations": "none",
         "reshape_activations": "none", "metadata": {"hook_name": "blocks.1.hook_resid_post"},
         "architecture": "gated"}
  safetensors_np.save_file(t, str(tmp_path / "sae_weights.safetensors"))
  with open(tmp_path / "cfg.json", "w") as f:
    json.dump(cfg, f)
  imp = saelens_lib.load(str(tmp_path))
  assert imp.sae_config.activation == "gated" and not imp.sae_config.pre_bias
  x = rng.normal(size=(6, D)).astype(np.float32)
  gate = x @ t["W_enc"] + t["b_gate"]
  mag = x @ (t["W_enc"] * np.exp(t["r_mag"])) + t["b_mag"]
  codes = (gate > 0) * np.maximum(mag, 0)
  out = codes @ t["W_dec"] + t["b_dec"]
  assert 0 < np.mean(codes != 0) < 1
  got_out, got_codes, _ = sae_lib.splice(imp.params, jnp.asarray(x), imp.sae_config,
                                         imp.hparams)
  np.testing.assert_allclose(np.asarray(got_codes), codes, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(got_out), out, rtol=1e-5, atol=1e-5)
  # Weights that do not fit the architecture are named.
  safetensors_np.save_file({k: v for k, v in t.items() if k != "r_mag"},
                           str(tmp_path / "sae_weights.safetensors"))
  with pytest.raises(ValueError, match=r"lacks \['r_mag'\]"):
    saelens_lib.load(str(tmp_path))


def test_gated_sae_with_recon_norm_is_refused_with_its_reason():
  config = sae_lib.SAEConfig(d_in=D, width=F, activation="gated", recon_norm=True)
  how = saelens_lib.form(config)
  assert not how.loadable and how.architecture == "gated"
  assert how.normalize_activations == "jaxsae_recon"
  assert "normalisation of the reconstruction" in how.note
