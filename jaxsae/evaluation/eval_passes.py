"""The eval job's held-out data and its compiled metric passes.

`heldout` samples the held-out set; `reference_sums` (first pass) gives the held-out means;
`clean_pass` runs the clean model (and the zero / mean ablations) once per batch for every
group; `group_pass` computes the per-batch sums of every metric for all variants of one group;
`finalize` turns the summed batches into the metrics below. `evaluate.py` drives them over
batches and groups.

Data. Held-out batch k is `grammars.sample(fold_in(fold_in(key(seed), 1000), k), ...)` and the
generations of `spliced_generation.spliced_grammaticality` use `fold_in(key(seed), 1001)` (batch
i: its `fold_in(., i)`). SAE training uses the branches 1 (data), 2 (capacity probe) and 3 (pre-bias
sample) of its own root key, the LM job 0-4 of the LM's root: the streams never share a key.
Sequences are sampled at the grid's `max_len`; the model sees the first `forward_len`
positions, as in training.

Which tokens count. `mask_BT` (sentence tokens, or every non-pad position: the grid's
`positions` unless told otherwise) selects the tokens of every activation metric. Output
metrics (CE, KL, top-1, TV, grammatical mass) count the *predictions* of those positions:
position t (logits predicting token t+1) counts iff `mask_BT[t]` and token t+1 is not `<pad>`
(train_lm's rule: pad targets are ignored). With sentence tokens that is every sentence
position, predicting the next sentence token or `<eos>`; with all positions, the decorator
positions predicting the decorator and the first word, then the sentence.

Where the SAE goes. `positions='sentence'` splices the SAE (and the zero / mean ablations)
at the `mask_BT` tokens only, the clean activation elsewhere (what SAE training does);
`positions='all'` splices at every position, decorator and padding included (padding cannot
affect earlier positions). The splice mode is the group's `splice_mode` unless overridden.

Transcoders (a grid with `target_site` 'mlp_out.{l}' and site 'mlp_in.{l}'). The codes (L0,
firing, alive / dead) come from the transcoder applied to the site's activation, MLP l's
input; x below is the clean activation at the target, MLP l's output, at the same tokens (mse,
nmse, EV, norm_ratio, the mean-ablation value and the zero / mean ablations are all of MLP l's
output). The spliced forward replaces MLP l's output by the transcoder's at the spliced
positions and resumes at resid_post.l = (resid_pre.l + attn_out.l) + that output, the sum block
l forms (`spliced_forward`); nothing upstream of mlp_out.l changes, so the transcoder's input
in that forward IS the clean mlp_in.l activation (`splice_group`). CE, KL, top-1, TV,
grammatical mass and ds_* follow as for SAEs (ds sites: resid_post.l onwards). Transcoders
have no input / recon norm, so both splice modes are the same function.

Metrics per variant (all exact token means over the whole held-out set: per-batch sums, added
in float64 on the host, divided at the end). x = clean activation at the site (a transcoder's
target), x̂ = the spliced activation (in the model's space, i.e. after the splice mode's rescaling), mu = mean of x
over the held-out `mask_BT` tokens (a first pass computes it), LN = layer norm without affine
and eps 1e-5 (e2e_sae's `_layer_norm_pre`; the formulas are `metrics.py`'s):

    l0                mean over tokens of #(latents != 0); frac_zeros = 1 - l0 / F
    alive, dead       latents firing at least once / never in the first `window_tokens` masked
                      tokens (0: all of them); dense: firing on > 10% of them; *_fraction of F;
                      density_histogram: alive latents per log10(firing frequency) bin
                      (`metrics.DENSITY_BIN_EDGES`; below -6 goes to the first bin)
    mse               mean over tokens × dims of (x̂ - x)²  (mse_sae_space: x_hat vs the SAE's
                      own target, what the training loss saw; differs only under input/recon
                      norm)
    nmse              Σ‖x̂ - x‖² / Σ‖x‖²   (relative to the zero reconstruction)
    ev_token_mean     mean over tokens of 1 - Σ_d (x̂-x)² / Σ_d (x-mu)²   (e2e_sae's form)
    ev_ratio_of_sums  1 - Σ_tokens Σ_d (x̂-x)² / Σ_tokens Σ_d (x-mu)²   (1 - FVU)
    ev_layernorm      the token-mean form on LN(x̂), LN(x), with mu = mean of LN(x) (e2e_sae's
                      `layer_norm=True`)
    ce_clean, ce_spliced, ce_increase = ce_spliced - ce_clean  (next-token CE, nats)
    kl                mean over predictions of KL(p_clean ‖ p_spliced)
    top1_agreement    fraction of predictions with argmax p_clean = argmax p_spliced
    total_variation   mean over predictions of ½ Σ_v |p_clean - p_spliced|
    ce_zero_ablation, ce_mean_ablation  CE with the site replaced by 0 / by mu (same positions)
    ce_recovered_zero, ce_recovered_mean = (CE_ablated - CE_spliced) / (CE_ablated - CE_clean)
    ds_mse/<site>, ds_ev/<site>  mse and token-mean EV of the spliced vs clean activation at
                      every later resid_post (mu: its held-out mean)
    grammatical_mass_clean / _spliced  mean over predictions of the probability mass on the
                      grammatical next tokens (`grammars.valid_next`)
    norm_ratio        mean over tokens of ‖x̂‖ / ‖x‖ (shrinkage: < 1 when the SAE meets its
                      sparsity penalty by shrinking codes rather than turning latents off)
    b_dec_norm        ‖b_dec + b_pre‖, the bias added to every reconstruction (NaN without
                      either; `evaluate` adds it)

Compilation: the clean forward runs once per batch and is shared by every variant of every
group; each group's metrics come from one jitted function of the stacked SAE params (static:
the SAE config, splice mode and positions), so a group compiles once whatever its size. Inside
it the variants are vmapped, or run one after another with `lax.map` where the grid's
`variant_loop` says so (its 'auto' picks the map on CPU, where it is faster; see
`variant_axis.over_variants`).
"""


