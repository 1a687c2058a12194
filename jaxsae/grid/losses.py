"""SAE loss terms with the e2e_sae reductions and the local / e2e / e2e+ds presets, for ONE variant.

Every term takes arrays (the model-running part, e.g. the spliced forward, lives in the trainer)
and a bool token mask `mask_BT` (`None` = all tokens): only masked-in tokens count in every mean.
Reductions (copied from e2e_sae; coefficients do not transfer otherwise):

    sparsity   e2e_sae:   coeff · mean_tokens(‖c‖_p) / d      (true p-norm for p ≠ 1)
               sum_batch: coeff · Σ_tokens ‖c‖_p             (Menon: Σ_{tokens, latents} |c| at p=1)
               p-annealing: ‖c‖_p replaced by Σ_latents |c|^p, p traced and annealed from 1
               (Karvonen et al. 2024; `sparsity_annealed`, `anneal_p`)
    out_to_in  mean_elements((x̂ − x)²)                        (masked tokens × dims)
    auxk       mean_elements((ê − sg(x − x̂))²), ê = c_aux @ W_dec (no biases), c_aux the top
               k_aux dead latents' pre-activations (Gao et al. 2024; TopK / BatchTopK SAEs)
    gated_aux  out_to_in(x̂_gate, x), x̂_gate = relu(π_gate) decoded by the frozen decoder
               (Rajamanoharan et al. 2024a; gated SAEs, whose sparsity is on relu(π_gate)·‖d_j‖)
    matryoshka Σ_m out_to_in(x̂_m, x) over the inner prefixes m (Bussmann et al. 2025 sum the
               prefix losses, the full width being out_to_in), x̂_m decoded from latents < m
    in_to_orig (1/|H|) Σ_h mean_elements((a_spliced_h − a_clean_h)²)
    logits_kl  mean_tokens Σ_v p_clean (log p_clean − log p_spliced) = KL(clean ‖ spliced)
    causal     distance(logits of the run with D(z_i + λ(z_j(i) − z_i)) spliced at each token i,
               Y_i + λ(Y_j(i) − Y_i)), j(i) the nearest other token in latent space in the row

`LossConfig` is static (which terms exist, hence whether a spliced / downstream pass is needed);
`LossCoeffs` holds the dynamic per-variant coefficients (scalars, stacked on N for a grid). The
trainer computes the terms with `compute_terms` (or the term functions, with coeff 1) and combines
them with `total_loss`, which logs every term, also those with coefficient 0.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import chex
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jaxsae.lm import model as model_lib

PRESETS = ("local", "e2e", "e2e_ds")
REDUCTIONS = ("e2e_sae", "sum_batch")
COEFF_NAMES = ("sparsity", "out_to_in", "logits_kl", "in_to_orig", "causal", "auxk",
               "matryoshka", "gated_aux")
AUXK_COEFF = 1 / 32  # Gao et al. 2024, appendix A.2: alpha = 1/32
CAUSAL_LAMBDAS = ("step", "token", "fixed")
CAUSAL_TARGETS = ("clean", "sae")
CAUSAL_DISTANCES = ("mse", "kl")


def _token_weights(mask: jax.Array | None, lead_shape: tuple[int, ...]) -> jax.Array:
  if mask is None:
    return jnp.ones(lead_shape, jnp.float32)
  chex.assert_shape(mask, lead_shape)
  return mask.astype(jnp.float32)


def _masked_mean(v: jax.Array, w: jax.Array) -> jax.Array:
  """Σ w·v / Σ w over all axes (0 when no token is masked in)."""
  return jnp.sum(w * v) / jnp.maximum(jnp.sum(w), 1.0)


def _p_norm(c: jax.Array, p: float) -> jax.Array:
  """‖c‖_p over the last axis, with finite gradients at zero (double-where)."""
  a = jnp.abs(c)
  if p == 1:
    return jnp.sum(a, axis=-1)
  pos = a > 0
  s = jnp.sum(jnp.where(pos, jnp.where(pos, a, 1.0) ** p, 0.0), axis=-1)
  s_pos = s > 0
  return jnp.where(s_pos, jnp.where(s_pos, s, 1.0) ** (1.0 / p), 0.0)


def sparsity(codes: jax.Array, mask: jax.Array | None, d_in: int, coeff: Any = 1.0,
             p: float = 1.0, reduction: str = "e2e_sae") -> jax.Array:
  """The sparsity penalty.

  Args:
    codes: latents `[..., F]` (for JumpReLU, pass `aux['gates']` to penalise L0).
    mask: bool `codes.shape[:-1]` or None.
    d_in: the SAE input width D (static; e2e_sae divides by it).
    coeff: the coefficient (1 when the caller applies it, e.g. through `total_loss`).
    p: static Python float > 0, the norm's order.
    reduction: `e2e_sae` (coeff · mean_tokens ‖c‖_p / d) or `sum_batch` (coeff · Σ_tokens ‖c‖_p).

  Returns:
    A scalar.
  """
  if reduction not in REDUCTIONS:
    raise ValueError(f"sparsity reduction={reduction!r} is unknown; choose one of {REDUCTIONS}.")
  norms = _p_norm(codes, p)
  w = _token_weights(mask, norms.shape)
  if reduction == "sum_batch":
    return coeff * jnp.sum(w * norms)
  return coeff * _masked_mean(norms, w) / d_in


def sparsity_annealed(codes: jax.Array, mask: jax.Array | None, d_in: int, p: jax.Array,
                      reduction: str = "e2e_sae", rescale: Any = False) -> jax.Array:
  """p-annealing's penalty: `sparsity` with Σ_latents |c|^p (no 1/p root, the `Lp^p` of
  Karvonen et al.'s dictionary_learning trainer) in place of ‖c‖_p, for a traced p > 0.

  At p = 1 every value and gradient is bit-identical to `sparsity(..., p=1.0)` (the sum of |c|
  is selected, not a power of it); for p != 1 zero codes count 0 with a zero gradient
  (double-where, as `sparsity`).

  `rescale` (traced bool): times sg(L1 / Lp) of this batch (1 at p = 1 or Lp = 0), so the value
  stays the L1 penalty's and the gradient is Lp's, scaled: the trainer's λ update at each
  change of p (× the ratio of recent mean penalties at the old and new p) made continuous, on
  the batch instead of a queue of recent batches.
  """
  if reduction not in REDUCTIONS:
    raise ValueError(f"sparsity reduction={reduction!r} is unknown; choose one of {REDUCTIONS}.")
  a = jnp.abs(codes)
  pos = a > 0
  safe = jnp.where(pos, a, 1.0)
  powers = jnp.sum(jnp.where(pos, safe ** jnp.asarray(p, safe.dtype), 0.0), axis=-1)
  norms = jnp.where(p == 1, l1 := jnp.sum(a, axis=-1), powers)
  w = _token_weights(mask, norms.shape)
  reduce = lambda v: jnp.sum(w * v) if reduction == "sum_batch" else _masked_mean(v, w) / d_in
  value, value_l1 = reduce(norms), reduce(l1)
  ratio = jax.lax.stop_gradient(value_l1 / jnp.where(value > 0, value, 1.0))
  return value * jnp.where(rescale & (p != 1) & (value > 0), ratio, 1.0)


def anneal_p(step: jax.Array, p_end: jax.Array, start: jax.Array, steps: jax.Array
             ) -> jax.Array:
  """p-annealing's order at `step`: 1 before `start`, then linear in the step to `p_end`,
  p = 1 + (p_end − 1) · min((step − start + 1) / steps, 1) (`steps` 0: p_end at once; the
  ramp of `causal_ramp`). p_end = 1 gives exactly 1 at every step."""
  p_end = jnp.asarray(p_end, jnp.float32)
  ramp = causal_ramp(step, start, steps)
  return jnp.where(ramp >= 1, p_end, 1.0 + (p_end - 1.0) * ramp)  # p_end exactly at the end


def out_to_in(x_hat: jax.Array, x: jax.Array, mask: jax.Array | None) -> jax.Array:
  """Mean over masked tokens × dims of (x̂ − x)²."""
  chex.assert_equal_shape([x_hat, x])
  w = _token_weights(mask, x.shape[:-1])[..., None]
  return jnp.sum(w * jnp.square(x_hat - x)) / (jnp.maximum(jnp.sum(w), 1.0) * x.shape[-1])


def auxk(aux_codes: jax.Array, dictionary_FD: jax.Array, x_hat: jax.Array, target: jax.Array,
         mask: jax.Array | None) -> jax.Array:
  """AuxK: how well the dead latents' codes `aux_codes` `[..., F]` decode (through the
  dictionary, no biases) the residual target − x̂ (a constant), as `out_to_in`. The value is
  mean(residual²) and the gradient 0 while no latent is dead."""
  residual = jax.lax.stop_gradient(target - x_hat)
  return out_to_in(jnp.einsum("...f,fd->...d", aux_codes, dictionary_FD), residual, mask)


def matryoshka(prefix_x_hats: Mapping[int, jax.Array], target: jax.Array,
               mask: jax.Array | None) -> tuple[jax.Array, dict[str, jax.Array]]:
  """`(Σ_m out_to_in(x̂_m, target), {f"matryoshka/{m}": each})` over the prefix widths m."""
  per = {f"matryoshka/{m}": out_to_in(x, target, mask) for m, x in prefix_x_hats.items()}
  return sum(per.values()), per


def in_to_orig(spliced_acts: Mapping[str, jax.Array], clean_acts: Mapping[str, jax.Array],
               mask: jax.Array | None) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Downstream reconstruction: `(mean over sites h of out_to_in(spliced_h, clean_h), per_site)`.

  Clean activations are wrapped in stop_gradient. The coefficient is the caller's.
  """
  sites = tuple(spliced_acts)
  if not sites:
    raise ValueError("in_to_orig needs at least one downstream site (is the SAE at the last "
                     "layer with the final resid_post omitted?).")
  if set(sites) != set(clean_acts):
    raise ValueError(f"in_to_orig: spliced sites {sorted(sites)} != clean sites "
                     f"{sorted(clean_acts)}.")
  per_site = {h: out_to_in(spliced_acts[h], jax.lax.stop_gradient(clean_acts[h]), mask)
              for h in sites}
  return sum(per_site.values()) / len(sites), per_site


