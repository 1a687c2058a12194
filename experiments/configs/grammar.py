"""Grammar survey: sample a language on device, check every sample, compare with exact values.

Command (about 15 s on 2 CPU cores, mostly compilation)::

    python -m experiments.main --config=experiments/configs/grammar.py:language=dyck2 \
        --workdir=workdirs/grammar_dyck2

Writes `report.md`, `report.json` and `lengths.png`. Expected for dyck2 (20,000 samples):
grammatical fraction 1.0000, rejection rate ≈ 0.053 (exact 0.0532), mean length ≈ 11.8
(exact 11.85), median 4, p90 30–32, mean maximum depth ≈ 2.75; z-scores against the exact
values within ±3. Switches: `smoke` (512 samples, seconds).
"""

import ml_collections

from experiments.configs import args as args_lib
from jaxsae import grammars


def get_config(arg=None):
  opts = args_lib.parse(arg, switches=("smoke",), keys={"language": "dyck2", "seed": 0})
  if opts["language"] not in grammars.names():
    raise ValueError(f"unknown language '{opts['language']}'; use one of {grammars.names()}")
  config = ml_collections.ConfigDict()
  config.job = "grammar"  # which job experiments.main runs
  config.language = opts["language"]  # a name from jaxsae.grammars.names()
  config.seed = opts["seed"]  # PRNG seed of the sample
  config.num_samples = 512 if opts["smoke"] else 20_000  # sentences sampled (count)
  config.max_len = 128  # sequence length in tokens (sentences up to max_len - 18)
  config.num_examples = 8  # example sentences printed in the report
  return config
