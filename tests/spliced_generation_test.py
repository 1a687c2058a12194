"""Spliced generation: the jitted generation loop with an SAE spliced in (identity SAE = the
clean model, 'sentence' leaves the decorator clean, one compilation per positions value), and
`spliced_grammaticality` against the clean model and against `generate.grammaticality` with the
same replacement as a closure; transcoders against `generate` with MLP l's output replaced."""
# pylint: disable=protected-access

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fakes
from jaxsae.evaluation import spliced_generation as sg
from jaxsae.grid import grid_step
from jaxsae.grid import sae as sae_lib
from jaxsae.grid import sae_groups
from jaxsae.grid import train_sae
from jaxsae.lm import generate as generate_lib

D = 32  # the smoke LM's width


# ------------------------------------------------------------------------------------------------
# Fixtures: an untrained smoke LM (params scaled up so that SAEs change its generations), its grid
# setup, and a crafted ReLU group whose variants are an identity and a zero SAE.


@pytest.fixture(scope="module")
def setup_and_lm(tmp_path_factory):
  lm_dir = fakes.write_smoke_lm(tmp_path_factory.mktemp("lm") / "dyck2")
  setup, lm, _ = train_sae.prepare(fakes.smoke_sae_config(lm_dir, [{"set": {"loss": "local"}}]))
  return setup, jax.tree.map(lambda p: 8.0 * p, lm.params)


def _crafted_group(n_variants: int, w_decs):
  """A ReLU group of width 3D without biases: w_enc = [I, -I, 0], w_dec given per variant."""
  specs, _ = sae_groups.build_groups(
      [{"product": {"seed": list(range(n_variants))},
        "set": {"expansion": 3, "enc_bias": False, "dec_bias": False, "decoder_norm": "none",
                "init": "menon"}}], D)
  spec, = specs
  eye = np.eye(D, dtype=np.float32)
  w_enc = np.concatenate([eye, -eye, np.zeros_like(eye)], axis=1)
  params = {"w_enc": jnp.asarray(np.stack([w_enc] * n_variants)),
            "w_dec": jnp.asarray(np.stack(w_decs))}
  return spec, params, grid_step.group_hyper(spec)


def _identity_w_dec(rng):
  eye = np.eye(D, dtype=np.float32)
  # The third block never fires, so its decoder rows do not matter: random, to prove it.
  return np.concatenate([eye, -eye, rng.normal(size=(D, D)).astype(np.float32)], axis=0)


# ------------------------------------------------------------------------------------------------
# The generation loop.


def _splice_closure(spec, params, states, hparams, i, positions, prefix_len, mode="corrected"):
  """Variant i's SAE as a closure for `generate` (the un-shared reference): the prompt chunk
  (`prefix_len` positions at once) stays clean for 'sentence'."""
  pick = lambda t: jax.tree.map(lambda a: a[i], t)
  p, s, h = pick(params), pick(states), pick(hparams)

  def replace(x_BtD):
    if positions == "sentence" and x_BtD.shape[1] == prefix_len:
      return x_BtD
    return sae_lib.splice(p, x_BtD, spec.sae, h, mode, state=s)[0]

  return replace


@pytest.mark.parametrize("variant_loop", ["map", "vmap"])
def test_group_generations_equal_one_variant_and_batch_at_a_time(setup_and_lm, variant_loop):
  setup, lm_params = setup_and_lm
  setup = dataclasses.replace(setup, variant_loop=variant_loop)
  rng = np.random.default_rng(0)
  w_random = rng.normal(size=(3 * D, D)).astype(np.float32) * 0.2
  spec, params, hyper = _crafted_group(
      3, [_identity_w_dec(rng), np.zeros((3 * D, D), np.float32), w_random])
  states = jax.vmap(lambda _: sae_lib.init_state(spec.sae))(jnp.arange(3))
  g, mc = setup.grammar, setup.model_config
  keys = jnp.stack([jax.random.key(5), jax.random.key(6)])
  clean = [np.asarray(generate_lib.generate(lm_params, mc, g, k, batch_size=8,
                                            max_new_tokens=12).tokens) for k in keys]

  def group(positions):
    return sg.group_generations(setup, lm_params, spec.sae, params, states, hyper.hparams, keys,
                                mode="corrected", positions=positions, batch_size=8,
                                max_new_tokens=12)

  before = sg._decode_group._cache_size()
  all_t, all_done = group("all")
  sentence_t, _ = group("sentence")
  # One compilation of the sampling loop per (group, mode): both positions values share it.
  assert sg._decode_group._cache_size() == before + 1
  assert all_t.shape == (3, 2, 8, g.prefix_len + 12) and all_done.shape == (3, 2, 8)
  for b in range(2):
    np.testing.assert_array_equal(all_t[0, b], clean[b])  # identity SAE = the clean model
    np.testing.assert_array_equal(sentence_t[0, b], clean[b])
  # Every variant and batch equals its own un-shared generation (prompt prefilled per call,
  # the SAE as a closure), token for token with the same keys.
  for i in range(3):
    for positions, tokens in (("all", all_t), ("sentence", sentence_t)):
      fn = _splice_closure(spec, params, states, hyper.hparams, i, positions, g.prefix_len)
      for b in range(2):
        ref = generate_lib.generate(lm_params, mc, g, keys[b], batch_size=8, max_new_tokens=12,
                                    replace={setup.site: fn})
        np.testing.assert_array_equal(tokens[i, b], np.asarray(ref.tokens))
  # 'sentence' leaves the decorator clean, so the first word is the clean model's; 'all' does not.
  n = g.prefix_len
  np.testing.assert_array_equal(sentence_t[1, 0, :, n], clean[0][:, n])
  assert (all_t[1, 0, :, n:] != clean[0][:, n:]).any()
  assert (sentence_t[1, 0, :, n + 1:] != clean[0][:, n + 1:]).any()