def clean_log_probs(clean_logits: jax.Array) -> jax.Array:
  """log softmax of the clean logits (float32, constant): `logits_kl_from_log_probs`'s target,
  computed once per batch when many variants share it."""
  return jax.nn.log_softmax(jax.lax.stop_gradient(clean_logits).astype(jnp.float32), axis=-1)


def logits_kl(clean_logits: jax.Array, spliced_logits: jax.Array,
              mask: jax.Array | None) -> jax.Array:
  """KL(clean ‖ spliced) summed over the vocab, averaged over masked tokens; clean is constant."""
  return logits_kl_from_log_probs(clean_log_probs(clean_logits), spliced_logits, mask)


def logits_kl_from_log_probs(clean_logp: jax.Array, spliced_logits: jax.Array,
                             mask: jax.Array | None) -> jax.Array:
  """`logits_kl` with the clean side given as `clean_log_probs(clean_logits)`."""
  chex.assert_equal_shape([clean_logp, spliced_logits])
  logp = jax.lax.stop_gradient(clean_logp)
  logq = jax.nn.log_softmax(spliced_logits.astype(jnp.float32), axis=-1)
  kl = jnp.sum(jnp.exp(logp) * (logp - logq), axis=-1)
  return _masked_mean(kl, _token_weights(mask, kl.shape))


