"""The description of one SAE: static architecture (`SAEConfig`), dynamic per-variant numbers
(`SAEHparams`) and non-gradient training state (`SAEState`).

`sae.py` computes with them and re-exports every public name here (`sae.SAEConfig`, ...), so
callers keep importing `jaxsae.grid.sae`. One `SAEConfig` is one compilation group of the grid;
`SAEHparams` / `SAEState` leaves are stacked on a leading variant axis.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

ACTIVATIONS = ("relu", "topk", "batchtopk", "jumprelu", "sparsemax_no_kds",
               "sparsemax_recon_dist", "sparsemax_dist", "gated")
SPARSEMAX_ACTIVATIONS = ("sparsemax_no_kds", "sparsemax_recon_dist", "sparsemax_dist")
DECODER_NORMS = ("none", "forward", "project")
INITS = ("e2e", "menon")
PRE_BIAS_INITS = ("zero", "mean", "median")
SPLICE_MODES = ("corrected", "original")
DECODES = ("auto", "dense", "sparse")
# AuxK's dead-latent window: Gao et al. 2024 (appendix A.2) call a latent dead after 10M tokens
# without firing. Short CPU runs see far fewer tokens; set `dead_tokens` per variant.
DEAD_TOKENS = 10_000_000
SINCE_FIRED_MAX = 2**30  # the since-fired counters saturate here (int32)
# Left out of `config_json` at these values.
OPT_IN_FIELDS = {"k_aux": 0, "matryoshka": (), "p_anneal": False, "resample_steps": ()}


def check_choice(field: str, value: Any, choices: tuple[str, ...]) -> None:
  if value not in choices:
    raise ValueError(f"{field}={value!r} is unknown; choose one of {', '.join(choices)}.")


def is_positive_int(value: Any) -> bool:
  return isinstance(value, int) and not isinstance(value, bool) and value > 0


@dataclasses.dataclass(frozen=True)
class SAEConfig:
  """Static SAE architecture (hashable: one config = one compilation group).

  Attributes:
    d_in: input width D.
    width: number of latents F (expansion × D).
    activation: one of `ACTIVATIONS`.
    k_max: static upper bound on k for `topk` / `batchtopk` (1 <= k_max <= width); must be None
      for other activations (so configs differing only in an unused k_max are one group).
    enc_bias, dec_bias, pre_bias: which biases exist (see the module docstring).
    decoder_norm: `none`; `forward` (directions divided by their L2 norm inside the forward);
      `project` (unit norm kept by the trainer: `project_gradients`, step, `renormalize`).
    input_norm, recon_norm: L2-normalise x before the SAE / x_hat (Menon's `input` / `recon`).
    init: `e2e` (e2e_sae) or `menon`; see `init`.
    pre_bias_init: `zero`, or `mean` / `median` (geometric) of a data sample (needs `pre_bias`).
    decode: how `topk` / `batchtopk` codes are decoded: `dense` (`codes @ dictionary`),
      `sparse` (from the active latents only, forward and backward; see `sparse_decode`), or
      `auto` (per backend, from measurements: `sparse_decode`). Other activations: always dense.
    k_aux: AuxK (Gao et al. 2024, appendix A.2): 0 for none, else the number of dead latents
      (topk / batchtopk only; k_aux <= width) whose top pre-activations reconstruct the residual
      x − x̂ in the `auxk` loss term; needs `SAEState.since_fired` (see `init_state`).
    matryoshka: Matryoshka SAE (Bussmann et al. 2025): the inner prefix widths m_1 < ... < F
      (empty: none), each prefix's reconstruction `sae.decode_prefix` trained to reconstruct x
      too (the `matryoshka` loss term); the full width is the plain reconstruction.
    p_anneal: p-annealing (Karvonen et al. 2024): the sparsity term is Σ|c|^p with p annealed
      from 1 per variant (`losses.anneal_p`; the schedule is the grid's per-variant `p_end`,
      `p_anneal_start`, `p_anneal_steps`); needs the loss's static sparsity_p = 1. Against
      the dictionary_learning trainer: p falls linearly every step (its
      n_sparsity_updates='continuous'; by default it steps p through a few values between its
      anneal start and end); that trainer rescales λ at each p update by the ratio of the mean
      recent penalties at the old and the new p, which the per-variant `p_anneal_rescale` does
      continuously, on each batch (`losses.sparsity_annealed`); without it λ is the variant's
      `sparsity_coeff` throughout.
    resample_steps: dead-latent resampling (Anthropic 2023, `resample.py`): after these numbers
      of optimizer steps (strictly increasing, >= 1; empty: none), latents not fired for
      `dead_tokens` tokens are re-initialised from high-loss inputs; needs an encoder with
      `w_enc` (not sparsemax) and `SAEState.since_fired`.
  """

  d_in: int
  width: int
  activation: str = "relu"
  k_max: int | None = None
  enc_bias: bool = True
  dec_bias: bool = True
  pre_bias: bool = False
  decoder_norm: str = "forward"
  input_norm: bool = False
  recon_norm: bool = False
  init: str = "e2e"
  pre_bias_init: str = "zero"
  decode: str = "auto"
  k_aux: int = 0
  matryoshka: tuple[int, ...] = ()
  p_anneal: bool = False
  resample_steps: tuple[int, ...] = ()

  def __post_init__(self):
    for name in ("d_in", "width"):
      if not is_positive_int(getattr(self, name)):
        raise ValueError(f"SAEConfig.{name} must be a positive int, got {getattr(self, name)!r}.")
    for name in ("enc_bias", "dec_bias", "pre_bias", "input_norm", "recon_norm", "p_anneal"):
      if not isinstance(getattr(self, name), bool):
        raise ValueError(f"SAEConfig.{name} must be a bool, got {getattr(self, name)!r}.")
    check_choice("SAEConfig.activation", self.activation, ACTIVATIONS)
    check_choice("SAEConfig.decoder_norm", self.decoder_norm, DECODER_NORMS)
    check_choice("SAEConfig.init", self.init, INITS)
    check_choice("SAEConfig.pre_bias_init", self.pre_bias_init, PRE_BIAS_INITS)
    check_choice("SAEConfig.decode", self.decode, DECODES)
    if self.decode == "sparse" and not self.uses_k:
      raise ValueError(f"SAEConfig.decode='sparse' needs a topk/batchtopk activation (got "
                       f"{self.activation!r}); use decode='auto' or 'dense'.")
    if self.uses_k:
      if not is_positive_int(self.k_max):
        raise ValueError(f"SAEConfig.k_max must be a positive int for activation="
                         f"{self.activation!r}, got {self.k_max!r}; set it to the largest k swept.")
      if self.k_max > self.width:
        raise ValueError(f"SAEConfig.k_max={self.k_max} exceeds width={self.width}; lower k_max "
                         f"or widen the SAE.")
    elif self.k_max is not None:
      raise ValueError(f"SAEConfig.k_max only applies to topk/batchtopk; set it to None for "
                       f"activation={self.activation!r}.")
    if self.k_aux != 0:
      if not (self.uses_k and is_positive_int(self.k_aux) and self.k_aux <= self.width):
        raise ValueError(f"SAEConfig.k_aux={self.k_aux!r} must be 0 (no AuxK) or an int in "
                         f"[1, width={self.width}] with a topk/batchtopk activation (got "
                         f"{self.activation!r}); AuxK revives dead TopK / BatchTopK latents.")
    if isinstance(self.matryoshka, list):  # as read back from JSON
      object.__setattr__(self, "matryoshka", tuple(self.matryoshka))
    m = self.matryoshka
    if not (isinstance(m, tuple) and all(is_positive_int(w) for w in m)
            and all(a < b for a, b in zip(m, m[1:])) and (not m or m[-1] < self.width)):
      raise ValueError(f"SAEConfig.matryoshka={m!r} must be a tuple of strictly increasing "
                       f"prefix widths in [1, width={self.width}) (empty: no Matryoshka).")
    if isinstance(self.resample_steps, list):  # as read back from JSON
      object.__setattr__(self, "resample_steps", tuple(self.resample_steps))
    r = self.resample_steps
    if not (isinstance(r, tuple) and all(is_positive_int(s) for s in r)
            and all(a < b for a, b in zip(r, r[1:]))):
      raise ValueError(f"SAEConfig.resample_steps={r!r} must be a tuple of strictly increasing "
                       f"step counts >= 1 (empty: no resampling).")
    if r and self.is_sparsemax:
      raise ValueError(f"SAEConfig.resample_steps needs an encoder with w_enc; "
                       f"activation={self.activation!r} has none (turn resampling off).")
    if self.is_sparsemax and self.enc_bias:
      raise ValueError(f"SAEConfig.enc_bias must be False for activation={self.activation!r} "
                       f"(sparsemax encoders have no encoder bias).")
    if self.pre_bias_init != "zero" and not self.pre_bias:
      raise ValueError(f"SAEConfig.pre_bias_init={self.pre_bias_init!r} needs pre_bias=True; "
                       f"set pre_bias=True or pre_bias_init='zero'.")
    if self.init == "e2e" and self.width < self.d_in:
      raise ValueError(f"SAEConfig.init='e2e' needs width >= d_in for W_dec W_decᵀ = I (got "
                       f"width={self.width}, d_in={self.d_in}); widen the SAE or use init='menon'.")

  @property
  def uses_k(self) -> bool:
    return self.activation in ("topk", "batchtopk")

  @property
  def tracks_firing(self) -> bool:
    """Whether `SAEState.since_fired` and `SAEHparams.dead_tokens` exist (AuxK, resampling)."""
    return bool(self.k_aux or self.resample_steps)

  @property
  def is_sparsemax(self) -> bool:
    return self.activation in SPARSEMAX_ACTIVATIONS


@flax.struct.dataclass
class SAEHparams:
  """Dynamic per-variant hyperparameters (scalars; stacked on a leading axis N for a grid).

  Attributes:
    k: int32, latents kept per token for `topk` / `batchtopk` (1 <= k <= k_max).
    jumprelu_bandwidth: the STE rectangle-kernel bandwidth eps (> 0).
    jumprelu_init_threshold: initial theta (> 0); used by `init` only.
    jumprelu_threshold_lr_scale: multiplier (> 0) of the optimizer's step on log theta (Adam
      moves log theta by about lr per step, so at short budgets theta cannot travel far from
      its initial value at scale 1); used by the trainer only.
    threshold_decay: BatchTopK threshold EMA decay in [0, 1).
    dead_tokens: int32, AuxK and resampling: a latent not fired for this many training tokens
      is dead (> 0); None without either (and where nothing trains).
  """

  k: jax.Array
  jumprelu_bandwidth: jax.Array
  jumprelu_init_threshold: jax.Array
  threshold_decay: jax.Array
  dead_tokens: jax.Array | None = None
  jumprelu_threshold_lr_scale: jax.Array | None = None  # None: 1


def default_hparams(config: SAEConfig, **overrides: Any) -> SAEHparams:
  """Scalar hparams for one variant: k = k_max (or 0), eps = theta_0 = 1e-3, decay 0.99,
  threshold lr scale 1, dead_tokens = `DEAD_TOKENS` with AuxK or resampling (else None)."""
  values = dict(k=config.k_max or 0, jumprelu_bandwidth=1e-3, jumprelu_init_threshold=1e-3,
                threshold_decay=0.99, jumprelu_threshold_lr_scale=1.0,
                dead_tokens=DEAD_TOKENS if config.tracks_firing else None)
  unknown = set(overrides) - set(values)
  if unknown:
    raise ValueError(f"Unknown SAEHparams field(s) {sorted(unknown)}; valid: {sorted(values)}.")
  values.update(overrides)
  dead = values.pop("dead_tokens")
  return SAEHparams(
      k=jnp.asarray(values.pop("k"), jnp.int32),
      dead_tokens=None if dead is None else jnp.asarray(dead, jnp.int32),
      **{name: jnp.asarray(v, jnp.float32) for name, v in values.items()})


def check_hparams(hparams: SAEHparams, config: SAEConfig) -> None:
  """Validates concrete (possibly stacked) hparams before compiling; raises ValueError."""
  k = np.asarray(hparams.k)
  if config.uses_k and (k.min() < 1 or k.max() > config.k_max):
    raise ValueError(f"SAEHparams.k must lie in [1, k_max={config.k_max}], got {k.tolist()}; "
                     f"raise SAEConfig.k_max or lower k.")
  for name in ("jumprelu_bandwidth", "jumprelu_init_threshold", "jumprelu_threshold_lr_scale"):
    if getattr(hparams, name) is None:
      continue
    v = np.asarray(getattr(hparams, name))
    if not (np.all(np.isfinite(v)) and np.all(v > 0)):
      raise ValueError(f"SAEHparams.{name} must be finite and > 0, got {v.tolist()}.")
  v = np.asarray(hparams.threshold_decay)
  if not np.all((v >= 0) & (v < 1)):
    raise ValueError(f"SAEHparams.threshold_decay must lie in [0, 1), got {v.tolist()}.")
  if config.tracks_firing and hparams.dead_tokens is not None:
    v = np.asarray(hparams.dead_tokens)
    if not np.all(v > 0):
      raise ValueError(f"SAEHparams.dead_tokens must be > 0 tokens, got {v.tolist()}.")


@flax.struct.dataclass
class SAEState:
  """Non-gradient state: BatchTopK's inference threshold (present, unused, for all activations)
  and, with AuxK (`k_aux > 0`) or resampling only, the training tokens since each latent last
  fired."""

  threshold: jax.Array  # float32 scalar
  count: jax.Array  # int32 scalar, number of EMA updates so far
  since_fired: jax.Array | None = None  # int32 [F], saturating at SINCE_FIRED_MAX


def init_state(config: SAEConfig) -> SAEState:
  since = jnp.zeros((config.width,), jnp.int32) if config.tracks_firing else None
  return SAEState(threshold=jnp.zeros((), jnp.float32), count=jnp.zeros((), jnp.int32),
                  since_fired=since)


def config_json(config: SAEConfig) -> dict[str, Any]:
  """The config's fields for JSON records; opt-in fields at their off value are left out (so
  records of SAEs that do not use them read as before those fields existed)."""
  out = dataclasses.asdict(config)
  for name, off in OPT_IN_FIELDS.items():
    if out[name] == off:
      del out[name]
  for name in ("matryoshka", "resample_steps"):
    if name in out:
      out[name] = list(out[name])
  return out
