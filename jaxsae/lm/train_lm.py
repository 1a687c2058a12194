"""Training the transformer LM on a grammar: the `lm` job (`run(config, workdir)`).

The job drives `lm_step` (the recipe: state, data streams keyed by (seed, step), objective,
compiled steps, held-out evaluation) and owns the workdir: resume, checks, logs, checkpoints and
the summary.

Workdir layout::

    config.json      the config of the latest invocation
    metrics.jsonl    one JSON object per line: kind 'train' (one per host call: mean loss and
                     grad norm over its steps, lr, throughput), 'eval' (periodic), 'final'
    summary.json     the headline numbers, written at the end
    checkpoints/     `jaxsae.core.checkpoint` layout: <step>/ (last `keep_checkpoints`) and
                     fingerprint.json (the config fields a resume must not change)

Resume: rerunning the same command restores the newest valid checkpoint (a corrupted newest one
is moved aside with a warning and the previous one is used), drops metric lines after its
step (and a torn last line), and continues; a config differing in a field outside `MUTABLE_FIELDS` raises
`checkpoint.ConfigMismatchError`. A finished run (checkpoint step >= num_steps) is not
retrained; its summary is re-computed (from the checkpoint and metrics.jsonl, replacing the
'final' record) only if summary.json is missing or stale. Raising `num_steps` extends a finished
run. The job holds the workdir's writer lock (`jaxsae.core.workdir.lock`) and checks the config
fingerprint before it writes anything.

NaN/inf: the losses and gradient norms of every host call are checked; the first non-finite
step raises `FloatingPointError` naming it. The state is checkpointed only after that check,
so the checkpoints on disk stay valid. A finite loss that grows by orders of magnitude is
flagged in summary.json's `divergence` and the log (`jaxsae.core.divergence`).
"""

from __future__ import annotations

import math
import os
import time
from typing import Any

from absl import logging
import jax
import numpy as np

from jaxsae import grammars
from jaxsae.core import checkpoint as ckpt_lib
from jaxsae.core import divergence
from jaxsae.core import jsonio
from jaxsae.core import workdir as workdir_lib
from jaxsae.lm import generate as generate_lib
from jaxsae.lm import lengths as lengths_lib
from jaxsae.lm import lm_step
from jaxsae.lm import model as model_lib

# Config fields that may differ between the run that wrote a checkpoint and the one resuming
# it (they do not change the training trajectory). Dotted prefixes exempt whole groups.
MUTABLE_FIELDS = ("job", "num_steps", "steps_per_call", "log_every", "eval_every",
                  "checkpoint_every", "keep_checkpoints", "eval", "debug_nan_step")

# Learning rates above this are accepted with a warning (finite, but rarely sane).
LR_WARN = 1.0

SUMMARY_KEYS = ("language", "steps", "train_seconds", "tokens_per_s", "param_count", "eval_ce",
                "grammatical_next_token_mass", "grammatical_fraction",
                "grammatical_fraction_std")


# ------------------------------------------------------------------------------------------------
# Config.


