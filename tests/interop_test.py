"""The exports loaded by the real PyTorch libraries (the `interop` extra: torch, sae-lens,
transformer-lens): SAELens SAEs against `sae.splice`, the LM in TransformerLens against
`model.apply`, the dataset files against the LM run's streams, and the README's SAELens guide."""

import json
import os
import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import safetensors.numpy
import safetensors.torch
import sae_lens
import torch
import transformer_lens
from pyarrow import parquet

import fakes
from jaxsae import grammars
from jaxsae.grid import sae as sae_lib
from jaxsae.grid import train_sae
from jaxsae.interop import export as export_lib
from jaxsae.interop import lm_export
from jaxsae.interop import saelens as saelens_lib
from jaxsae.lm import bundle
from jaxsae.lm import lm_step
from jaxsae.lm import model as model_lib

D, F = 8, 24

# name -> (SAEConfig overrides, hparams overrides, BatchTopK threshold or None)
CASES = {
    "relu_prebias_decbias": (dict(pre_bias=True, decoder_norm="none"), {}, None),
    "relu_forward": (dict(decoder_norm="forward"), {}, None),
    "topk_prebias_forward": (dict(activation="topk", k_max=6, pre_bias=True), dict(k=4), None),
    "jumprelu_prebias_project": (dict(activation="jumprelu", pre_bias=True,
                                      decoder_norm="project"), {}, None),
    "batchtopk_threshold": (dict(activation="batchtopk", k_max=4, pre_bias=True), dict(k=3), 0.4),
    "relu_input": (dict(input_norm=True, pre_bias=True), {}, None),
    "topk_input": (dict(activation="topk", k_max=5, input_norm=True), dict(k=3), None),
    "jumprelu_input_menon": (dict(activation="jumprelu", input_norm=True, init="menon",
                                  dec_bias=False, pre_bias=True), {}, None),
    "gated_prebias_decbias": (dict(activation="gated", pre_bias=True, decoder_norm="none"), {},
                              None),
    "gated_forward_nobias": (dict(activation="gated", enc_bias=False), {}, None),
    "gated_input_project": (dict(activation="gated", input_norm=True, pre_bias=True,
                                 decoder_norm="project"), {}, None),
    # Not expressible in SAELens:
    "relu_input_recon": (dict(input_norm=True, recon_norm=True, pre_bias=True), {}, None),
    "relu_recon": (dict(recon_norm=True), {}, None),
    "gated_recon": (dict(activation="gated", recon_norm=True, pre_bias=True), {}, None),
    "sparsemax_recon_dist": (dict(activation="sparsemax_recon_dist", enc_bias=False,
                                  init="menon", pre_bias=True, input_norm=True), {}, None),
}
REFUSED = ("relu_input_recon", "relu_recon", "gated_recon", "sparsemax_recon_dist")


def _export(tmp_path, name, splice_mode="corrected"):
  """A non-trivial variant (every tensor perturbed), exported; returns (path, variant)."""
  params, config, hparams, state = fakes.perturbed_sae(CASES[name], D, F, seed=1)
  path = export_lib.export_sae(str(tmp_path / splice_mode), params, config, hparams,
                               site="resid_post.0", language="dyck2", variant_id=name,
                               state=state, splice_mode=splice_mode, context_size=32)
  return path, (params, config, hparams, state)


def _x(scale=1.5):
  return scale * np.asarray(jax.random.normal(jax.random.key(3), (4, 6, D)), np.float32)


# ------------------------------------------------------------------------------------------------
# SAEs in SAELens.


@pytest.mark.parametrize("splice_mode", sae_lib.SPLICE_MODES)
@pytest.mark.parametrize("name", [n for n in CASES if n not in REFUSED])
def test_saelens_loads_the_sae_with_our_codes_and_output(tmp_path, name, splice_mode):
  path, (params, config, hparams, state) = _export(tmp_path, name, splice_mode)
  sae = sae_lens.SAE.load_from_disk(path)  # the one call a user makes
  want = {"relu": sae_lens.StandardSAE, "topk": sae_lens.TopKSAE,
          "jumprelu": sae_lens.JumpReLUSAE, "batchtopk": sae_lens.JumpReLUSAE,
          "gated": sae_lens.GatedSAE}
  assert type(sae) is want[config.activation]  # pylint: disable=unidiomatic-typecheck
  if config.activation == "topk":
    assert sae.cfg.k == int(hparams.k)
  assert sae.cfg.metadata.hook_name == "blocks.0.hook_resid_post"
  x = _x()
  out, codes, _ = sae_lib.splice(params, jnp.asarray(x), config, hparams, mode=splice_mode,
                                 state=state)
  with torch.no_grad():
    codes_pt = sae.encode(torch.from_numpy(x)).numpy()
    out_pt = sae(torch.from_numpy(x)).numpy()
  np.testing.assert_allclose(codes_pt, np.asarray(codes), rtol=0, atol=1e-5)
  np.testing.assert_allclose(out_pt, np.asarray(out), rtol=0, atol=1e-5)
  np.testing.assert_array_equal(codes_pt != 0, np.asarray(codes) != 0)
  assert 0 < np.mean(np.asarray(codes) != 0) < 1  # some latents on, some off
  if config.input_norm and splice_mode == "corrected":
    assert sae.cfg.normalize_activations == "constant_norm_rescale"
    # The input's scale matters to the SAE's output only through the rescale.
    with torch.no_grad():
      np.testing.assert_allclose(sae(torch.from_numpy(3 * x)).numpy(), 3 * out_pt, atol=1e-5)