from __future__ import annotations

import dataclasses
import functools
from typing import Mapping

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jaxsae import grammars
from jaxsae.core import variant_axis
from jaxsae.evaluation import spliced_generation
from jaxsae.grid import grid_step
from jaxsae.grid import losses as losses_lib
from jaxsae.grid import metrics as metrics_lib
from jaxsae.grid import sae as sae_lib
from jaxsae.lm import generate as generate_lib
from jaxsae.lm import model as model_lib

HELDOUT_STREAM = 1000  # held-out batch k: fold_in(fold_in(key(seed), 1000), k)
POSITIONS = ("sentence", "all")  # where the SAE is spliced for the held-out metrics
ALL_WINDOW = 2**30  # window_tokens=0: every evaluated token
# Sums per held-out sequence (`[B]` per batch, concatenated over batches, not added): the
# paired standard errors of CE increase and KL (the same sequences, clean and spliced).
SEQ_PREFIX = "seq/"



# ------------------------------------------------------------------------------------------------
# Held-out data.


@dataclasses.dataclass(frozen=True)
class HeldOut:
  """Held-out batches (host arrays; K batches of B sequences, T = the grid's forward_len).

  Attributes:
    tokens_KBT: int32 model inputs.
    next_KBT: int32 the token after each position (`<pad>` beyond the sampled sequence).
    mask_KBT: bool, the tokens that count (sentence tokens or non-pad positions).
    valid_KBTV: bool, grammatical next tokens of each prefix (`grammars.valid_next`).
  """

  tokens_KBT: np.ndarray
  next_KBT: np.ndarray
  mask_KBT: np.ndarray
  valid_KBTV: np.ndarray

  @property
  def num_batches(self) -> int:
    return self.tokens_KBT.shape[0]


