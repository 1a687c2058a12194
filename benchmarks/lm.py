"""LM training throughput against the machine's measured matrix-multiply peak.

    python benchmarks/lm.py [--language dyck2] [--batch_size 128] [--max_len 64] \
        [--steps_per_call 10] [--calls 3]

Prints one JSON object:
- `train_tokens_per_s`: training tokens (batch x max_len per step, padding included) per second
  of the jitted `lm_step.train_steps` (data sampling on device included), best of `--calls`
  host calls after compilation;
- `model_flops_per_token` and `achieved_gflops`: matmul FLOPs counted analytically,
  6 * N per token for the weight matmuls (N = non-embedding matmul params + the tied
  unembedding; forward 2N, backward 4N) plus attention (scores and weighted values over the
  full T x T square XLA computes, causal mask included: 2 * 2 * T * d_model per token per layer
  forward, x3 for training);
- `matmul_peak_gflops`: best jitted float32 `a @ b` over square sizes (best of repeats), and
  `fraction_of_peak`;
- `generate_tokens_per_s`: tokens per second of `generate.generate` (KV cache, batch 128,
  118 new tokens), after compilation.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import jax

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from experiments.configs import lm as lm_config  # pylint: disable=g-import-not-at-top
from jaxsae import grammars  # pylint: disable=g-import-not-at-top
from jaxsae.core.flops import matmul_peak  # pylint: disable=g-import-not-at-top
from jaxsae.lm import generate as generate_lib  # pylint: disable=g-import-not-at-top
from jaxsae.lm import lm_step  # pylint: disable=g-import-not-at-top
from jaxsae.lm import train_lm  # pylint: disable=g-import-not-at-top


def flops_per_token(mc, seq_len: int) -> dict[str, float]:
  """Training matmul FLOPs per token (forward + backward)."""
  d, l = mc.d_model, mc.n_layers
  n_matmul = l * (3 * d * d + d * d + 2 * d * mc.d_mlp) + d * mc.vocab_size
  attention = 3 * l * 2 * 2 * seq_len * d
  return {"weights": 6 * n_matmul, "attention": attention, "total": 6 * n_matmul + attention,
          "n_matmul_params": n_matmul}


def train_throughput(config, steps_per_call: int, calls: int) -> dict:
  """Training tokens per second of `config`'s LM: best of `calls` host calls of
  `steps_per_call` jitted steps each (data sampling on device included), after compilation."""
  config = config.copy_and_resolve_references()
  config.steps_per_call = steps_per_call
  config.num_steps = config.log_every = config.eval_every = config.checkpoint_every = (
      steps_per_call * calls)
  train_lm.validate_config(config)
  setup = lm_step.setup_for(config)
  hyper = lm_step.hyper_for(config)
  state = lm_step.init_state(config)
  t0 = time.perf_counter()
  state, m = lm_step.train_steps(state, hyper, setup)
  jax.block_until_ready(m)
  compile_and_first = time.perf_counter() - t0
  best = float("inf")
  for _ in range(calls):
    t0 = time.perf_counter()
    state, m = lm_step.train_steps(state, hyper, setup)
    jax.block_until_ready(m)
    best = min(best, time.perf_counter() - t0)
  tokens = steps_per_call * config.batch_size * config.max_len
  fl = flops_per_token(setup.model_config, config.max_len - 1)
  return {"language": config.language, "batch_size": config.batch_size,
          "max_len": config.max_len, "steps_per_call": steps_per_call,
          "seconds_per_step": best / steps_per_call, "first_call_s": compile_and_first,
          "train_tokens_per_s": tokens / best, "model_flops_per_token": fl,
          "achieved_gflops": tokens / best * fl["total"] / 1e9,
          "state": state, "setup": setup}


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--language", default="dyck2")
  parser.add_argument("--batch_size", type=int, default=128)
  parser.add_argument("--max_len", type=int, default=64)
  parser.add_argument("--steps_per_call", type=int, default=10)
  parser.add_argument("--calls", type=int, default=3)
  args = parser.parse_args()

  config = lm_config.get_config(f"language={args.language}")
  config.batch_size = args.batch_size
  config.max_len = args.max_len
  r = train_throughput(config, args.steps_per_call, args.calls)
  state, setup = r.pop("state"), r.pop("setup")
  peak, peak_n = matmul_peak()

  grammar = grammars.get(args.language)
  gen = lambda k: generate_lib.generate(state.params, setup.model_config, grammar, k)
  jax.block_until_ready(gen(jax.random.key(0)).tokens)
  t0 = time.perf_counter()
  out = gen(jax.random.key(1))
  jax.block_until_ready(out.tokens)
  gen_s = time.perf_counter() - t0

  print(json.dumps({
      **r,
      "param_count": int(jax.tree_util.tree_reduce(lambda a, x: a + x.size, state.params, 0)
                         - state.params["wpe"].size),
      "matmul_peak_gflops": peak, "matmul_peak_size": peak_n,
      "fraction_of_peak": r["achieved_gflops"] / peak,
      "generate_tokens_per_s": out.tokens.shape[0] * generate_lib.MAX_NEW_TOKENS / gen_s,
      "generate_batch_seconds": gen_s,
      "backend": jax.default_backend(), "devices": len(jax.devices()),
      "cpu_count": os.cpu_count(), "machine": platform.machine(), "jax": jax.__version__,
  }, indent=1))


if __name__ == "__main__":
  main()
