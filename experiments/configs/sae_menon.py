"""Menon et al.'s SAE grid for one language: 44 local SAEs at resid_post.0 in one compiled run.

Commands (train the LM once, then the grid; rerun a command to resume it)::

    python -m experiments.main --config=experiments/configs/lm.py:language=english \
        --workdir=workdirs/lm_english
    python -m experiments.main --config=experiments/configs/sae_menon.py:language=english \
        --workdir=workdirs/sae_menon_english

The grid (Menon, Shrivastava, Krueger, Lubana 2025; `specs/sae.md`, "Grids to reproduce"):
expansion {1, 2, 4, 8} (width 128 to 1024 on the spec's d_model 128) ×
(ReLU + L1 with α ∈ {1e-3, 1e-2, 1e-1, 1, 10, 100}, Menon's reduction α·Σ_{tokens, latents}|c|
over the whole batch (`sparsity_reduction='sum_batch'`) plus the mean-element MSE |
TopK with k ∈ {8, 16, 32, 64, 128}, MSE only) = 24 + 20 = 44 SAEs in 8 compilation groups
(4 widths × {L1, TopK}; within a group α or k is a per-variant array). k = 128 at expansion 1
keeps every latent (k = width), as in the original. Their profile: Adam (0.9, 0.999, 1e-8),
lr 1e-5, constant, no gradient clipping, 5,000 steps of 128 sequences, sentence tokens only;
Menon-style SAEs: U(±1/√d) encoder, U(±1/√F) decoder (N(0, 1) under the `dec` norm), no biases
unless `pre_bias` (then a zero-initialised pre-bias and an encoder bias), no decoder bias.

Settings after the colon (comma-separated):
- `language=<name>` (any of `jaxsae.grammars.names()`; default dyck2);
- `lm_workdir=<dir>` (default workdirs/lm_<language>);
- `steps=<int>` (a positive multiple of log_every: 50, or 2 under `smoke`);
- `norm=none|input|input_recon|input_dec`: Menon's normalisations: `input` L2-normalises x
  before the SAE, `input_recon` also the reconstruction, `input_dec` also divides each
  dictionary direction by its norm in the forward (decoder_norm='forward');
- switches `pre_bias` (pre-bias and encoder bias on), `sparsemax` (adds Menon's three sparsemax
  encoders, no-kds / recon-dist / dist, per expansion: 56 SAEs in 20 groups) and `smoke`
  (4 steps of 4 sequences, expansions {1, 2}, α {1e-3, 1}, k {8, 16}: seconds, for tests).

Runtime of the default grid (44 SAEs, 128 sequences per step), english (max_len 48; 1,256
selected tokens per step), 2 CPU cores, jax 0.10.2:
- measured at commit 0dcb15f on an otherwise idle machine (`/usr/bin/time -v`): **15 min 54 s
  wall** for the whole 5,000-step run, compile included (50-step chunks take ≈ 9.0 s after a
  ≈ 19 s first chunk), 1.18 GB peak memory: within the 20-minute target. Its final metrics are
  bit-identical to the run at commit 82f6a88, which took 29 min 11 s while the test suite and
  other jobs shared the same 2 cores (uncontended chunks there took 10.3-11.7 s);
- before the CPU fixes (variants one by one inside the step; TopK at k_max 128 by bisection;
  L0 and fired latents from one masked count) the same grid extrapolated to ≈ 71 min. dyck2
  (max_len 64, ≈ 1,700 tokens per step) takes about 1.35× as long.

The LM comes first (english ≈ 4 min, dyck2 ≈ 17 min; `lm.py`). `smoke` runs in ≈ 15 s.
With `sparsemax` add the 12 sparsemax SAEs (not timed). On an accelerator the grid takes
seconds per hundred steps.

What the original paper found (spliced grammaticality, their conventions: the fraction of
5 × 128 generations that are grammatical with the SAE spliced in; `specs/sae.md`):
- L1: ≈ 0 everywhere except Expr with α ≤ 1e-2 (≈ 1.0): the sum-over-batch L1 is ~10⁵× stronger
  than a per-token penalty, so most L1 SAEs collapse;
- TopK, no norm: ≈ 1.0 on Expr; ≈ 0.99 on English for most (k, width); on Dyck-2 (p 0.5) rising
  with k and width from ≈ 0.1 (k 8) to ≈ 0.92 (k 128, ×8);
- `recon` normalisation and sparsemax: ≈ 0 (a splicing artefact of the original pipeline: the
  unit-norm reconstruction was spliced without rescaling; `splice_mode='original'` reproduces
  it, the default 'corrected' rescales to ‖x‖).
This job writes the training metrics (per variant: loss, MSE, sparsity, L0, explained variance,
dead fraction) to `metrics.jsonl` / `summary.json`; the spliced grammaticality comes from the
pipeline's evaluation (`study.py:study=menon,full` runs this grid with the evaluation, analysis
and report). Measured (`experiments/results/menon_dyck2/`, `menon_expr_prefix/`): TopK agrees
with the paper on Expr (≈ 1.0) and in shape on Dyck-2; the L1 SAEs collapse at every α on
every language measured, and their L0 trajectories coincide across α 1e-3 … 100 (the penalty
dominates Adam's updates from α 1e-3 on; `study.py:study=menon_l1` extends α below 1e-3).
"""

