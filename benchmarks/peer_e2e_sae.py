"""The PyTorch peer: e2e_sae's own SAE training step at the reference shape, timed.

Runs with the peer environment's interpreter (made by `benchmarks/peer_setup.sh`), never with the
project's: it imports torch, transformer_lens and the installed e2e_sae package, and nothing of
jaxsae or JAX.

    benchmarks/.peer-venv/bin/python benchmarks/peer_e2e_sae.py [--losses local,e2e,e2e_ds] \
        [--steps 5] [--repeats 3] [--warmup 3] [--threads 2]
    benchmarks/.peer-venv/bin/python benchmarks/peer_e2e_sae.py --check   # imports + versions

The step is e2e_sae's training-loop body (its `train` function in
`scripts/train_tlens_saes/run_train_tlens_saes.py`, which the published wheel does not ship), made
of the package's own parts: `SAETransformer.forward_raw` (the frozen transformer with its
activations cached; for local runs it stops after the SAE's block), `SAETransformer.forward`
(local: the cached activations through the SAE; e2e: the whole model with the SAE spliced in by a
hook, and for e2e+ds the downstream activations cached too), `losses.calc_loss` with the loss
presets below, `backward`, `clip_grad_norm_` on the SAE parameters, Adam `step` / `zero_grad`
and the cosine warm-up schedule's `step` (`utils.get_cosine_schedule_with_warmup`). Logging,
evaluation and checkpointing steps are off, as they are in jaxsae's timed chunk.

Shape: a transformer_lens `HookedTransformer` with random weights, 2 layers, d_model 128, 2 heads
(d_head 64), d_mlp 512, vocab 69, 128 positions, GELU, LayerNorm; batch 32 × 128 random tokens;
one SAE of `dict_size_to_input_ratio` 8 (dict 1024) at `blocks.0.hook_resid_post`. Loss presets
(jaxsae's `losses` presets): local = out_to_in 1 + sparsity; e2e = logits_kl 1 + sparsity
(out_to_in 0, computed and logged as e2e_sae does); e2e_ds = logits_kl 0.5 + in_to_orig 2.5 at
`blocks.1.hook_resid_post` + sparsity (out_to_in 0); sparsity coefficient 1, L1.

Timing: `--warmup` steps, then `--repeats` timed calls of `--steps` steps each; `step_s` is the
median call time / steps, `tokens_per_s` = batch tokens / step_s (one SAE trains on all of them).
Prints one JSON object.

e2e_sae 2.1.1's wheel imports `e2e_sae.scripts.train_tlens.run_train_tlens` (from
`e2e_sae.loader`, for loading a transformer from a checkpoint path) but does not contain it; a
module raising on use stands in for it, since no checkpoint is loaded here.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import json
import math
import os
import platform
import statistics
import sys
import time
import types

BATCH_SIZE, SEQ_LEN, EXPANSION = 32, 128, 8
SAE_POSITION = "blocks.0.hook_resid_post"
DOWNSTREAM_POSITIONS = ["blocks.1.hook_resid_post"]
LOSSES = ("local", "e2e", "e2e_ds")
PACKAGES = ("torch", "e2e_sae", "transformer_lens", "transformers", "numpy", "pydantic")


def _stand_in_for_missing_loader_dependency() -> None:
  """Registers `e2e_sae.scripts.train_tlens.run_train_tlens` (absent from the 2.1.1 wheel)."""
  name = "e2e_sae.scripts.train_tlens.run_train_tlens"
  try:
    importlib.import_module(name)
    return
  except ModuleNotFoundError:
    pass

  class HookedTransformerPreConfig:  # pylint: disable=too-few-public-methods
    def __init__(self, *args, **kwargs):
      raise RuntimeError("e2e_sae's wheel lacks scripts/train_tlens; loading a transformer from a "
                         "checkpoint path is not available in this benchmark.")

  package = types.ModuleType("e2e_sae.scripts.train_tlens")
  package.__path__ = []
  module = types.ModuleType(name)
  module.HookedTransformerPreConfig = HookedTransformerPreConfig
  package.run_train_tlens = module
  sys.modules[package.__name__] = package
  sys.modules[name] = module


_stand_in_for_missing_loader_dependency()

# pylint: disable=g-import-not-at-top,wrong-import-position
import torch
import transformer_lens
from e2e_sae import losses
from e2e_sae import utils
from e2e_sae.models import transformers as e2e_transformers
# pylint: enable=g-import-not-at-top,wrong-import-position


def loss_configs(loss: str) -> losses.LossConfigs:
  """e2e_sae loss configs for jaxsae's presets (see the module docstring)."""
  sparsity = {"coeff": 1.0, "p_norm": 1.0}
  table = {
      "local": {"sparsity": sparsity, "in_to_orig": None, "out_to_orig": None,
                "out_to_in": {"coeff": 1.0}, "logits_kl": None},
      "e2e": {"sparsity": sparsity, "in_to_orig": None, "out_to_orig": None,
              "out_to_in": {"coeff": 0.0}, "logits_kl": {"coeff": 1.0}},
      "e2e_ds": {"sparsity": sparsity, "out_to_orig": None, "out_to_in": {"coeff": 0.0},
                 "in_to_orig": {"hook_positions": DOWNSTREAM_POSITIONS, "total_coeff": 2.5},
                 "logits_kl": {"coeff": 0.5}},
  }
  if loss not in table:
    raise ValueError(f"unknown loss {loss!r}; choose from {', '.join(LOSSES)}")
  return losses.LossConfigs(**table[loss])


