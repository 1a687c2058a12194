"""The SAE grid-training job: every variant of a sweep trained in one compiled program.

`run(config, workdir)` loads the LM checkpoint named by the config, validates the sweep and
builds its groups (`grid_setup`) before compiling anything, then trains all groups together
(`grid_step`): `log_every` steps run inside one `lax.scan` per host call with the state
donated; metrics are fetched once per call and appended to `metrics.jsonl` per variant. A
variant whose loss or gradients turn non-finite is frozen at its last good parameters and
flagged (with its hyperparameters) in the logs and `summary.json`; the others are untouched.
A variant whose finite loss grows by orders of magnitude is flagged the same way
(`summary.json`'s `diverged`; `jaxsae.core.divergence`).
Checkpoints hold the whole grid state; data is a pure function of (seed, step), so resume is
exact. Besides config.json, checkpoints, metrics and the summary it writes what a read-back
needs (`trained.save`: variants.json, setup.json); `trained.load` reads the workdir back.

Workdir guarantees (`jaxsae.core.workdir`): the job holds the workdir's writer lock; the LM it trains
on is pinned (its workdir relative to this one, checkpoint step and content digest, in
`inputs.json` and in every checkpoint's metadata), and a resume or a `trained.load` against a
different LM, a config that differs from the checkpoints' fingerprint, or a `config.json` edited
after training is refused before anything is written. `summary.json` is built from the
checkpoint and `metrics.jsonl`, so a rerun of a finished job, or a resume after any kill, writes
the same summary as an uninterrupted run. The LM is read without writing to its workdir.

Devices: a mesh with axes ('variant', 'data'); each group's variant axis is padded to a multiple
of the variant-axis size and sharded over it, the batch over 'data'.
"""

from __future__ import annotations

import contextlib
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

from jaxsae.core import checkpoint as ckpt_lib
from jaxsae.core import distributed
from jaxsae.core import divergence
from jaxsae.core import jsonio
from jaxsae.core import workdir as workdir_lib
from jaxsae.grid import grid_setup
from jaxsae.grid import grid_step
from jaxsae.grid import sae_groups
from jaxsae.grid import trained as trained_lib
from jaxsae.lm import bundle
from jaxsae.lm import model as model_lib

# ------------------------------------------------------------------------------------------------
# The job.


# Fields a resume may change. The LM's path may change too (a workdir moved with its LM): the
# LM itself is pinned by content. So may the processes' addresses and ids (several hosts).
MUTABLE_FIELDS = ("steps", "log_every", "checkpoint_every", "keep_checkpoints", "lm_workdir",
                  "distributed", "coordinator_address", "num_processes", "process_id",
                  "heartbeat_s")


def validate_config(config, d_model: int | None = None) -> None:
  """Checks the config before anything is loaded or compiled: the job's validation pass.

  Args:
    config: the job's config.
    d_model: the LM's width when it is known without loading the LM (the pipeline knows it
      from its LM config): the sweep is then checked too. Otherwise the sweep is checked when
      `prepare` builds its groups, after the LM is loaded and before anything compiles.
  """
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
  if d_model is not None:
    sae_groups.build_groups(list(config.sweep), d_model)


def prepare(config, workdir: str | None = None, lm_pin: Mapping[str, Any] | None = None):
  """Checks the config against the LM and builds the static setup (no compilation).

  Args:
    config: the job's config, passed by `validate_config` (not checked again here).
    workdir: the grid's workdir (where `lm_pin` was recorded).
    lm_pin: the identity of the LM the grid was built from (`bundle.LMBundle.identity`); the
      LM is loaded at its step and must match it. Default: the newest LM checkpoint.
  """
  lm = grid_setup.load_lm(config, workdir, lm_pin)
  if config.language and config.language != lm.language:
    raise ValueError(f"config.language={config.language!r} but the LM in {config.lm_workdir!r} "
                     f"was trained on {lm.language!r}; point lm_workdir at a {config.language} "
                     "LM or change language")
  mc = lm.model_config
  max_len, forward_len = grid_setup.lengths(config, lm)
  if not 8 < forward_len <= max_len <= mc.context:
    raise ValueError(f"need 8 < forward_len ({forward_len}) <= max_len ({max_len}) <= the LM's "
                     f"context ({mc.context}); fix config.max_len / config.forward_len (0 = the "
                     "LM's sequence length)")
  names = model_lib.site_names(mc)
  if config.site not in names:
    raise ValueError(f"config.site={config.site!r} is not a site of the model; valid sites: "
                     f"{', '.join(names)}")
  if not config.site.startswith(("resid_pre", "resid_post", "mlp_in")):
    raise ValueError(f"config.site={config.site!r}: SAEs train on residual-stream sites "
                     "(resid_pre.{l} / resid_post.{l}), transcoders on mlp_in.{l} (with "
                     "target_site='mlp_out.{l}' in the sweep)")
  setup, root = grid_setup.build(config, lm)  # mesh, groups, probed token capacity
  return setup, lm, root


def make_chunk_fn(setup: grid_step.Setup, num_steps: int, state_template: grid_step.GridState):
  """The jitted chunk of `num_steps` steps; the state is donated and keeps its shardings."""
  return jax.jit(functools.partial(grid_step.train_chunk, setup=setup, num_steps=num_steps),
                 donate_argnums=(0,),
                 out_shardings=(grid_setup.state_shardings(setup, state_template),
                                NamedSharding(setup.mesh, P("variant"))))