# ------------------------------------------------------------------------------------------------
# The causal-interpolation term (Menon et al.'s proposed loss).


def nearest_neighbours(codes_BTF: jax.Array, mask_BT: jax.Array | None) -> jax.Array:
  """Index j(i) `[B, T]` of each token's nearest other token (L2 in latent space) in its row.

  Only masked-in tokens are candidates, and never the token itself; a token with no candidate
  (a row holding one selected token) gets j(i) = i, so interpolating towards it is a no-op.
  No gradient flows through the choice.
  """
  codes_BTF = jax.lax.stop_gradient(codes_BTF).astype(jnp.float32)
  b, t, _ = codes_BTF.shape
  valid_BT = jnp.ones((b, t), bool) if mask_BT is None else mask_BT.astype(bool)
  sq_BT = jnp.sum(jnp.square(codes_BTF), axis=-1)
  dist_BTS = (sq_BT[:, :, None] + sq_BT[:, None, :]
              - 2 * jnp.einsum("btf,bsf->bts", codes_BTF, codes_BTF))
  ok_BTS = valid_BT[:, None, :] & ~jnp.eye(t, dtype=bool)[None]
  dist_BTS = jnp.where(ok_BTS, dist_BTS, jnp.inf)
  j_BT = jnp.argmin(dist_BTS, axis=-1).astype(jnp.int32)
  self_BT = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32)[None], (b, t))
  return jnp.where(jnp.any(ok_BTS, axis=-1), j_BT, self_BT)