def check_options(*, positions: str = "sentence", window_tokens: int = 0,
                  splice_mode: str | None = None, mask_positions: str | None = None) -> None:
  if positions not in POSITIONS:
    raise ValueError(f"positions={positions!r}: use 'sentence' (SAE at the mask's tokens) or "
                     "'all' (at every position)")
  spliced_generation.check_positive_int("window_tokens", window_tokens, minimum=0)
  if splice_mode is not None and splice_mode not in sae_lib.SPLICE_MODES:
    raise ValueError(f"splice_mode={splice_mode!r}: use one of {sae_lib.SPLICE_MODES} (or "
                     "None for each group's own)")
  if mask_positions is not None and mask_positions not in POSITIONS:
    raise ValueError(f"mask_positions={mask_positions!r}: use 'sentence', 'all' or None (the "
                     "grid's training positions)")


def heldout(setup: grid_step.Setup, seed: int, num_batches: int, batch_size: int, *,
            mask_positions: str | None = None) -> HeldOut:
  """Samples the held-out set: batch k from `fold_in(fold_in(key(seed), 1000), k)`.

  Args:
    setup: the grid's setup (grammar, max_len, forward_len, positions).
    seed: the evaluation seed.
    num_batches, batch_size: K and B.
    mask_positions: `sentence` or `all` (non-pad); default the grid's `positions`.
  """
  spliced_generation.check_positive_int("num_batches", num_batches)
  spliced_generation.check_positive_int("batch_size", batch_size)
  mask_positions = mask_positions or setup.positions
  if mask_positions not in POSITIONS:
    raise ValueError(f"mask_positions={mask_positions!r}: use 'sentence' or 'all'.")
  g = setup.grammar
  t = setup.forward_len
  key = jax.random.fold_in(jax.random.key(seed), HELDOUT_STREAM)
  valid_fn = generate_lib.jitted_for(g, grammars.valid_next)
  out = {"tokens": [], "next": [], "mask": [], "valid": []}
  for k in range(num_batches):
    batch = grammars.sample(jax.random.fold_in(key, k), g, batch_size, setup.max_len)
    full = np.asarray(batch.tokens)
    padded = np.concatenate([full, np.full_like(full[:, :1], g.pad_id)], axis=1)
    tokens = full[:, :t]
    out["tokens"].append(tokens)
    out["next"].append(padded[:, 1:t + 1])
    out["mask"].append(np.asarray(grammars.selected_mask(g, batch, mask_positions, t)))
    out["valid"].append(np.asarray(valid_fn(full))[:, :t])
  return HeldOut(*(np.stack(out[k]) for k in ("tokens", "next", "mask", "valid")))


# ------------------------------------------------------------------------------------------------
# The compiled passes.


@dataclasses.dataclass(frozen=True)
class Static:
  """What shapes the clean pass (hashable: a jit static argument).

  Attributes:
    model_config: the LM's.
    site: the grid's site, every SAE's input.
    ds_sites: the later resid_post sites (ds_mse / ds_ev).
    pad_id: the grammar's `<pad>`.
    splice_all: positions == 'all'.
    target: a transcoder grid's target site ('mlp_out.{l}', with site 'mlp_in.{l}'); '' for
      SAEs, which stand for their own input.
  """

  model_config: model_lib.ModelConfig
  site: str
  ds_sites: tuple[str, ...]
  pad_id: int
  splice_all: bool
  target: str = ""

  @property
  def out_site(self) -> str:
    """The site the SAE's output replaces and is measured against (x of the metrics)."""
    return self.target or self.site

  @property
  def mid_sites(self) -> tuple[str, ...]:
    """A transcoder's spliced forward resumes at resid_post.l = resid_pre.l + attn_out.l + its
    output (the sum block l forms there): the two clean terms it needs."""
    if not self.target:
      return ()
    layer = self.target.partition(".")[2]
    return (f"resid_pre.{layer}", f"attn_out.{layer}")


