"""The SAE grid-training job: every variant of a sweep trained in one compiled program.

`run(config, workdir)` loads the LM checkpoint named by the config, validates the sweep and
builds its groups (`sae_groups`) before compiling anything, then trains all groups together
(`grid_step`): `log_every` steps run inside one `lax.scan` per host call with the state
donated; metrics are fetched once per call and appended to `metrics.jsonl` per variant. A
variant whose loss or gradients turn non-finite is frozen at its last good parameters and
flagged (with its hyperparameters) in the logs and `summary.json`; the others are untouched.
A variant whose finite loss grows by orders of magnitude is flagged the same way
(`summary.json`'s `diverged`; `jaxsae.core.divergence`).
Checkpoints hold the whole grid state; data is a pure function of (seed, step), so resume is
exact. `load_trained` / `variant` read a finished workdir back.

Workdir guarantees (`jaxsae.core.workdir`): the job holds the workdir's writer lock; the LM it trains
on is pinned (its workdir relative to this one, checkpoint step and content digest, in
`inputs.json` and in every checkpoint's metadata), and a resume or a `load_trained` against a
different LM, a config that differs from the checkpoints' fingerprint, or a `config.json` edited
after training is refused before anything is written. `summary.json` is built from the
checkpoint and `metrics.jsonl`, so a rerun of a finished job, or a resume after any kill, writes
the same summary as an uninterrupted run. The LM is read without writing to its workdir.

Devices: a mesh with axes ('variant', 'data'); each group's variant axis is padded to a multiple
of the variant-axis size and sharded over it, the batch over 'data'.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import time
from typing import Any, Mapping, Sequence

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxsae import grammars
from jaxsae.core import checkpoint as ckpt_lib
from jaxsae.core import distributed
from jaxsae.core import divergence
from jaxsae.core import jsonio
from jaxsae.core import workdir as workdir_lib
from jaxsae.grid import grid_step
from jaxsae.grid import sae as sae_lib
from jaxsae.grid import sae_groups
from jaxsae.grid import sweep as sweep_lib
from jaxsae.lm import model as model_lib

# ------------------------------------------------------------------------------------------------
# The job.


@dataclasses.dataclass(frozen=True)
class LoadedLM:
  params: Any
  model_config: model_lib.ModelConfig
  language: str
  step: int
  config: Mapping[str, Any]
  workdir: str = ""
  digest: str = ""  # content digest of the checkpoint restored (`checkpoint.Restored.digest`)

  def identity(self, relative_to: str) -> dict[str, Any]:
    """What a workdir built on this LM records: its path relative to `relative_to`, the
    checkpoint step and content digest."""
    return {"path": workdir_lib.relative_path(self.workdir, relative_to), "step": self.step,
            "digest": self.digest}


def load_lm(lm_workdir: str, step: int | None = None) -> LoadedLM:
  """Loads an LM checkpoint of a `train_lm` workdir (params only), without writing there.

  Args:
    lm_workdir: the LM job's workdir (it may still be training).
    step: the checkpoint step to load; default the newest valid one.

  Raises:
    FileNotFoundError: no LM there, or no checkpoint (at `step`).
  """
  from jaxsae.lm import train_lm  # pylint: disable=g-import-not-at-top
  import ml_collections  # pylint: disable=g-import-not-at-top
  cfg_path = os.path.join(lm_workdir, "config.json")
  ckpt_dir = os.path.join(lm_workdir, "checkpoints")
  if not os.path.exists(cfg_path) or not os.path.isdir(ckpt_dir):
    raise FileNotFoundError(
        f"no trained LM in {lm_workdir!r} (config.json / checkpoints missing); train one with "
        f"python -m experiments.main --config=experiments/configs/lm.py:language=<name> "
        f"--workdir={lm_workdir}, or point config.lm_workdir at an LM workdir")
  lm_config = ml_collections.ConfigDict(jsonio.read(cfg_path))
  train_lm.check_lm_workdir_config(lm_config, lm_workdir)
  template = jax.eval_shape(lambda: train_lm.init_state(lm_config))
  with ckpt_lib.Checkpointer(ckpt_dir, read_only=True) as ckpt:
    steps = ckpt.all_steps()
    if not steps:
      raise FileNotFoundError(f"{ckpt_dir!r} holds no checkpoint; finish the LM run first")
    if step is not None and step not in steps:
      raise FileNotFoundError(f"{ckpt_dir!r} holds no checkpoint at step {step} (it holds "
                              f"{steps})")
    restored = ckpt.restore(template, step)
  return LoadedLM(params=restored.state.params,
                  model_config=train_lm.model_config_for(lm_config),
                  language=lm_config.language, step=int(restored.state.step),
                  config=lm_config.to_dict(), workdir=os.path.abspath(lm_workdir),
                  digest=restored.digest)


def _load_pinned_lm(lm_workdir: str, pin: Mapping[str, Any] | None, workdir: str) -> LoadedLM:
  """The LM of a grid: at the pinned step when the grid has one, checked against the pin."""
  fix = (f"The grid in {workdir!r} was trained on that LM's checkpoint; point lm_workdir at it "
         "(or put it back), or train a new grid in a new --workdir.")
  if not pin:
    return load_lm(lm_workdir)
  try:
    lm = load_lm(lm_workdir, int(pin["step"]))
  except FileNotFoundError as e:
    raise workdir_lib.InputMismatchError(
        f"the LM in {lm_workdir!r} is not the one this workdir was built from (step "
        f"{pin['step']}, digest {pin['digest'][:12]}…): {e}. {fix}") from None
  workdir_lib.check_input(f"the LM in {lm_workdir!r}", pin, lm.identity(workdir), fix)
  return lm


# Fields a resume may change. The LM's path may change too (a workdir moved with its LM): the
# LM itself is pinned by content. So may the processes' addresses and ids (several hosts).
MUTABLE_FIELDS = ("steps", "log_every", "checkpoint_every", "keep_checkpoints", "lm_workdir",
                  "distributed", "coordinator_address", "num_processes", "process_id",
                  "heartbeat_s")
_DATA_STREAM, _PROBE_STREAM = 1, 2


def validate_config(config) -> None:
  """Checks the non-sweep fields before anything is loaded or compiled."""
  def need(cond, msg):
    if not cond:
      raise ValueError(msg)
  need(config.positions in ("sentence", "all"),
       f"config.positions={config.positions!r}: use 'sentence' (sentence tokens) or 'all' "
       "(every non-pad position)")
  for name in ("batch_size", "steps", "log_every", "checkpoint_every"):
    need(isinstance(config[name], int) and config[name] > 0,
         f"config.{name}={config[name]!r} must be a positive int")
  for name in ("max_len", "forward_len"):
    need(isinstance(config[name], int) and config[name] >= 0,
         f"config.{name}={config[name]!r} must be an int >= 0 (0: the LM's sequence length)")
  need(config.steps % config.log_every == 0 and config.checkpoint_every % config.log_every == 0,
       f"config.steps ({config.steps}) and config.checkpoint_every ({config.checkpoint_every}) "
       f"must be multiples of config.log_every ({config.log_every})")
  need(config.schedule in ("constant", "warmup_cosine"),
       f"config.schedule={config.schedule!r}: use 'constant' (Menon) or 'warmup_cosine' (e2e)")
  need(isinstance(config.warmup_steps, int) and config.warmup_steps >= 0,
       f"config.warmup_steps={config.warmup_steps!r} must be an int >= 0 (linear warm-up "
       "steps; 0: none)")
  need(isinstance(config.decay_steps, int) and config.decay_steps >= 0,
       f"config.decay_steps={config.decay_steps!r} must be an int >= 0 (0: config.steps)")
  need(isinstance(config.keep_checkpoints, int) and config.keep_checkpoints >= 1,
       f"config.keep_checkpoints={config.keep_checkpoints!r} must be an int >= 1")
  need(isinstance(config.token_capacity, int) and config.token_capacity >= -1,
       f"config.token_capacity={config.token_capacity!r} must be an int >= -1 (0: probe, "
       "-1: every token)")
  need(isinstance(config.seed, int) and config.seed >= 0,
       f"config.seed={config.seed!r} must be an int >= 0")
  def number(name):
    v = config[name]
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
  need(number("lr_floor") and 0 <= config.lr_floor <= 1,
       f"config.lr_floor={config.lr_floor!r} must lie in [0, 1]")
  need(isinstance(config.grad_clip, (int, float)) and config.grad_clip > 0,
       f"config.grad_clip={config.grad_clip!r} must be > 0 (global-norm clip; inf: none)")
  for name in ("adam_b1", "adam_b2"):
    need(number(name) and 0 <= config[name] < 1,
         f"config.{name}={config[name]!r} must lie in [0, 1) (Adam moment decay; usual "
         f"{0.9 if name == 'adam_b1' else 0.999})")
  need(number("adam_eps") and config.adam_eps > 0,
       f"config.adam_eps={config.adam_eps!r} must be a finite number > 0 (usual 1e-8)")


def _mesh(config) -> Any:
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


def _probe_capacity(grammar, batch_size, max_len, forward_len, positions, token_capacity,
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
    counts.append(int(np.asarray(b.sentence_mask[:, :forward_len]).sum()))
  return int(min(full, -(-int(1.25 * max(counts)) // 8) * 8))


def prepare(config, workdir: str | None = None, lm_pin: Mapping[str, Any] | None = None):
  """Validates everything and builds the static setup (no compilation).

  Args:
    config: the job's config.
    workdir: the grid's workdir (where `lm_pin` was recorded).
    lm_pin: the identity of the LM the grid was built from (`LoadedLM.identity`); the LM is
      loaded at its step and must match it. Default: the newest LM checkpoint.
  """
  validate_config(config)
  lm_dir = config.lm_workdir
  if lm_pin and not os.path.isdir(lm_dir) and workdir and lm_pin.get("path"):
    lm_dir = workdir_lib.resolve(workdir, lm_pin["path"])  # both moved together
  lm = _load_pinned_lm(lm_dir, lm_pin, workdir or ".")
  if config.language and config.language != lm.language:
    raise ValueError(f"config.language={config.language!r} but the LM in {config.lm_workdir!r} "
                     f"was trained on {lm.language!r}; point lm_workdir at a {config.language} "
                     "LM or change language")
  mc = lm.model_config
  max_len = config.max_len or int(lm.config["max_len"])
  forward_len = config.forward_len or max_len
  if not 8 < forward_len <= max_len <= mc.context:
    raise ValueError(f"need 8 < forward_len ({forward_len}) <= max_len ({max_len}) <= the LM's "
                     f"context ({mc.context}); fix config.max_len / config.forward_len (0 = the "
                     "LM's sequence length)")
  names = model_lib.site_names(mc)
  if config.site not in names:
    raise ValueError(f"config.site={config.site!r} is not a site of the model; valid sites: "
                     f"{', '.join(names)}")
  if not config.site.startswith(("resid_pre", "resid_post")):
    raise ValueError(f"config.site={config.site!r}: SAEs train on residual-stream sites "
                     "(resid_pre.{l} / resid_post.{l})")
  mesh = _mesh(config)
  specs, _ = sae_groups.build_groups(list(config.sweep), mc.d_model, mesh.shape["variant"])
  for s in specs:
    if s.loss.needs_downstream and not s.loss.downstream_sites(mc, config.site):
      raise ValueError(f"group {s.name} uses e2e_ds but no resid_post follows {config.site} "
                       "(include_final_resid=False); include the final resid or use e2e")
  grammar = grammars.get(lm.language)
  root = jax.random.key(config.seed)
  capacity = _probe_capacity(grammar, config.batch_size, max_len, forward_len, config.positions,
                             config.token_capacity, jax.random.fold_in(root, _PROBE_STREAM))
  setup = grid_step.Setup(
      grammar=grammar, model_config=mc, site=config.site, specs=tuple(specs),
      batch_size=config.batch_size, max_len=max_len, forward_len=forward_len,
      positions=config.positions, capacity=capacity, schedule=config.schedule,
      warmup_steps=config.warmup_steps, total_steps=config.decay_steps or config.steps,
      lr_floor=config.lr_floor,
      grad_clip=config.grad_clip, adam=(config.adam_b1, config.adam_b2, config.adam_eps),
      mesh=mesh,
      variant_loop=grid_step.resolve_variant_loop(config.get("variant_loop", "auto"), mesh))
  return setup, lm, root


def _data_sample(lm, setup: grid_step.Setup, root) -> jax.Array | None:
  """Activations for data-dependent pre-bias inits (mean / median)."""
  if not any(s.sae.pre_bias and s.sae.pre_bias_init != "zero" for s in setup.specs):
    return None
  key = jax.random.fold_in(root, _PROBE_STREAM + 1)
  batch = grid_step.make_batch(lm.params, jnp.int32(0), key, setup)
  return batch.flat_CD[: int(np.asarray(batch.flat_mask_C).sum())]


def init_grid(setup: grid_step.Setup, lm, root) -> grid_step.GridState:
  sample = _data_sample(lm, setup, root)
  return grid_step.GridState(step=jnp.int32(0),
                   groups=tuple(grid_step.init_group(s, setup, sample) for s in setup.specs))


def _shard(tree, setup: grid_step.Setup, spec=P("variant")):
  return jax.device_put(tree, NamedSharding(setup.mesh, spec))


def state_shardings(setup: grid_step.Setup, state: grid_step.GridState) -> grid_step.GridState:
  """Replicated step, variant-sharded groups (also the jit's output shardings, so the state
  fed back in matches and nothing recompiles)."""
  return grid_step.GridState(step=NamedSharding(setup.mesh, P()),
                   groups=jax.tree.map(lambda _: NamedSharding(setup.mesh, P("variant")),
                                       state.groups))


def place_state(state: grid_step.GridState, setup: grid_step.Setup) -> grid_step.GridState:
  return jax.device_put(state, state_shardings(setup, state))


def make_chunk_fn(setup: grid_step.Setup, num_steps: int, state_template: grid_step.GridState):
  """The jitted chunk of `num_steps` steps; the state is donated and keeps its shardings."""
  return jax.jit(functools.partial(grid_step.train_chunk, setup=setup, num_steps=num_steps),
                 donate_argnums=(0,),
                 out_shardings=(state_shardings(setup, state_template),
                                NamedSharding(setup.mesh, P("variant"))))


def _append_jsonl(path: str, records: Sequence[Mapping[str, Any]]) -> None:
  workdir_lib.append_records(path, records)


def _fingerprinted(config, workdir: str) -> dict[str, Any]:
  """The config as the checkpoints' fingerprint records it (lm_workdir relative to `workdir`)."""
  out = config.to_dict()
  if out.get("lm_workdir"):
    out["lm_workdir"] = workdir_lib.relative_path(out["lm_workdir"], workdir)
  return out


