"""The benchmark: the SAE architectures the field trains today, against the grammar's ground truth.

The `bench` study of `study.py` under its own name: ReLU + L1, ReLU with p-annealing,
Matryoshka ReLU, JumpReLU, Gated, TopK, TopK + AuxK, BatchTopK and Matryoshka BatchTopK, each
trained `local` and `e2e` over a seven-value λ or k ladder with `seeds` seeds (378 SAEs at the
default 3), on one language, then
the pipeline's evaluation, ground-truth analysis and report. One run per language; the
leaderboard ranks the architectures across the runs::

    for lang in dyck2 expr_prefix english; do
      python -m experiments.main --config=experiments/configs/bench.py:language=$lang \
          --workdir=workdirs/bench_$lang
    done
    python -m experiments.leaderboard --out=workdirs/leaderboard workdirs/bench_*

Settings after the colon (comma-separated): `language=<name>`, `seed=<int>` (LM, data and
evaluation seed), `seeds=<int>` (SAE seeds per configuration), and one of the switches `full`
(5,000 steps of 128 sequences: an accelerator job) or `smoke` (tiny, for tests). Without a
switch: the CPU budget (800 steps of 32 sequences, about two and a half hours per language on
two cores).

Expected at the CPU budget (`experiments/results/bench/`, 3 seeds). Dyck-2 (about 86 min of SAE
training on 2 shared cores): the TopK family and JumpReLU first in MCC at L0 4 (0.50–0.51,
random codes 0.073), e2e Gated and Gated first at matched CE increase 0.0025 (0.58 / 0.56),
Matryoshka BatchTopK lowest in absorption (0.03 at L0 8). Expr (99 min): e2e TopK + AuxK and e2e
TopK first in MCC at every matched L0 (0.19 / 0.17 at L0 4, random codes 0.10), absorption ≤ 0.09 for the leaders, and no ranking at matched CE
increase (Expr's LM barely notices SAEs at this site). English (89 min of SAE training on
shared cores): e2e TopK + AuxK, TopK + AuxK and Gated first in MCC at L0 8 (0.30 / 0.29 / 0.29,
random codes 0.074), e2e TopK + AuxK and TopK at L0 16 (0.35 / 0.34), Matryoshka types lowest
in hedging.
"""

from typing import Literal

import ml_collections

from experiments.configs import args as args_lib
from experiments.configs import study


def get_config(arg=None):
  """The config of `bench.py:<arg>` (see the module docstring): `build` of the parsed settings."""
  opts = args_lib.parse(arg, switches=("smoke", "full"),
                        keys={"language": "english", "seed": 0, "seeds": 3},
                        minimum={"seeds": 1})
  if opts["smoke"] and opts["full"]:
    raise ValueError("choose at most one of the switches smoke and full")
  size = "smoke" if opts["smoke"] else "full" if opts["full"] else "default"
  return build(language=opts["language"], seed=opts["seed"], seeds=opts["seeds"], size=size)


def build(language: str = "english", seed: int = 0, seeds: int = 3,
          size: Literal["smoke", "default", "full"] = "default") -> ml_collections.ConfigDict:
  """`study.build(study="bench", ...)`: the same config, so workdirs of either name resume."""
  return study.build(study="bench", language=language, seed=seed, seeds=seeds, size=size)