@dataclasses.dataclass(frozen=True)
class GroupStatic:
  """What shapes one group's pass."""

  base: Static
  sae: sae_lib.SAEConfig
  splice_mode: str
  variant_loop: str  # 'vmap' or 'map' (`variant_axis.over_variants`)


@flax.struct.dataclass
class Reference:
  """Held-out token means (over `mask_BT` tokens) of the clean activations.

  Attributes:
    mean_D: mu at the site the SAE's output replaces (`Static.out_site`: EV's centre, the
      mean-ablation value).
    ln_mean_D: mean of layer_norm(x) at the site (ev_layernorm's centre).
    ds_mean: downstream site -> its mean (ds_ev's centre).
  """

  mean_D: jax.Array
  ln_mean_D: jax.Array
  ds_mean: dict[str, jax.Array]


@flax.struct.dataclass
class Clean:
  """One batch's clean forward and masks, shared by every variant of every group."""

  acts_BTD: jax.Array
  logits_BTV: jax.Array
  ds_acts: dict[str, jax.Array]
  mask_BT: jax.Array
  predict_BT: jax.Array
  window_BT: jax.Array
  next_BT: jax.Array
  valid_BTV: jax.Array
  # Transcoder grids (`Static.target`): the clean target activation (x of the metrics; acts_BTD
  # is then the SAE input at mlp_in.l) and resid_pre.l + attn_out.l (`spliced_forward`).
  target_BTD: jax.Array | None = None
  resid_mid_BTD: jax.Array | None = None

  def measured(self) -> jax.Array:
    """x of the metrics: the clean activation the SAE's output replaces."""
    return self.acts_BTD if self.target_BTD is None else self.target_BTD


def _masked_sum(values: jax.Array, mask: jax.Array) -> jax.Array:
  return jnp.sum(jnp.where(mask, values, 0.0))


def spliced_forward(lm_params, out_BTD: jax.Array, c: Clean, st: Static,
                    collect: tuple[str, ...] = ()) -> model_lib.ForwardResult:
  """The frozen model from the splice on, with `out_BTD` (clean where unspliced) at
  `st.out_site`: from the site for SAEs; for a transcoder, in place of MLP l's output, from
  resid_post.l = (resid_pre.l + attn_out.l) + out (upstream of mlp_out.l nothing changes, so
  the clean terms are those of the spliced forward)."""
  if not st.target:
    return model_lib.apply_from(lm_params, st.site, out_BTD, st.model_config, collect=collect)
  start = f"resid_post.{st.target.partition('.')[2]}"
  return model_lib.apply_from(lm_params, start, c.resid_mid_BTD + out_BTD, st.model_config,
                              collect=collect)


@functools.partial(jax.jit, static_argnames=("st",))
def reference_sums(lm_params, tokens_BT, mask_BT, *, st: Static):
  last = st.ds_sites[-1] if st.ds_sites else st.out_site
  res = model_lib.apply(lm_params, tokens_BT, st.model_config,
                        collect=(st.out_site, *st.ds_sites), stop_at=last)
  w = mask_BT.astype(jnp.float32)[..., None]
  total = lambda a: jnp.sum(w * a, axis=(0, 1))
  x = res.acts[st.out_site]
  return {"x": total(x), "ln": total(metrics_lib.layer_norm(x)),
          **{f"ds/{h}": total(res.acts[h]) for h in st.ds_sites}}