def _recorded_lm_pin(workdir: str, ckpt: ckpt_lib.Checkpointer) -> dict[str, Any] | None:
  """The LM identity a grid with checkpoints was built from (inputs.json, else the newest
  checkpoint's metadata; None for grids written before LMs were pinned)."""
  pin = workdir_lib.read_inputs(workdir).get("lm")
  if pin:
    return pin
  try:
    return ckpt.metadata(ckpt.latest_step()).get("lm")
  except Exception:  # pylint: disable=broad-except  # a corrupted newest one: restore decides
    return None


def _check_restored_lm(restored: ckpt_lib.Restored, lm: LoadedLM, workdir: str) -> None:
  workdir_lib.check_input(
      f"the LM in {lm.workdir!r}", restored.metadata.get("lm"), lm.identity(workdir),
      f"Checkpoint step {restored.step} of {workdir!r} was trained on another LM; point "
      "lm_workdir at that LM, or train a new grid in a new --workdir.")


def run(config, workdir: str) -> dict[str, Any]:
  """Trains (or resumes) the SAE grid of `config` in `workdir`; returns the summary."""
  validate_config(config)
  distributed.initialize(config)
  # Several processes share the workdir: the writer (process 0) holds its lock.
  with (workdir_lib.lock(workdir) if distributed.is_writer() else contextlib.nullcontext()):
    return _run_locked(config, workdir)


