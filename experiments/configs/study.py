"""The papers' headline studies, one language per run: the pipeline with a study's SAE grid.

Commands (rerun a command to resume it; finished stages are skipped)::

    python -m experiments.main --config=experiments/configs/study.py:study=frontier,language=dyck2 \
        --workdir=workdirs/study_frontier_dyck2
    python -m experiments.main --config=experiments/configs/study.py:study=menon,language=english,full \
        --workdir=workdirs/study_menon_english

Every study runs the main job's stages (`pipeline.py`: LM → SAE grid → evaluation → analysis →
report) with the language's default LM (the CPU budget of `lm.py`, which reaches the spec's
grammaticality; the paper-scale LM is `lm.py:full`) and swaps in the study's grid:

- `frontier` (Braun et al.'s question, e2e vs local): ReLU SAEs at resid_post.0, expansion 4,
  trained `local`, `e2e` and `e2e_ds`, eight sparsity coefficients λ each on wide geometric
  ladders (eleven for `local`, dense where it collapses; five more past λ 32 on Expr, whose LM
  barely notices local SAEs, with 4× the held-out sequences: `FRONTIER_LOCAL_EXTRA`,
  `FRONTIER_EVAL_BATCHES`) so the fronts overlap in CE increase, and TopK SAEs with six k,
  every configuration with `seeds` SAE seeds (default 3): the report's matched comparison then carries bootstrap
  intervals over seeds and states which points the local front covers;
- `menon` (Menon et al.'s grid, `sae_menon.py`): expansion {1, 2, 4, 8} × (ReLU + sum-over-batch
  L1 α ∈ {1e-3 … 100} | TopK k ∈ {8 … 128} | three sparsemax encoders), Menon's optimisation
  profile (Adam lr 1e-5, constant, no clipping), plus the TopK SAEs again under the
  `input_recon` normalisation; evaluated in both splice modes (`original`, the paper's
  convention, and `corrected`) with 5 × 128 generations per SAE and mode, the SAE spliced at
  the sentence tokens it was trained on;
- `menon_l1`: Menon's L1 arm alone (ReLU, sum-over-batch L1, their optimisation profile) at
  expansion {1, 4} with α ∈ {1e-8 … 1e-3} (`MENON_L1_ALPHAS`), below the paper's range: where
  does α start to matter, and do the SAEs that survive splice in grammatically? Same
  evaluation as `menon`;
- `causal` (Menon et al.'s causal-interpolation loss, `sae_causal.py` under the pipeline's
  optimisation profile) with `seeds` SAE seeds; causal predictability of every SAE against the
  null of random live latents;
- `bench` (the architectures the field trains today, against the grammar's ground truth):
  ReLU + L1, ReLU with p-annealing, Matryoshka ReLU, JumpReLU, Gated, TopK, TopK + AuxK,
  BatchTopK and Matryoshka BatchTopK, each trained `local` and `e2e`, over a seven-value λ or k
  ladder (JumpReLU with its threshold's step scaled to the budget, `BENCH_JUMPRELU_LR_SCALE`;
  p from 1 to 0.2 between a quarter and three quarters of the steps, `BENCH_P_ANNEAL`),
  `seeds` seeds each (378 SAEs at the default 3 seeds: an accelerator job at `full`; at the CPU
  budget about two and a half hours per language, or pass `seeds=1`); the report's ground-truth table (MCC,
  absorption, splitting, k-sparse probes, shrinkage) and its trade-off plots compare them.

Settings after the colon (comma-separated): `study=frontier|menon|menon_l1|causal|bench`, `language=<name>`,
`seed=<int>` (LM, data and evaluation seed), `seeds=<int>` (SAE seeds per configuration), and
one of the switches `full` (the papers' SAE budget, 5,000 steps of 128 sequences: an
accelerator job) or `smoke` (tiny, for tests). Without a switch the SAE grid trains the
pipeline's CPU budget (800 steps of 32 sequences); `menon` and `menon_l1` need `full` (lr 1e-5
barely moves the SAEs in 800 steps) and refuse to run without it.
"""

from typing import Literal

import ml_collections

from experiments.configs import args as args_lib
from experiments.configs import pipeline as pipeline_configs
from experiments.configs import sae_menon