def test_normalised_group_one_compilation_for_both_modes_and_positions(setup_and_lm):
  setup, lm_params = setup_and_lm
  specs, _ = sae_groups.build_groups(
      [{"product": {"seed": [0, 1]},
        "set": {"expansion": 2, "input_norm": True, "recon_norm": True, "init": "menon"}}], D)
  spec, = specs
  state = grid_step.init_group(spec, setup, None)
  # Larger weights, so that the SAE's output (and so the mode) changes the generations.
  params = jax.tree.map(lambda a: 4.0 * a, state.params)
  hparams = grid_step.group_hyper(spec).hparams
  g, mc = setup.grammar, setup.model_config
  keys = jnp.stack([jax.random.key(7)])
  before = sg._decode_group._cache_size()
  out = {}
  for mode in ("corrected", "original"):
    for positions in ("all", "sentence"):
      out[mode, positions] = sg.group_generations(
          setup, lm_params, spec.sae, params, state.sae_state, hparams, keys, mode=mode,
          positions=positions, batch_size=8, max_new_tokens=12)[0]
      for i in range(2):
        fn = _splice_closure(spec, params, state.sae_state, hparams, i, positions, g.prefix_len,
                             mode)
        ref = generate_lib.generate(lm_params, mc, g, keys[0], batch_size=8, max_new_tokens=12,
                                    replace={setup.site: fn})
        np.testing.assert_array_equal(out[mode, positions][i, 0], np.asarray(ref.tokens))
  assert sg._decode_group._cache_size() == before + 1  # the group compiles once for all four
  assert (out["corrected", "all"] != out["original", "all"]).any()  # the modes differ here


# ------------------------------------------------------------------------------------------------
# Spliced grammaticality of a group.


def _parts(setup, lm_params, spec, params, hyper):
  """`(setup, lm_params, group_states, hypers)` of a grid made of the one crafted group."""
  state = grid_step.init_group(spec, setup, None).replace(params=params)
  return dataclasses.replace(setup, specs=(spec,)), lm_params, (state,), (hyper,)


def test_spliced_grammaticality_against_clean_and_closure_generation(setup_and_lm):
  setup, lm_params = setup_and_lm
  rng = np.random.default_rng(1)
  spec, params, hyper = _crafted_group(2, [_identity_w_dec(rng), np.zeros((3 * D, D), np.float32)])
  parts = _parts(setup, lm_params, spec, params, hyper)
  kw = dict(seed=4, num_batches=2, batch_size=8, max_new_tokens=12, temperature=1.0, top_k=0)
  out = sg.spliced_grammaticality(parts, modes=("corrected", "original"), positions=("all",),
                                  **kw)
  assert set(out["variants"]) == set(spec.ids) and len(spec.ids) == 2
  ident, zero = (out["variants"][vid] for vid in spec.ids)
  # Common random numbers: the identity SAE generates the clean model's sequences. (An untrained
  # LM is rarely grammatical, so `finished`, the fraction that emitted <eos>, is the telling
  # number here.)
  assert ident["corrected/all"]["per_batch"] == out["clean"]["per_batch"]
  assert ident["corrected/all"]["finished"] == out["clean"]["finished"]
  # Without input / recon norm both splice modes are one function.
  assert zero["original/all"] == zero["corrected/all"]
  # The zero SAE at every position = generate.grammaticality with a zeroing replacement, batch i
  # drawn from fold_in(fold_in(key(seed), GENERATION_STREAM), i).
  key = jax.random.fold_in(jax.random.key(4), sg.GENERATION_STREAM)
  ref = generate_lib.grammaticality(lm_params, setup.model_config, setup.grammar, key,
                                    num_batches=2, batch_size=8, max_new_tokens=12,
                                    replace={setup.site: jnp.zeros_like})
  assert zero["corrected/all"]["per_batch"] == ref["per_batch"]
  assert zero["corrected/all"]["finished"] == ref["finished"]
  assert out["settings"] == {"seed": 4, "num_batches": 2, "batch_size": 8, "max_new_tokens": 12,
                             "temperature": 1.0, "top_k": 0}