def _run_locked(config, workdir: str) -> dict[str, Any]:
  writer = distributed.is_writer()  # one process writes the workdir's files
  metrics_path = os.path.join(workdir, "metrics.jsonl")
  summary_path = os.path.join(workdir, "summary.json")
  ckpt_dir = os.path.join(workdir, "checkpoints")
  fingerprint = _fingerprinted(config, workdir)
  # Every check (config fingerprint, pinned LM) comes before anything is written.
  with ckpt_lib.Checkpointer(ckpt_dir, read_only=True) as ro:
    has_checkpoints = bool(ro.all_steps())
    ckpt_lib.verify_fingerprint(ckpt_dir, fingerprint, MUTABLE_FIELDS,
                                has_checkpoints=has_checkpoints)
    pin = _recorded_lm_pin(workdir, ro) if has_checkpoints else None
  setup, lm, root = prepare(config, workdir, lm_pin=pin)
  hypers = _shard(tuple(grid_step.group_hyper(s) for s in setup.specs), setup)
  lm_params = _shard(lm.params, setup, P())
  data_key = jax.random.fold_in(root, _DATA_STREAM)
  with distributed.peers_guard("SAE grid training"), ckpt_lib.Checkpointer(
      ckpt_dir, max_to_keep=config.keep_checkpoints) as ckpt:
    if ckpt.all_steps():
      template = jax.eval_shape(lambda: init_grid(setup, lm, root))
      restored = ckpt.restore(template)
      _check_restored_lm(restored, lm, workdir)
      state = restored.state
      logging.info("Resuming the SAE grid at step %d.", int(state.step))
    else:
      state = init_grid(setup, lm, root)
    state = place_state(grid_step.GridState(step=jnp.asarray(state.step, jnp.int32),
                                  groups=tuple(state.groups)), setup)
    start = int(state.step)
    if start % config.log_every:
      raise ValueError(f"the checkpoint is at step {start}, not a multiple of log_every="
                       f"{config.log_every}; resume with a log_every that divides it")
    if writer:  # checks passed: record what this run is
      ckpt_lib.record_fingerprint(ckpt_dir, fingerprint)
      jsonio.write(os.path.join(workdir, "config.json"), config.to_dict())
      write_variants(os.path.join(workdir, "variants.json"), setup)
      workdir_lib.record_input(workdir, "lm", lm.identity(workdir))
      workdir_lib.resume_records(metrics_path, start)
    chunk = make_chunk_fn(setup, config.log_every, state)
    n_variants = sum(s.size for s in setup.specs)
    frozen_seen = {s.name: np.zeros(s.padded, bool) for s in setup.specs}
    for step in range(start, config.steps, config.log_every):
      t0 = time.perf_counter()
      state, metrics = chunk(state, hypers, lm_params, data_key)
      metrics, frozen, bad = distributed.to_host(
          (metrics, [g.frozen for g in state.groups], [g.bad_step for g in state.groups]))
      dt = time.perf_counter() - t0
      new_step = step + config.log_every
      records = []
      for spec, m, fz, bs in zip(setup.specs, metrics, frozen, bad):
        for i, vid in enumerate(spec.ids):
          rec = {"step": new_step, "variant": vid, "group": spec.name,
                 **{k: jsonio.finite_or_str(v[i]) for k, v in m.items()}, "frozen": bool(fz[i])}
          records.append(rec)
          if fz[i] and not frozen_seen[spec.name][i]:
            logging.warning("variant %s (group %s, %s) hit a non-finite loss/gradient at step "
                            "%d and is frozen at its last finite parameters.", vid, spec.name,
                            json.dumps(_jsonable(spec.values[i])), int(bs[i]))
        frozen_seen[spec.name] = frozen_seen[spec.name] | fz
      if writer:
        _append_jsonl(metrics_path, records)
      eta = (config.steps - new_step) * dt / config.log_every
      toks = setup.batch_size * setup.forward_len * config.log_every / dt
      losses_txt = " ".join(f"{s.name}:{np.mean(m['loss'][:s.size]):.4g}"
                            for s, m in zip(setup.specs, metrics))
      logging.info("step %d/%d  %s  %.0f tok/s (x%d variants)  ETA %.0f s", new_step,
                   config.steps, losses_txt, toks, n_variants, eta)
      if new_step % config.checkpoint_every == 0 or new_step == config.steps:
        ckpt.save(new_step, state, metadata={"language": lm.language,
                                             "lm": lm.identity(workdir)})
  # From the files, not from this process's chunks: a rerun or a resume writes the same. The
  # metrics file is the writer's, so only the writer reads it back (other processes return the
  # summary without the per-variant records).
  host_state = distributed.to_host(state)
  if not writer:
    return _summary(setup, host_state, {}, lm)
  summary = _summary(setup, host_state, _last_records(metrics_path, int(host_state.step)), lm)
  divergence.flag_variants(summary, metrics_path)
  jsonio.write(summary_path, summary)
  return summary