from typing import Literal

import ml_collections

from experiments.configs import args as args_lib
from experiments.configs import sae_base
from jaxsae import grammars

EXPANSIONS = [1, 2, 4, 8]  # SAE width / d_model
ALPHAS = [1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0]  # L1 α, sum over tokens and latents of a batch
KS = [8, 16, 32, 64, 128]  # TopK latents kept per token
SPARSEMAX = ["sparsemax_no_kds", "sparsemax_recon_dist", "sparsemax_dist"]
# norm= value -> (input_norm, recon_norm, decoder_norm)
NORMS = {"none": (False, False, "none"), "input": (True, False, "none"),
         "input_recon": (True, True, "none"), "input_dec": (True, False, "forward")}

_SMOKE_EXPANSIONS, _SMOKE_ALPHAS, _SMOKE_KS = [1, 2], [1e-3, 1.0], [8, 16]


def get_config(arg=None):
  """The config of `sae_menon.py:<arg>`: `build` of the parsed settings."""
  opts = args_lib.parse(arg, switches=("smoke", "pre_bias", "sparsemax"),
                        keys={"language": "dyck2", "lm_workdir": "", "steps": int, "norm": "none"},
                        minimum={"steps": 1})
  return build(language=opts["language"], lm_workdir=opts["lm_workdir"],
               size="smoke" if opts["smoke"] else "default", steps=opts["steps"],
               norm=opts["norm"], pre_bias=opts["pre_bias"], sparsemax=opts["sparsemax"])


def build(language: str = "dyck2", lm_workdir: str = "",
          size: Literal["smoke", "default"] = "default", *, steps: int | None = None,
          norm: str = "none", pre_bias: bool = False,
          sparsemax: bool = False) -> ml_collections.ConfigDict:
  """The grid's config (see the module docstring; lm_workdir '': workdirs/lm_<language>)."""
  if language not in grammars.names():
    raise ValueError(f"unknown language '{language}'; use one of {grammars.names()}")
  if norm not in NORMS:
    raise ValueError(f"unknown norm '{norm}'; use one of {list(NORMS)} "
                     "(Menon's none / input / input+recon / input+dec)")
  if size not in ("smoke", "default"):
    raise ValueError(f"size={size!r}: use 'smoke' or 'default'")
  c = sae_base.base_config(language=language,
                           lm_workdir=lm_workdir or f"workdirs/lm_{language}")
  # Menon's optimisation profile (sae_base carries the e2e_sae one).
  c.positions = "sentence"  # sentence tokens only (decorator, <eos> and padding excluded)
  c.batch_size = 128  # sequences per step
  c.steps = 5000  # optimizer steps
  c.log_every = 50  # steps per host call; metrics fetched once per call
  c.checkpoint_every = 1000  # steps between checkpoints (multiple of log_every)
  c.schedule = "constant"  # no warm-up, no decay
  c.warmup_steps = 0  # linear warm-up steps (unused by 'constant')
  c.grad_clip = float("inf")  # global grad-norm clip per variant: none (Menon clips nothing)

  input_norm, recon_norm, decoder_norm = NORMS[norm]
  common = {
      "loss": "local", "lr": 1e-5, "init": "menon", "pre_bias": pre_bias,
      "enc_bias": pre_bias, "dec_bias": False, "decoder_norm": decoder_norm,
      "input_norm": input_norm, "recon_norm": recon_norm,
      # Menon's sum-over-batch L1 (also what is logged as `sparsity` for TopK / sparsemax).
      "sparsity_reduction": "sum_batch",
  }
  expansions, alphas, ks = EXPANSIONS, ALPHAS, KS
  if size == "smoke":
    expansions, alphas, ks = _SMOKE_EXPANSIONS, _SMOKE_ALPHAS, _SMOKE_KS
    c.steps, c.log_every, c.checkpoint_every, c.batch_size = 4, 2, 4, 4
  c.sweep = [
      {"product": {"expansion": expansions, "sparsity_coeff": alphas},
       "set": dict(common, activation="relu")},
      {"product": {"expansion": expansions, "k": ks},
       "set": dict(common, activation="topk", sparsity_coeff=0.0)},
  ]
  if sparsemax:
    c.sweep.append({"product": {"expansion": expansions, "activation": SPARSEMAX},
                    "set": dict(common, sparsity_coeff=0.0)})
  if steps is not None:
    if steps % c.log_every:
      raise ValueError(f"steps={steps} must be a positive multiple of log_every="
                       f"{c.log_every} (metrics are fetched every log_every steps)")
    c.steps = steps
    c.checkpoint_every = min(c.checkpoint_every, c.steps)  # both multiples of log_every
  return c