@pytest.mark.parametrize("name", ["topk_prebias_forward", "batchtopk_threshold", "relu_input",
                                  "gated_input_project"])
def test_the_files_are_what_saelens_save_model_writes(tmp_path, name):
  path, _ = _export(tmp_path, name)
  sae = sae_lens.SAE.load_from_disk(path)
  resaved = tmp_path / "resaved"
  sae.save_model(resaved)
  with open(os.path.join(path, "cfg.json")) as f:
    ours = json.load(f)
  with open(resaved / "cfg.json") as f:
    theirs = json.load(f)
  assert list(ours) == list(theirs)
  assert ours == theirs
  a = safetensors.numpy.load_file(os.path.join(path, "sae_weights.safetensors"))
  b = safetensors.numpy.load_file(str(resaved / "sae_weights.safetensors"))
  assert sorted(a) == sorted(b)
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])
  # SAELens' from_dict keeps our k (its default would be 100).
  rebuilt = sae_lens.SAE.from_dict(ours)
  assert getattr(rebuilt.cfg, "k", None) == ours.get("k")


@pytest.mark.parametrize("name", REFUSED)
def test_saelens_refuses_what_it_cannot_express(tmp_path, name):
  path, _ = _export(tmp_path, name)
  meta = export_lib.load_sae(path)[3]
  assert meta["saelens"]["loadable"] is False and "refused" in meta["saelens"]["note"]
  with pytest.raises((KeyError, ValueError), match="jaxsae_"):
    sae_lens.SAE.load_from_disk(path)


def test_export_job_manifest_says_which_load(tmp_path):
  # A grid with a loadable and a refused variant, through the job.
  from experiments.configs import export as export_configs  # pylint: disable=g-import-not-at-top
  c = fakes.smoke_sae_config(
      fakes.write_smoke_lm(tmp_path / "lm"),
      [{"set": {"loss": "local", "activation": "topk", "k": 2, "expansion": 2}},
       {"set": {"loss": "local", "expansion": 2, "input_norm": True, "recon_norm": True}}],
      steps=2, log_every=2, checkpoint_every=2)
  train_sae.run(c, str(tmp_path / "sae"))
  summary = export_lib.run(export_configs.get_config(f"sae_workdir={tmp_path / 'sae'}"),
                           str(tmp_path / "out"))
  with open(tmp_path / "out" / "export" / "export.json") as f:
    manifest = json.load(f)
  assert len(summary["saelens_loadable"]) == 1 and len(summary["saelens_refused"]) == 1
  for vid, entry in manifest.items():
    if entry["loadable"]:
      sae = sae_lens.SAE.load_from_disk(entry["dir"])
      assert sae.cfg.k == 2 and vid in summary["saelens_loadable"]
    else:
      with pytest.raises(ValueError, match="normalize_activations"):
        sae_lens.SAE.load_from_disk(entry["dir"])


# ------------------------------------------------------------------------------------------------
# The LM in TransformerLens, and the dataset.


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
  """A smoke LM with every parameter perturbed (LayerNorm scales away from 1)."""
  loaded = bundle.load(fakes.write_smoke_lm(tmp_path_factory.mktemp("lm")))
  leaves, tree = jax.tree.flatten(loaded.params)
  keys = jax.random.split(jax.random.key(0), len(leaves))
  params = jax.tree.unflatten(tree, [p + 0.3 * jax.random.normal(k, p.shape, p.dtype)
                                     for p, k in zip(leaves, keys)])
  return params, loaded


def test_transformer_lens_gives_our_logits_and_activations(lm, tmp_path):
  params, loaded = lm
  out = lm_export.export_lm(str(tmp_path / "tl"), params, loaded.model_config,
                            model_name="jaxsae-dyck2")
  # The module docstring's three calls.
  cfg = transformer_lens.HookedTransformerConfig(**json.load(open(f"{out}/config.json")))
  model = transformer_lens.HookedTransformer(cfg)
  model.load_and_process_state_dict(
      safetensors.torch.load_file(f"{out}/model.safetensors"), fold_ln=False,
      center_writing_weights=False, center_unembed=False, fold_value_biases=False)
  tokens = np.asarray(lm_step.training_batch(ml_collections.ConfigDict(loaded.config),
                                              0).tokens)
  sites = model_lib.site_names(loaded.model_config)
  ours = model_lib.apply(params, jnp.asarray(tokens), loaded.model_config, collect=sites)
  with torch.no_grad():
    logits, cache = model.run_with_cache(torch.from_numpy(tokens).long())
  assert np.abs(np.asarray(ours.logits)).max() > 1  # not a comparison of near-zero logits
  np.testing.assert_allclose(logits.numpy(), np.asarray(ours.logits), rtol=0, atol=1e-4)
  for site, hook in lm_export.hook_names(loaded.model_config).items():
    np.testing.assert_allclose(cache[hook].numpy(), np.asarray(ours.acts[site]), rtol=0,
                               atol=1e-4, err_msg=f"{site} vs {hook}")