@functools.partial(jax.jit, static_argnames=("st",))
def clean_pass(lm_params, tokens_BT, next_BT, mask_BT, valid_BTV, ref: Reference, window_left,
               *, st: Static):
  """The clean forward, the ablation baselines and the clean sums of one batch."""
  mc = st.model_config
  extra = (*st.mid_sites, st.target) if st.target else ()
  clean = model_lib.apply(lm_params, tokens_BT, mc, collect=(st.site, *extra, *st.ds_sites))
  tc = {}
  if st.target:
    mid = clean.acts[st.mid_sites[0]] + clean.acts[st.mid_sites[1]]
    tc = dict(target_BTD=clean.acts[st.target], resid_mid_BTD=mid)
  x = clean.acts[st.out_site]
  predict = mask_BT & (next_BT != st.pad_id)
  flat = mask_BT.reshape(-1)
  rank = jnp.cumsum(flat.astype(jnp.int32)).reshape(mask_BT.shape)
  window = mask_BT & (rank <= window_left)
  splice_at = jnp.ones_like(mask_BT) if st.splice_all else mask_BT

  def ablated_ce(value_BTD):
    out = jnp.where(splice_at[..., None], value_BTD, x)
    logits = spliced_forward(lm_params, out, c, st).logits
    return _masked_sum(metrics_lib.token_cross_entropy(logits, next_BT), predict)

  c = Clean(acts_BTD=clean.acts[st.site], logits_BTV=clean.logits,
            ds_acts={h: clean.acts[h] for h in st.ds_sites}, mask_BT=mask_BT, predict_BT=predict,
            window_BT=window, next_BT=next_BT, valid_BTV=valid_BTV, **tc)
  w = mask_BT.astype(jnp.float32)
  sums = {
      "tokens": jnp.sum(w),
      "predictions": jnp.sum(predict.astype(jnp.float32)),
      "window": jnp.sum(window.astype(jnp.float32)),
      "var": jnp.sum(w * jnp.sum(jnp.square(x - ref.mean_D[None, None, :]), axis=-1)),
      "sq_x": jnp.sum(w * jnp.sum(jnp.square(x), axis=-1)),
      "ce_clean": _masked_sum(metrics_lib.token_cross_entropy(clean.logits, next_BT), predict),
      "mass_clean": _masked_sum(metrics_lib.token_grammatical_mass(clean.logits, valid_BTV),
                                predict),
      "ce_zero": ablated_ce(jnp.zeros_like(x)),
      "ce_mean": ablated_ce(jnp.broadcast_to(ref.mean_D[None, None, :], x.shape)),
      SEQ_PREFIX + "predictions": jnp.sum(predict.astype(jnp.float32), axis=1),
  }
  return c, sums


