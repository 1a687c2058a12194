"""A trained SAE grid as a value: its setup, stacked state, LM and variants (`TrainedGrid`).

`load(workdir)` reads the workdir of a finished (or still training) `sae` job back: the config
(checked against the checkpoints' fingerprint), the LM it was trained on (pinned by content),
the setup (built from the config with the token capacity the job recorded, so nothing is
sampled) and the newest (or a given) checkpoint. Evaluation, analysis, interventions, causality
and export take the `TrainedGrid`; `TrainedGrid.variant(id)` takes one SAE out of its group's
stacked arrays.

`save(workdir, setup)` is what the training job writes for a read-back besides checkpoints and
config.json: `variants.json` (every group and variant) and `setup.json` (the token capacity it
trained with). Reads only: `load` writes nothing in the grid's or the LM's workdir.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Mapping

import jax
import jax.numpy as jnp

from jaxsae.core import checkpoint as ckpt_lib
from jaxsae.core import jsonio
from jaxsae.core import workdir as workdir_lib
from jaxsae.grid import grid_setup
from jaxsae.grid import grid_step
from jaxsae.grid import sae as sae_lib
from jaxsae.grid import sweep as sweep_lib
from jaxsae.lm import bundle

VARIANTS_FILE = "variants.json"
SETUP_FILE = "setup.json"


@dataclasses.dataclass(frozen=True)
class Variant:
  """One SAE of a trained grid, taken out of its group's stacked arrays (`TrainedGrid.variant`)."""

  params: Any  # the SAE's parameters, without the variant axis
  sae_config: sae_lib.SAEConfig
  hparams: sae_lib.SAEHparams
  sae_state: sae_lib.SAEState
  splice_mode: str
  spec_index: int  # its group: trained.setup.specs[spec_index]
  position: int  # its index in the group's stacked arrays (spec.ids[position])


@dataclasses.dataclass(frozen=True)
class TrainedGrid:
  """A trained grid (see `load`)."""

  config: Any  # the run's ConfigDict (from config.json)
  setup: grid_step.Setup
  lm: bundle.LMBundle
  state: grid_step.GridState  # the checkpoint restored, placed on `setup.mesh`
  hypers: tuple[grid_step.GroupHyper, ...]
  # What an eval or export of it records: workdir, checkpoint step and content digest, and a
  # digest of the config it was trained with.
  identity: Mapping[str, Any] = dataclasses.field(default_factory=dict)

  @property
  def variant_ids(self) -> tuple[str, ...]:
    """Every SAE's id, group by group (the keys of summary.json's 'variants')."""
    return tuple(vid for spec in self.setup.specs for vid in spec.ids)

  def variant(self, variant_id: str) -> Variant:
    """One SAE by id, ready for `sae.splice_fn`, `interventions` or `causality`.

    Raises:
      ValueError: an id the grid does not have (the message lists the known ids).
    """
    for gi, spec in enumerate(self.setup.specs):
      if variant_id in spec.ids:
        i = spec.ids.index(variant_id)
        group = self.state.groups[gi]
        pick = functools.partial(jax.tree.map, lambda x: x[i])
        return Variant(params=pick(group.params), sae_config=spec.sae,
                       hparams=pick(self.hypers[gi].hparams), sae_state=pick(group.sae_state),
                       splice_mode=spec.splice_mode, spec_index=gi, position=i)
    known = self.variant_ids
    shown = ", ".join(known[:20]) + (f", ... ({len(known)} in all)" if len(known) > 20 else "")
    raise ValueError(f"variant_id={variant_id!r} is not in this grid; its SAEs are {shown} (the "
                     "keys of summary.json's 'variants').")


# ------------------------------------------------------------------------------------------------
# Writing.


def hparams_json(values: Mapping[str, Any]) -> dict[str, Any]:
  """A variant's sweep values as JSON."""
  return {k: sweep_lib.to_json(v) for k, v in values.items()}


def write_variants(path: str, setup: grid_step.Setup) -> None:
  """variants.json: the groups (static fields, loss, splice mode) and every variant's values."""
  out = {"groups": [], "variants": []}
  for s in setup.specs:
    out["groups"].append({"name": s.name, "size": s.size, "padded": s.padded,
                          "sae": sae_lib.config_json(s.sae), "loss": dataclasses.asdict(s.loss),
                          "splice_mode": s.splice_mode,
                          **({"target_site": s.target_site} if s.target_site else {})})
    for i, vid in enumerate(s.ids):
      out["variants"].append({"id": vid, "group": s.name, "position": i,
                              "hparams": hparams_json(s.values[i])})
  out["variants"].sort(key=lambda v: v["id"])
  jsonio.write(path, out)


