"""What an intervention does to the next-token distribution.

`effect_measures` compares two sets of logits over the measured positions: KL(base ‖ edited),
the shift of the mean probability of each token class (`grammars.token_classes`: Dyck `<eos>`,
openers, closers per type; Expr `<eos>`, digits, operators by arity; English `<eos>` and each
part of speech) and the fraction of positions whose top-1 token changes.
`intervention_effects` runs the model clean, with the plain SAE splice and with the intervention
(`interventions.edited_logits`), in one jitted call, and reports the edit against both baselines
(optionally swept over latents with `lax.map` in chunks).

The edits themselves live in `interventions.py`; generation under an edit in
`intervened_generation.py`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jaxsae.analysis import interventions
from jaxsae.grid import sae as sae_lib
from jaxsae.lm import model as model_lib


def effect_measures(base_logits_BTV: jax.Array, edited_logits_BTV: jax.Array,
                    mask_BT: jax.Array, membership_CV: jax.Array) -> dict[str, jax.Array]:
  """How an edit moves the next-token distribution, as means over the masked positions.

  Returns:
    dict with `kl` (KL(base ‖ edited), nats), `class_base` [C] and `class_edited` [C] (mean
    probability of each class), `class_shift` [C] = class_edited − class_base, and `top1_change`
    (fraction of positions whose argmax changes).
  """
  logp_b = jax.nn.log_softmax(base_logits_BTV.astype(jnp.float32), axis=-1)
  logp_e = jax.nn.log_softmax(edited_logits_BTV.astype(jnp.float32), axis=-1)
  p_b, p_e = jnp.exp(logp_b), jnp.exp(logp_e)
  w_BT = jnp.asarray(mask_BT, jnp.float32)
  n = jnp.maximum(jnp.sum(w_BT), 1.0)
  kl_BT = jnp.sum(p_b * (logp_b - logp_e), axis=-1)
  member = jnp.asarray(membership_CV, jnp.float32)
  cls_b = jnp.einsum("bt,btv,cv->c", w_BT, p_b, member) / n
  cls_e = jnp.einsum("bt,btv,cv->c", w_BT, p_e, member) / n
  flip_BT = (jnp.argmax(logp_b, -1) != jnp.argmax(logp_e, -1)).astype(jnp.float32)
  return {"kl": jnp.sum(w_BT * kl_BT) / n, "class_base": cls_b, "class_edited": cls_e,
          "class_shift": cls_e - cls_b, "top1_change": jnp.sum(w_BT * flip_BT) / n}


def _effects_impl(lm_params, sae_params, hparams, sae_state, tokens_BT, mask_BT, membership,
                  intervention, latents_L, values_L, chunk, model_config, site, sae_config,
                  splice_mode):
  clean = model_lib.apply(lm_params, tokens_BT, model_config).logits
  spliced = interventions.edited_logits(lm_params, sae_params, hparams, sae_state, tokens_BT,
                                        None, None, model_config, site, sae_config, splice_mode)

  def one(lat_val):
    iv = intervention if latents_L is None else interventions.with_latents(intervention, *lat_val)
    edited = interventions.edited_logits(lm_params, sae_params, hparams, sae_state, tokens_BT,
                                         iv, None, model_config, site, sae_config, splice_mode)
    return {"vs_clean": effect_measures(clean, edited, mask_BT, membership),
            "vs_spliced": effect_measures(spliced, edited, mask_BT, membership)}

  out = (one(None) if latents_L is None
         else jax.lax.map(one, (latents_L, values_L), batch_size=chunk))
  out["spliced_vs_clean"] = effect_measures(clean, spliced, mask_BT, membership)
  return out


_effects_jit = jax.jit(_effects_impl, static_argnames=(*interventions.STATIC_ARGNAMES, "chunk"))


def intervention_effects(lm_params: model_lib.Params, model_config: model_lib.ModelConfig,
                         site: str, sae_params: sae_lib.Params, sae_config: sae_lib.SAEConfig,
                         hparams: sae_lib.SAEHparams, tokens_BT: jax.Array,
                         intervention: interventions.Intervention, mask_BT: jax.Array,
                         membership_CV: jax.Array, splice_mode: str = "corrected",
                         sae_state: sae_lib.SAEState | None = None, *,
                         latents_L: jax.Array | None = None, values_L: jax.Array | None = None,
                         chunk: int = 8) -> dict[str, Any]:
  """`effect_measures` of an intervention against the clean and the plain spliced model.

  Args:
    mask_BT: bool, the positions measured (e.g. the sentence positions, or the intervened ones).
    membership_CV: from `grammars.token_classes.token_classes`.
    latents_L, values_L: optional: sweep the template over latents as
      `interventions.intervened_logits_latents` (lax.map in chunks of `chunk` latents,
      bounding memory).
    Others: as `interventions.intervened_logits`.

  Returns:
    `{'vs_clean': ..., 'vs_spliced': ..., 'spliced_vs_clean': ...}`, each an `effect_measures`
    dict (with a leading L axis for a sweep, except `spliced_vs_clean`).
  """
  interventions.check_site(model_config, site, sae_config, splice_mode, tokens_BT)
  tokens_BT = jnp.asarray(tokens_BT)
  if jnp.shape(mask_BT) != tokens_BT.shape:
    raise ValueError(f"mask_BT has shape {jnp.shape(mask_BT)}; it must match the tokens "
                     f"{tokens_BT.shape}.")
  membership_CV = jnp.asarray(membership_CV)
  if membership_CV.ndim != 2 or membership_CV.shape[1] != model_config.vocab_size:
    raise ValueError(f"membership_CV must be [C, V={model_config.vocab_size}] (from "
                     f"grammars.token_classes.token_classes), got {membership_CV.shape}.")
  if not (isinstance(chunk, int) and chunk > 0):
    raise ValueError(f"chunk must be a positive int, got {chunk!r}.")
  if latents_L is None:
    interventions.check_intervention(intervention, sae_config.width, tokens_BT.shape)
  else:
    latents_L, values_L = interventions.check_sweep(intervention, latents_L, values_L,
                                                    sae_config.width, tokens_BT.shape)
  return _effects_jit(lm_params, sae_params, hparams, sae_state, tokens_BT,
                      jnp.asarray(mask_BT, bool), membership_CV, intervention, latents_L,
                      values_L, chunk=chunk, model_config=model_config, site=site,
                      sae_config=sae_config, splice_mode=splice_mode)
