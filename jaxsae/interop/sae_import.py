"""Import of SAEs trained elsewhere (SAELens 6 directories) as an `sae` job workdir.

`import_grid(sae_dirs, config, workdir)` reads each directory with `saelens.load` (exact: our
splice equals SAELens' forward), builds the grid of `config` (an `sae` job config naming the
jaxsae LM the SAEs were trained on) with one `set` sweep block per SAE, puts the imported
parameters in place of the initial ones and writes config.json, variants.json, setup.json and a
checkpoint at step `config.steps`. `trained.load(workdir)` then reads it like any trained grid, so
the eval job, the feature analysis and the interventions take it as they are; variant `v{i:03d}`
is `sae_dirs[i]` (imported.json lists them). Rerunning the `sae` job on the workdir finds the
run finished and trains nothing.

The SAEs become decoder_norm 'none' (the dictionary as SAELens applies it), init 'menon' (unused)
and loss 'local' (unused by evaluation); the site is the SAEs' hook (all must share one).
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxsae.core import checkpoint as ckpt_lib
from jaxsae.core import jsonio
from jaxsae.core import workdir as workdir_lib
from jaxsae.grid import grid_setup
# The import creates an `sae` workdir, so it validates its config and fingerprints it as the
# `sae` job does (`train_sae.prepare`, `train_sae.MUTABLE_FIELDS`).
from jaxsae.grid import train_sae
from jaxsae.grid import trained as trained_lib
from jaxsae.interop import saelens as saelens_lib
from jaxsae.lm import bundle

IMPORTED_FILE = "imported.json"


def sweep_for(imported: Sequence[saelens_lib.Imported], d_model: int) -> list[dict[str, Any]]:
  """One `set` sweep block per imported SAE (its static fields and k)."""
  blocks = []
  for i, imp in enumerate(imported):
    c = imp.sae_config
    if c.d_in != d_model:
      raise ValueError(f"SAE {i} reads d_in={c.d_in} but the LM's d_model is {d_model}; import "
                       "SAEs trained on this LM")
    if c.width % d_model:
      raise ValueError(f"SAE {i} has d_sae={c.width}, not a multiple of d_model={d_model}; "
                       "the grid's widths are expansion × d_model")
    fields = {"loss": "local", "activation": c.activation, "expansion": c.width // d_model,
              "enc_bias": c.enc_bias, "dec_bias": c.dec_bias, "pre_bias": c.pre_bias,
              "decoder_norm": c.decoder_norm, "input_norm": c.input_norm, "init": c.init,
              "splice_mode": imp.splice_mode}
    if c.uses_k:
      fields["k"] = int(np.asarray(imp.hparams.k))
    blocks.append({"set": fields})
  return blocks


def import_grid(sae_dirs: Sequence[str], config, workdir: str) -> dict[str, str]:
  """Writes an `sae` workdir holding the SAEs of `sae_dirs` (module docstring).

  Args:
    sae_dirs: SAELens 6 SAE directories, all at the same hook of the LM.
    config: an `sae` job config (e.g. `experiments/configs/sae_e2e.py`) whose lm_workdir is
      the LM the SAEs read; its sweep, site and step counts are replaced.
    workdir: the new workdir (must not hold checkpoints yet).

  Returns:
    variant id -> source directory (also written to imported.json).

  Raises:
    ValueError: no directories, SAEs at different or unknown hooks, shapes that do not fit the
      LM, or a workdir that already holds checkpoints. Errors of `saelens.load`.
  """
  if not sae_dirs:
    raise ValueError("sae_dirs is empty; give SAELens SAE directories (cfg.json + "
                     "sae_weights.safetensors)")
  imported = [saelens_lib.load(d) for d in sae_dirs]
  sites = sorted({str(imp.site) for imp in imported})
  if len(sites) != 1 or sites[0] == "None":
    hooks = sorted({str((imp.cfg.get("metadata") or {}).get("hook_name")) for imp in imported})
    raise ValueError(f"the SAEs read hooks {hooks}; import SAEs of one residual-stream hook "
                     "(blocks.<l>.hook_resid_pre / hook_resid_post) at a time")
  ckpt_dir = os.path.join(workdir, "checkpoints")
  if os.path.isdir(ckpt_dir) and os.listdir(ckpt_dir):
    raise ValueError(f"{workdir!r} already holds checkpoints; import into a new workdir")
  lm = bundle.load(config.lm_workdir)
  config.sweep = sweep_for(imported, lm.model_config.d_model)
  config.site = sites[0]
  config.steps = config.log_every = config.checkpoint_every = 1
  train_sae.validate_config(config)
  setup, lm, root = train_sae.prepare(config, workdir)
  state = grid_setup.init_grid(setup, lm, root)
  groups = []
  for spec, group in zip(setup.specs, state.groups):
    params = {k: np.array(v) for k, v in group.params.items()}
    for i, vid in enumerate(spec.ids):
      source = imported[int(vid[1:])].params
      if set(source) != set(params):
        raise ValueError(f"{vid}: imported params {sorted(source)} do not match the group's "
                         f"{sorted(params)}")
      for k in params:
        params[k][i] = np.asarray(source[k])
    groups.append(group.replace(params={k: jnp.asarray(v) for k, v in params.items()}))
  state = state.replace(step=jnp.int32(config.steps), groups=tuple(groups))
  os.makedirs(workdir, exist_ok=True)
  workdir_lib.write_config(workdir, config)
  trained_lib.save(workdir, setup)
  sources = {f"v{i:03d}": os.path.abspath(d) for i, d in enumerate(sae_dirs)}
  jsonio.write(os.path.join(workdir, IMPORTED_FILE), sources)
  with ckpt_lib.Checkpointer(ckpt_dir, max_to_keep=max(int(config.keep_checkpoints), 1)) as ckpt:
    ckpt_lib.check_fingerprint(ckpt_dir, config, train_sae.MUTABLE_FIELDS, has_checkpoints=False)
    ckpt.save(config.steps, jax.device_get(state), metadata={"language": lm.language})
  return sources
