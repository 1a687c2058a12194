"""Local vs e2e vs e2e+ds SAEs over a sparsity-coefficient grid (Braun et al.'s comparison).

Command (needs a trained LM; the lm job's default for the language)::

    python -m experiments.main --config=experiments/configs/lm.py:language=dyck2 \
        --workdir=workdirs/lm_dyck2
    python -m experiments.main --config=experiments/configs/sae_e2e.py:language=dyck2 \
        --workdir=workdirs/sae_e2e_dyck2

Settings: `language=<name>`, `lm_workdir=<dir>` (default workdirs/lm_<language>), `steps=<int>`;
switch `smoke` (a few steps, seconds).

The grid: SAEs at resid_post.0, expansion 4, e2e_sae reductions (sparsity = λ·mean‖c‖₁/d),
Adam lr 1e-3 with warm-up and cosine to 0.1×, clip 1; loss ∈ {local, e2e, e2e_ds} × λ grid.

Measured (english, the lm job's default LM, commit 859d428, 1,000 steps: ≈ 3 min, then
the eval job with 2 × 128 generations per combination: ≈ 2.5 min; report in
`experiments/results/english_sae_e2e/`): local λ 0.5-4 gave L0 16.4-3.9 at CE increase
0.0005-0.0034; e2e λ 2-16 gave L0 1.4-0.9 at CE increase 0.0036-0.014 (EV ≈ 0.15); e2e+ds λ
2-16 gave L0 20.7-6.3 at 0.0006-0.0053 (1.7× local's L0 at matched CE). The e2e SAEs fell just
outside the local front's CE range (0.0036 vs 0.0034), so local λ = 8 was added to the grid to
cover it (not yet measured). Spliced at every position, including the decorator they were not
trained on, e2e SAEs give 0 grammatical generations; see the pipeline report for sentence
positions.
"""

from typing import Literal

import ml_collections

from experiments.configs import args as args_lib
from experiments.configs import sae_base
from jaxsae import grammars

# Sparsity coefficients per loss family (e2e_sae reduction). KL-trained SAEs tolerate larger λ
# for the same CE increase, so their grid sits higher.
_LAMBDAS = {"local": [0.5, 1.0, 2.0, 4.0, 8.0], "e2e": [2.0, 4.0, 8.0, 16.0],
            "e2e_ds": [2.0, 4.0, 8.0, 16.0]}


def get_config(arg=None):
  """The config of `sae_e2e.py:<arg>`: `build` of the parsed settings."""
  opts = args_lib.parse(arg, switches=("smoke",),
                        keys={"language": "dyck2", "lm_workdir": "", "steps": int},
                        minimum={"steps": 1})
  return build(language=opts["language"], lm_workdir=opts["lm_workdir"],
               size="smoke" if opts["smoke"] else "default", steps=opts["steps"])


def build(language: str = "dyck2", lm_workdir: str = "",
          size: Literal["smoke", "default"] = "default", *,
          steps: int | None = None) -> ml_collections.ConfigDict:
  """The grid's config (lm_workdir '': workdirs/lm_<language>; steps None: the size's)."""
  if language not in grammars.names():
    raise ValueError(f"unknown language '{language}'; use one of {grammars.names()}")
  if size not in ("smoke", "default"):
    raise ValueError(f"size={size!r}: use 'smoke' or 'default'")
  c = sae_base.base_config(language=language,
                           lm_workdir=lm_workdir or f"workdirs/lm_{language}")
  c.sweep = [{"product": {"sparsity_coeff": lams}, "set": {"loss": loss, "expansion": 4}}
             for loss, lams in _LAMBDAS.items()]
  if size == "smoke":
    c.steps, c.log_every, c.checkpoint_every, c.batch_size = 4, 2, 4, 4
    c.warmup_steps = 1
    c.sweep = [{"product": {"sparsity_coeff": [1.0, 4.0]}, "set": {"loss": loss, "expansion": 2}}
               for loss in _LAMBDAS]
  if steps is not None:
    c.steps = steps
  return c