def validate_config(config) -> None:
  """Checks a config before anything is compiled.

  Raises:
    ValueError: naming the field at fault and how to fix it.
  """
  if config.language not in grammars.names():
    raise ValueError(f"config.language={config.language!r} is unknown; use one of "
                     f"{', '.join(grammars.names())}.")

  def positive(name, value):
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
      raise ValueError(f"config.{name}={value!r} must be a positive integer.")

  if config.loss_reduction not in lm_step.LOSS_REDUCTIONS:
    raise ValueError(f"config.loss_reduction={config.loss_reduction!r}: use one of "
                     f"{lm_step.LOSS_REDUCTIONS} (per-sequence mean, the spec's, or per-token "
                     "mean)")
  for name in ("n_layers", "n_heads", "d_model", "d_mlp", "context"):
    positive(f"model.{name}", config.model[name])
  for name in ("batch_size", "max_len", "num_steps", "steps_per_call", "log_every", "eval_every",
               "checkpoint_every", "keep_checkpoints"):
    positive(name, config[name])
  for name in ("batches", "batch_size", "gen_batches", "gen_batch_size", "final_gen_batches",
               "final_gen_batch_size", "max_new_tokens"):
    positive(f"eval.{name}", config.eval[name])
  if config.model.d_model % config.model.n_heads:
    raise ValueError(f"config.model.d_model={config.model.d_model} must be divisible by "
                     f"config.model.n_heads={config.model.n_heads}.")
  grammar = grammars.get(config.language)
  need = grammars.sampler.min_max_len(grammar)
  if config.max_len < need:
    raise ValueError(f"config.max_len={config.max_len} is too short for {config.language} "
                     f"(7 decorator tokens + a sentence of at least {grammar.info.min_length} + "
                     f"<eos> + the 10-token margin); use max_len >= {need}.")
  if config.max_len > config.model.context:
    raise ValueError(f"config.max_len={config.max_len} exceeds config.model.context="
                     f"{config.model.context}; lower max_len or raise the context.")
  if grammar.prefix_len + config.eval.max_new_tokens > config.model.context:
    raise ValueError(f"config.eval.max_new_tokens={config.eval.max_new_tokens} + 7 decorator "
                     f"tokens exceed config.model.context={config.model.context}.")
  k = config.steps_per_call
  for name in ("num_steps", "log_every", "eval_every", "checkpoint_every"):
    if config[name] % k:
      raise ValueError(f"config.{name}={config[name]} must be a multiple of "
                       f"config.steps_per_call={k} (host calls run {k} steps each); change "
                       f"one of them.")
  o = config.optim
  checks = [
      ("optim.peak_lr", _finite(o.peak_lr) and o.peak_lr > 0, "must be a finite number > 0"),
      ("optim.end_lr", _finite(o.end_lr) and o.end_lr >= 0, "must be a finite number >= 0"),
      ("optim.warmup_steps", isinstance(o.warmup_steps, int) and o.warmup_steps >= 0,
       "must be an integer >= 0"),
      ("optim.decay_steps", isinstance(o.decay_steps, int) and o.decay_steps > o.warmup_steps,
       f"must be an integer > optim.warmup_steps={o.warmup_steps}"),
      ("optim.b1", _finite(o.b1) and 0 <= o.b1 < 1, "must lie in [0, 1)"),
      ("optim.b2", _finite(o.b2) and 0 <= o.b2 < 1, "must lie in [0, 1)"),
      ("optim.weight_decay", _finite(o.weight_decay) and o.weight_decay >= 0,
       "must be a finite number >= 0"),
      ("optim.grad_clip", o.grad_clip > 0, "must be > 0 (global-norm clip; inf: none)"),
      ("eval.temperature", _finite(config.eval.temperature) and config.eval.temperature > 0,
       "must be a finite number > 0"),
      ("eval.top_k", 0 <= config.eval.top_k <= grammar.vocab_size,
       f"must lie in [0, {grammar.vocab_size}] (0 = off)"),
  ]
  for name, ok, why in checks:
    if not ok:
      value = config
      for part in name.split("."):
        value = value[part]
      raise ValueError(f"config.{name}={value!r} {why}.")
  for name in ("peak_lr", "end_lr"):
    if o[name] > LR_WARN:
      logging.warning("config.optim.%s=%g is above %g: AdamW steps of that size usually "
                      "diverge (summary.json flags a run whose loss grows %gx).", name, o[name],
                      LR_WARN, divergence.FACTOR)


def _finite(x) -> bool:
  """A real number (not a bool) that is finite."""
  return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


# ------------------------------------------------------------------------------------------------
# Evaluation.


def _generation_eval(params, config, setup: lm_step.Setup, key, num_batches, batch_size,
                     arrays: bool = False):
  return generate_lib.grammaticality(
      params, setup.model_config, grammars.get(config.language), key, num_batches=num_batches,
      batch_size=batch_size, max_new_tokens=config.eval.max_new_tokens,
      temperature=config.eval.temperature, top_k=config.eval.top_k, arrays=arrays)