def _last_records(metrics_path: str, step: int) -> dict[str, dict[str, Any]]:
  """Each variant's newest record at or before `step` in metrics.jsonl."""
  last = {}
  for r in workdir_lib.read_records(metrics_path):
    if r["step"] <= step and r["step"] >= last.get(r["variant"], {}).get("step", -1):
      last[r["variant"]] = r
  return last


def _jsonable(values: Mapping[str, Any]) -> dict[str, Any]:
  return {k: sweep_lib.to_json(v) for k, v in values.items()}


def write_variants(path: str, setup: grid_step.Setup) -> None:
  """variants.json: the groups (static fields, loss, splice mode) and every variant's values."""
  out = {"groups": [], "variants": []}
  for s in setup.specs:
    out["groups"].append({"name": s.name, "size": s.size, "padded": s.padded,
                          "sae": sae_lib.config_json(s.sae), "loss": dataclasses.asdict(s.loss),
                          "splice_mode": s.splice_mode})
    for i, vid in enumerate(s.ids):
      out["variants"].append({"id": vid, "group": s.name, "position": i,
                              "hparams": _jsonable(s.values[i])})
  out["variants"].sort(key=lambda v: v["id"])
  jsonio.write(path, out)


def _summary(setup: grid_step.Setup, state: grid_step.GridState, last,
             lm: LoadedLM) -> dict[str, Any]:
  variants = {}
  for spec, g in zip(setup.specs, state.groups):
    frozen, bad = np.asarray(g.frozen), np.asarray(g.bad_step)
    for i, vid in enumerate(spec.ids):
      variants[vid] = {"group": spec.name, "hparams": _jsonable(spec.values[i]),
                       "frozen": bool(frozen[i]), "bad_step": int(bad[i]),
                       "metrics": {k: v for k, v in last.get(vid, {}).items()
                                   if k not in ("variant", "group", "frozen")}}
  return {"language": lm.language, "site": setup.site, "positions": setup.positions,
          "steps": int(state.step),
          "lm_step": lm.step, "token_capacity": setup.capacity, "variants": variants}