STUDIES = ("frontier", "menon", "menon_l1", "causal", "bench")
# Sparsity ladders (e2e_sae reduction λ · mean_tokens ‖c‖₁ / d) per loss family: factors of 2
# over 128×, each reaching past the CE increase of the others' sparsest SAEs. The local ladder
# steps by √2 between λ 2 and 16, where local SAEs collapse (English, CPU budget: CE increase
# 0.006 at λ 8, 3.2 at λ 16), so the local front covers the e2e SAEs' CE range.
FRONTIER_LAMBDAS = {
    "local": [0.25, 0.5, 1.0, 2.0, 2.8, 4.0, 5.7, 8.0, 11.0, 16.0, 32.0],
    "e2e": [0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0],
    "e2e_ds": [2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0],
}
FRONTIER_KS = [2, 4, 8, 16, 32, 64]  # TopK latents per token
# Per language: local λ values past the common ladder, and held-out batches (of 64 sequences)
# for the evaluation. Expr's LM barely depends on resid_post.0 beyond what a near-empty code
# keeps (CPU budget, seed 42: local λ 32 reaches L0 2.1 at a CE increase of only 0.0046, while
# e2e SAEs go to 0.018), and its sentences average 4 tokens, so its local front needs larger λ
# and its CE differences 4× the held-out sequences to be resolved.
FRONTIER_LOCAL_EXTRA = {"expr_prefix": [45.0, 64.0, 90.0, 128.0, 256.0]}
FRONTIER_EVAL_BATCHES = {"expr_prefix": 32}
# The benchmark's architectures: sweep fields, and which ladder (λ or k) each sweeps.
# JumpReLU: Adam moves log θ by about lr per step, so at 800 steps of lr 1e-3 θ can grow at most
# e^0.8 ≈ 2.2× from where it starts, and the L0 penalty cannot bring a small θ0 up to the
# pre-activations' scale: measured on the Dyck-2 LM at the CPU budget (expansion 4, local;
# `experiments/results/bench/jumprelu_init.json`), λ from 0.5 to 32 left L0 at 241 of 512 with
# θ0 0.001 and 231 with SAELens 6's θ0 0.01 (bandwidth 0.05). With the step on log θ scaled by
# 30 (`jumprelu_threshold_lr_scale`: about 24 units of log-θ travel over the run, the JumpReLU
# paper's 200k steps at lr 7e-5 allow 14) λ sets L0 as intended: 25.9, 11.4, 5.3, 2.9 at λ 0.5,
# 2, 8, 32. The scale follows the budget so that the travel stays about the same.
BENCH_JUMPRELU = {"jumprelu_init_threshold": 0.01, "jumprelu_bandwidth": 0.05}
BENCH_JUMPRELU_LR_SCALE = {"smoke": 30.0, "default": 30.0, "full": 5.0}
# p-annealing (Karvonen et al.): p falls linearly from 1 to p_end 0.2 between these fractions of
# the run's steps, with the penalty rescaled to the L1 penalty's value so λ keeps its meaning
# (the dictionary_learning trainer's λ update, made continuous).
BENCH_P_ANNEAL = {"start": 0.25, "end": 0.75}
BENCH_ARCHS = {
    "relu": ({"activation": "relu"}, "sparsity_coeff"),
    "relu+p_anneal": ({"activation": "relu", "p_anneal": True}, "sparsity_coeff"),
    "matryoshka_relu": ({"activation": "relu", "matryoshka": (0.125, 0.25, 0.5)},
                        "sparsity_coeff"),
    "jumprelu": ({"activation": "jumprelu", **BENCH_JUMPRELU}, "sparsity_coeff"),
    "gated": ({"activation": "gated"}, "sparsity_coeff"),
    "topk": ({"activation": "topk"}, "k"),
    "topk+auxk": ({"activation": "topk", "auxk": True}, "k"),
    "batchtopk": ({"activation": "batchtopk"}, "k"),
    "matryoshka_batchtopk": ({"activation": "batchtopk", "matryoshka": (0.125, 0.25, 0.5)}, "k"),
}
# Factor-2 steps (√2-ish in k), so neighbouring configurations are close enough in CE increase
# for the matched comparison to interpolate between them (the committed Dyck-2 run used factor-4
# ladders of four values: most of its matched-CE view was not covered).
# menon_l1: Menon's L1 arm with α extended below the paper's 1e-3, where the reconstruction's
# gradient can compete with the sum-over-batch penalty (α·n_tokens is the per-token weight).
MENON_L1_ALPHAS = [1e-8, 1e-7, 1e-6, 1e-5, 1e-4, 1e-3]
MENON_L1_EXPANSIONS = [1, 4]
BENCH_LADDERS = {"sparsity_coeff": [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0],
                 "k": [4, 6, 8, 12, 16, 24, 32]}
BENCH_LOSSES = ("local", "e2e")
# AuxK's dead-latent window (tokens): about 1/10 of the training tokens of each size (Gao et
# al.'s 10M is for runs of billions of tokens).
BENCH_DEAD_TOKENS = {"smoke": 16, "default": 20_000, "full": 500_000}


def get_config(arg=None):
  """The config of `study.py:<arg>` (see the module docstring): `build` of the parsed settings."""
  opts = args_lib.parse(arg, switches=("smoke", "full"),
                        keys={"study": "frontier", "language": "english", "seed": 0, "seeds": 3},
                        minimum={"seeds": 1})
  if opts["smoke"] and opts["full"]:
    raise ValueError("choose at most one of the switches smoke and full")
  size = "smoke" if opts["smoke"] else "full" if opts["full"] else "default"
  return build(study=opts["study"], language=opts["language"], seed=opts["seed"],
               seeds=opts["seeds"], size=size)


