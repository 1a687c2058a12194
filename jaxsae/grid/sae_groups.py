"""The SAE grid's sweepable fields and its compilation groups.

`registry` lists every field a sweep may set (static fields choose the architecture and loss
family; dynamic ones are stacked per variant). `build_groups` validates a sweep, resolves the
preset coefficients, and groups the variants by static structure into `GroupSpec`s: one
compilation each, their per-variant values stacked on a leading axis padded to a multiple of
the mesh's variant axis. No compilation happens here.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

from absl import logging
import flax.struct
import numpy as np

from jaxsae.core import divergence
from jaxsae.grid import losses as losses_lib
from jaxsae.grid import sae as sae_lib
from jaxsae.grid import sweep as sweep_lib

# Learning rates above this are accepted with a warning (they are finite, but rarely sane).
LR_WARN = 1.0

# ------------------------------------------------------------------------------------------------
# The sweepable fields.


def _nonneg(v):
  return None if v is None or (isinstance(v, (int, float)) and v >= 0 and math.isfinite(v)) \
      else "must be a finite number >= 0"


def _positive(v):
  return None if isinstance(v, (int, float)) and v > 0 and math.isfinite(v) \
      else "must be a finite number > 0"


def _int32_nonneg(v):
  ok = isinstance(v, (int, np.integer)) and not isinstance(v, bool) and 0 <= v < 2**31
  return None if ok else "must be an int in [0, 2^31) (stored as int32; larger values wrap)"


def _fractions(v):
  ok = isinstance(v, (list, tuple)) and all(
      isinstance(f, (int, float)) and not isinstance(f, bool) and 0 < f < 1 for f in v) and all(
          a < b for a, b in zip(v, v[1:]))
  return None if ok else "must be a list of strictly increasing fractions in (0, 1)"


def _steps(v):
  ok = isinstance(v, (list, tuple)) and all(
      isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in v) and all(
          a < b for a, b in zip(v, v[1:]))
  return None if ok else "must be a list of strictly increasing step counts >= 1"


def matryoshka_widths(fractions, width: int) -> tuple[int, ...]:
  """Prefix widths round(fraction·F) of a Matryoshka sweep value."""
  return tuple(int(round(f * width)) for f in fractions)


def _target_site(v):
  kind, _, layer = v.partition(".") if isinstance(v, str) else ("", "", "")
  ok = v == "" or (kind == "mlp_out" and layer.isdigit())
  return None if ok else "must be '' (no transcoder) or 'mlp_out.<l>'"


def _choice(options):
  return lambda v: None if v in options else f"must be one of {list(options)}"


def registry() -> list[sweep_lib.Field]:
  """Every field a sweep may set, with defaults (the e2e_sae conventions) and units."""
  F = sweep_lib.Field
  return [
      # Static: architecture and loss family (one compilation group per combination).
      F("activation", "relu", True, check=_choice(sae_lib.ACTIVATIONS),
        doc="SAE activation (gated: Rajamanoharan et al. 2024a, whose encoder subtracts b_dec "
        "first: pre_bias=True)"),
      F("expansion", 4, True, check=lambda v: None if isinstance(v, int) and v > 0
        else "must be a positive int", doc="latents per input dimension (F = expansion × d)"),
      F("enc_bias", True, True, doc="encoder bias"),
      F("dec_bias", True, True, doc="decoder bias"),
      F("pre_bias", False, True, doc="pre-bias subtracted before encoding, added after decoding"),
      F("decoder_norm", "forward", True, check=_choice(sae_lib.DECODER_NORMS),
        doc="dictionary normalisation"),
      F("input_norm", False, True, doc="L2-normalise the SAE input (Menon 'input')"),
      F("recon_norm", False, True, doc="L2-normalise the reconstruction (Menon 'recon')"),
      F("init", "e2e", True, check=_choice(sae_lib.INITS), doc="initialisation scheme"),
      F("pre_bias_init", "zero", True, check=_choice(sae_lib.PRE_BIAS_INITS),
        doc="pre-bias init (data mean/median is an improvement)"),
      F("decode", "auto", True, check=_choice(sae_lib.DECODES),
        doc="TopK/BatchTopK decode: dense, sparse (active latents only) or auto (per backend)"),
      F("auxk", False, True, doc="AuxK loss (Gao et al. 2024): the top k_aux dead latents "
        "reconstruct the residual x − x̂ (topk / batchtopk)"),
      F("k_aux", None, True, check=lambda v: None if v is None or (
          isinstance(v, int) and not isinstance(v, bool) and v > 0) else "must be None or an "
        "int > 0", doc="AuxK's dead latents per token (None: d_model / 2, SAELens' reading of "
        "Gao et al.; the paper used 512 at d_model 768-4096)"),
      F("matryoshka", (), True, check=_fractions,
        doc="Matryoshka SAE (Bussmann et al. 2025): inner prefix sizes as increasing fractions "
        "of F in (0, 1), each prefix also reconstructs x (paper: [1/16, 1/8, 1/4, 1/2]); "
        "empty: none"),
      F("target_site", "", True, check=_target_site,
        doc="transcoder (Dunefsky et al. 2024): the site the SAE's output stands for, "
        "'mlp_out.{l}' with config.site 'mlp_in.{l}': it reads MLP l's input, is trained to "
        "output (local) or is spliced in place of (e2e) MLP l's output; '': the SAE "
        "reconstructs its own input"),
      F("p_anneal", False, True, doc="p-annealing (Karvonen et al. 2024): sparsity Σ|c|^p with "
        "p linear in the step from 1 to p_end (needs sparsity_p = 1; p_anneal_rescale keeps "
        "the penalty at the L1 penalty's value)"),
      F("resample_steps", (), True, check=_steps,
        doc="dead-latent resampling (Anthropic 2023) after these numbers of steps: latents not "
        "fired for dead_tokens tokens restart from high-loss inputs (paper: 25k, 50k, 75k, "
        "100k); empty: none"),
      F("loss", "local", True, check=_choice(losses_lib.PRESETS),
        doc="loss preset: local, e2e or e2e_ds"),
      F("sparsity_p", 1.0, True, check=_positive, doc="order p of the sparsity norm"),
      F("sparsity_reduction", "e2e_sae", True, check=_choice(losses_lib.REDUCTIONS),
        doc="e2e_sae (mean over tokens / d) or sum_batch (Menon: sum over the batch)"),
      F("include_final_resid", True, True,
        doc="in_to_orig includes the final resid_post (the e2e paper omitted it)"),
      F("splice_mode", "corrected", True, check=_choice(sae_lib.SPLICE_MODES),
        doc="how normalised SAEs are spliced in (corrected rescales to ‖x‖)"),
      F("causal", False, True, doc="add the causal-interpolation term (β = causal_coeff)"),
      F("causal_lambda", "step", True, check=_choice(losses_lib.CAUSAL_LAMBDAS),
        doc="interpolation λ: U(0,1) per step, per token, or fixed (causal_lambda_value)"),
      F("causal_target", "sae", True, check=_choice(losses_lib.CAUSAL_TARGETS),
        doc="interpolated target logits: of the SAE-spliced run (paper) or the clean run"),
      F("causal_distance", "mse", True, check=_choice(losses_lib.CAUSAL_DISTANCES),
        doc="distance of the causal term: MSE on logits or KL"),
      # Dynamic: stacked per variant.
      F("lr", 1e-3, False, check=_positive, doc="peak learning rate"),
      F("seed", 0, False, np.int32, check=_int32_nonneg,
        doc="SAE init seed (same seed + architecture = same init)"),
      F("k", 0, False, np.int32, check=_int32_nonneg, doc="TopK / BatchTopK latents per token"),
      F("sparsity_coeff", 0.0, False, check=_nonneg, doc="sparsity coefficient (λ or α)"),
      F("out_to_in_coeff", None, False, check=_nonneg,
        doc="local MSE coefficient (None: the preset's)"),
      F("logits_kl_coeff", None, False, check=_nonneg, doc="KL coefficient (None: preset's)"),
      F("in_to_orig_coeff", None, False, check=_nonneg,
        doc="downstream MSE coefficient (None: preset's)"),
      F("jumprelu_bandwidth", 1e-3, False, check=_positive, doc="JumpReLU STE bandwidth"),
      F("jumprelu_init_threshold", 1e-3, False, check=_positive, doc="JumpReLU initial θ"),
      F("jumprelu_threshold_lr_scale", 1.0, False, check=_positive,
        doc="JumpReLU: multiplier of the step on log θ"),
      F("threshold_decay", 0.99, False, check=lambda v: None if _nonneg(v) is None and v <= 1
        else "must lie in [0, 1]", doc="BatchTopK inference-threshold EMA decay"),
      F("auxk_coeff", losses_lib.AUXK_COEFF, False, check=_nonneg,
        doc="AuxK coefficient alpha (Gao et al.: 1/32)"),
      F("dead_tokens", sae_lib.DEAD_TOKENS, False, np.int32, check=lambda v: None if (
          _int32_nonneg(v) is None and v > 0) else "must be an int in [1, 2^31)",
        doc="AuxK and resampling: tokens without firing after which a latent is dead (Gao et "
        "al.: 10M)"),
      F("matryoshka_coeff", 1.0, False, check=_nonneg,
        doc="weight of the summed Matryoshka prefix losses (paper: 1, as the full width)"),
      F("gated_aux_coeff", 1.0, False, check=_nonneg,
        doc="gated SAEs: weight of the gate path's reconstruction through the frozen decoder "
        "(paper: 1)"),
      F("p_end", 0.2, False, check=lambda v: None if _positive(v) is None and v <= 1
        else "must lie in (0, 1]", doc="p-annealing: the final order p (Karvonen et al.: 0.2)"),
      F("p_anneal_start", 0, False, np.int32, check=_int32_nonneg,
        doc="p-annealing: the step at which p leaves 1 (steps)"),
      F("p_anneal_steps", 0, False, np.int32, check=_int32_nonneg,
        doc="p-annealing: steps over which p falls linearly to p_end (0: p_end at once)"),
      F("p_anneal_rescale", False, False, bool, check=lambda v: None if isinstance(v, (bool, np.bool_)) else "must be True or False",
        doc="p-annealing: scale the Σ|c|^p penalty to the L1 penalty's value on each batch "
        "(sg(L1 / Lp): the trainer's λ update at each change of p, continuous), so λ keeps "
        "its meaning as p falls"),
      F("causal_coeff", 0.0, False, check=_nonneg, doc="β of the causal-interpolation term"),
      F("causal_lambda_value", 0.2, False, check=lambda v: None if 0 <= v <= 1
        else "must lie in [0, 1]", doc="λ when causal_lambda='fixed' (paper: 0.2 or 0.02)"),
      F("causal_start", 0, False, np.int32, check=_nonneg,
        doc="step at which the causal term starts (plain pre-training before; steps)"),
      F("causal_ramp", 0, False, np.int32, check=_nonneg,
        doc="steps over which β ramps linearly from 0 after causal_start (0: constant β)"),
      F("causal_lr_scale", 1.0, False, check=_positive,
        doc="lr multiplier from causal_start on (fine-tuning at a lower lr)"),
      F("causal_reset_opt", False, False, doc="fresh Adam state at causal_start (> 0)"),
  ]


# Opt-in recipes: (their fields, whether a variant uses them). A variant that does not records
# none of them (`GroupSpec.values`), as before they existed.
OPT_IN = ((("auxk", "k_aux", "auxk_coeff", "dead_tokens"), lambda v: bool(v["auxk"])),
          (("matryoshka", "matryoshka_coeff"), lambda v: bool(v["matryoshka"])),
          (("gated_aux_coeff",), lambda v: v["activation"] == "gated"),
          (("target_site",), lambda v: bool(v["target_site"])),
          (("p_anneal", "p_end", "p_anneal_start", "p_anneal_steps", "p_anneal_rescale"),
           lambda v: bool(v["p_anneal"])),
          (("resample_steps", "dead_tokens"), lambda v: bool(v["resample_steps"])))

# Static fields a transcoder may not set: each maps the SAE's output back into its input's space
# (pre-bias added back, rescaling to ‖x‖) or interpolates in it (the causal term).
TRANSCODER_EXCLUDES = {"pre_bias": False, "input_norm": False, "recon_norm": False,
                       "causal": False}


def _recorded(values: Mapping[str, Any]) -> dict[str, Any]:
  """`values` without the fields of the recipes it does not use (a field shared by recipes,
  e.g. `dead_tokens`, stays when one of them is used)."""
  used = {name for fields, uses in OPT_IN if uses(values) for name in fields}
  unused = {name for fields, _ in OPT_IN for name in fields} - used
  return {k: v for k, v in values.items() if k not in unused}


_COEFF_FIELDS = {"out_to_in": "out_to_in_coeff", "logits_kl": "logits_kl_coeff",
                 "in_to_orig": "in_to_orig_coeff"}


@flax.struct.dataclass
class CausalHparams:
  """Per-variant schedule of the causal term (leading axis N in a group)."""

  lambda_value: Any  # float: λ when causal_lambda == 'fixed'
  start: Any  # int: first step with the causal term (and the lr scale)
  ramp: Any  # int: β ramp length in steps (0: constant)
  lr_scale: Any  # float: lr multiplier from `start` on
  reset_opt: Any  # bool: fresh Adam state at `start` (when start > 0)


@flax.struct.dataclass
class PAnnealHparams:
  """Per-variant p-annealing schedule (leading axis N in a group; `losses.anneal_p`)."""

  p_end: Any  # float: the final order
  start: Any  # int: the step at which p leaves 1
  steps: Any  # int: steps of the linear fall to p_end (0: at once)
  rescale: Any  # bool: the penalty rescaled to the L1 penalty's value (`sparsity_annealed`)


@dataclasses.dataclass(frozen=True)
class GroupSpec:
  """A compilation group: static SAE and loss structure plus stacked per-variant values.

  Arrays have a leading axis of `padded` entries: the `size` real variants, then copies of the
  last one that fill the group to a multiple of the mesh's variant axis (never reported).
  """

  name: str
  sae: sae_lib.SAEConfig
  loss: losses_lib.LossConfig
  splice_mode: str
  ids: tuple[str, ...]
  size: int
  padded: int
  hparams: sae_lib.SAEHparams
  coeffs: losses_lib.LossCoeffs
  lr: np.ndarray
  seed: np.ndarray
  values: tuple[Mapping[str, Any], ...]  # every field of each real variant (for reports)
  causal: CausalHparams | None = None
  target_site: str = ""  # a transcoder's target ('mlp_out.{l}'); '': the SAE's own input
  p_anneal: PAnnealHparams | None = None  # groups with SAEConfig.p_anneal only


def _k_max_hook(static, members):
  if static["activation"] in ("topk", "batchtopk"):
    static["k_max"] = max(int(m.values["k"]) for m in members)
  else:
    static["k_max"] = None
  return static


def build_groups(sweep_blocks, d_model: int, n_variant_devices: int = 1
                 ) -> tuple[list[GroupSpec], list[sweep_lib.Group]]:
  """Validates the sweep and builds the groups (no compilation)."""
  reg = registry()
  variants = sweep_lib.expand(sweep_blocks, reg)
  resolved = []
  for v in variants:
    values = dict(v.values)
    preset = losses_lib.default_coeffs(losses_lib.LossConfig(preset=values["loss"]), 0.0)
    for term, field in _COEFF_FIELDS.items():
      if values[field] is None:
        values[field] = float(getattr(preset, term))
    if values["activation"] in ("topk", "batchtopk"):
      width = values["expansion"] * d_model
      if not 1 <= int(values["k"]) <= width:
        raise sweep_lib.SweepError(
            f"variant {v.id} ({v.label}): k={values['k']} must lie in [1, width={width}] for "
            f"activation={values['activation']}; set k in the sweep or widen the SAE")
    if values["auxk"] and values["activation"] not in ("topk", "batchtopk"):
      raise sweep_lib.SweepError(
          f"variant {v.id} ({v.label}): auxk=True needs activation topk or batchtopk (got "
          f"{values['activation']!r}); AuxK revives dead TopK / BatchTopK latents")
    if values["auxk"] and values["k_aux"] is not None and values["k_aux"] > (
        values["expansion"] * d_model):
      raise sweep_lib.SweepError(
          f"variant {v.id} ({v.label}): k_aux={values['k_aux']} exceeds the width "
          f"{values['expansion'] * d_model}; lower k_aux or widen the SAE")
    if values["p_anneal"] and float(values["sparsity_p"]) != 1:
      raise sweep_lib.SweepError(
          f"variant {v.id} ({v.label}): p_anneal=True anneals p from 1, but sparsity_p="
          f"{values['sparsity_p']}; set sparsity_p=1 (p_end sets the final order)")
    if values["resample_steps"] and values["activation"].startswith("sparsemax"):
      raise sweep_lib.SweepError(
          f"variant {v.id} ({v.label}): resample_steps needs an encoder with w_enc; "
          f"activation={values['activation']!r} has none (drop resample_steps)")
    widths = matryoshka_widths(values["matryoshka"], values["expansion"] * d_model)
    if any(not 1 <= w < values["expansion"] * d_model for w in widths) or len(set(widths)) < len(
        widths):
      raise sweep_lib.SweepError(
          f"variant {v.id} ({v.label}): matryoshka={list(values['matryoshka'])} gives prefix "
          f"widths {list(widths)} of F={values['expansion'] * d_model}; each must be distinct "
          f"and in [1, F): use fewer or coarser fractions, or widen the SAE")
    if values["target_site"]:
      bad = [f"{k}={values[k]!r}" for k, ok in TRANSCODER_EXCLUDES.items() if values[k] != ok]
      if bad:
        raise sweep_lib.SweepError(
            f"variant {v.id} ({v.label}): target_site={values['target_site']!r} (a transcoder) "
            f"cannot use {', '.join(bad)}: its output lives in another space than its input; "
            f"set {', '.join(f'{k}={ok!r}' for k, ok in TRANSCODER_EXCLUDES.items())} for "
            "transcoder variants")
    if float(values["lr"]) > LR_WARN:
      logging.warning("variant %s (%s): lr=%g is above %g; Adam steps of that size usually "
                      "diverge (the summary flags variants whose loss grows %gx).", v.id,
                      v.label, float(values["lr"]), LR_WARN, divergence.FACTOR)
    resolved.append(dataclasses.replace(v, values=values))
  groups = sweep_lib.group(resolved, reg, derive=_k_max_hook)
  specs = []
  for g in groups:
    s = g.static
    sae_cfg = sae_lib.SAEConfig(
        d_in=d_model, width=s["expansion"] * d_model, activation=s["activation"],
        k_max=s["k_max"], enc_bias=s["enc_bias"] and not s["activation"].startswith("sparsemax"),
        dec_bias=s["dec_bias"], pre_bias=s["pre_bias"], decoder_norm=s["decoder_norm"],
        input_norm=s["input_norm"], recon_norm=s["recon_norm"], init=s["init"],
        pre_bias_init=s["pre_bias_init"],
        decode=s["decode"] if s["activation"] in ("topk", "batchtopk") else "auto",
        k_aux=(s["k_aux"] or max(d_model // 2, 1)) if s["auxk"] else 0,
        matryoshka=matryoshka_widths(s["matryoshka"], s["expansion"] * d_model),
        p_anneal=s["p_anneal"], resample_steps=tuple(s["resample_steps"]))
    loss_cfg = losses_lib.LossConfig(preset=s["loss"], sparsity_p=float(s["sparsity_p"]),
                                     sparsity_reduction=s["sparsity_reduction"],
                                     include_final_resid=s["include_final_resid"],
                                     causal=s["causal"], causal_lambda=s["causal_lambda"],
                                     causal_target=s["causal_target"],
                                     causal_distance=s["causal_distance"])
    n = g.size
    padded = -(-n // n_variant_devices) * n_variant_devices
    pad = lambda a: np.concatenate([a, np.repeat(a[-1:], padded - n, axis=0)])
    d = {k: pad(v) for k, v in g.dynamic.items()}
    hparams = sae_lib.SAEHparams(
        k=np.maximum(d["k"], 1).astype(np.int32) if sae_cfg.uses_k else d["k"].astype(np.int32),
        jumprelu_bandwidth=d["jumprelu_bandwidth"].astype(np.float32),
        jumprelu_init_threshold=d["jumprelu_init_threshold"].astype(np.float32),
        threshold_decay=d["threshold_decay"].astype(np.float32),
        jumprelu_threshold_lr_scale=d["jumprelu_threshold_lr_scale"].astype(np.float32),
        dead_tokens=d["dead_tokens"].astype(np.int32) if sae_cfg.tracks_firing else None)
    coeffs = losses_lib.LossCoeffs(
        sparsity=d["sparsity_coeff"].astype(np.float32),
        out_to_in=d["out_to_in_coeff"].astype(np.float32),
        logits_kl=d["logits_kl_coeff"].astype(np.float32),
        in_to_orig=d["in_to_orig_coeff"].astype(np.float32),
        causal=d["causal_coeff"].astype(np.float32),
        auxk=d["auxk_coeff"].astype(np.float32),
        matryoshka=d["matryoshka_coeff"].astype(np.float32),
        gated_aux=d["gated_aux_coeff"].astype(np.float32))
    causal = CausalHparams(
        lambda_value=d["causal_lambda_value"].astype(np.float32),
        start=d["causal_start"].astype(np.int32), ramp=d["causal_ramp"].astype(np.int32),
        lr_scale=d["causal_lr_scale"].astype(np.float32),
        reset_opt=d["causal_reset_opt"].astype(bool))
    p_anneal = PAnnealHparams(
        p_end=d["p_end"].astype(np.float32), start=d["p_anneal_start"].astype(np.int32),
        steps=d["p_anneal_steps"].astype(np.int32),
        rescale=d["p_anneal_rescale"].astype(bool)) if sae_cfg.p_anneal else None
    sae_lib.check_hparams(hparams, sae_cfg)
    losses_lib.check_coeffs(coeffs)
    specs.append(GroupSpec(
        name=g.name, sae=sae_cfg, loss=loss_cfg, splice_mode=s["splice_mode"], ids=g.ids,
        size=n, padded=padded, hparams=hparams, coeffs=coeffs,
        lr=d["lr"].astype(np.float32), seed=d["seed"].astype(np.int32),
        values=tuple(dict(_recorded(v.values), **{k: g.static[k] for k in ("k_max",)})
                     for v in g.variants), causal=causal, target_site=s["target_site"],
        p_anneal=p_anneal))
  return specs, groups
