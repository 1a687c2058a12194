"""A trained LM read back from an `lm` job's workdir: params, model config and provenance.

`load(lm_workdir)` restores the params of one checkpoint (default the newest) without writing
to the workdir (the LM may still be training) and returns an `LMBundle`: what every later stage
needs of an LM (the SAE grid trains on it, evaluation and analysis run it, export writes it) and
the identity a workdir built on it records (`LMBundle.identity`: path, step, content digest).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping

import jax

from jaxsae.core import checkpoint as ckpt_lib
from jaxsae.core import workdir as workdir_lib
from jaxsae.lm import lm_step
from jaxsae.lm import model as model_lib


@dataclasses.dataclass(frozen=True)
class LMBundle:
  """One checkpoint of a trained LM (see `load`)."""

  params: Any
  model_config: model_lib.ModelConfig
  language: str
  step: int
  config: Mapping[str, Any]  # the LM job's config (its config.json, as a dict)
  workdir: str = ""
  digest: str = ""  # content digest of the checkpoint restored (`checkpoint.Restored.digest`)

  def identity(self, relative_to: str) -> dict[str, Any]:
    """What a workdir built on this LM records: its path relative to `relative_to`, the
    checkpoint step and content digest."""
    return {"path": workdir_lib.relative_path(self.workdir, relative_to), "step": self.step,
            "digest": self.digest}


def check_lm_workdir_config(config: Mapping[str, Any], lm_workdir: str) -> None:
  """Checks that `config` (a workdir's config.json) is an `lm` job's config.

  Raises:
    ValueError: the workdir belongs to another job (an SAE grid, an eval, ...): names the job
      and what to point at instead.
  """
  job = config.get("job")
  if job == "lm" and all(k in config for k in ("model", "optim", "language")):
    return
  if job == "sae":
    hint = (f"this is an SAE workdir, not an LM workdir; point lm_workdir at the LM it was "
            f"trained on ({config.get('lm_workdir', '?')!r})")
  else:
    hint = (f"its config.json is of job {job!r}, not an LM (job 'lm') workdir; point "
            "lm_workdir at the workdir of an lm job (experiments/configs/lm.py)")
  raise ValueError(f"lm_workdir={lm_workdir!r}: {hint}")


def load(lm_workdir: str, step: int | None = None) -> LMBundle:
  """Loads an LM checkpoint of a `train_lm` workdir (params only), without writing there.

  Args:
    lm_workdir: the LM job's workdir (it may still be training).
    step: the checkpoint step to load; default the newest valid one.

  Raises:
    FileNotFoundError: no LM there, or no checkpoint (at `step`).
    ValueError: the workdir is not an `lm` job's.
  """
  import ml_collections  # pylint: disable=g-import-not-at-top
  cfg_path = os.path.join(lm_workdir, "config.json")
  ckpt_dir = os.path.join(lm_workdir, "checkpoints")
  if not os.path.exists(cfg_path) or not os.path.isdir(ckpt_dir):
    raise FileNotFoundError(
        f"no trained LM in {lm_workdir!r} (config.json / checkpoints missing); train one with "
        f"python -m experiments.main --config=experiments/configs/lm.py:language=<name> "
        f"--workdir={lm_workdir}, or point config.lm_workdir at an LM workdir")
  lm_config = ml_collections.ConfigDict(workdir_lib.read_config(lm_workdir))
  check_lm_workdir_config(lm_config, lm_workdir)
  template = jax.eval_shape(lambda: lm_step.init_state(lm_config))
  with ckpt_lib.Checkpointer(ckpt_dir, read_only=True) as ckpt:
    steps = ckpt.all_steps()
    if not steps:
      raise FileNotFoundError(f"{ckpt_dir!r} holds no checkpoint; finish the LM run first")
    if step is not None and step not in steps:
      raise FileNotFoundError(f"{ckpt_dir!r} holds no checkpoint at step {step} (it holds "
                              f"{steps})")
    restored = ckpt.restore(template, step)
  return LMBundle(params=restored.state.params,
                  model_config=lm_step.model_config_for(lm_config),
                  language=lm_config.language, step=int(restored.state.step),
                  config=lm_config.to_dict(), workdir=os.path.abspath(lm_workdir),
                  digest=restored.digest)