def gather_rows(v_BT_: jax.Array, j_BT: jax.Array) -> jax.Array:
  """`v[b, j[b, t]]` for `v` `[B, T, ...]`."""
  return jax.vmap(lambda v, j: v[j])(v_BT_, j_BT)


def interpolate(v_BT_: jax.Array, j_BT: jax.Array, lam: jax.Array) -> jax.Array:
  """`v_i + λ (v_j(i) − v_i)`; λ a scalar or `[B, T]`."""
  lam = jnp.asarray(lam, v_BT_.dtype)
  lam = jnp.reshape(lam, lam.shape + (1,) * (v_BT_.ndim - lam.ndim))
  return v_BT_ + lam * (gather_rows(v_BT_, j_BT) - v_BT_)


def causal_distance(logits_BTV: jax.Array, target_BTV: jax.Array, mask_BT: jax.Array | None,
                    distance: str = "mse") -> jax.Array:
  """Distance of the interpolated run's logits from the interpolated targets (constant).

  `mse`: mean over masked tokens × vocab of (logits − target)²; `kl`: mean over masked tokens of
  KL(softmax(target) ‖ softmax(logits)).
  """
  if distance not in CAUSAL_DISTANCES:
    raise ValueError(f"causal distance={distance!r} is unknown; choose one of "
                     f"{CAUSAL_DISTANCES}.")
  chex.assert_equal_shape([logits_BTV, target_BTV])
  target_BTV = jax.lax.stop_gradient(target_BTV)
  if distance == "kl":
    return logits_kl(target_BTV, logits_BTV, mask_BT)
  w = _token_weights(mask_BT, logits_BTV.shape[:-1])[..., None]
  sq = jnp.square(logits_BTV.astype(jnp.float32) - target_BTV.astype(jnp.float32))
  return jnp.sum(w * sq) / (jnp.maximum(jnp.sum(w), 1.0) * logits_BTV.shape[-1])


def draw_lambda(key: jax.Array, mode: str, fixed: jax.Array, shape_BT: tuple[int, int]
                ) -> jax.Array:
  """λ: one U(0, 1) draw per step (`step`, scalar), one per token (`token`, `[B, T]`), or the
  variant's `fixed` value."""
  if mode not in CAUSAL_LAMBDAS:
    raise ValueError(f"causal lambda mode={mode!r} is unknown; choose one of {CAUSAL_LAMBDAS}.")
  if mode == "step":
    return jax.random.uniform(key, ())
  if mode == "token":
    return jax.random.uniform(key, shape_BT)
  return jnp.asarray(fixed, jnp.float32)


def causal_ramp(step: jax.Array, start: jax.Array, ramp: jax.Array) -> jax.Array:
  """β's multiplier at `step`: 0 before `start` (the plain pre-training phase), then a linear
  ramp over `ramp` steps to 1 (`ramp` 0: 1 at once)."""
  step = jnp.asarray(step, jnp.float32)
  start = jnp.asarray(start, jnp.float32)
  ramp = jnp.asarray(ramp, jnp.float32)
  up = jnp.clip((step - start + 1) / jnp.maximum(ramp, 1.0), 0.0, 1.0)
  return jnp.where(step < start, 0.0, jnp.where(ramp > 0, up, 1.0))


