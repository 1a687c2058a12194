"""The main job: LM → local / e2e / e2e+ds / TopK SAE grid → evaluation → analysis → report.

Command (the README's first command; rerun it to resume, finished stages are skipped)::

    python -m experiments.main --config=experiments/configs/pipeline.py --workdir=workdirs/pipeline

Settings after the colon (comma-separated): `language=<name>` (any of
`jaxsae.grammars.names()`; default english, the fastest to train on a CPU), `seed=<int>` (LM,
SAE data and evaluation seeds), `stages=<s1+s2+...>` (a subset of lm+sae+eval+analysis+report);
switches `full` (paper-scale settings for an accelerator: the LM's `full` budget, 128-sequence
SAE batches, 5,000 SAE steps, the spec's 5 × 128 generations in both splice modes) and `smoke`
(tiny everything: well under a minute, for tests).

The default grid, at resid_post.0, expansion 4 (F = 512), the e2e_sae optimisation profile
(Adam lr 1e-3, warm-up + cosine to 0.1×, clip 1), sentence tokens (`grid=causal` swaps in
the causal-interpolation grid of `sae_causal.py` and tests every SAE's causal predictability):
- ReLU SAEs trained `local` (MSE + λ·mean‖c‖₁/d), `e2e` (KL(clean ‖ spliced) + sparsity) and
  `e2e_ds` (½ KL + downstream MSE at resid_post.1 + sparsity): seven local λ (a ladder dense
  enough for the matched comparison to cover the e2e SAEs), three e2e and three e2e_ds λ;
- TopK SAEs (k ∈ {4, 8, 16}, local MSE).
The report answers, from the run, whether e2e SAEs reach the same CE increase with lower L0 and
fewer alive latents than local ones, shows the clean model's and every SAE's spliced
grammaticality, and lists the latents that track grammar features and whether they act
causally as their labels predict.

Runtime of the default on 2 CPU cores, near idle (commit 4b651f5 with 5 × 128 generations per
SAE and combination): 4 min 57 s wall: LM 149 s, SAE grid 70 s, evaluation 27 s (640
generations per SAE at two positions), analysis 46 s (the causal null included), report 1 s;
report in `experiments/results/english_default/`. Before (commit b5a6175, 2 × 64
generations, `/usr/bin/time -v`): 5 min 29 s wall, 2.7 GB peak memory: LM 185 s, SAE grid 70 s, evaluation 41 s, analysis 29 s,
report 1 s. Earlier runs (commit 16d596e, other jobs sharing the cores): the default 6 min
05 s; `language=dyck2` 8 min 16 s (its LM trains 1,500 steps of 64 tokens); `grid=causal`
9 min 16 s with the English LM already trained. `smoke`: ≈ 20-40 s.
Headline numbers of those runs are in the README and `experiments/results/`.
"""

from typing import Literal, Sequence

import ml_collections

from experiments.configs import args as args_lib
from experiments.configs import eval as eval_configs
from experiments.configs import lm as lm_configs
from experiments.configs import sae_base
from experiments.configs import sae_causal
from jaxsae import grammars

STAGES = ("lm", "sae", "eval", "analysis", "report")
GRIDS = ("default", "causal")
# Sparsity coefficients λ (e2e_sae reduction: λ · mean_tokens ‖c‖₁ / d) per loss family.
# The local ladder is dense between 4 and 16: in the English default run (experiments/results/
# english_default, commit 4b651f5) local λ 4 gave CE increase 0.0017 and λ 16 gave 2.9, so the
# e2e SAEs' range (up to 0.004) had no local front within the matched comparison's 4× rule.
LAMBDAS = {"local": [1.0, 2.0, 4.0, 6.0, 8.0, 11.0, 16.0], "e2e": [0.5, 2.0, 8.0],
           "e2e_ds": [4.0, 16.0, 64.0]}
SMOKE_LAMBDAS = {"local": [1.0, 4.0], "e2e": [0.5, 2.0], "e2e_ds": [4.0, 16.0]}
TOPK_KS = [4, 8, 16]  # TopK latents per token
EXPANSION = 4  # SAE width / d_model


def get_config(arg=None):
  """The config of `pipeline.py:<arg>` (see the module docstring): `build` of the settings."""
  opts = args_lib.parse(arg, switches=("smoke", "full"),
                        keys={"language": "english", "seed": 0, "stages": "+".join(STAGES),
                              "grid": "default"})
  if opts["smoke"] and opts["full"]:
    raise ValueError("choose at most one of the switches smoke and full")
  stages = tuple(s for s in opts["stages"].split("+") if s)
  bad = [s for s in stages if s not in STAGES]
  if bad or not stages:
    raise ValueError(f"stages={opts['stages']!r}: join a subset of {STAGES} with '+'")
  size = "smoke" if opts["smoke"] else "full" if opts["full"] else "default"
  return build(language=opts["language"], seed=opts["seed"], stages=stages, grid=opts["grid"],
               size=size)