def save(workdir: str, setup: grid_step.Setup) -> None:
  """Writes what a read-back of the grid needs besides its config and checkpoints.

  variants.json (`write_variants`) and setup.json: the token capacity the grid trains with (a
  probe of sampled batches unless the config fixes it), so `load` builds the same setup without
  sampling.
  """
  write_variants(os.path.join(workdir, VARIANTS_FILE), setup)
  jsonio.write(os.path.join(workdir, SETUP_FILE), {"token_capacity": int(setup.capacity)})


def recorded_capacity(workdir: str) -> int | None:
  """The token capacity `save` recorded in `workdir`; None if it has no setup.json."""
  record = jsonio.read(os.path.join(workdir, SETUP_FILE))
  return int(record["token_capacity"]) if record else None


# ------------------------------------------------------------------------------------------------
# Reading.


def fingerprinted(config, workdir: str) -> dict[str, Any]:
  """The config as the checkpoints' fingerprint records it (lm_workdir relative to `workdir`)."""
  out = config.to_dict()
  if out.get("lm_workdir"):
    out["lm_workdir"] = workdir_lib.relative_path(out["lm_workdir"], workdir)
  return out


def check_config_unedited(config, workdir: str, ckpt_dir: str) -> dict[str, Any]:
  """config.json must be the config the checkpoints were written with (the fingerprint);
  returns the fingerprint."""
  recorded = ckpt_lib.read_fingerprint(ckpt_dir)
  if recorded is None:
    raise ckpt_lib.ConfigMismatchError(
        f"{ckpt_dir} holds checkpoints but no fingerprint.json, so {workdir}/config.json cannot "
        "be checked against the config that trained them; put the file back.")
  diffs = ckpt_lib.fingerprint_diffs(recorded, fingerprinted(config, workdir), ("lm_workdir",))
  if diffs:
    lines = "\n".join(f"  {n}: {o!r} (trained) != {v!r} (config.json)" for n, o, v in diffs)
    raise ckpt_lib.ConfigMismatchError(
        f"{workdir}/config.json was edited after training; it differs from the config the "
        f"checkpoints were written with ({ckpt_dir}/fingerprint.json):\n{lines}\nRestore "
        "those values (the grid's SAEs were trained with them); to train other values, use a "
        "new --workdir.")
  return recorded


def load(workdir: str, step: int | None = None) -> TrainedGrid:
  """Reads the `sae` job's workdir back: setup, LM and the checkpoint at `step`.

  Reads only: nothing in `workdir` or the LM's workdir is written (the grid may still be
  training). Nothing is sampled when the workdir records its token capacity (setup.json).

  Args:
    workdir: the SAE job's workdir (config.json and checkpoints/).
    step: checkpoint step to restore (default: the latest).

  Raises:
    FileNotFoundError: no config.json or no checkpoint (at `step`; the message says which job
      to run or which steps there are).
    checkpoint.ConfigMismatchError: config.json was edited after training.
    workdir.InputMismatchError: the LM is not the one the grid was trained on.
  """
  import ml_collections  # pylint: disable=g-import-not-at-top
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found: {workdir!r} is not an sae job workdir; train "
                            "the grid first (python -m experiments.main --config="
                            "experiments/configs/sae_*.py --workdir=...)")
  config = ml_collections.ConfigDict(workdir_lib.read_config(workdir))
  ckpt_dir = os.path.join(workdir, "checkpoints")
  with ckpt_lib.Checkpointer(ckpt_dir, read_only=True) as ckpt:
    steps = ckpt.all_steps()
    if not steps:
      raise FileNotFoundError(f"no checkpoint in {ckpt_dir}; the sae job in {workdir!r} has "
                              "not saved one yet (rerun it to finish training)")
    if step is not None and step not in steps:
      raise FileNotFoundError(f"{ckpt_dir} holds no checkpoint at step {step}; it holds steps "
                              f"{steps} (the last keep_checkpoints of the run)")
    fingerprint = check_config_unedited(config, workdir, ckpt_dir)
    lm = grid_setup.load_lm(config, workdir, grid_setup.recorded_lm_pin(workdir, ckpt))
    # Workdirs written before setup.json existed: `build` probes the capacity again (the same
    # sampled batches as at training time, so the same value).
    setup, root = grid_setup.build(config, lm, capacity=recorded_capacity(workdir))
    template = jax.eval_shape(lambda: grid_setup.init_grid(setup, lm, root))
    restored = ckpt.restore(template, step)
    grid_setup.check_restored_lm(restored, lm, workdir)
  state = grid_setup.place_state(
      grid_step.GridState(step=jnp.asarray(restored.state.step, jnp.int32),
                          groups=tuple(restored.state.groups)), setup)
  hypers = grid_setup.shard(tuple(grid_step.group_hyper(s) for s in setup.specs), setup)
  identity = {"path": os.path.abspath(workdir), "step": restored.step,
              "digest": restored.digest, "config": workdir_lib.digest_of(fingerprint)}
  return TrainedGrid(config=config, setup=setup, lm=lm, state=state, hypers=hypers,
                     identity=identity)
