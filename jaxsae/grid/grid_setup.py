"""The static setup of an SAE grid from its config and LM, and its initial, placed state.

What both the training job (`train_sae`) and a read-back of its workdir (`trained`) build from
a grid's config: the LM it trains on (pinned by content once recorded), the device mesh, the
groups, the lengths, the token capacity and the `grid_step.Setup`; the initial grid state and
its placement on the mesh. Key schedule of a grid (root = `jax.random.key(config.seed)`):
`fold_in(root, DATA_STREAM)` the training data, `fold_in(root, PROBE_STREAM)` the capacity
probe, `fold_in(root, PROBE_STREAM + 1)` the activations of data-dependent pre-bias inits.

The token capacity (selected tokens per batch) is probed from 16 sampled batches unless the
config fixes it; the training job records the value it used in the workdir (`trained.save`) so
a read-back passes it in instead of probing again.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxsae import grammars
from jaxsae.core import checkpoint as ckpt_lib
from jaxsae.core import workdir as workdir_lib
from jaxsae.grid import grid_step
from jaxsae.grid import sae_groups
from jaxsae.lm import bundle

DATA_STREAM, PROBE_STREAM = 1, 2


# ------------------------------------------------------------------------------------------------
# The LM.


def load_pinned_lm(lm_workdir: str, pin: Mapping[str, Any] | None,
                   workdir: str) -> bundle.LMBundle:
  """The LM of a grid: at the pinned step when the grid has one, checked against the pin."""
  fix = (f"The grid in {workdir!r} was trained on that LM's checkpoint; point lm_workdir at it "
         "(or put it back), or train a new grid in a new --workdir.")
  if not pin:
    return bundle.load(lm_workdir)
  try:
    lm = bundle.load(lm_workdir, int(pin["step"]))
  except FileNotFoundError as e:
    raise workdir_lib.InputMismatchError(
        f"the LM in {lm_workdir!r} is not the one this workdir was built from (step "
        f"{pin['step']}, digest {pin['digest'][:12]}…): {e}. {fix}") from None
  workdir_lib.check_input(f"the LM in {lm_workdir!r}", pin, lm.identity(workdir), fix)
  return lm


def load_lm(config, workdir: str | None, pin: Mapping[str, Any] | None) -> bundle.LMBundle:
  """The LM named by `config.lm_workdir`, or, when that is gone and the grid has a pin, the one
  at the pinned path relative to `workdir` (a grid moved together with its LM)."""
  lm_dir = config.lm_workdir
  if pin and not os.path.isdir(lm_dir) and workdir and pin.get("path"):
    lm_dir = workdir_lib.resolve(workdir, pin["path"])  # both moved together
  return load_pinned_lm(lm_dir, pin, workdir or ".")


def recorded_lm_pin(workdir: str, ckpt: ckpt_lib.Checkpointer) -> dict[str, Any] | None:
  """The LM identity a grid with checkpoints was built from (inputs.json, else the newest
  checkpoint's metadata; None for grids written before LMs were pinned)."""
  pin = workdir_lib.read_inputs(workdir).get("lm")
  if pin:
    return pin
  try:
    return ckpt.metadata(ckpt.latest_step()).get("lm")
  except Exception:  # pylint: disable=broad-except  # a corrupted newest one: restore decides
    return None


def check_restored_lm(restored: ckpt_lib.Restored, lm: bundle.LMBundle, workdir: str) -> None:
  """A restored grid checkpoint must have been trained on `lm` (its metadata's pin)."""
  workdir_lib.check_input(
      f"the LM in {lm.workdir!r}", restored.metadata.get("lm"), lm.identity(workdir),
      f"Checkpoint step {restored.step} of {workdir!r} was trained on another LM; point "
      "lm_workdir at that LM, or train a new grid in a new --workdir.")


# ------------------------------------------------------------------------------------------------
# The setup.


def mesh_for(config) -> Any:
  """The ('variant', 'data') device mesh of `config.mesh_variant_devices`."""
  devices = jax.devices()
  n = len(devices)
  n_var = n if config.mesh_variant_devices in (-1, None) else config.mesh_variant_devices
  if n_var < 1 or n % n_var:
    raise ValueError(f"config.mesh_variant_devices={config.mesh_variant_devices} must divide "
                     f"the {n} devices (or be -1 for all of them)")
  n_data = n // n_var
  if config.batch_size % n_data:
    raise ValueError(f"config.batch_size={config.batch_size} must be divisible by the "
                     f"{n_data} data-parallel devices; change batch_size or "
                     "mesh_variant_devices")
  return jax.sharding.Mesh(np.array(devices).reshape(n_var, n_data), ("variant", "data"))


def probe_capacity(grammar, batch_size, max_len, forward_len, positions, token_capacity,
                   key) -> int:
  """Selected tokens per batch: 1.25 × the most seen in 16 probe batches (multiple of 8)."""
  full = batch_size * forward_len
  if positions == "all" or token_capacity == -1:
    return full
  if token_capacity > 0:
    return min(full, token_capacity)
  counts = []
  for i in range(16):
    b = grammars.sample(jax.random.fold_in(key, i), grammar, batch_size, max_len)
    counts.append(int(np.asarray(grammars.selected_mask(grammar, b, positions,
                                                        forward_len)).sum()))
  return int(min(full, -(-int(1.25 * max(counts)) // 8) * 8))


def lengths(config, lm: bundle.LMBundle) -> tuple[int, int]:
  """(max_len, forward_len) of a grid: the config's, 0 meaning the LM's sequence length."""
  max_len = config.max_len or int(lm.config["max_len"])
  return max_len, config.forward_len or max_len


def check_targets(specs, site: str) -> None:
  """Transcoder groups (`target_site`) and the grid's site must pair up: site `mlp_in.{l}`
  with target `mlp_out.{l}` of the same block, in every group (the grid has one site).

  Raises:
    ValueError: naming the group, the mismatch and the fix.
  """
  kind, _, layer = site.partition(".")
  for s in specs:
    if s.target_site:
      if s.target_site != f"mlp_out.{layer}" or kind != "mlp_in":
        fix = (f"set config.site='mlp_in.{s.target_site.partition('.')[2]}'"
               if kind != "mlp_in" else f"set target_site='mlp_out.{layer}'")
        raise ValueError(f"group {s.name}: target_site={s.target_site!r} with config.site="
                         f"{site!r}: a transcoder reads MLP l's input (mlp_in.l) and stands for "
                         f"its output (mlp_out.l) of the same block; {fix}")
    elif kind == "mlp_in":
      raise ValueError(f"group {s.name} has no target_site but config.site={site!r}: at the "
                       f"MLP's input only transcoders train; set target_site='mlp_out.{layer}' "
                       "in the sweep, or move config.site to a resid_pre / resid_post site")


def build(config, lm: bundle.LMBundle, capacity: int | None = None
          ) -> tuple[grid_step.Setup, jax.Array]:
  """The static setup of the grid of `config` on `lm`, and the grid's root key.

  Args:
    config: the `sae` job's config (already validated).
    lm: the LM it trains on.
    capacity: the token capacity the grid was trained with (`trained.save` records it); None
      probes it (`probe_capacity`).

  Raises:
    ValueError: a mesh that does not fit the devices, an e2e_ds group with no downstream
      resid site, or transcoder groups that do not pair with the site (`check_targets`).
  """
  mc = lm.model_config
  max_len, forward_len = lengths(config, lm)
  mesh = mesh_for(config)
  specs, _ = sae_groups.build_groups(list(config.sweep), mc.d_model, mesh.shape["variant"])
  check_targets(specs, config.site)
  for s in specs:
    if s.loss.needs_downstream and not s.loss.downstream_sites(mc, config.site):
      raise ValueError(f"group {s.name} uses e2e_ds but no resid_post follows {config.site} "
                       "(include_final_resid=False); include the final resid or use e2e")
  grammar = grammars.get(lm.language)
  root = jax.random.key(config.seed)
  if capacity is None:
    capacity = probe_capacity(grammar, config.batch_size, max_len, forward_len,
                              config.positions, config.token_capacity,
                              jax.random.fold_in(root, PROBE_STREAM))
  setup = grid_step.Setup(
      grammar=grammar, model_config=mc, site=config.site, specs=tuple(specs),
      batch_size=config.batch_size, max_len=max_len, forward_len=forward_len,
      positions=config.positions, capacity=capacity, schedule=config.schedule,
      warmup_steps=config.warmup_steps, total_steps=config.decay_steps or config.steps,
      lr_floor=config.lr_floor,
      grad_clip=config.grad_clip, adam=(config.adam_b1, config.adam_b2, config.adam_eps),
      mesh=mesh,
      variant_loop=grid_step.resolve_variant_loop(config.get("variant_loop", "auto"), mesh))
  return setup, root


# ------------------------------------------------------------------------------------------------
# The state.


def _data_sample(lm: bundle.LMBundle, setup: grid_step.Setup, root) -> jax.Array | None:
  """Activations for data-dependent pre-bias inits (mean / median)."""
  if not any(s.sae.pre_bias and s.sae.pre_bias_init != "zero" for s in setup.specs):
    return None
  key = jax.random.fold_in(root, PROBE_STREAM + 1)
  batch = grid_step.make_batch(lm.params, jnp.int32(0), key, setup)
  return batch.flat_CD[: int(np.asarray(batch.flat_mask_C).sum())]


def init_grid(setup: grid_step.Setup, lm: bundle.LMBundle, root) -> grid_step.GridState:
  """The grid's state at step 0 (under `jax.eval_shape`: a checkpoint's restore template)."""
  sample = _data_sample(lm, setup, root)
  return grid_step.GridState(step=jnp.int32(0),
                   groups=tuple(grid_step.init_group(s, setup, sample) for s in setup.specs))


def shard(tree, setup: grid_step.Setup, spec=P("variant")):
  """`tree` placed on the setup's mesh with `spec` (default: split over the variant axis)."""
  return jax.device_put(tree, NamedSharding(setup.mesh, spec))


def state_shardings(setup: grid_step.Setup, state: grid_step.GridState) -> grid_step.GridState:
  """Replicated step, variant-sharded groups (also the jit's output shardings, so the state
  fed back in matches and nothing recompiles)."""
  return grid_step.GridState(step=NamedSharding(setup.mesh, P()),
                   groups=jax.tree.map(lambda _: NamedSharding(setup.mesh, P("variant")),
                                       state.groups))


def place_state(state: grid_step.GridState, setup: grid_step.Setup) -> grid_step.GridState:
  """`state` placed on the mesh by `state_shardings`."""
  return jax.device_put(state, state_shardings(setup, state))