def build_model(seed: int) -> e2e_transformers.SAETransformer:
  """The random-weight reference transformer with one ×8 SAE at resid_post of block 0."""
  utils.set_seed(seed)
  cfg = transformer_lens.HookedTransformerConfig(
      n_layers=2, d_model=128, n_ctx=SEQ_LEN, d_head=64, n_heads=2, d_mlp=512, d_vocab=69,
      act_fn="gelu", normalization_type="LN", seed=seed, device="cpu")
  tlens = transformer_lens.HookedTransformer(cfg)
  positions = utils.filter_names(list(tlens.hook_dict.keys()), [SAE_POSITION])
  assert positions == [SAE_POSITION], positions
  return e2e_transformers.SAETransformer(tlens_model=tlens, raw_sae_positions=positions,
                                         dict_size_to_input_ratio=EXPANSION)


def make_step(model: e2e_transformers.SAETransformer, loss: str, total_steps: int):
  """One training step of e2e_sae's loop for `loss`; returns `step(tokens) -> loss float`."""
  configs = loss_configs(loss)
  cache_positions = None
  if configs.in_to_orig is not None:
    cache_positions = [p for p in configs.in_to_orig.hook_positions
                       if p not in model.raw_sae_positions]
  is_local = configs.logits_kl is None and cache_positions is None
  final_layer = None
  if is_local:  # e2e_sae runs local SAEs only up to the block after the last SAE position
    final_layer = max(int(n.split(".")[1]) for n in model.raw_sae_positions) + 1

  model.saes.train()
  for name, param in model.named_parameters():
    param.requires_grad = name.startswith("saes.")
  optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
  scheduler = utils.get_cosine_schedule_with_warmup(
      optimizer, num_warmup_steps=50, num_training_steps=max(total_steps, 51), min_lr_factor=0.1)

  def step(tokens: torch.Tensor) -> float:
    orig_logits, orig_acts = model.forward_raw(
        tokens=tokens, run_entire_model=not is_local, final_layer=final_layer,
        cache_positions=cache_positions)
    new_logits, new_acts = model.forward(
        tokens=tokens, sae_positions=model.raw_sae_positions, cache_positions=cache_positions,
        orig_acts=orig_acts if is_local else None)
    loss_value, _ = losses.calc_loss(
        orig_acts=orig_acts, new_acts=new_acts,
        orig_logits=None if new_logits is None else orig_logits.detach().clone(),
        new_logits=new_logits, loss_configs=configs, is_log_step=False)
    loss_value.backward()
    torch.nn.utils.clip_grad_norm_(model.saes.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad()
    scheduler.step()
    return loss_value.item()

  return step


def time_loss(loss: str, steps: int, repeats: int, warmup: int, seed: int) -> dict:
  """Builds a fresh model + optimizer for `loss` and times its training step."""
  model = build_model(seed)
  step = make_step(model, loss, warmup + steps * repeats)
  gen = torch.Generator().manual_seed(seed)
  batches = [torch.randint(0, 69, (BATCH_SIZE, SEQ_LEN), generator=gen) for _ in range(4)]
  t0 = time.perf_counter()
  for i in range(warmup):
    step(batches[i % len(batches)])
  warmup_s = time.perf_counter() - t0
  times, last = [], float("nan")
  for r in range(repeats):
    t0 = time.perf_counter()
    for i in range(steps):
      last = step(batches[(r * steps + i) % len(batches)])
    times.append(time.perf_counter() - t0)
  step_s = statistics.median(times) / steps
  if math.isnan(last):
    raise FloatingPointError(f"{loss}: the loss turned NaN")
  return {"loss": loss, "step_s": step_s, "tokens_per_s": BATCH_SIZE * SEQ_LEN / step_s,
          "call_times_s": times, "steps": steps, "repeats": repeats, "warmup": warmup,
          "warmup_s": warmup_s, "final_loss": last}


def versions() -> dict:
  """Python's and the peer packages' installed versions, and torch's CUDA version (None)."""
  out = {"python": platform.python_version()}
  for name in PACKAGES:
    try:
      out[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      out[name] = None
  out["torch_cuda"] = torch.version.cuda
  return out


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--losses", default=",".join(LOSSES))
  parser.add_argument("--steps", type=int, default=5, help="steps per timed call")
  parser.add_argument("--repeats", type=int, default=3, help="timed calls (median)")
  parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
  parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--check", action="store_true",
                      help="only import, build the model and print the versions")
  args = parser.parse_args()
  names = [x for x in args.losses.split(",") if x]
  bad = [x for x in names if x not in LOSSES]
  if bad or not names:
    parser.error(f"--losses: unknown {bad or 'empty'}; choose from {', '.join(LOSSES)}")
  if min(args.steps, args.repeats, args.threads) < 1 or args.warmup < 0:
    parser.error("--steps, --repeats and --threads must be >= 1 and --warmup >= 0")

  torch.set_num_threads(args.threads)
  out = {"peer": "e2e_sae", "versions": versions(), "threads": torch.get_num_threads(),
         "interop_threads": torch.get_num_interop_threads(), "cpu_count": os.cpu_count(),
         "shape": {"batch_size": BATCH_SIZE, "seq_len": SEQ_LEN, "expansion": EXPANSION,
                   "sae_position": SAE_POSITION}}
  if args.check:
    build_model(args.seed)
    out["check"] = "ok"
  else:
    out["results"] = [time_loss(x, args.steps, args.repeats, args.warmup, args.seed)
                      for x in names]
  print(json.dumps(out))


if __name__ == "__main__":
  main()
