"""LM training on a grammar: the spec's 2-layer, 128-wide GPT (`jaxsae.lm.train_lm`, job `lm`).

Command (CPU default for the language; rerun the same command to resume)::

    python -m experiments.main --config=experiments/configs/lm.py:language=dyck2 \
        --workdir=workdirs/lm_dyck2

Settings after the colon (comma-separated): `language=<name>` (any of
`jaxsae.grammars.names()`), `seed=<int>`, `steps=<int>` (overrides num_steps; a finished run
in the same workdir is extended), `batch_size=<int>`, `max_len=<int>` (each >= 1; omitted: the
defaults below), `loss_reduction=token|sequence` (default token: the per-token mean CE, whose
models generate sentences as long as the data's; `sequence` is the spec's per-sequence mean,
whose models' sentences come out shorter, see below); switches `full` (the
paper's budget for accelerators: batch 128 x 128, 70k steps) and `smoke` (a few steps of a
small batch, seconds, for tests).

Writes `metrics.jsonl`, `config.json`, `summary.json` and `checkpoints/` in the workdir (see
`jaxsae/lm/train_lm.py`).

Expected runtime and headline numbers of the CPU defaults (rows trained with the spec's
per-sequence mean loss unless marked; dyck2's default is now 3,000 steps, see its per-token
row and `experiments/results/lm_token_loss/`), measured on 2 CPU cores shared with
other jobs (load average 2-7, so wall times vary up to 2x; "wall" is the whole command, compile
and evaluations included). Grammatical = fraction of 5 x 128 temperature-1 generations (up to
118 new tokens) accepted by the exact recogniser, mean ± std over the 5 batches; eval CE = the
training loss on 4 x 128 held-out sequences; mass = grammatical next-token mass.

| language | max_len | steps | train s | wall s | grammatical | eval CE | mass |
|---|---|---|---|---|---|---|---|
| dyck2 | 64 | 1500 | 933 | 992 | 0.983 ± 0.010 | 0.410 | 0.995 |
| dyck2 (per-token loss) | 64 | 3000 | 1758 | — | 0.972 ± 0.017 | 0.408 | 0.996 |
| dyck2_p03 | 64 | 1000 | 350 | 375 | 0.983 ± 0.009 | 0.363 | 0.987 |
| expr_prefix | 64 | 1000 | 584 | 639 | 0.989 ± 0.015 | 0.718 | 0.998 |
| expr_postfix | 64 | 1000 | 330 | 352 | 0.988 ± 0.009 | 0.733 | 0.994 |
| english | 48 | 1000 | 193 | 226 | 0.988 ± 0.008 | 1.460 | 0.998 |
| english_transitive | 64 | 1500 | 477 | 523 | 0.991 ± 0.003 | 1.719 | 0.998 |
| english_relative | 96 | 1500 | 1135 | 1206 | 0.977 ± 0.010 | 1.986 | 0.995 |
| english_prep | 96 | 1500 | 974 | ~1040 | 0.986 ± 0.006 | 1.954 | 0.998 |
| english_pconj03 | 96 | 1500 | 970 | ~1040 | 0.973 ± 0.008 | 1.982 | 0.999 |

(english_prep and english_pconj03 were trained side by side, one core each.)

The relative run's grammatical fraction of the periodic 128-sample check was 0.81 / 0.91 /
0.98 at steps 500 / 1000 / 1500 (it needs the full 1500); at ~16k tokens/s under load it took
20 min, ~13 min uncontended.
Uncontended, the spec model trains at ~23k tokens/s (0.35 s per 128 x 64 step; see
`benchmarks/lm.py`), so dyck2's 1500 steps take ~9 min. Models trained with the spec's
per-sequence mean loss generate somewhat shorter sentences than the data (e.g. dyck2: mean
5.9 vs 8.1 tokens): the per-sequence normalisation up-weights short sequences, hence `<eos>`.

Length-filter rejection rates of the training data (draws longer than max_len - 18 tokens are
redrawn): dyck2 0.10 at 64 (0.05 at 128), dyck2_p03 0.02, expr 0.02, english 0.01 at 48,
english_transitive 0.02 at 64; the heavy-tailed English variants reject far more (relative
0.24 / prep 0.18 / pconj03 0.12 at 96; 0.18 / 0.14 / 0.08 even at 128).

`full`: batch 128 x 128, 70k steps, checkpoints every 5k; meant for an accelerator (about
14 h at the CPU's ~23k tokens/s).
"""

from typing import Literal

import ml_collections

from experiments.configs import args as args_lib
from jaxsae import grammars

# Per-language CPU defaults: (max_len in tokens, optimizer steps). Sentences are at most
# max_len - 18 tokens; the sampler redraws longer ones (rejection rates in the docstring).
_CPU = {
    "dyck2": (64, 3000),
    "dyck2_p03": (64, 1000),
    "expr_prefix": (64, 1000),
    "expr_postfix": (64, 1000),
    "english": (48, 1000),
    "english_transitive": (64, 1500),
    # Heavy-tailed lengths: 96 keeps most sentences (see the rejection rates) at 2/3 the cost
    # of 128; prep and pconj03 are set by analogy with relative (not measured).
    "english_relative": (96, 1500),
    "english_prep": (96, 1500),
    "english_pconj03": (96, 1500),
}


SIZES = ("smoke", "default", "full")