@functools.partial(jax.jit, static_argnames=("st",))
def group_pass(sae_params, sae_state, hparams, lm_params, c: Clean, ref: Reference, *,
               st: GroupStatic):
  """Per-variant sums of one batch for a whole group (over the leading axis N: vmapped, or
  `lax.map` where the grid's `variant_loop` says so, as in training)."""
  b = st.base
  x = c.measured()
  w = c.mask_BT.astype(jnp.float32)
  ce_clean_BT = metrics_lib.token_cross_entropy(c.logits_BTV, c.next_BT)
  per_sequence = lambda v_BT: jnp.sum(jnp.where(c.predict_BT, v_BT, 0.0), axis=1)

  def one(params, state, hp):
    out, codes, aux = splice_group(params, state, hp, c, st)
    nonzero = codes != 0
    res = spliced_forward(lm_params, out, c, b, collect=b.ds_sites)
    logits = res.logits
    sums = {
        "l0": jnp.sum(w * jnp.sum(nonzero, axis=-1)),
        "sq_err": jnp.sum(w * metrics_lib.token_sq_error(out, x)),
        "sq_err_sae": jnp.sum(w * metrics_lib.token_sq_error(aux["x_hat"], aux["target"])),
        "ev_tok": jnp.sum(w * metrics_lib.token_explained_variance(out, x, ref.mean_D)),
        "norm_ratio": jnp.sum(w * jnp.linalg.norm(out, axis=-1)
                              / jnp.maximum(jnp.linalg.norm(x, axis=-1), 1e-12)),
        "ev_ln_tok": jnp.sum(w * metrics_lib.token_explained_variance(
            metrics_lib.layer_norm(out), metrics_lib.layer_norm(x),
                                                          ref.ln_mean_D)),
        "ce": _masked_sum(metrics_lib.token_cross_entropy(logits, c.next_BT), c.predict_BT),
        "kl": _masked_sum(metrics_lib.token_kl(c.logits_BTV, logits), c.predict_BT),
        "tv": _masked_sum(metrics_lib.token_total_variation(c.logits_BTV, logits), c.predict_BT),
        "top1": _masked_sum(metrics_lib.token_top1_agreement(c.logits_BTV, logits),
                            c.predict_BT),
        "mass": _masked_sum(metrics_lib.token_grammatical_mass(logits, c.valid_BTV),
                            c.predict_BT),
    }
    # Per-sequence sums [B] (SEQ_PREFIX): the paired standard errors of `finalize`.
    ce_BT = metrics_lib.token_cross_entropy(logits, c.next_BT)
    sums[SEQ_PREFIX + "ce_increase"] = per_sequence(ce_BT - ce_clean_BT)
    sums[SEQ_PREFIX + "kl"] = per_sequence(metrics_lib.token_kl(c.logits_BTV, logits))
    for h in b.ds_sites:
      sums[f"ds_sq_err/{h}"] = jnp.sum(
          w * metrics_lib.token_sq_error(res.acts[h], c.ds_acts[h]))
      sums[f"ds_ev_tok/{h}"] = jnp.sum(
          w * metrics_lib.token_explained_variance(res.acts[h], c.ds_acts[h], ref.ds_mean[h]))
    fired = metrics_lib.latent_fire_counts(codes, c.window_BT).astype(jnp.int32)
    return sums, fired

  return variant_axis.over_variants(one, st.variant_loop)(sae_params, sae_state, hparams)


def splice_group(params, state, hp, c: Clean, st: GroupStatic):
  """One variant's `(out, codes, aux)` as `sae.splice` gives them, `aux['target']` what x̂
  stands for. An SAE replaces its input; a transcoder encodes the clean mlp_in.l activation
  (that of the spliced forward too: mlp_out.l is downstream of it) and its output replaces the
  clean mlp_out.l, x̂'s target. Unspliced tokens (positions 'sentence') keep the clean value."""
  mask = None if st.base.splice_all else c.mask_BT
  if not st.base.target:
    return sae_lib.splice(params, c.acts_BTD, st.sae, hp, st.splice_mode, mask=mask, state=state)
  x_hat, codes, aux = sae_lib.forward(params, c.acts_BTD, st.sae, hp, state=state, mask=mask)
  out = sae_lib.to_model_space(x_hat, c.target_BTD, st.sae, st.splice_mode, mask)
  return out, codes, {**aux, "target": c.target_BTD}


def check_target(spec, setup: grid_step.Setup) -> None:
  """A group is evaluated as a transcoder iff its grid is one (`grid_step.target_site`).

  Raises:
    ValueError: the group's target_site differs from the grid's.
  """
  grid_target = grid_step.target_site(setup)
  if spec.target_site != grid_target:
    raise ValueError(f"group {spec.name}: target_site={spec.target_site!r} but the setup's "
                     f"groups have {grid_target!r}; evaluate a group with the setup of its own "
                     "grid (trained.load(workdir).setup)")