def build(language: str = "english", seed: int = 0, stages: Sequence[str] = STAGES,
          grid: str = "default",
          size: Literal["smoke", "default", "full"] = "default") -> ml_collections.ConfigDict:
  """The pipeline's config: the stage configs of `lm.build`, the grid, `eval.build` and the
  analysis, for one language, seed and size."""
  lang, smoke, full = language, size == "smoke", size == "full"
  if lang not in grammars.names():
    raise ValueError(f"unknown language '{lang}'; use one of {grammars.names()}")
  if size not in lm_configs.SIZES:
    raise ValueError(f"size={size!r}: use one of {lm_configs.SIZES}")
  if grid not in GRIDS:
    raise ValueError(f"grid={grid!r}: use one of {GRIDS}")
  stages = tuple(stages)
  bad = [s for s in stages if s not in STAGES]
  if bad or not stages:
    raise ValueError(f"stages={stages!r}: choose a subset of {STAGES}")

  c = ml_collections.ConfigDict()
  c.job = "pipeline"  # experiments.main job (jaxsae.pipeline.run)
  c.stages = stages  # stages to run, in order (finished ones are skipped on rerun)

  # Stage 1: the LM (the lm job's config for the language).
  c.lm = lm_configs.build(language=lang, seed=seed, size=size)

  # Stage 2: the SAE grid (lm_workdir is filled in by the pipeline: <workdir>/lm).
  s = sae_base.base_config(language=lang, lm_workdir="")
  s.seed = seed
  s.positions = "sentence"  # train on sentence tokens (the report's metrics use them too)
  s.batch_size = 128 if full else 32  # sequences per step
  s.steps = 5000 if full else 800  # optimizer steps
  s.log_every = 50  # steps per host call
  s.checkpoint_every = 1000 if full else 200  # steps between checkpoints
  s.warmup_steps = 50  # linear warm-up steps
  lambdas, ks, expansion = LAMBDAS, TOPK_KS, EXPANSION
  if smoke:
    s.steps, s.log_every, s.checkpoint_every, s.batch_size, s.warmup_steps = 4, 2, 4, 4, 1
    lambdas = SMOKE_LAMBDAS
    ks, expansion = TOPK_KS[:2], 2
  s.sweep = [{"product": {"sparsity_coeff": lams}, "set": {"loss": loss, "expansion": expansion}}
             for loss, lams in lambdas.items()]
  s.sweep.append({"product": {"k": ks}, "set": {"loss": "local", "activation": "topk",
                                                "expansion": expansion}})
  if grid == "causal":
    # The causal-interpolation grid of sae_causal.py (TopK 16, expansion 2, β × λ options, plus
    # a plain TopK baseline) under this pipeline's optimisation profile (lr 1e-3 with warm-up
    # and cosine instead of Menon's constant 1e-5, which needs 5,000 steps of 128 sequences).
    causal = sae_causal.build(language=lang, size="smoke" if smoke else "default")
    s.sweep = [dict(block, set=dict(block["set"], lr=1e-3, decoder_norm="forward"))
               for block in causal.sweep]
    s.grad_clip = 1.0
  c.sae = s

  # Stage 3: evaluation (sae_workdir is filled in: <workdir>/sae).
  e = eval_configs.build(seed=seed, size="smoke" if smoke else "default")
  if not smoke and not full:
    e.num_batches = 8  # held-out batches of batch_size sequences
    e.batch_size = 64
    e.grammaticality_batches = 5  # generation batches per variant and combination (the
    e.grammaticality_batch_size = 128  # paper's 5 × 128 = 640: Wilson ±0.01 near 0.98)
    e.grammaticality_modes = ("corrected",)  # no normalised SAEs here: the modes coincide
  c.eval = e

  # Stage 4: feature analysis.
  a = ml_collections.ConfigDict()
  a.seed = seed  # analysis data seed (its own stream)
  a.num_sequences = 8 if smoke else 256  # held-out sequences whose selected tokens are analysed
  a.threshold = 0.5  # |corr| above which a (latent, label) pair is tested causally
  a.max_pairs = 4 if smoke else 24  # causal tests per chosen SAE (strongest pairs first)
  # Per label, the most live latents unrelated to it in the causal null (>= 19 for a 95% test;
  # more: a null's quantile less dependent on which latents were drawn, one clamp pair each).
  a.null_latents = 64
  a.causal = True  # run the causal-predictability interventions
  # ... on one SAE per type ('per_type') or on every SAE ('all': the causal grid compares them)
  a.causal_variants = "all" if grid == "causal" else "per_type"
  a.heatmap_latents = 24  # latents shown in the correlation heatmaps
  # Ground-truth recovery of the grammar's features (MCC, absorption, splitting, k-sparse
  # probes, shrinkage: `jaxsae.analysis.ground_truth`) for every SAE.
  a.ground_truth = True
  c.analysis = a
  return c