def _append_jsonl(path: str, records: Sequence[Mapping[str, Any]]) -> None:
  workdir_lib.append_records(path, records)


def run(config, workdir: str) -> dict[str, Any]:
  """Trains (or resumes) the SAE grid of `config` in `workdir`; returns the summary."""
  validate_config(config)
  return run_validated(config, workdir)


def run_validated(config, workdir: str) -> dict[str, Any]:
  """`run` of a config that `validate_config` has passed (the pipeline validates every stage
  up front, once)."""
  distributed.initialize(config)
  # Several processes share the workdir: the writer (process 0) holds its lock.
  with (workdir_lib.lock(workdir) if distributed.is_writer() else contextlib.nullcontext()):
    return _run_locked(config, workdir)


def _run_locked(config, workdir: str) -> dict[str, Any]:
  writer = distributed.is_writer()  # one process writes the workdir's files
  metrics_path = os.path.join(workdir, "metrics.jsonl")
  summary_path = os.path.join(workdir, "summary.json")
  ckpt_dir = os.path.join(workdir, "checkpoints")
  fingerprint = trained_lib.fingerprinted(config, workdir)
  # Every check (config fingerprint, pinned LM) comes before anything is written.
  with ckpt_lib.Checkpointer(ckpt_dir, read_only=True) as ro:
    has_checkpoints = bool(ro.all_steps())
    ckpt_lib.verify_fingerprint(ckpt_dir, fingerprint, MUTABLE_FIELDS,
                                has_checkpoints=has_checkpoints)
    pin = grid_setup.recorded_lm_pin(workdir, ro) if has_checkpoints else None
  setup, lm, root = prepare(config, workdir, lm_pin=pin)
  hypers = grid_setup.shard(tuple(grid_step.group_hyper(s) for s in setup.specs), setup)
  lm_params = grid_setup.shard(lm.params, setup, P())
  data_key = jax.random.fold_in(root, grid_setup.DATA_STREAM)
  with distributed.peers_guard("SAE grid training"), ckpt_lib.Checkpointer(
      ckpt_dir, max_to_keep=config.keep_checkpoints) as ckpt:
    if ckpt.all_steps():
      template = jax.eval_shape(lambda: grid_setup.init_grid(setup, lm, root))
      restored = ckpt.restore(template)
      grid_setup.check_restored_lm(restored, lm, workdir)
      state = restored.state
      logging.info("Resuming the SAE grid at step %d.", int(state.step))
    else:
      state = grid_setup.init_grid(setup, lm, root)
    state = grid_setup.place_state(grid_step.GridState(step=jnp.asarray(state.step, jnp.int32),
                                  groups=tuple(state.groups)), setup)
    start = int(state.step)
    if start % config.log_every:
      raise ValueError(f"the checkpoint is at step {start}, not a multiple of log_every="
                       f"{config.log_every}; resume with a log_every that divides it")
    if writer:  # checks passed: record what this run is
      ckpt_lib.record_fingerprint(ckpt_dir, fingerprint)
      workdir_lib.write_config(workdir, config)
      trained_lib.save(workdir, setup)  # variants.json, setup.json
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
                            json.dumps(trained_lib.hparams_json(spec.values[i])), int(bs[i]))
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
    return _summary(setup, host_state, {}, {}, lm)
  summary = _summary(setup, host_state, *_end_records(metrics_path, int(host_state.step)), lm)
  divergence.flag_variants(summary, metrics_path)
  jsonio.write(summary_path, summary)
  return summary


def _end_records(metrics_path: str, step: int
                 ) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
  """Each variant's newest record at or before `step` in metrics.jsonl, and its oldest."""
  last, first = {}, {}
  for r in workdir_lib.read_records(metrics_path):
    if r["step"] <= step and r["step"] >= last.get(r["variant"], {}).get("step", -1):
      last[r["variant"]] = r
    if r["step"] < first.get(r["variant"], {}).get("step", float("inf")):
      first[r["variant"]] = r
  return last, first


def _summary(setup: grid_step.Setup, state: grid_step.GridState, last, first,
             lm: bundle.LMBundle) -> dict[str, Any]:
  """summary.json: per variant its hparams, frozen flag and final metrics (the last chunk's
  means; `initial_loss` is the loss before the run's first update, the first chunk's
  `first_step_loss`, which in later chunks would name the loss of their own first step)."""
  variants = {}
  for spec, g in zip(setup.specs, state.groups):
    frozen, bad = np.asarray(g.frozen), np.asarray(g.bad_step)
    for i, vid in enumerate(spec.ids):
      variants[vid] = {"group": spec.name, "hparams": trained_lib.hparams_json(spec.values[i]),
                       "frozen": bool(frozen[i]), "bad_step": int(bad[i]),
                       "metrics": {k: v for k, v in last.get(vid, {}).items()
                                   if k not in ("variant", "group", "frozen",
                                                "first_step_loss")}}
      if "first_step_loss" in first.get(vid, {}):
        variants[vid]["metrics"]["initial_loss"] = first[vid]["first_step_loss"]
  return {"language": lm.language, "site": setup.site, "positions": setup.positions,
          "steps": int(state.step),
          "lm_step": lm.step, "token_capacity": setup.capacity, "variants": variants}