# ------------------------------------------------------------------------------------------------
# Files.


def _read_metrics(path: str) -> list[dict[str, Any]]:
  return workdir_lib.read_records(path)


def _append_metric(path: str, record: dict[str, Any]) -> None:
  jsonio.append_lines(path, [record])


# ------------------------------------------------------------------------------------------------
# The job.


def run(config, workdir: str) -> dict[str, Any]:
  """Trains (or resumes) the LM of `config` in `workdir`; returns the summary dict.

  Raises:
    ValueError: a bad config (before compiling).
    checkpoint.ConfigMismatchError: the workdir's checkpoints come from another config.
    checkpoint.CheckpointError: no valid checkpoint although some exist.
    FloatingPointError: a non-finite loss or gradient norm (names the step).
  """
  validate_config(config)
  return run_validated(config, workdir)


def run_validated(config, workdir: str) -> dict[str, Any]:
  """`run` of a config that `validate_config` has passed (the pipeline validates every stage
  up front, once)."""
  with workdir_lib.lock(workdir):
    return _run_locked(config, workdir)


def _run_locked(config, workdir: str) -> dict[str, Any]:
  setup = lm_step.setup_for(config)
  hyper = lm_step.hyper_for(config)
  metrics_path = os.path.join(workdir, "metrics.jsonl")
  summary_path = os.path.join(workdir, "summary.json")
  ckpt_dir = os.path.join(workdir, "checkpoints")
  with ckpt_lib.Checkpointer(ckpt_dir, read_only=True) as ro:  # check before writing anything
    ckpt_lib.verify_fingerprint(ckpt_dir, config, MUTABLE_FIELDS,
                                has_checkpoints=bool(ro.all_steps()))
  with ckpt_lib.Checkpointer(ckpt_dir, max_to_keep=config.keep_checkpoints) as ckpt:
    ckpt_lib.record_fingerprint(ckpt_dir, config)
    workdir_lib.write_config(workdir, config)
    template = jax.eval_shape(lm_step.init_state_from, jax.random.key(config.seed), hyper,
                              setup)
    train_seconds = 0.0
    if ckpt.all_steps():
      restored = ckpt.restore(template)
      state = jax.device_put(restored.state)
      train_seconds = float(restored.metadata.get("train_seconds", 0.0))
      logging.info("Resuming from %s (step %d).", ckpt.step_path(restored.step), restored.step)
    else:
      state = lm_step.init_state(config)
    start_step = int(state.step)
    if start_step < config.num_steps and start_step % config.steps_per_call:
      raise ValueError(f"The checkpoint is at step {start_step}, not a multiple of "
                       f"config.steps_per_call={config.steps_per_call}; resume with a "
                       f"steps_per_call that divides {start_step}.")
    param_count = model_lib.count_params(state.params)
    root = _copy_key(state.key)

    if start_step >= config.num_steps:
      if start_step > config.num_steps:
        logging.warning("The checkpoint is at step %d, beyond num_steps=%d; summarising it.",
                        start_step, config.num_steps)
      summary = jsonio.read(summary_path)
      if summary and summary.get("steps") == start_step:
        logging.info("Run already finished at step %d; summary.json is up to date.",
                     start_step)
        return summary
    # The 'final' record of this step is rewritten below (a run killed after writing it).
    workdir_lib.resume_records(
        metrics_path, start_step,
        drop=lambda r: r.get("kind") == "final" and r.get("step") == start_step)
    if start_step < config.num_steps:
      state, train_seconds = _train(config, setup, hyper, state, ckpt, metrics_path,
                                    train_seconds)

    # Final evaluation.
    eval_set = lm_step.make_eval_set(config, jax.random.fold_in(root, lm_step.HELDOUT_STREAM))
    final = lm_step.evaluate(state.params, eval_set, setup)
    gen = _generation_eval(state.params, config, setup,
                           jax.random.fold_in(root, lm_step.FINAL_GEN_STREAM),
                           config.eval.final_gen_batches, config.eval.final_gen_batch_size,
                           arrays=True)
    gen_arrays = gen.pop("arrays")
    match = lengths_lib.length_match(gen_arrays["lengths"], gen_arrays["finished"],
                                     gen_arrays["grammatical"], eval_set.lengths,
                                     seed=config.seed)
    step = int(state.step)
    train_records = [r for r in _read_metrics(metrics_path) if r["kind"] == "train"]
    # The steady-state rate (compilation excluded) of the last process that trained.
    rates = [r["tokens_per_s"] for r in train_records if r.get("tokens_per_s")]
    summary = {
        "language": config.language,
        "steps": step,
        "train_seconds": train_seconds,
        "tokens_per_s": rates[-1] if rates else None,
        "param_count": param_count,
        "eval_ce": final["eval_ce"],
        "grammatical_next_token_mass": final["grammatical_next_token_mass"],
        "grammatical_fraction": gen["mean"],
        "grammatical_fraction_std": gen["std"],
        "grammatical_per_batch": gen["per_batch"],
        "finished_fraction": gen["finished"],
        "mean_generated_length": gen["mean_length"],
        "generations": f"{config.eval.final_gen_batches} x {config.eval.final_gen_batch_size}",
        "final_train_loss": train_records[-1]["loss"] if train_records else None,
        "samples": gen["samples"],
        # Also under the names experiments.main prints for jobs with a grammatical fraction.
        "grammar": config.language,
        "rejection_rate": eval_set.rejection_rate,  # of the training distribution at max_len
        "length": {"generated_mean": gen["mean_length"], "heldout_mean": eval_set.mean_length,
                   # bucketed TV of generations vs held-out sentences, its null, per-bucket
                   # grammaticality (`jaxsae.lm.lengths.length_match`)
                   "match": match},
    }
    divergence.flag_run(summary, metrics_path, setup.model_config.vocab_size)
    _append_metric(metrics_path, {"kind": "final", "step": step, **final,
                                  "grammatical_fraction": gen["mean"],
                                  "grammatical_fraction_std": gen["std"]})
    jsonio.write(summary_path, summary)
    logging.info("Finished %s at step %d: grammatical %.4f ± %.4f, eval CE %.4f, length TV "
                 "%.3f (null %.3f), %.0f s of training.", config.language, step, gen["mean"],
                 gen["std"], final["eval_ce"], match["tv"], match["tv_null"]["mean"],
                 train_seconds)
    return summary