@dataclasses.dataclass(frozen=True)
class Trained:
  """A trained grid read back from an `sae` workdir (see `load_trained`)."""

  config: Any  # the run's ConfigDict (from config.json)
  setup: grid_step.Setup
  lm: LoadedLM
  state: grid_step.GridState  # the latest checkpoint
  hypers: tuple[grid_step.GroupHyper, ...]
  # What an eval or export of it records: workdir, checkpoint step and content digest, and a
  # digest of the config it was trained with.
  identity: Mapping[str, Any] = dataclasses.field(default_factory=dict)


def load_trained(workdir: str, step: int | None = None) -> Trained:
  """Rebuilds the setup of the `sae` run in `workdir` and restores its checkpoint.

  Reads only: nothing in `workdir` or the LM's workdir is written (the grid may still be
  training).

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
  config = ml_collections.ConfigDict(jsonio.read(path))
  ckpt_dir = os.path.join(workdir, "checkpoints")
  with ckpt_lib.Checkpointer(ckpt_dir, read_only=True) as ckpt:
    steps = ckpt.all_steps()
    if not steps:
      raise FileNotFoundError(f"no checkpoint in {ckpt_dir}; the sae job in {workdir!r} has "
                              "not saved one yet (rerun it to finish training)")
    if step is not None and step not in steps:
      raise FileNotFoundError(f"{ckpt_dir} holds no checkpoint at step {step}; it holds steps "
                              f"{steps} (the last keep_checkpoints of the run)")
    fingerprint = _check_config_unedited(config, workdir, ckpt_dir)
    setup, lm, root = prepare(config, workdir, lm_pin=_recorded_lm_pin(workdir, ckpt))
    template = jax.eval_shape(lambda: init_grid(setup, lm, root))
    restored = ckpt.restore(template, step)
    _check_restored_lm(restored, lm, workdir)
  state = place_state(grid_step.GridState(step=jnp.asarray(restored.state.step, jnp.int32),
                                groups=tuple(restored.state.groups)), setup)
  hypers = _shard(tuple(grid_step.group_hyper(s) for s in setup.specs), setup)
  identity = {"path": os.path.abspath(workdir), "step": restored.step,
              "digest": restored.digest, "config": workdir_lib.digest_of(fingerprint)}
  return Trained(config=config, setup=setup, lm=lm, state=state, hypers=hypers,
                 identity=identity)


def _check_config_unedited(config, workdir: str, ckpt_dir: str) -> dict[str, Any]:
  """config.json must be the config the checkpoints were written with (the fingerprint);
  returns the fingerprint."""
  recorded = ckpt_lib.read_fingerprint(ckpt_dir)
  if recorded is None:
    raise ckpt_lib.ConfigMismatchError(
        f"{ckpt_dir} holds checkpoints but no fingerprint.json, so {workdir}/config.json cannot "
        "be checked against the config that trained them; put the file back.")
  diffs = ckpt_lib.fingerprint_diffs(recorded, _fingerprinted(config, workdir), ("lm_workdir",))
  if diffs:
    lines = "\n".join(f"  {n}: {o!r} (trained) != {v!r} (config.json)" for n, o, v in diffs)
    raise ckpt_lib.ConfigMismatchError(
        f"{workdir}/config.json was edited after training; it differs from the config the "
        f"checkpoints were written with ({ckpt_dir}/fingerprint.json):\n{lines}\nRestore "
        "those values (the grid's SAEs were trained with them); to train other values, use a "
        "new --workdir.")
  return recorded


@dataclasses.dataclass(frozen=True)
class Variant:
  """One SAE of a trained grid, taken out of its group's stacked arrays (see `variant`)."""

  params: Any  # the SAE's parameters, without the variant axis
  sae_config: sae_lib.SAEConfig
  hparams: sae_lib.SAEHparams
  sae_state: sae_lib.SAEState
  splice_mode: str
  spec_index: int  # its group: trained.setup.specs[spec_index]
  position: int  # its index in the group's stacked arrays (spec.ids[position])


def variant(trained: Trained, variant_id: str) -> Variant:
  """One SAE of `trained` by id, ready for `sae.splice_fn`, `interventions` or `causality`.

  Args:
    trained: `load_trained(...)` output.
    variant_id: the SAE's id (`summary.json`'s `variants`, `trained.setup.specs[g].ids`).

  Raises:
    ValueError: an id the grid does not have (the message lists the known ids).
  """
  for gi, spec in enumerate(trained.setup.specs):
    if variant_id in spec.ids:
      i = spec.ids.index(variant_id)
      group = trained.state.groups[gi]
      pick = functools.partial(jax.tree.map, lambda x: x[i])
      return Variant(params=pick(group.params), sae_config=spec.sae,
                     hparams=pick(trained.hypers[gi].hparams), sae_state=pick(group.sae_state),
                     splice_mode=spec.splice_mode, spec_index=gi, position=i)
  known = [vid for spec in trained.setup.specs for vid in spec.ids]
  shown = ", ".join(known[:20]) + (f", ... ({len(known)} in all)" if len(known) > 20 else "")
  raise ValueError(f"variant_id={variant_id!r} is not in this grid; its SAEs are {shown} (the "
                   "keys of summary.json's 'variants').")
