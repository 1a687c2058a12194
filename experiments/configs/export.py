"""Export a trained SAE grid in SAELens 6's format, and its LM for TransformerLens with the LM run's
token streams (see `jaxsae/interop/export.py`, `jaxsae/interop/saelens.py`, `jaxsae/interop/lm_export.py`).

Command (needs a finished sae job; seconds: restoring the checkpoint and writing files)::

    python -m experiments.main \
        --config=experiments/configs/export.py:sae_workdir=workdirs/sae_e2e_dyck2 \
        --workdir=workdirs/export_sae_e2e_dyck2

Writes `<workdir>/export/<variant_id>/` (cfg.json, sae_weights.safetensors, jaxsae.json,
jaxsae_params.npz) for each variant, `<workdir>/export/export.json` (per variant: loaded by
SAELens or refused, and how it was mapped), `<workdir>/lm/` (TransformerLens config.json +
model.safetensors), `<workdir>/data/` (tokens.npz, tokens.parquet if pyarrow is installed,
dataset.json) and `<workdir>/summary.json`. Settings: `sae_workdir=<dir>`, `variants=<id>+<id>...`
(ids joined by '+', since ',' separates settings; default all), `step=<int>` (checkpoint step, 0 =
the latest), `lm=<bool>` (also the LM and data; default true), `train_batches=<int>` (LM training
batches in the dataset's train split). Expected: one directory per requested variant;
`jaxsae.interop.export.load_sae` on each returns the grid's params bit for bit, `sae_lens.SAE.load_from_disk`
loads every variant export.json marks loadable.
"""

import ml_collections

from experiments.configs import args as args_lib


def get_config(arg=None):
  """The config of `export.py:<arg>`: `build` of the parsed settings."""
  opts = args_lib.parse(arg, switches=(),
                        keys={"sae_workdir": "workdirs/sae_e2e_dyck2", "variants": "all",
                              "step": 0, "lm": True, "train_batches": 8},
                        minimum={"step": 0, "train_batches": 1})
  variants = "all" if opts["variants"] == "all" else opts["variants"].replace("+", ",")
  return build(sae_workdir=opts["sae_workdir"], variants=variants, step=opts["step"],
               lm=opts["lm"], train_batches=opts["train_batches"])


def build(sae_workdir: str = "workdirs/sae_e2e_dyck2", variants: str = "all", step: int = 0,
          lm: bool = True, train_batches: int = 8) -> ml_collections.ConfigDict:
  """The export job's config (variants: 'all' or comma-separated variant ids)."""
  if train_batches < 1:
    raise ValueError(f"train_batches={train_batches} must be >= 1")
  if not variants:
    raise ValueError("variants= is empty; give 'all' or ids joined by '+' (e.g. v000+v003)")
  config = ml_collections.ConfigDict()
  config.job = "export"  # which job experiments.main runs
  config.sae_workdir = sae_workdir  # workdir of a finished `sae` job (config + checkpoints)
  config.variants = variants  # 'all', or comma-separated variant ids from its variants.json
  config.step = step  # checkpoint step to export (0: the latest)
  config.lm = lm  # also export the grid's LM (TransformerLens) and its token streams
  config.train_batches = train_batches  # LM training batches in the dataset (batches)
  return config
