"""Evaluation of a trained SAE grid: every metric of specs/sae.md (`jaxsae.evaluation.evaluate`, job `eval`: `jaxsae.eval_job`).

Command (after the grid's `sae` job; the eval workdir may be the grid's own)::

    python -m experiments.main \
        --config=experiments/configs/eval.py:sae_workdir=workdirs/sae_e2e_dyck2 \
        --workdir=workdirs/sae_e2e_dyck2

Settings after the colon (comma-separated): `sae_workdir=<dir>` (required), `seed=<int>`,
`num_batches=<int>`, `batch_size=<int>`, `window_tokens=<int>` (0: every held-out token),
`grammaticality_batches=<int>` (0: skip spliced generation), `grammaticality_batch_size=<int>`,
`splice_mode=corrected|original`, `positions=sentence|all`, `mask_positions=sentence|all`;
switch `smoke` (a few tiny batches, seconds, for tests). Counts are >= 1 unless 0 is listed;
omitted settings take the defaults below.

Writes `eval.json` in the workdir: per variant L0, alive / dead / dense latents and a density
histogram, MSE / NMSE / three explained variances, spliced CE / CE increase / KL / top-1 / TV,
CE recovered against zero and mean ablation, downstream MSE / EV, grammatical next-token mass,
and spliced grammaticality (5 × 128 generations per mode × positions) next to the clean
model's; the clean numbers once under `clean`. Then `report.md`, `report.json` and the plots
(Pareto fronts, matched e2e-vs-local comparison, grid tables) from eval.json and the grid's
summary.json; feature recovery and causal predictability come with the `pipeline` job.

Runtime, measured on 2 CPU cores shared with other jobs (load average ≈ 4) for the 12-variant
`sae_e2e` dyck2 grid (spec LM, d_model 128, max_len 64) with these defaults: 4.5 min wall,
650 MB peak memory; held-out metrics 14 s (10 × 128 sequences, 10k sentence tokens, compilation
included: one per group), spliced grammaticality 255 s (per variant 5 × 128 generations of up to
118 tokens for each positions value; the two splice modes coincide for SAEs without input /
recon norm and are generated once; normalised SAEs take twice as long). `smoke`: seconds.

Headline numbers depend on the trained grid and LM. Measured there only on an untrained LM (a
timing run): clean grammaticality 0.00 (random text), CE ≈ 2.49 nats. For a trained dyck2 LM
the clean model's own grammaticality is ≈ 0.98 (configs/lm.py); compare each variant's
`grammaticality/*` and `ce_recovered_*` with it.
"""

from typing import Literal

import ml_collections

from experiments.configs import args as args_lib


def get_config(arg=None):
  opts = args_lib.parse(
      arg, switches=("smoke",),
      keys={"sae_workdir": "", "seed": 0, "num_batches": int, "batch_size": int,
            "window_tokens": 0, "grammaticality_batches": int, "grammaticality_batch_size": int,
            "splice_mode": "", "positions": "sentence", "mask_positions": ""},
      minimum={"num_batches": 1, "batch_size": 1, "window_tokens": 0,
               "grammaticality_batches": 0, "grammaticality_batch_size": 1})
  settings = {k: v for k, v in opts.items() if k != "smoke"}
  return build(size="smoke" if opts["smoke"] else "default", **settings)


def build(sae_workdir: str = "", seed: int = 0,
          size: Literal["smoke", "default"] = "default", *, num_batches: int | None = None,
          batch_size: int | None = None, window_tokens: int = 0,
          grammaticality_batches: int | None = None,
          grammaticality_batch_size: int | None = None, splice_mode: str = "",
          positions: str = "sentence", mask_positions: str = "") -> ml_collections.ConfigDict:
  """The eval job's config; settings left None take the size's defaults (see the fields)."""
  if size not in ("smoke", "default"):
    raise ValueError(f"size={size!r}: use 'smoke' or 'default'")
  smoke = size == "smoke"
  default = lambda value, fallback: fallback if value is None else value
  c = ml_collections.ConfigDict()
  c.job = "eval"  # experiments.main job (jaxsae.eval_job.run)
  c.sae_workdir = sae_workdir  # workdir of a finished `sae` job (required)
  c.seed = seed  # evaluation seed: held-out stream and generations (never training's)
  c.num_batches = default(num_batches, 2 if smoke else 10)  # held-out batches
  c.batch_size = default(batch_size, 4 if smoke else 128)  # sequences per held-out batch
  # Firing window for alive / dead / dense latents, in masked tokens (0: every held-out token).
  c.window_tokens = window_tokens
  # Spliced grammaticality: generation batches per variant and combination (0: skip) ...
  c.grammaticality_batches = default(grammaticality_batches, 1 if smoke else 5)
  # ... of this many sequences each (the spec: 5 × 128).
  c.grammaticality_batch_size = default(grammaticality_batch_size, 4 if smoke else 128)
  c.grammaticality_modes = ("corrected", "original")  # splice modes generated with
  c.grammaticality_positions = ("all", "sentence")  # SAE at every position / after the decorator
  c.splice_mode = splice_mode  # held-out metrics: '' (each group's), corrected, original
  c.positions = positions  # held-out metrics: SAE at 'sentence' (mask) or 'all' positions
  c.mask_positions = mask_positions  # tokens that count: '' (grid's), sentence, all
  return c