def downstream_sites(model_config: model_lib.ModelConfig, sae_site: str,
                     include_final: bool = True) -> tuple[str, ...]:
  """The in_to_orig sites H: every `resid_post.{l}` strictly after `sae_site` in forward order.

  `include_final=False` drops `resid_post.{L-1}`, reproducing the e2e paper's omission. (A site
  holding the same tensor as the SAE site, e.g. `resid_post.{l-1}` for `resid_pre.{l}`, is not
  after it.) May be empty; `in_to_orig` then raises.
  """
  names = model_lib.site_names(model_config)
  if sae_site not in names:
    raise ValueError(f"Unknown SAE site {sae_site!r}; valid sites are: {', '.join(names)}.")
  order = {n: i for i, n in enumerate(names)}
  last = model_config.n_layers - 1
  return tuple(f"resid_post.{l}" for l in range(model_config.n_layers)
               if order[f"resid_post.{l}"] > order[sae_site] and (include_final or l != last))


# ------------------------------------------------------------------------------------------------
# Presets.


@dataclasses.dataclass(frozen=True)
class LossConfig:
  """Static loss structure (part of a compilation group).

  Attributes:
    preset: `local` (out_to_in + sparsity), `e2e` (logits_kl + sparsity; out_to_in logged), or
      `e2e_ds` (logits_kl + in_to_orig + sparsity; out_to_in logged).
    sparsity_p: the sparsity norm's order (> 0).
    sparsity_reduction: `e2e_sae` or `sum_batch` (Menon).
    include_final_resid: whether H includes the final `resid_post` (the e2e paper omitted it).
    causal: add the causal-interpolation term (its coefficient β is `LossCoeffs.causal`).
    causal_lambda: `step` (λ ~ U(0,1) once per step), `token` (per token) or `fixed`.
    causal_target: `clean` (interpolate the clean model's logits, the original code) or `sae`
      (the logits of the SAE-reconstructed run, the paper's definition; held constant).
    causal_distance: `mse` on logits or `kl`.
  """

  preset: str = "local"
  sparsity_p: float = 1.0
  sparsity_reduction: str = "e2e_sae"
  include_final_resid: bool = True
  causal: bool = False
  causal_lambda: str = "step"
  causal_target: str = "sae"
  causal_distance: str = "mse"

  def __post_init__(self):
    if self.preset not in PRESETS:
      raise ValueError(f"LossConfig.preset={self.preset!r} is unknown; choose one of {PRESETS}.")
    if self.sparsity_reduction not in REDUCTIONS:
      raise ValueError(f"LossConfig.sparsity_reduction={self.sparsity_reduction!r} is unknown; "
                       f"choose one of {REDUCTIONS}.")
    if isinstance(self.sparsity_p, bool) or not (isinstance(self.sparsity_p, (int, float))
                                                 and self.sparsity_p > 0):
      raise ValueError(f"LossConfig.sparsity_p must be a number > 0, got {self.sparsity_p!r}.")
    for name, options in (("causal_lambda", CAUSAL_LAMBDAS), ("causal_target", CAUSAL_TARGETS),
                          ("causal_distance", CAUSAL_DISTANCES)):
      if getattr(self, name) not in options:
        raise ValueError(f"LossConfig.{name}={getattr(self, name)!r} is unknown; choose one of "
                         f"{options}.")

  @property
  def terms(self) -> tuple[str, ...]:
    """The terms computed (and logged) for this preset."""
    base = {"local": ("out_to_in", "sparsity"),
            "e2e": ("logits_kl", "out_to_in", "sparsity"),
            "e2e_ds": ("logits_kl", "in_to_orig", "out_to_in", "sparsity")}[self.preset]
    return base + ("causal",) if self.causal else base

  def downstream_sites(self, model_config: model_lib.ModelConfig,
                       sae_site: str) -> tuple[str, ...]:
    """H for an SAE at `sae_site`, honouring `include_final_resid` (see `downstream_sites`)."""
    return downstream_sites(model_config, sae_site, self.include_final_resid)

  @property
  def needs_spliced_forward(self) -> bool:
    """Whether the trainer must run the model from the SAE site with the SAE spliced in."""
    return "logits_kl" in self.terms

  @property
  def needs_sequences(self) -> bool:
    """Whether the SAE runs on whole `[B, T]` sequences (spliced forward or causal term), not
    on the gathered selected tokens."""
    return self.needs_spliced_forward or self.causal

  @property
  def needs_clean_logits(self) -> bool:
    """Whether the shared clean forward must run to the logits."""
    return self.needs_spliced_forward or (self.causal and self.causal_target == "clean")

  @property
  def needs_downstream(self) -> bool:
    """Whether that forward must collect the downstream sites (in_to_orig)."""
    return "in_to_orig" in self.terms