def get_config(arg=None):
  """The config of `lm.py:<arg>` (see the module docstring): `build` of the parsed settings."""
  opts = args_lib.parse(arg, switches=("smoke", "full"),
                        keys={"language": "dyck2", "seed": 42, "steps": int,
                              "batch_size": int, "max_len": int, "loss_reduction": "token"},
                        minimum={"steps": 1, "batch_size": 1, "max_len": 1})
  if opts["smoke"] and opts["full"]:
    raise ValueError("choose at most one of the switches 'smoke' and 'full'")
  size = "smoke" if opts["smoke"] else "full" if opts["full"] else "default"
  return build(language=opts["language"], seed=opts["seed"], size=size, steps=opts["steps"],
               batch_size=opts["batch_size"], max_len=opts["max_len"],
               loss_reduction=opts["loss_reduction"])


def build(language: str = "dyck2", seed: int = 42,
          size: Literal["smoke", "default", "full"] = "default", *, steps: int | None = None,
          batch_size: int | None = None, max_len: int | None = None,
          loss_reduction: Literal["token", "sequence"] = "token") -> ml_collections.ConfigDict:
  """The lm job's config.

  Args:
    language: a name from `jaxsae.grammars.names()`.
    seed: the root PRNG seed.
    size: 'default' (the language's CPU budget), 'full' (the paper's, for accelerators) or
      'smoke' (a tiny model for a few steps, for tests).
    steps, batch_size, max_len: overrides of num_steps / batch_size / max_len (None: the
      size's and language's defaults).
    loss_reduction: 'token' (the per-token mean CE) or 'sequence' (the spec's per-sequence
      mean; its models generate shorter sentences than their data).
  """
  if language not in grammars.names():
    raise ValueError(f"unknown language '{language}'; use one of {grammars.names()}")
  if size not in SIZES:
    raise ValueError(f"size={size!r}: use one of {SIZES}")
  smoke = size == "smoke"
  default_max_len, num_steps = _CPU[language]
  default_batch_size, steps_per_call = 128, 25
  if size == "full":
    default_max_len, num_steps, steps_per_call = 128, 70_000, 100
  if smoke:
    default_max_len, num_steps, default_batch_size, steps_per_call = 32, 4, 8, 2
  # Settings not given (None) keep the language's / size's defaults.
  max_len = default_max_len if max_len is None else max_len
  batch_size = default_batch_size if batch_size is None else batch_size
  num_steps = num_steps if steps is None else steps

  config = ml_collections.ConfigDict()
  config.job = "lm"  # which job experiments.main runs
  config.language = language  # a name from jaxsae.grammars.names()
  config.seed = seed  # root PRNG seed: params init, data stream, eval streams

  # The spec's model (smoke: a tiny one of the same structure, so tests compile fast).
  config.model = ml_collections.ConfigDict()
  config.model.n_layers = 2  # transformer blocks
  config.model.n_heads = 2  # attention heads (head dim = d_model / n_heads)
  config.model.d_model = 128 if not smoke else 32  # residual width (units)
  config.model.d_mlp = 512 if not smoke else 64  # MLP hidden width (units)
  # Learned positions (tokens); must cover max_len and 7 + eval.max_new_tokens.
  config.model.context = 256 if not smoke else 64

  config.batch_size = batch_size  # sequences per optimizer step
  config.max_len = max_len  # tokens per training sequence (decorator + sentence + <eos> + pad)
  config.mask_decorator = False  # True: exclude decorator targets from the loss
  # 'token': mean CE over every target of a batch (its generations match the data's lengths);
  # 'sequence': the spec's mean over each sequence, then the batch (shorter generations).
  config.loss_reduction = loss_reduction

  config.optim = ml_collections.ConfigDict()
  config.optim.peak_lr = 1e-3  # learning rate after warm-up (per step)
  config.optim.end_lr = 9e-4  # cosine end value, reached at decay_steps
  config.optim.warmup_steps = 200  # linear warm-up length (optimizer steps)
  # Cosine horizon (optimizer steps, counted from 0, warm-up included). The original planned
  # 1e6 steps and stopped at 70k, so the rate is ~constant; fixed independently of num_steps
  # so that a run can be extended without changing its past schedule.
  config.optim.decay_steps = 1_000_000
  config.optim.b1 = 0.9  # AdamW beta1
  config.optim.b2 = 0.95  # AdamW beta2
  config.optim.weight_decay = 1e-4  # decoupled decay (per step, times lr) on >= 2-D params
  config.optim.grad_clip = 1.0  # global gradient-norm clip

  config.num_steps = num_steps  # total optimizer steps
  config.steps_per_call = steps_per_call  # optimizer steps per host call (lax.scan length)
  config.log_every = 100 if not smoke else 2  # steps between progress lines
  config.eval_every = 500 if not smoke else 2  # steps between periodic evaluations
  config.checkpoint_every = 500 if not smoke else 2  # steps between checkpoints
  config.keep_checkpoints = 3  # most recent checkpoints kept on disk
  if size == "full":
    config.log_every, config.eval_every, config.checkpoint_every = 1000, 5000, 5000

  config.eval = ml_collections.ConfigDict()
  config.eval.batches = 4 if not smoke else 1  # held-out batches for CE / mass
  config.eval.batch_size = 128 if not smoke else 8  # sequences per held-out batch
  config.eval.gen_batches = 1  # periodic generation check: batches
  config.eval.gen_batch_size = 128 if not smoke else 8  # ... of this many samples
  config.eval.final_gen_batches = 5 if not smoke else 2  # final check: batches
  config.eval.final_gen_batch_size = 128 if not smoke else 8  # ... of this many
  # Generation budget after the decorator (tokens); the spec's 118 (smoke: 24).
  config.eval.max_new_tokens = 118 if not smoke else 24
  config.eval.temperature = 1.0  # sampling temperature (> 0)
  config.eval.top_k = 0  # sample among the k most likely tokens; 0 = all

  config.debug_nan_step = -1  # test hook: NaN params at this step (-1 = off)
  return config
