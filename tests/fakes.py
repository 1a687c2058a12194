"""Hand-built inputs shared by several test files (the tests directory is not a package)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.configs import lm as lm_configs
from experiments.configs import sae_e2e
from jaxsae import grammars
from jaxsae.grid import sae as sae_lib
from jaxsae.lm import model as model_lib
from jaxsae.lm import train_lm

# A tiny one-layer Dyck-2 LM (untrained) and a batch of its language, for the intervention and
# causality tests.
DYCK = grammars.get("dyck2")
TINY_DYCK_MC = model_lib.ModelConfig(vocab_size=DYCK.vocab_size, n_layers=1, n_heads=2,
                                     d_model=32, d_mlp=64, context=64)


def tiny_dyck_lm():
  return model_lib.init(jax.random.key(0), TINY_DYCK_MC)


def dyck_batch():
  return grammars.sample(jax.random.key(2), DYCK, 8, 32)


# The same two as module-scoped pytest fixtures named `lm` and `data`
# (`lm, data = fakes.TINY_DYCK_LM_FIXTURE, fakes.DYCK_BATCH_FIXTURE` in a test module).
TINY_DYCK_LM_FIXTURE = pytest.fixture(scope="module", name="lm")(tiny_dyck_lm)
DYCK_BATCH_FIXTURE = pytest.fixture(scope="module", name="data")(dyck_batch)


# Smoke-size LM workdirs and SAE grid configs for the trainer, evaluation and analysis tests.


def write_smoke_lm(directory, language: str = "dyck2") -> str:
  """An untrained smoke-size LM workdir (the SAE trainer needs config.json + a checkpoint)."""
  return train_lm.write_untrained(lm_configs.get_config(f"language={language},smoke"),
                                  str(directory))


def smoke_sae_config(lm_dir, sweep, **overrides):
  """`sae_e2e`'s dyck2 smoke config on `lm_dir` with `sweep` and fields overridden."""
  c = sae_e2e.get_config(f"language=dyck2,smoke,lm_workdir={lm_dir}")
  c.sweep = sweep
  for k, v in overrides.items():
    c[k] = v
  return c


def planted_eos_sae(wte, d_in: int, eos_id: int, sign: float, width: int = 16):
  """An SAE for the `ln_final` site whose latent 5 always fires (code 1) and adds ±4 per unit to
  `<eos>`'s logit and nothing to any other logit (its decoder row solves wte · d = ±4 e_eos);
  latent 7 never fires; the others are the random init. Returns `(config, params)`."""
  config = sae_lib.SAEConfig(d_in=d_in, width=width, decoder_norm="none", init="menon")
  params = sae_lib.init(jax.random.key(5), config)
  params["w_enc"] = params["w_enc"].at[:, 5].set(0.0)
  params["b_enc"] = params["b_enc"].at[5].set(1.0).at[7].set(-100.0)  # 7 never fires
  wte = np.asarray(wte, np.float64)
  target = np.zeros(wte.shape[0])
  target[eos_id] = sign * 4.0
  d = np.linalg.pinv(wte) @ target
  params["w_dec"] = params["w_dec"].at[5].set(jnp.asarray(d, jnp.float32))
  return config, params


def feature_summaries(ids, names, rng):
  """A synthetic `analysis.summarise` output with binary columns `names` for variants `ids`."""
  variants = {}
  for vid in ids:
    corr = rng.uniform(-1, 1, len(names))
    variants[vid] = {
        "labels": {n: {"kind": "binary", "latent": int(rng.integers(0, 8)), "corr": float(c)}
                   for n, c in zip(names, corr)},
        "matching_score": float(rng.random()), "mean_best_abs_corr": float(np.abs(corr).mean()),
        "n_labels_corr_ge_0.8": int(np.sum(np.abs(corr) >= 0.8)), "dead_latents": 1}
  return {"columns": [{"name": n, "kind": "binary", "label": n} for n in names],
          "variants": variants}


def perturbed_sae(case, d_in: int, width: int, seed: int):
  """A non-trivial SAE: `case = (SAEConfig overrides, hparam overrides, BatchTopK threshold or
  None)`, every tensor perturbed off its init (JumpReLU thresholds spread around 0.3).
  Returns `(params, config, hparams, state)`."""
  overrides, hp_overrides, threshold = case
  config = sae_lib.SAEConfig(d_in=d_in, width=width, **overrides)
  hparams = sae_lib.default_hparams(config, **hp_overrides)
  key = jax.random.key(seed)
  params = sae_lib.init(key, config, hparams=hparams)
  keys = jax.random.split(jax.random.fold_in(key, 1), len(params))
  params = {k: v + 0.2 * jax.random.normal(kk, v.shape, v.dtype)
            for kk, (k, v) in zip(keys, sorted(params.items()))}
  if "log_threshold" in params:
    params["log_threshold"] = jnp.log(0.3) + 0.5 * jax.random.normal(keys[0], (width,))
  state = sae_lib.init_state(config)
  if threshold is not None:
    state = sae_lib.SAEState(threshold=jnp.float32(threshold), count=jnp.int32(7))
  return params, config, hparams, state