@flax.struct.dataclass
class LossCoeffs:
  """Dynamic per-variant coefficients of each term (scalars; stacked on N for a grid)."""

  sparsity: jax.Array
  out_to_in: jax.Array
  logits_kl: jax.Array
  in_to_orig: jax.Array
  causal: jax.Array  # β of the causal-interpolation term
  auxk: jax.Array  # AuxK's alpha (only SAEs with k_aux > 0 have the term)
  matryoshka: jax.Array  # weight of the summed prefix losses (only Matryoshka SAEs have them)
  gated_aux: jax.Array  # weight of a gated SAE's auxiliary reconstruction


def default_coeffs(config: LossConfig, sparsity: float, **overrides: float) -> LossCoeffs:
  """The preset's coefficients: local out_to_in 1; e2e logits_kl 1 (out_to_in 0); e2e_ds
  logits_kl 0.5, in_to_orig 2.5 (the paper's middle-layer value; 0.05 for the last layer),
  out_to_in 0. Terms outside the preset (and the causal β) get 0; AuxK's alpha
  `AUXK_COEFF`; Matryoshka prefixes 1 (each weighs as the full reconstruction); the gated
  auxiliary reconstruction 1 (the paper's unweighted sum)."""
  values = {"local": dict(out_to_in=1.0, logits_kl=0.0, in_to_orig=0.0),
            "e2e": dict(out_to_in=0.0, logits_kl=1.0, in_to_orig=0.0),
            "e2e_ds": dict(out_to_in=0.0, logits_kl=0.5, in_to_orig=2.5)}[config.preset]
  values["sparsity"] = sparsity
  values["causal"] = 0.0
  values["auxk"] = AUXK_COEFF
  values["matryoshka"] = 1.0
  values["gated_aux"] = 1.0
  unknown = set(overrides) - set(COEFF_NAMES)
  if unknown:
    raise ValueError(f"Unknown LossCoeffs field(s) {sorted(unknown)}; valid: {COEFF_NAMES}.")
  values.update(overrides)
  coeffs = LossCoeffs(**{k: jnp.asarray(v, jnp.float32) for k, v in values.items()})
  check_coeffs(coeffs)
  return coeffs


def check_coeffs(coeffs: LossCoeffs) -> None:
  """Validates concrete (possibly stacked) coefficients: finite and >= 0."""
  for name in COEFF_NAMES:
    v = np.asarray(getattr(coeffs, name))
    if not (np.all(np.isfinite(v)) and np.all(v >= 0)):
      raise ValueError(f"LossCoeffs.{name} must be finite and >= 0, got {v.tolist()}.")