def _copy_key(key: jax.Array) -> jax.Array:
  data = np.array(jax.random.key_data(key), copy=True)
  return jax.random.wrap_key_data(data, impl=jax.random.key_impl(key))


def _train(config, setup: lm_step.Setup, hyper, state: lm_step.TrainState,
           ckpt: ckpt_lib.Checkpointer, metrics_path: str, train_seconds: float):
  """The host loop: train calls, checks, logging, periodic eval and checkpoints."""
  k = config.steps_per_call
  tokens_per_step = config.batch_size * config.max_len
  root = _copy_key(state.key)  # state buffers are donated to each train call
  eval_set = lm_step.make_eval_set(config, jax.random.fold_in(root, lm_step.HELDOUT_STREAM))
  step = int(state.step)
  first_call = True
  window_t, window_steps = 0.0, 0  # since the last progress line
  steady_t, steady_steps = 0.0, 0  # calls after the first of this process (no compile)
  last_ckpt = ckpt.latest_step()
  while step < config.num_steps:
    t0 = time.perf_counter()
    state, metrics = lm_step.train_steps(state, hyper, setup)
    metrics = jax.device_get(metrics)  # host sync point
    dt = time.perf_counter() - t0
    train_seconds += dt
    bad = ~(np.isfinite(metrics["loss"]) & np.isfinite(metrics["grad_norm"]))
    if bad.any():
      i = int(np.argmax(bad))
      where = (f"the last checkpoint is {ckpt.step_path(last_ckpt)} (intact)"
               if last_ckpt is not None else "no checkpoint was written yet")
      raise FloatingPointError(
          f"Non-finite training loss {metrics['loss'][i]} / grad norm {metrics['grad_norm'][i]} "
          f"at step {step + i} (language {config.language}, lr {metrics['lr'][i]:.3g}); "
          f"{where}. Lower config.optim.peak_lr or raise warmup_steps, then rerun with a new "
          f"workdir or resume from that checkpoint.")
    step += k
    if not first_call:
      steady_t += dt
      steady_steps += k
    first_call = False
    window_t += dt
    window_steps += k
    rate = steady_steps * tokens_per_step / steady_t if steady_t else None
    _append_metric(metrics_path, {
        "kind": "train", "step": step, "loss": float(np.mean(metrics["loss"])),
        "grad_norm": float(np.mean(metrics["grad_norm"])), "lr": float(metrics["lr"][-1]),
        "tokens_per_s": rate, "train_seconds": train_seconds})
    if step % config.log_every == 0 or step == config.num_steps:
      steps_per_s = (steady_steps / steady_t) if steady_t else window_steps / window_t
      eta = (config.num_steps - step) / steps_per_s
      logging.info("step %d/%d  loss %.4f  grad_norm %.3f  lr %.3g  %.0f tokens/s  ETA %.0f s",
                   step, config.num_steps, float(metrics["loss"][-1]),
                   float(metrics["grad_norm"][-1]), float(metrics["lr"][-1]),
                   window_steps * tokens_per_step / window_t, eta)
      window_t, window_steps = 0.0, 0
    # Also at the last step (when a multiple), so a run stopped there and extended later
    # logs exactly what an uninterrupted run logs.
    if step % config.eval_every == 0:
      t_eval = time.perf_counter()
      ev = lm_step.evaluate(state.params, eval_set, setup)
      gen = _generation_eval(state.params, config, setup,
                             jax.random.fold_in(root, lm_step.GEN_STREAM),
                             config.eval.gen_batches, config.eval.gen_batch_size)
      _append_metric(metrics_path, {"kind": "eval", "step": step, **ev,
                                    "grammatical_fraction": gen["mean"],
                                    "finished_fraction": gen["finished"]})
      logging.info("eval step %d  CE %.4f  grammatical mass %.4f  grammatical %.3f  (%.1f s)",
                   step, ev["eval_ce"], ev["grammatical_next_token_mass"], gen["mean"],
                   time.perf_counter() - t_eval)
    if step % config.checkpoint_every == 0 or step == config.num_steps:
      ckpt.save(step, state, {"train_seconds": train_seconds})
      last_ckpt = step
  return state, train_seconds


def summary_line(summary: dict[str, Any]) -> str:
  """One human-readable line of the headline numbers."""
  return (f"{summary['language']}: {summary['steps']} steps in {summary['train_seconds']:.0f} s, "
          f"grammatical {summary['grammatical_fraction']:.4f} ± "
          f"{summary['grammatical_fraction_std']:.4f}, eval CE {summary['eval_ce']:.4f}, "
          f"grammatical mass {summary['grammatical_next_token_mass']:.4f}")



def write_untrained(config, workdir: str) -> str:
  """An LM workdir holding `config.json` and an untrained step-0 checkpoint of `config`.

  What SAE training and benchmarks need when the LM's weights do not matter (tests, timing).
  """
  validate_config(config)
  with workdir_lib.lock(workdir):
    workdir_lib.write_config(workdir, config)
    ckpt_dir = os.path.join(workdir, "checkpoints")
    with ckpt_lib.Checkpointer(ckpt_dir) as ckpt:
      ckpt_lib.record_fingerprint(ckpt_dir, config)
      ckpt.save(0, lm_step.init_state(config))
  return workdir