def test_dataset_files_hold_the_lm_streams_and_labels(lm, tmp_path):
  _, loaded = lm
  schema = lm_export.export_dataset(str(tmp_path), loaded.config, train_batches=2)
  c = ml_collections.ConfigDict(loaded.config)
  grammar = grammars.get(c.language)
  assert schema["files"] == ["tokens.npz", "tokens.parquet"]
  assert schema["vocab"] == list(grammar.vocab)
  table = parquet.read_table(tmp_path / "tokens.parquet").to_pydict()
  with np.load(tmp_path / "tokens.npz") as z:
    npz = {k: z[k] for k in z.files}
  train = [lm_step.training_batch(c, s) for s in range(2)]
  want_train = np.concatenate([np.asarray(b.tokens) for b in train])
  want_held = lm_step.make_eval_set(c, lm_step.heldout_key(c)).tokens_NBT
  want_held = want_held.reshape(-1, want_held.shape[-1])
  for split, want in (("train", want_train), ("heldout", want_held)):
    rows = [i for i, s in enumerate(table["split"]) if s == split]
    assert schema["splits"][split]["rows"] == len(rows) == want.shape[0]
    np.testing.assert_array_equal(np.array([table["tokens"][i] for i in rows]), want)
    np.testing.assert_array_equal(npz[f"{split}/tokens"], want)
    labels = grammars.labels(grammar, want)
    assert sorted(labels) == sorted(schema["labels"])
    for name, value in labels.items():
      np.testing.assert_array_equal(np.array([table[f"label_{name}"][i] for i in rows]),
                                    np.asarray(value))
      np.testing.assert_array_equal(npz[f"{split}/label/{name}"], np.asarray(value))
  # The held-out sentence mask is the sampler's: identical rule on the training split.
  np.testing.assert_array_equal(
      npz["train/sentence_mask"], np.concatenate([np.asarray(b.sentence_mask) for b in train]))
  assert npz["heldout/sentence_mask"].sum() > 0


# ------------------------------------------------------------------------------------------------
# The README's guide: an SAE trained by SAELens on the exported LM and data.


def _readme_guide() -> str:
  readme = os.path.join(os.path.dirname(__file__), os.pardir, "README.md")
  with open(readme) as f:
    text = f.read()
  found = re.search(r"<!-- interop-guide -->\n```python\n(.*?)```", text, re.S)
  assert found, "README.md lost its <!-- interop-guide --> python block"
  return found.group(1)


def test_readme_guide_trains_an_saelens_sae_on_the_exported_lm(lm, tmp_path, monkeypatch):
  params, loaded = lm
  lm_export.export_lm(str(tmp_path / "lm"), params, loaded.model_config,
                      model_name="jaxsae-dyck2")
  lm_export.export_dataset(str(tmp_path / "data"), loaded.config, train_batches=4)
  monkeypatch.chdir(tmp_path)
  exec(compile(_readme_guide(), "README.md", "exec"), {})  # pylint: disable=exec-used
  sae = sae_lens.SAE.load_from_disk(str(tmp_path / "sae_saelens"))
  assert isinstance(sae, sae_lens.TopKSAE) and sae.cfg.k == 4
  assert sae.cfg.metadata.hook_name == "blocks.0.hook_resid_post"
  # Applied to jaxsae's own activations at that site: at most k latents per token, some on.
  tokens = np.asarray(lm_step.training_batch(ml_collections.ConfigDict(loaded.config),
                                              5).tokens)
  acts = model_lib.apply(params, jnp.asarray(tokens), loaded.model_config,
                         collect=["resid_post.0"]).acts["resid_post.0"]
  with torch.no_grad():
    codes_pt = sae.encode(torch.from_numpy(np.asarray(acts))).numpy()
    out_pt = sae(torch.from_numpy(np.asarray(acts))).numpy()
  l0 = (codes_pt != 0).sum(-1)
  assert l0.max() <= 4 and l0.mean() > 1
  # Read back into jaxsae, the SAELens-trained SAE is the same function of the activations.
  imp = saelens_lib.load(str(tmp_path / "sae_saelens"))
  assert imp.site == "resid_post.0" and imp.sae_config.activation == "topk"
  out, codes, _ = sae_lib.splice(imp.params, acts, imp.sae_config, imp.hparams,
                                 mode=imp.splice_mode)
  np.testing.assert_allclose(np.asarray(codes), codes_pt, rtol=0, atol=1e-5)
  np.testing.assert_allclose(np.asarray(out), out_pt, rtol=0, atol=1e-5)