def compute_terms(config: LossConfig, *, d_in: int, codes: jax.Array, x_hat: jax.Array,
                  target: jax.Array, mask: jax.Array | None,
                  clean_logits: jax.Array | None = None, spliced_logits: jax.Array | None = None,
                  spliced_acts: Mapping[str, jax.Array] | None = None,
                  clean_acts: Mapping[str, jax.Array] | None = None,
                  causal: jax.Array | None = None, auxk: jax.Array | None = None,
                  prefix_x_hats: Mapping[int, jax.Array] | None = None,
                  gate_x_hat: jax.Array | None = None,
                  clean_logp: jax.Array | None = None, annealed_rescale: Any = False,
                  annealed_p: jax.Array | None = None) -> dict[str, jax.Array]:
  """Every term of the preset, coefficient-free (sparsity with coeff 1).

  Args:
    config: the loss structure.
    d_in: SAE input width.
    codes: `[B, T, F]` latents (JumpReLU L0: pass the gates).
    x_hat, target: `[B, T, D]` SAE output and what it reconstructs (`aux['target']`).
    mask: bool `[B, T]` or None.
    clean_logits, spliced_logits: `[B, T, V]`, needed when `config.needs_spliced_forward`.
    clean_logp: optional `clean_log_probs(clean_logits)`, used instead of `clean_logits` (the
      trainer computes it once per batch for all variants).
    spliced_acts, clean_acts: site -> `[B, T, D]` over H, needed when `config.needs_downstream`.
    causal: the causal-interpolation distance (`causal_distance` of the interpolated run, which
      the trainer computes since it runs the model), needed when `config.causal`.
    auxk: the `auxk` term of an SAE with AuxK (the SAE's business, not the preset's): logged
      and weighted by `LossCoeffs.auxk` when given.
    prefix_x_hats: a Matryoshka SAE's inner prefix reconstructions (width -> `[..., D]`): the
      `matryoshka` term and one `matryoshka/<m>` entry per prefix when given.
    gate_x_hat: a gated SAE's gate-path reconstruction through the frozen decoder: the
      `gated_aux` term (out_to_in against `target`) when given.
    annealed_p: p-annealing's traced order (`anneal_p`): when given, the sparsity term is
      `sparsity_annealed` at that p (which needs `config.sparsity_p` = 1).
    annealed_rescale: with `annealed_p`, `sparsity_annealed`'s traced `rescale`.

  Returns:
    name -> scalar for each of `config.terms`, plus `in_to_orig/<site>` per downstream site.
  """
  if annealed_p is None:
    sparse = sparsity(codes, mask, d_in, 1.0, config.sparsity_p, config.sparsity_reduction)
  elif config.sparsity_p != 1:
    raise ValueError(f"p-annealing starts from p = 1; got LossConfig.sparsity_p="
                     f"{config.sparsity_p} (set sparsity_p=1 or turn p-annealing off).")
  else:
    sparse = sparsity_annealed(codes, mask, d_in, annealed_p, config.sparsity_reduction,
                               rescale=annealed_rescale)
  terms = {"sparsity": sparse, "out_to_in": out_to_in(x_hat, target, mask)}
  if config.needs_spliced_forward:
    if (clean_logits is None and clean_logp is None) or spliced_logits is None:
      raise ValueError(f"Preset {config.preset!r} needs clean_logits and spliced_logits.")
    if clean_logp is None:
      clean_logp = clean_log_probs(clean_logits)
    terms["logits_kl"] = logits_kl_from_log_probs(clean_logp, spliced_logits, mask)
  if config.needs_downstream:
    if spliced_acts is None or clean_acts is None:
      raise ValueError(f"Preset {config.preset!r} needs spliced_acts and clean_acts.")
    terms["in_to_orig"], per_site = in_to_orig(spliced_acts, clean_acts, mask)
    terms.update({f"in_to_orig/{h}": v for h, v in per_site.items()})
  if config.causal:
    if causal is None:
      raise ValueError("LossConfig.causal needs the causal term (causal=...).")
    terms["causal"] = causal
  if auxk is not None:
    terms["auxk"] = auxk
  if gate_x_hat is not None:
    terms["gated_aux"] = out_to_in(gate_x_hat, target, mask)
  if prefix_x_hats:
    terms["matryoshka"], per_prefix = matryoshka(prefix_x_hats, target, mask)
    terms.update(per_prefix)
  return terms


def total_loss(terms: Mapping[str, jax.Array],
               coeffs: LossCoeffs) -> tuple[jax.Array, dict[str, jax.Array]]:
  """`Σ_name coeff_name · terms[name]` over the `COEFF_NAMES` present in `terms`.

  Returns:
    `(total, logs)`: logs holds every given term (coefficient-free, also at coefficient 0, and
    extra entries such as per-site values) plus `total`.
  """
  total = sum(getattr(coeffs, name) * terms[name] for name in COEFF_NAMES if name in terms)
  return total, {**terms, "total": total}
