"""Causal predictability: do strongly label-correlated SAE latents act on the model as their
labels predict?

`causal_predictability` tests latent-label pairs causally with the interventions of
`interventions.py` (measured by `effects.py`), one SAE variant (`SplicedSAE`) at a time under
`CausalSettings`: clamp the latent high (a quantile of its active values, times a scale) and low
(0) at every measured position, and check that the token classes the label predicts
(`EXPECTED_EFFECTS`) move in the direction given by the sign of the correlation. Per pair:
effect = w·(p_high − p_low) / ‖w‖₁, with w the expected per-class weights (classes of
`grammars.token_classes.token_classes`) and p the mean class probabilities. "Acts as predicted"
iff the signed effect sign(corr)·effect is > 0 and beats a null at 95%: the same signed effect
of random live latents of the SAE, clamped the same way (one-sided permutation p ≤ 0.05; a
latent unrelated to the label passes with probability ≤ 5%, so a tiny effect of the right sign
no longer counts). For English parts of speech w is derived from data (`EMPIRICAL`): the
regression slope of "the next token is in class c" on the label, over the measured positions.

The pieces: `label_columns` (per-token labels as float columns), `pearson` (latent × column
correlations), `expected_effects` (w per testable column) and `score_pairs` (the scoring, given
any function that measures the class shift of clamping latents).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxsae import grammars
from jaxsae.analysis import effects
from jaxsae.analysis import interventions
from jaxsae.core import stats
from jaxsae.grammars import token_classes
from jaxsae.grid import sae as sae_lib
from jaxsae.lm import model as model_lib

EMPIRICAL = "empirical"
NULL_LATENTS = 64  # random live latents clamped per SAE for the null of causal effects

# (family, label column) -> expected effect of increasing the label: ((token class, sign), ...),
# or EMPIRICAL (derived from data). A column is looked up by its full name ("top_type_after=0")
# first, then by its label name ("pos" for "pos=N"). Families (`grammars.token_classes.family`):
# `dyck`, `expr` (prefix and postfix), `english` (every other PCFG). Only effects the grammar
# forces are listed:
#   Dyck: deeper -> closers legal, <eos> not; empty stack -> <eos> legal, closers not; top of the
#     stack of type k -> closer k legal, the other not; an opener -> <eos> illegal.
#   Expr: a complete prefix -> <eos> legal; more pending operands (prefix: operands needed;
#     postfix: stack size >= 1) -> <eos> less legal.
#   English: a complete sentence -> <eos> legal; part of speech -> the categories that follow it.
EXPECTED_EFFECTS: dict[tuple[str, str], Any] = {
    ("dyck", "depth_after"): (("close", 1), ("eos", -1)),
    ("dyck", "stack_empty_after"): (("eos", 1), ("close", -1)),
    ("dyck", "top_type_after=0"): (("close0", 1), ("close1", -1)),
    ("dyck", "top_type_after=1"): (("close1", 1), ("close0", -1)),
    ("dyck", "is_open"): (("eos", -1),),
    ("expr", "eos_legal"): (("eos", 1),),
    ("expr", "pending_operands"): (("eos", -1),),
    ("english", "eos_legal"): (("eos", 1),),
    ("english", "pos"): EMPIRICAL,
}


# ------------------------------------------------------------------------------------------------
# Labels, correlations, expected effects.


def label_columns(grammar: grammars.Grammar, tokens_BT: jax.Array
                  ) -> tuple[tuple[str, ...], np.ndarray]:
  """Per-token labels as float columns: `(names, values [B, T, K])`, NaN where undefined.

  Binary and ordinal labels are one column each (`name`); categorical labels one 0/1 column per
  class (`name=class`, e.g. `top_type_after=0`, `pos=N`).
  """
  labels = {k: np.asarray(v) for k, v in grammars.labels(grammar, tokens_BT).items()}
  names, cols = [], []
  for name, info in grammars.label_info(grammar).items():
    lab = labels[name]
    defined = lab >= 0
    if info.kind == "categorical":
      for i, cls in enumerate(info.classes):
        names.append(f"{name}={cls}")
        cols.append(np.where(defined, (lab == i).astype(np.float32), np.nan))
    else:
      names.append(name)
      cols.append(np.where(defined, lab.astype(np.float32), np.nan))
  return tuple(names), np.stack(cols, axis=-1).astype(np.float32)


def pearson(codes_MF: np.ndarray, values_MK: np.ndarray) -> np.ndarray:
  """Pearson correlation `[F, K]` of each latent with each label column over the tokens where
  the label is defined (finite); NaN where either side is constant there."""
  x = np.asarray(codes_MF, np.float64)
  y = np.asarray(values_MK, np.float64)
  if x.ndim != 2 or y.ndim != 2 or x.shape[0] != y.shape[0]:
    raise ValueError(f"pearson needs codes [M, F] and labels [M, K] over the same tokens, got "
                     f"{x.shape} and {y.shape}.")
  w = np.isfinite(y).astype(np.float64)
  y = np.where(w > 0, y, 0.0)
  n = np.maximum(w.sum(0), 1.0)[None, :]
  sx, sxx = x.T @ w, (x * x).T @ w
  sy, syy = y.sum(0)[None, :], (y * y).sum(0)[None, :]
  cov = x.T @ y - sx * sy / n
  vx, vy = sxx - sx * sx / n, syy - sy * sy / n
  denom = np.sqrt(np.maximum(vx, 0) * np.maximum(vy, 0))
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.where(denom > 1e-12, cov / denom, np.nan)


def _table_entry(fam: str, name: str):
  entry = EXPECTED_EFFECTS.get((fam, name))
  return EXPECTED_EFFECTS.get((fam, name.split("=")[0])) if entry is None else entry


def expected_effects(grammar: grammars.Grammar, names: Sequence[str], tokens_BT: jax.Array,
                     mask_BT: jax.Array, *, label_values_BTK: np.ndarray | None = None,
                     empirical_fallback: bool = False) -> dict[str, np.ndarray]:
  """Expected per-class weights `[C]` (`grammars.token_classes`) for each testable column.

  From `EXPECTED_EFFECTS` (±1 per listed class); for `EMPIRICAL` entries (and, with
  `empirical_fallback`, unlisted columns) the slope of "next token in class c" regressed on the
  label over masked positions with a next token: for a 0/1 column,
  P(next in c | label = 1) − P(next in c | label = 0). Columns without data, or constant on
  it, are left out (untestable).

  Args:
    grammar: the LM's grammar.
    names: label column names (as `label_columns` names them).
    tokens_BT, mask_BT: data and the positions that count.
    label_values_BTK: optional float label values aligned with `names` (NaN where undefined);
      default: computed with `label_columns` (for English this runs the CKY parser).
    empirical_fallback: derive unlisted columns' expectations from data too.
  """
  class_names, member_CV = token_classes.token_classes(grammar)
  fam = token_classes.family(grammar)
  out: dict[str, np.ndarray] = {}
  need_data = []
  for name in names:
    entry = _table_entry(fam, name)
    if entry is None and empirical_fallback:
      entry = EMPIRICAL
    if entry == EMPIRICAL:
      need_data.append(name)
    elif entry is not None:
      w = np.zeros((len(class_names),), np.float64)
      for cls, sign in entry:
        if cls in class_names:
          w[class_names.index(cls)] = sign
      if np.any(w):
        out[name] = w
  if need_data:
    if label_values_BTK is None:
      col_names, values_BTK = label_columns(grammar, tokens_BT)
    else:
      col_names, values_BTK = tuple(names), np.asarray(label_values_BTK, np.float64)
      if values_BTK.shape != (*np.shape(tokens_BT), len(names)):
        raise ValueError(f"label_values_BTK has shape {values_BTK.shape}; it must be "
                         f"{(*np.shape(tokens_BT), len(names))} (one column per name).")
    tokens = np.asarray(tokens_BT)
    nxt_CBT = member_CV[:, tokens[:, 1:]].astype(np.float64)  # class of the next token
    mask = np.asarray(mask_BT, bool)[:, :-1]
    for name in need_data:
      if name not in col_names:
        continue
      y = values_BTK[:, :-1, col_names.index(name)].astype(np.float64)
      ok = mask & np.isfinite(y)
      if ok.sum() < 2 or np.var(y[ok]) <= 0:
        continue
      yc = y[ok] - y[ok].mean()
      slope = (nxt_CBT[:, ok] @ yc) / (yc @ yc)
      if np.any(slope):
        out[name] = slope
  return out


# ------------------------------------------------------------------------------------------------
# Causal predictability.


def _num(x) -> float | None:
  x = float(x)
  return x if np.isfinite(x) else None


def score_pairs(corr_FK: np.ndarray, names: Sequence[str], expected: Mapping[str, np.ndarray],
                class_names: Sequence[str],
                shift_fn: Callable[[np.ndarray], tuple[np.ndarray, list[dict[str, Any]]]], *,
                threshold: float = 0.5, max_pairs: int = 64,
                testable_latents: np.ndarray | None = None, null_latents: int = NULL_LATENTS,
                confidence: float = stats.CONFIDENCE, seed: int = 0) -> dict[str, Any]:
  """Scores strongly correlated (latent, label) pairs against their expected effects and a null.

  A pair (f, k) with expected weights w and correlation sign s has the signed effect
  s·w·shift_f / ‖w‖₁. Its null: the same quantity for up to `null_latents` live latents j
  unrelated to the label (|corr[j, k]| below the threshold, so j ≠ f), the first such latents
  in one random order of the live latents (`numpy.random.default_rng(seed)`, drawn once per
  call: labels share their null latents where they can), clamped the same way. The pair acts
  as predicted when its signed effect is > 0 and beats that null at `confidence`
  (`stats.null_test`: one-sided p = (1 + #{null ≥ effect}) / (1 + m) ≤ 1 − confidence): a
  latent unrelated to the label passes with probability at most 5%, whatever the sign.

  A label with fewer unrelated live latents than the test needs (`stats.min_null_size`, 19 at
  95%: a narrow or mostly dead SAE, or a label most live latents track) cannot be tested: its
  strong pairs are counted in `n_null_too_small`, neither tested nor in the fraction's
  denominator, instead of being reported as failures no effect could have avoided.

  Args:
    corr_FK: latent-label correlations; names: the K column names.
    expected: column name -> per-class weights [C] (e.g. `expected_effects`).
    class_names: the C class names.
    shift_fn: latents [U] -> (shift [U, C] = mean class probabilities with the latent clamped
      high minus clamped low, a list of U JSON-able dicts added to each pair's record).
    threshold: pairs with |corr| >= threshold are strong.
    max_pairs: test at most this many testable pairs, the strongest first.
    testable_latents: optional bool [F]; strong pairs of other latents (e.g. never active, so
      no high value to clamp to) are counted but not tested, and they are not in the null.
    null_latents: the most null latents per label (the tested latents' shifts and the union of
      the tested labels' nulls are measured in one `shift_fn` call).
    confidence: the null test's level; seed: the null sample's generator seed.

  Returns:
    JSON-able summary: counts (`n_strong`; of those `n_untestable_label`, `n_inactive_latent`,
    `n_null_too_small`, `n_testable`; `n_tested` = min(n_testable, max_pairs)), `n_as_predicted`,
    `fraction_as_predicted` with its Wilson interval `fraction_as_predicted_interval` [lo, hi],
    `n_right_sign` / `fraction_right_sign` (sign only, no null), `mean_effect` (± `mean_effect_se`
    over pairs) / `median_effect` (signed: > 0 is the predicted direction), `null` (the
    measured null latents, their number, the least a test needs, each tested label's own and
    the level), every tested pair in `pairs` (with `effect`, `signed_effect`, `right_sign`,
    `p_value`, `null_quantile`, `n_null`, `as_predicted`) and the failures in
    `not_as_predicted`.
  """
  corr = np.asarray(corr_FK, np.float64)
  if corr.ndim != 2 or corr.shape[1] != len(names):
    raise ValueError(f"corr_FK has shape {corr.shape} but {len(names)} column names were given; "
                     f"pass one name per column.")
  if not 0 < threshold <= 1:
    raise ValueError(f"threshold={threshold} must lie in (0, 1].")
  if not (isinstance(max_pairs, int) and max_pairs > 0):
    raise ValueError(f"max_pairs must be a positive int, got {max_pairs!r}.")
  if not (isinstance(null_latents, int) and null_latents >= 0):
    raise ValueError(f"null_latents must be an int >= 0, got {null_latents!r} (19 or more for a "
                     "test at 95%).")
  strong = np.isfinite(corr) & (np.abs(np.nan_to_num(corr)) >= threshold)
  f_idx, k_idx = np.nonzero(strong)
  has_exp = np.array([names[k] in expected for k in k_idx], bool)
  live_F = (np.ones(corr.shape[0], bool) if testable_latents is None
            else np.asarray(testable_latents, bool))
  live = live_F[f_idx]
  # Each label's null: the first `null_latents` live latents unrelated to it, in one random order.
  rng = np.random.default_rng(seed)
  order_live = rng.permutation(np.nonzero(live_F)[0])
  null_of = {}
  for k in np.unique(k_idx[has_exp & live]):
    weak = ~(np.abs(np.nan_to_num(corr[order_live, k], nan=0.0)) >= threshold)
    null_of[int(k)] = order_live[weak][:null_latents]
  min_null = stats.min_null_size(confidence)
  null_ok = np.array([int(k) in null_of and null_of[int(k)].size >= min_null for k in k_idx],
                     bool)
  test = has_exp & live & null_ok
  order = np.argsort(-np.abs(corr[f_idx[test], k_idx[test]]), kind="stable")[:max_pairs]
  pf, pk = f_idx[test][order], k_idx[test][order]
  tested_labels = sorted({int(k) for k in pk})
  pool = (np.unique(np.concatenate([null_of[k] for k in tested_labels])).astype(np.int64)
          if tested_labels else np.zeros((0,), np.int64))
  uniq = np.unique(np.concatenate([pf, pool])).astype(np.int64)
  shifts_UC, extras = shift_fn(uniq) if uniq.size else (np.zeros((0, len(class_names))), [])
  shifts_UC = np.asarray(shifts_UC, np.float64)
  row = {int(f): i for i, f in enumerate(uniq)}
  pairs = []
  for f, k in zip(pf, pk):
    w = np.asarray(expected[names[k]], np.float64)
    s = shifts_UC[row[int(f)]]
    effect = float(w @ s / np.sum(np.abs(w)))
    sign = np.sign(corr[f, k])
    null_rows = np.array([row[int(j)] for j in null_of[int(k)]], np.int64)
    null = sign * (shifts_UC[null_rows] @ w) / np.sum(np.abs(w))
    nt = stats.null_test(sign * effect, null, confidence=confidence)
    rec = {
        "latent": int(f), "label": names[k], "corr": float(corr[f, k]),
        "expected": {c: float(w[j]) for j, c in enumerate(class_names) if w[j]},
        "shift": {c: float(s[j]) for j, c in enumerate(class_names)},
        "effect": effect, "signed_effect": float(sign * effect),
        "right_sign": bool(sign * effect > 0), "p_value": nt["p_value"],
        "null_quantile": nt["null_quantile"], "n_null": nt["n_null"],
        "as_predicted": bool(sign * effect > 0 and nt["significant"]),
        "class_agreement": {c: bool(sign * w[j] * s[j] > 0)
                            for j, c in enumerate(class_names) if w[j]},
    }
    rec.update(extras[row[int(f)]] if extras else {})
    pairs.append(rec)
  n_tested = len(pairs)
  n_ok = sum(p["as_predicted"] for p in pairs)
  n_sign = sum(p["right_sign"] for p in pairs)
  effects = [p["signed_effect"] for p in pairs]
  frac = stats.fraction(n_ok, n_tested, confidence) if n_tested else None
  return {
      "threshold": float(threshold), "n_strong": int(strong.sum()),
      "n_untestable_label": int((~has_exp).sum()),
      "n_inactive_latent": int((has_exp & ~live).sum()),
      "n_null_too_small": int((has_exp & live & ~null_ok).sum()),
      "n_testable": int(test.sum()), "n_tested": n_tested, "n_as_predicted": int(n_ok),
      "fraction_as_predicted": n_ok / n_tested if n_tested else None,
      "fraction_as_predicted_interval": [frac["lo"], frac["hi"]] if frac else None,
      "n_right_sign": int(n_sign),
      "fraction_right_sign": n_sign / n_tested if n_tested else None,
      "mean_effect": float(np.mean(effects)) if effects else None,
      "mean_effect_se": stats.mean_se(effects)["se"] if len(effects) > 1 else None,
      "median_effect": float(np.median(effects)) if effects else None,
      "null": {"kind": "random live latents unrelated to the label", "latents": pool.tolist(),
               "size": int(pool.size), "min_size": min_null,
               "per_label": {names[k]: null_of[k].tolist() for k in tested_labels},
               "confidence": float(confidence), "seed": int(seed)},
      "untestable_labels": sorted({names[k] for k in k_idx[~has_exp]}),
      "pairs": pairs,
      "not_as_predicted": [p for p in pairs if not p["as_predicted"]],
  }


@dataclasses.dataclass(frozen=True)
class SplicedSAE:
  """One SAE variant spliced into the frozen LM at its site (inference mode).

  Attributes:
    lm_params, model_config: the frozen LM.
    site: the SAE's site.
    sae_params, sae_config, hparams: the variant.
    splice_mode: as `sae.splice`.
    sae_state: the variant's state, if its architecture has one.
  """

  lm_params: model_lib.Params
  model_config: model_lib.ModelConfig
  site: str
  sae_params: sae_lib.Params
  sae_config: sae_lib.SAEConfig
  hparams: sae_lib.SAEHparams
  splice_mode: str = "corrected"
  sae_state: sae_lib.SAEState | None = None


@dataclasses.dataclass(frozen=True)
class CausalSettings:
  """How `causal_predictability` picks, clamps and scores latent-label pairs.

  Attributes:
    threshold: pairs with |corr| >= threshold are strong (`score_pairs`).
    max_pairs: at most this many strong pairs are tested, strongest first (`score_pairs`).
    high_quantile, high_scale: the high clamp is `high_scale` × the latent's `high_quantile`
      quantile over the masked tokens where it fires (need 0 <= high_quantile <= 1,
      high_scale > 0).
    empirical_fallback: as `expected_effects`.
    chunk: latents per `lax.map` step of the clamp sweep (bounds memory).
    null_latents, null_seed: the random-latent null (`score_pairs`' `null_latents`, `seed`).
  """

  threshold: float = 0.5
  max_pairs: int = 64
  high_quantile: float = 0.95
  high_scale: float = 1.0
  empirical_fallback: bool = False
  chunk: int = 8
  null_latents: int = NULL_LATENTS
  null_seed: int = 0


def causal_predictability(sae: SplicedSAE, tokens_BT: jax.Array, mask_BT: jax.Array,
                          grammar: grammars.Grammar, corr_FK: np.ndarray, names: Sequence[str],
                          settings: CausalSettings = CausalSettings(), *,
                          label_values_BTK: np.ndarray | None = None) -> dict[str, Any]:
  """Do strongly label-correlated latents act on the model as their labels predict?

  For each pair with |corr| >= `settings.threshold` whose label has an expected effect
  (`EXPECTED_EFFECTS`, `expected_effects`), the latent is clamped high (`settings.high_scale` ×
  its `high_quantile` quantile
  over the masked tokens where it fires; e.g. 0.95 × 1, or 1.0 × 2 for twice its max) and low
  (0) at every masked position, and the mean class probabilities over those positions are
  compared (see `score_pairs`). Latents that never fire on the masked tokens are not tested.
  A pair acts as predicted only when its effect beats the same measurement on up to
  `null_latents` random live latents unrelated to its label at 95% (`score_pairs`); those latents
  cost one clamp pair each.

  Args:
    sae: the SAE variant and the LM it is spliced into.
    tokens_BT, mask_BT: the data and the positions intervened on and measured (e.g. sentence
      positions, `Batch.sentence_mask`).
    grammar: the LM's grammar (token classes, labels for the empirical expectations).
    corr_FK, names: a latent-label correlation matrix and its column names, e.g. `pearson` of
      `interventions.site_codes` and `label_columns` over the masked tokens.
    settings: thresholds, clamp values, null and chunking (`CausalSettings`).
    label_values_BTK: the label columns on `tokens_BT` if already computed (see
      `expected_effects`).

  Returns:
    `score_pairs`' summary plus `high_quantile`, `high_scale` and `spliced_vs_clean` (KL and
    class shift of the plain splice), each pair carrying `high_value` and, for the high clamp,
    `kl_high_vs_spliced`, `kl_high_vs_clean`, `shift_high_vs_spliced`, `shift_high_vs_clean`.
  """
  lm_params, model_config, site = sae.lm_params, sae.model_config, sae.site
  sae_params, sae_config, hparams = sae.sae_params, sae.sae_config, sae.hparams
  splice_mode, sae_state = sae.splice_mode, sae.sae_state
  high_quantile, high_scale = settings.high_quantile, settings.high_scale
  interventions.check_site(model_config, site, sae_config, splice_mode, tokens_BT)
  tokens_BT = jnp.asarray(tokens_BT)
  mask_BT = np.asarray(mask_BT, bool)
  if mask_BT.shape != tokens_BT.shape:
    raise ValueError(f"mask_BT has shape {mask_BT.shape}; it must match the tokens "
                     f"{tokens_BT.shape}.")
  corr = np.asarray(corr_FK)
  if corr.shape != (sae_config.width, len(names)):
    raise ValueError(f"corr_FK has shape {corr.shape}; expected [F={sae_config.width}, "
                     f"K={len(names)}] (one column per name).")
  if not 0 <= high_quantile <= 1 or not high_scale > 0:
    raise ValueError(f"need high_quantile in [0, 1] and high_scale > 0, got {high_quantile}, "
                     f"{high_scale}.")
  class_names, member_CV = token_classes.token_classes(grammar)
  codes = interventions.site_codes(lm_params, model_config, site, sae_params, sae_config,
                                   hparams, tokens_BT, splice_mode, sae_state)
  codes_MF = np.asarray(codes)[mask_BT]
  high_F = high_scale * np.asarray(interventions.latent_quantiles(codes_MF, [high_quantile]))[0]
  active_F = (codes_MF != 0).any(0) & (high_F != 0)
  expected = expected_effects(grammar, names, tokens_BT, mask_BT,
                              label_values_BTK=label_values_BTK,
                              empirical_fallback=settings.empirical_fallback)
  template = interventions.clamp(0, 0.0, mask_BT)
  baseline = {}

  def shift_fn(latents_U):
    u = latents_U.shape[0]
    lat = np.concatenate([latents_U, latents_U]).astype(np.int32)
    val = np.concatenate([high_F[latents_U], np.zeros((u,))]).astype(np.float32)
    eff = jax.device_get(effects.intervention_effects(
        lm_params, model_config, site, sae_params, sae_config, hparams, tokens_BT, template,
        mask_BT, member_CV, splice_mode, sae_state, latents_L=lat, values_L=val,
        chunk=settings.chunk))
    vs_s, vs_c = eff["vs_spliced"], eff["vs_clean"]
    baseline.update(kl=_num(eff["spliced_vs_clean"]["kl"]),
                    class_shift={c: float(x) for c, x in
                                 zip(class_names, eff["spliced_vs_clean"]["class_shift"])})
    shift = vs_s["class_edited"][:u] - vs_s["class_edited"][u:]
    by_class = lambda v: {c: float(x) for c, x in zip(class_names, v)}
    extras = [{"high_value": float(high_F[f]), "kl_high_vs_spliced": _num(vs_s["kl"][i]),
               "kl_high_vs_clean": _num(vs_c["kl"][i]),
               "shift_high_vs_spliced": by_class(vs_s["class_shift"][i]),
               "shift_high_vs_clean": by_class(vs_c["class_shift"][i])}
              for i, f in enumerate(latents_U)]
    return shift, extras

  out = score_pairs(corr, names, expected, class_names, shift_fn, threshold=settings.threshold,
                    max_pairs=settings.max_pairs, testable_latents=active_F,
                    null_latents=settings.null_latents, seed=settings.null_seed)
  out.update(high_quantile=float(high_quantile), high_scale=float(high_scale),
             spliced_vs_clean=baseline or None, classes=list(class_names))
  return out
