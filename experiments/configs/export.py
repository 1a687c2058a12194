"""Export a trained SAE grid in jaxsae's SAELens-style format (see `jaxsae/export.py`).

Command (needs a finished sae job; seconds: restoring the checkpoint and writing files)::

    python -m experiments.main \
        --config=experiments/configs/export.py:sae_workdir=workdirs/sae_e2e_dyck2 \
        --workdir=workdirs/export_sae_e2e_dyck2

Writes `<workdir>/export/<variant_id>/` (cfg.json, sae_weights.npz, jaxsae_params.npz) for each
variant and `<workdir>/summary.json` (variant id -> directory). Settings: `sae_workdir=<dir>`,
`variants=<id>+<id>...` (ids joined by '+', since ',' separates settings; default all),
`step=<int>` (checkpoint step, 0 = the latest). Expected: one directory per requested variant;
`jaxsae.export.load_sae` on each returns the grid's params bit for bit.
"""

import ml_collections

from experiments.configs import args as args_lib


def get_config(arg=None):
  opts = args_lib.parse(arg, switches=(),
                        keys={"sae_workdir": "workdirs/sae_e2e_dyck2", "variants": "all",
                              "step": 0},
                        minimum={"step": 0})
  variants = "all" if opts["variants"] == "all" else opts["variants"].replace("+", ",")
  if not variants:
    raise ValueError("variants= is empty; give 'all' or ids joined by '+' (e.g. v000+v003)")
  config = ml_collections.ConfigDict()
  config.job = "export"  # which job experiments.main runs
  config.sae_workdir = opts["sae_workdir"]  # workdir of a finished `sae` job (config + checkpoints)
  config.variants = variants  # 'all', or comma-separated variant ids from its variants.json
  config.step = opts["step"]  # checkpoint step to export (0: the latest)
  return config