def test_spliced_grammaticality_rejects_bad_options(setup_and_lm):
  setup, lm_params = setup_and_lm
  spec, params, hyper = _crafted_group(1, [np.zeros((3 * D, D), np.float32)])
  parts = _parts(setup, lm_params, spec, params, hyper)
  with pytest.raises(ValueError, match="modes: 'raw' is unknown"):
    sg.spliced_grammaticality(parts, modes=("raw",))
  with pytest.raises(ValueError, match="positions: 'middle' is unknown"):
    sg.spliced_grammaticality(parts, positions=("middle",))
  with pytest.raises(ValueError, match="at least one mode"):
    sg.spliced_grammaticality(parts, modes=())
  with pytest.raises(ValueError, match="num_batches=0"):
    sg.spliced_grammaticality(parts, num_batches=0)
  with pytest.raises(ValueError, match="takes a trained.TrainedGrid or a tuple"):
    sg.spliced_grammaticality(setup)
  with pytest.raises(ValueError, match="1 group states and 2 hypers"):
    sg.spliced_grammaticality(parts[:3] + ((hyper, hyper),))


# ------------------------------------------------------------------------------------------------
# Transcoders: site mlp_in.0, output in place of mlp_out.0.


def test_transcoder_generations_replace_the_mlp_output_of_each_step(setup_and_lm):
  """A transcoder group generates what `generate` does with MLP 0's output replaced by the
  transcoder of MLP 0's input of the same step (a closure pair written here), token for token
  with the same keys; the zero transcoder is the zero ablation of MLP 0."""
  base, lm_params = setup_and_lm
  rng = np.random.default_rng(3)
  specs, _ = sae_groups.build_groups(
      [{"product": {"seed": [0, 1]},
        "set": {"expansion": 2, "enc_bias": False, "dec_bias": False, "decoder_norm": "none",
                "init": "menon", "target_site": "mlp_out.0"}}], D)
  spec, = specs
  w_enc = rng.normal(size=(2, D, 2 * D)).astype(np.float32) / np.sqrt(D)
  w_dec = rng.normal(size=(2, 2 * D, D)).astype(np.float32) * 4.0 / np.sqrt(2 * D)
  w_dec[1] = 0.0  # variant 1 outputs zero
  params = {"w_enc": jnp.asarray(w_enc), "w_dec": jnp.asarray(w_dec)}
  hyper = grid_step.group_hyper(spec)
  states = jax.vmap(lambda _: sae_lib.init_state(spec.sae))(jnp.arange(2))
  setup = dataclasses.replace(base, site="mlp_in.0", specs=(spec,))
  g, mc = setup.grammar, setup.model_config
  keys = jnp.stack([jax.random.key(5), jax.random.key(6)])
  clean = np.asarray(generate_lib.generate(lm_params, mc, g, keys[0], batch_size=8,
                                           max_new_tokens=12).tokens)

  def pair(i, positions):
    h_seen = {}

    def hold(h_BtD):
      h_seen["h"] = h_BtD
      return h_BtD

    def put(m_BtD):
      h_BtD = h_seen.pop("h")
      if positions == "sentence" and m_BtD.shape[1] == g.prefix_len:
        return m_BtD
      return jax.nn.relu(h_BtD @ w_enc[i]) @ w_dec[i]

    return [("mlp_in.0", hold), ("mlp_out.0", put)]

  for positions in ("all", "sentence"):
    tokens, _ = sg.group_generations(setup, lm_params, spec.sae, params, states, hyper.hparams,
                                     keys, mode="corrected", positions=positions, batch_size=8,
                                     max_new_tokens=12)
    for i in range(2):
      replace = pair(i, positions)  # one closure pair per variant: compiled once for both keys
      for b in range(2):
        ref = generate_lib.generate(lm_params, mc, g, keys[b], batch_size=8, max_new_tokens=12,
                                    replace=replace)
        np.testing.assert_array_equal(tokens[i, b], np.asarray(ref.tokens))
    if positions == "all":
      zero = generate_lib.generate(lm_params, mc, g, keys[0], batch_size=8, max_new_tokens=12,
                                   replace={"mlp_out.0": jnp.zeros_like})
      np.testing.assert_array_equal(tokens[1, 0], np.asarray(zero.tokens))
      assert (tokens[0, 0] != clean).any() and (tokens[1, 0] != clean).any()
  # The pair refuses to run without its input site in the same forward.
  _, put = sg.transcoder_replace("mlp_in.0", "mlp_out.0", lambda h: h)
  with pytest.raises(ValueError, match="ran without 'mlp_in.0' before it"):
    generate_lib.generate(lm_params, mc, g, keys[0], batch_size=2, max_new_tokens=2,
                          replace=[put])
