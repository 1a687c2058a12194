"""Grammar survey: sample a language on device, check every sample, compare with exact values.

Command (about 15 s on 2 CPU cores, mostly compilation)::

    python -m experiments.main --config=experiments/configs/grammar.py:language=dyck2 \
        --workdir=workdirs/grammar_dyck2

Writes `report.md`, `report.json` and `lengths.png`. Expected for dyck2 (20,000 samples):
grammatical fraction 1.0000, rejection rate ≈ 0.053 (exact 0.0532), mean length ≈ 11.8
(exact 11.85), median 4, p90 30–32, mean maximum depth ≈ 2.75; z-scores against the exact
values within ±3. Switches: `smoke` (512 samples, seconds).
"""

from typing import Literal

import ml_collections

from experiments.configs import args as args_lib
from jaxsae import grammars


def get_config(arg=None):
  """The config of `grammar.py:<arg>`: `build` of the parsed settings."""
  opts = args_lib.parse(arg, switches=("smoke",), keys={"language": "dyck2", "seed": 0})
  return build(language=opts["language"], seed=opts["seed"],
               size="smoke" if opts["smoke"] else "default")


def build(language: str = "dyck2", seed: int = 0,
          size: Literal["smoke", "default"] = "default") -> ml_collections.ConfigDict:
  """The grammar survey's config ('smoke': 512 samples instead of 20,000)."""
  if language not in grammars.names():
    raise ValueError(f"unknown language '{language}'; use one of {grammars.names()}")
  if size not in ("smoke", "default"):
    raise ValueError(f"size={size!r}: use 'smoke' or 'default'")
  config = ml_collections.ConfigDict()
  config.job = "grammar"  # which job experiments.main runs
  config.language = language  # a name from jaxsae.grammars.names()
  config.seed = seed  # PRNG seed of the sample
  config.num_samples = 512 if size == "smoke" else 20_000  # sentences sampled (count)
  config.max_len = 128  # sequence length in tokens (sentences up to max_len - 18)
  config.num_examples = 8  # example sentences printed in the report
  return config