def build(study: str = "frontier", language: str = "english", seed: int = 0, seeds: int = 3,
          size: Literal["smoke", "default", "full"] = "default") -> ml_collections.ConfigDict:
  """The pipeline's config with the study's grid.

  Args:
    study: one of `STUDIES`.
    language: a name from `jaxsae.grammars.names()`.
    seed: the LM, data and evaluation seed.
    seeds: SAE seeds per configuration (a `seed` sweep field: 0 … seeds − 1).
    size: 'default' (the pipeline's CPU budget for the SAEs), 'full' (the papers' SAE budget,
      5,000 steps of 128 sequences) or 'smoke'. The LM is the language's default in both
      'default' and 'full'.
  """
  if study not in STUDIES:
    raise ValueError(f"study={study!r}: use one of {STUDIES}")
  if not isinstance(seeds, int) or seeds < 1:
    raise ValueError(f"seeds={seeds!r} must be a positive int")
  smoke, full = size == "smoke", size == "full"
  if study in ("menon", "menon_l1") and size == "default":
    raise ValueError(f"study={study} needs the switch full (Menon's lr 1e-5 trains 5,000 steps of "
                     "128 sequences; at the CPU budget its SAEs barely move): add ',full'")
  c = pipeline_configs.build(language=language, seed=seed,
                             grid="causal" if study == "causal" else "default",
                             size="smoke" if smoke else "default")
  c.study = study  # which study's grid (for the record; the pipeline ignores it)
  s, e, a = c.sae, c.eval, c.analysis
  if full:
    s.batch_size, s.steps, s.checkpoint_every = 128, 5000, 1000
    e.grammaticality_batches, e.grammaticality_batch_size = 5, 128
  if study != "causal":
    # Generations with the SAE spliced where it was trained (sentence tokens: the report's
    # headline combination); the causal study keeps both positions.
    e.grammaticality_positions = ("sentence",)
  seed_product = {"seed": list(range(seeds))}
  if study == "frontier":
    lambdas, ks, expansion = dict(FRONTIER_LAMBDAS), FRONTIER_KS, pipeline_configs.EXPANSION
    lambdas["local"] = lambdas["local"] + FRONTIER_LOCAL_EXTRA.get(language, [])
    if not smoke and language in FRONTIER_EVAL_BATCHES:
      e.num_batches = FRONTIER_EVAL_BATCHES[language]
    if smoke:
      lambdas = {k: v[::4] for k, v in lambdas.items()}
      ks, expansion = ks[1:3], 2
    s.sweep = [{"product": {"sparsity_coeff": lams, **seed_product},
                "set": {"loss": loss, "expansion": expansion}}
               for loss, lams in lambdas.items()]
    s.sweep.append({"product": {"k": ks, **seed_product},
                    "set": {"loss": "local", "activation": "topk", "expansion": expansion}})
    e.grammaticality_modes = ("corrected",)  # no normalised SAEs: the modes coincide
  elif study == "bench":
    expansion = pipeline_configs.EXPANSION if not smoke else 2
    s.sweep = []
    for arch, (fields, ladder) in BENCH_ARCHS.items():
      values = BENCH_LADDERS[ladder][1:2] if smoke else BENCH_LADDERS[ladder]
      extra = {"dead_tokens": BENCH_DEAD_TOKENS[size]} if fields.get("auxk") else {}
      if fields["activation"] == "jumprelu":
        extra["jumprelu_threshold_lr_scale"] = BENCH_JUMPRELU_LR_SCALE[size]
      if fields.get("p_anneal"):
        start = int(BENCH_P_ANNEAL["start"] * s.steps)
        extra.update(p_anneal_rescale=True, p_anneal_start=start,
                     p_anneal_steps=max(1, int(BENCH_P_ANNEAL["end"] * s.steps) - start))
      for loss in BENCH_LOSSES:
        s.sweep.append({"product": {ladder: values, **seed_product},
                        "set": {**fields, **extra, "loss": loss, "expansion": expansion}})
    e.grammaticality_modes = ("corrected",)
  elif study == "menon":
    menon_size = "smoke" if smoke else "default"
    m = sae_menon.build(language=language, size=menon_size, sparsemax=True)
    recon = sae_menon.build(language=language, size=menon_size, norm="input_recon")
    topk_recon = [b for b in recon.sweep if b["set"].get("activation") == "topk"]
    s.sweep = list(m.sweep) + topk_recon
  elif study == "menon_l1":
    m = sae_menon.build(language=language, size="smoke" if smoke else "default")
    (l1,) = [b for b in m.sweep if b["set"]["activation"] == "relu"]
    alphas = MENON_L1_ALPHAS[::3] if smoke else MENON_L1_ALPHAS
    s.sweep = [{"product": {"expansion": MENON_L1_EXPANSIONS, "sparsity_coeff": alphas},
                "set": dict(l1["set"])}]
  else:  # causal
    s.sweep = [dict(block, product=dict(block.get("product", {}), **seed_product))
               for block in s.sweep]
    a.causal_variants = "all"
  if study in ("menon", "menon_l1"):  # Menon's optimisation profile, both splice modes
    for name in ("schedule", "warmup_steps", "grad_clip"):
      s[name] = m[name]
    e.grammaticality_modes = ("original", "corrected")
  return c