def finalize(clean: Mapping[str, float], sums: Mapping[str, np.ndarray], fired: np.ndarray,
             st: GroupStatic) -> dict[str, np.ndarray]:
  """Ratios of the accumulated sums (float64), per variant `[N]`."""
  n = fired.shape[0]
  width, d = st.sae.width, st.base.model_config.d_model
  tok, pred, win = clean["tokens"], clean["predictions"], clean["window"]
  full = lambda v: np.full((n,), v, np.float64)
  with np.errstate(divide="ignore", invalid="ignore"):
    m = {
        "l0": sums["l0"] / tok,
        "frac_zeros": 1.0 - sums["l0"] / (tok * width),
        "mse": sums["sq_err"] / (tok * d),
        "mse_sae_space": sums["sq_err_sae"] / (tok * d),
        "nmse": sums["sq_err"] / clean["sq_x"],
        "ev_token_mean": sums["ev_tok"] / tok,
        "ev_ratio_of_sums": 1.0 - sums["sq_err"] / clean["var"],
        "ev_layernorm": sums["ev_ln_tok"] / tok,
        "norm_ratio": sums["norm_ratio"] / tok,
        "ce_clean": full(clean["ce_clean"] / pred),
        "ce_spliced": sums["ce"] / pred,
        "kl": sums["kl"] / pred,
        "top1_agreement": sums["top1"] / pred,
        "total_variation": sums["tv"] / pred,
        "ce_zero_ablation": full(clean["ce_zero"] / pred),
        "ce_mean_ablation": full(clean["ce_mean"] / pred),
        "grammatical_mass_clean": full(clean["mass_clean"] / pred),
        "grammatical_mass_spliced": sums["mass"] / pred,
    }
    m["ce_increase"] = m["ce_spliced"] - m["ce_clean"]
    m["ce_recovered_zero"] = metrics_lib.ce_recovered(m["ce_zero_ablation"], m["ce_spliced"],
                                                      m["ce_clean"])
    m["ce_recovered_mean"] = metrics_lib.ce_recovered(m["ce_mean_ablation"], m["ce_spliced"],
                                                      m["ce_clean"])
    for name in ("ce_increase", "kl"):  # paired over held-out sequences
      m[f"{name}_se"] = ratio_se(sums[SEQ_PREFIX + name], clean[SEQ_PREFIX + "predictions"])
    for h in st.base.ds_sites:
      m[f"ds_mse/{h}"] = sums[f"ds_sq_err/{h}"] / (tok * d)
      m[f"ds_ev/{h}"] = sums[f"ds_ev_tok/{h}"] / tok
  m.update(metrics_lib.latent_counts(fired, int(win)))
  m["density_histogram"] = metrics_lib.density_histogram(fired, int(win))
  m["firing_counts"] = fired
  m["window_tokens"] = full(win)
  return m


def ratio_se(num_NS: np.ndarray, den_S: np.ndarray) -> np.ndarray:
  """Standard error of the ratio of sums Σ_s num / Σ_s den over S sampled sequences, per row.

  The linearised (delta-method) estimator of a ratio mean, with sequences as the sampled
  units: SE = sqrt(S / (S − 1) · Σ_s (num_s − r · den_s)²) / Σ_s den_s with r the ratio. For a
  per-token mean over sequences of different lengths (CE increase, KL per predicted token) it
  carries the correlation of tokens within a sequence, and since num is the paired difference
  (spliced − clean on the same tokens) the clean model's own spread cancels. NaN for S < 2.
  """
  num_NS = np.asarray(num_NS, np.float64)
  den_S = np.asarray(den_S, np.float64)
  s = den_S.shape[-1]
  if s < 2:
    return np.full(num_NS.shape[:-1], np.nan)
  total = den_S.sum()
  r = num_NS.sum(axis=-1, keepdims=True) / total
  resid = num_NS - r * den_S
  return np.sqrt(s / (s - 1) * np.sum(resid * resid, axis=-1)) / total


def static_for(setup: grid_step.Setup, positions: str) -> Static:
  mc = setup.model_config
  return Static(model_config=mc, site=setup.site,
                ds_sites=losses_lib.downstream_sites(mc, setup.site, include_final=True),
                pad_id=setup.grammar.pad_id, splice_all=positions == "all",
                target=grid_step.target_site(setup))
