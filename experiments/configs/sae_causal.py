"""Menon et al.'s causal SAEs: TopK SAEs trained with the causal-interpolation term, next to
plain TopK baselines, in one compiled run.

Commands (train the LM once, then the grid; rerun a command to resume it)::

    python -m experiments.main --config=experiments/configs/lm.py:language=english \
        --workdir=workdirs/lm_english
    python -m experiments.main --config=experiments/configs/sae_causal.py:language=english \
        --workdir=workdirs/sae_causal_english

The grid (`specs/sae.md`, "Causal-interpolation loss"): expansion 2, TopK k = 16, at
resid_post.0, Menon's profile (Adam lr 1e-5, constant, no clipping, 128 sequences per step,
sentence tokens only, Menon init, no decoder bias) with
- a plain TopK baseline (MSE only), and
- the causal term `β · L_caus` added to the MSE for β ∈ {0.5, 1, 100} × λ ∈ {U(0,1) per step
  (the original), U(0,1) per token, fixed 0.2, fixed 0.02}: 12 causal SAEs.
Target: the logits of the SAE-reconstructed run (the paper's definition; `target=clean` for the
original code's clean logits); distance: MSE on logits (`distance=kl` for KL). The nearest
neighbour is taken within each sequence among its sentence tokens; every selected token carries
its interpolated reconstruction in one spliced forward, position-aligned (the original's
off-by-7 placement, one-sequence batches and bias-free decoding are not reproduced).

Settings after the colon (comma-separated):
- `language=<name>` (default english; the paper used expr and english);
- `lm_workdir=<dir>` (default workdirs/lm_<language>);
- `steps=<int>` (a positive multiple of log_every, 50);
- `target=sae|clean`, `distance=mse|kl`;
- switches `finetune` (plain pre-training for the first half of the steps, then the causal term
  with a fresh Adam state at 0.1× the lr, β ramped linearly over 10% of the steps) and `smoke`
  (4 steps of 4 sequences, β {0.5, 100}, λ {step, fixed 0.2}: seconds, for tests).

Runtime: each causal SAE runs the SAE on whole sequences plus two spliced forwards through the
rest of the model per step (the interpolated run and the SAE-target run), about 3× a plain
e2e SAE. At 128 sequences of ≤ 48 tokens (english) that is ≈ 0.1-0.2 s per causal SAE per step
on 2 CPU cores, so the 5,000-step grid is an accelerator job (hours on a laptop CPU); use
`steps=500` for a CPU run of about half an hour. `smoke` runs in ≈ 20 s.
"""

from typing import Literal

import ml_collections

from experiments.configs import args as args_lib
from experiments.configs import sae_base
from jaxsae import grammars

BETAS = [0.5, 1.0, 100.0]  # weight β of the causal term
# λ option name -> sweep fields
LAMBDAS = {
    "step": {"causal_lambda": "step"},
    "token": {"causal_lambda": "token"},
    "fixed0.2": {"causal_lambda": "fixed", "causal_lambda_value": 0.2},
    "fixed0.02": {"causal_lambda": "fixed", "causal_lambda_value": 0.02},
}


def get_config(arg=None):
  """The config of `sae_causal.py:<arg>`: `build` of the parsed settings."""
  opts = args_lib.parse(arg, switches=("smoke", "finetune"),
                        keys={"language": "english", "lm_workdir": "", "steps": int,
                              "target": "sae", "distance": "mse"},
                        minimum={"steps": 1})
  return build(language=opts["language"], lm_workdir=opts["lm_workdir"],
               size="smoke" if opts["smoke"] else "default", steps=opts["steps"],
               target=opts["target"], distance=opts["distance"], finetune=opts["finetune"])


def build(language: str = "english", lm_workdir: str = "",
          size: Literal["smoke", "default"] = "default", *, steps: int | None = None,
          target: str = "sae", distance: str = "mse",
          finetune: bool = False) -> ml_collections.ConfigDict:
  """The grid's config (see the module docstring; lm_workdir '': workdirs/lm_<language>)."""
  if language not in grammars.names():
    raise ValueError(f"unknown language '{language}'; use one of {grammars.names()}")
  if target not in ("sae", "clean"):
    raise ValueError(f"target={target!r}: use 'sae' (paper) or 'clean' (original code)")
  if distance not in ("mse", "kl"):
    raise ValueError(f"distance={distance!r}: use 'mse' or 'kl'")
  if size not in ("smoke", "default"):
    raise ValueError(f"size={size!r}: use 'smoke' or 'default'")
  c = sae_base.base_config(language=language,
                           lm_workdir=lm_workdir or f"workdirs/lm_{language}")
  c.positions = "sentence"  # sentence tokens only
  c.batch_size = 128  # sequences per step
  c.steps = 5000  # optimizer steps
  c.log_every = 50  # steps per host call
  c.checkpoint_every = 500  # steps between checkpoints (multiple of log_every)
  c.schedule = "constant"  # Menon: no warm-up, no decay
  c.warmup_steps = 0  # unused by 'constant'
  c.grad_clip = float("inf")  # Menon clips nothing
  betas, lambdas = BETAS, list(LAMBDAS)
  if size == "smoke":
    betas, lambdas = [0.5, 100.0], ["step", "fixed0.2"]
    c.steps, c.log_every, c.checkpoint_every, c.batch_size = 4, 2, 4, 4
  if steps is not None:
    if steps % c.log_every:
      raise ValueError(f"steps={steps} must be a positive multiple of log_every="
                       f"{c.log_every}")
    c.steps = steps
    c.checkpoint_every = min(c.checkpoint_every, c.steps)
  common = {"loss": "local", "activation": "topk", "k": 16, "expansion": 2, "lr": 1e-5,
            "init": "menon", "enc_bias": False, "dec_bias": False, "decoder_norm": "none",
            "sparsity_coeff": 0.0, "sparsity_reduction": "sum_batch"}
  causal = dict(common, causal=True, causal_target=target,
                causal_distance=distance)
  if finetune:
    start = (c.steps // 2 // c.log_every) * c.log_every or c.log_every
    causal.update(causal_start=start, causal_reset_opt=True, causal_lr_scale=0.1,
                  causal_ramp=max(c.steps // 10, 1))
  c.sweep = [{"set": common}]
  for name in lambdas:
    c.sweep.append({"product": {"causal_coeff": betas}, "set": dict(causal, **LAMBDAS[name])})
  return c
