"""Accelerator check: CPU agreement on a smoke grid, then SAE-grid and LM throughput and memory.

    python benchmarks/accelerator.py [--smoke] [--n 1,8,32,128] [--losses local,e2e] \
        [--topk-n 8,32] [--steps 5] [--repeats 3] [--out result.json]

One command for the first GPU or TPU at hand (about 3-4 minutes on one GPU, compilation
included); it runs unchanged on CPU, where `--smoke` shrinks every shape (the test suite runs it
that way). Prints one JSON object:

1. `agreement`: the same smoke jobs (the dyck2 smoke LM trained 12 steps, then a smoke SAE grid
   of ReLU local / e2e / e2e+ds and TopK local / e2e groups trained on that CPU-trained LM) run
   in child processes on the CPU backend and on the default backend, both with
   `jax_default_matmul_precision=highest`, and once more on the default backend at its default
   precision (on GPUs float32 matmuls then use TF32; skipped by `--smoke` on a CPU-only
   machine, where it would repeat the second run). Every logged metric of every step and
   variant (metrics.jsonl of both jobs) is compared: `max_rel_dev` = max |a - b| / (|b| + 1e-3)
   over continuous metrics; counts (L0, dead fraction) within `count_tolerance` (a latent whose
   pre-activation sits at 0 may fire on one backend and not the other). `pass` when the
   highest-precision run agrees within `rel_tolerance`; the default-precision deviation is
   reported, not judged. On a CPU-only machine both runs are the same program: deviation 0.
2. `grid`: per loss and N variants in one group (vmap over variants on accelerators, the
   library's `variant_loop='auto'`), at the reference shape (untrained English LM of the spec's
   size, batch 32 × 128 tokens, expansion 8 → F = 1,024 at resid_post.0, every position
   trained): `step_s` (median of `--repeats` calls of `--steps` steps after compilation),
   `variant_tokens_per_s` = N × tokens per second, `compile_s`, and the compiled program's
   memory (`memory_analysis`: arguments + outputs − aliased + temporaries) with
   `memory_per_variant_mb` = the slope between the smallest and largest N. On GPUs the device's
   `peak_bytes_in_use` after the group is recorded too. Then TopK k = 16 groups at `--topk-n`
   (default N = 8 and 32, none under `--smoke`), each with `speedup_vs_relu`, its
   variant-tokens/s over ReLU's at the same N and loss (`benchmarks/sae.py`'s TopK target,
   ≥ 1.5×, which CPUs cannot meet: see its docstring). The H200 run below predates these rows.
3. `lm`: the LM's training tokens per second at the English CPU default shape
   (`benchmarks/lm.py`'s measurement), batch 128.

Measured on one NVIDIA H200 (jax 0.11.2 with the CUDA 13 plugin, flax 0.12.10, orbax 0.12.4;
commit 237a966; 231 s wall with compilation; the whole JSON is `results/accelerator_h200.json`):

- agreement: pass. At `highest` precision the H200 differs from the CPU by at most 2.1e-7
  (relative) in the LM's 14 logged values and 6.3e-6 in the SAE grid's 200 (worst: a KL term,
  0.0161589 vs 0.0161590); L0 within 1.9e-6 latents per token. At the backend's default precision
  (TF32 matmuls) the deviations are 4.3e-5 (LM) and 1.7e-4 (SAE).
- grid, variant-tokens/s (ms per step; compiled memory), vmap over variants:

  | loss | N = 1 | N = 8 | N = 32 | N = 128 | memory per variant |
  |---|---|---|---|---|---|
  | local | 2.98M (1.37 ms; 64 MiB) | 17.1M (1.91; 331) | 41.1M (3.19; 1.3 GiB) | 58.3M (9.0; 4.9 GiB) | 39 MiB |
  | e2e | 2.15M (1.91 ms; 95 MiB) | 11.3M (2.90; 587) | 20.4M (6.43; 2.3 GiB) | 24.1M (21.7; 9.3 GiB) | 75 MiB |

  e2e costs 1.4-2.4x local per variant (1.39 at N = 1, 2.41 at N = 128). Compilation: 5-6 s per
  local group, 10-13 s per e2e group (50 s at N = 128).
- lm: 3.54M training tokens/s (English, batch 128 x 48, 1.73 ms per step; 9.1 TFLOP/s of
  counted matmul work in float32 at the default precision).

At N = 128 the e2e grid's program holds 9.3 GiB, about 7% of the H200's memory; larger N was
not measured.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

# Grow device memory on demand: the agreement check's child processes share the accelerator with
# this one, and the recorded peak then shows what the groups used (must precede jax's backend).
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top,wrong-import-position

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(_HERE, ".."))
sys.path.insert(0, _HERE)

import lm as lm_bench  # pylint: disable=g-import-not-at-top,wrong-import-position
from experiments.configs import lm as lm_configs  # pylint: disable=g-import-not-at-top
from experiments.configs import sae_base  # pylint: disable=g-import-not-at-top
from jaxsae.core import jsonio  # pylint: disable=g-import-not-at-top
from jaxsae.grid import grid_setup  # pylint: disable=g-import-not-at-top
from jaxsae.grid import grid_step  # pylint: disable=g-import-not-at-top
from jaxsae.grid import train_sae  # pylint: disable=g-import-not-at-top
from jaxsae.lm import train_lm  # pylint: disable=g-import-not-at-top

REL_TOLERANCE = 2e-3  # highest-precision accelerator vs CPU, relative to |value| + 1e-3
COUNT_TOLERANCE = 0.05  # L0 (latents per token) and dead fraction: absolute
COUNT_METRICS = ("l0", "dead_fraction", "dropped_tokens")
TOPK_K = 16  # the TopK rows' k (benchmarks/sae.py's TopK-vs-ReLU target is at k = 16)
SKIP_METRICS = ("step", "lr", "tokens_per_s", "train_seconds", "frozen", "grammatical_fraction",
                "finished_fraction", "grammatical_fraction_std")

# Reference shape (as benchmarks/sae.py) and its smoke counterpart.
FULL_SHAPE = {"language": "english", "batch_size": 32, "seq_len": 128, "expansion": 8,
              "site": "resid_post.0", "lm_batch": 128, "lm_len": 48}
SMOKE_SHAPE = {"language": "dyck2", "batch_size": 4, "seq_len": 24, "expansion": 2,
               "site": "resid_post.0", "lm_batch": 8, "lm_len": 24}


# ----------------------------------------------------------------------------- agreement


def _smoke_lm_config():
  c = lm_configs.get_config("language=dyck2,smoke,steps=12")
  c.optim.warmup_steps = 2  # move the weights, so the comparison has something to compare
  c.log_every = c.eval_every = c.checkpoint_every = 4
  c.steps_per_call = 4
  return c


def _smoke_sae_config(lm_dir: str):
  c = sae_base.base_config(language="dyck2", lm_workdir=lm_dir)
  c.batch_size, c.steps, c.log_every, c.checkpoint_every, c.warmup_steps = 4, 8, 2, 8, 1
  relu = {"product": {"loss": ["local", "e2e", "e2e_ds"]},
          "set": {"expansion": 2, "sparsity_coeff": 1.0}}
  topk = {"product": {"loss": ["local", "e2e"]},
          "set": {"expansion": 2, "activation": "topk", "k": 4}}
  c.sweep = [relu, topk]
  return c


def child(lm_out: str, sae_lm: str, sae_out: str) -> None:
  """Runs the smoke LM job into `lm_out` and the smoke SAE grid on `sae_lm` into `sae_out`."""
  train_lm.run(_smoke_lm_config(), lm_out)
  train_sae.run(_smoke_sae_config(sae_lm or lm_out), sae_out)


def _run_child(tmp: str, name: str, sae_lm: str, env_update: dict[str, str]) -> dict:
  env = dict(os.environ, **env_update)
  lm_out, sae_out = os.path.join(tmp, name, "lm"), os.path.join(tmp, name, "sae")
  cmd = [sys.executable, os.path.abspath(__file__), "--child", lm_out, sae_lm, sae_out]
  t0 = time.perf_counter()
  proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
  out = {"name": name, "rc": proc.returncode, "wall_s": round(time.perf_counter() - t0, 2),
         "lm": lm_out, "sae": sae_out}
  if proc.returncode:
    out["stderr_tail"] = proc.stderr[-3000:]
  return out


def _records(path: str) -> dict[tuple, dict]:
  out = {}
  with open(path) as f:
    for line in f:
      r = json.loads(line)
      out[(r.get("kind", ""), r.get("variant", ""), r["step"])] = r
  return out


def compare_records(a: dict[tuple, dict], b: dict[tuple, dict]) -> dict:
  """Deviation of records `a` from reference records `b` (same keys expected)."""
  rel, count, worst, worst_count, compared = 0.0, 0.0, None, None, 0
  missing = sorted(str(k) for k in set(a) ^ set(b))
  for key in sorted(set(a) & set(b), key=str):
    for m, vb in b[key].items():
      va = a[key].get(m)
      if m in SKIP_METRICS or isinstance(vb, (bool, str)) or not isinstance(vb, (int, float)):
        continue
      if not isinstance(va, (int, float)):
        missing.append(f"{key}:{m}")
        continue
      compared += 1
      if m in COUNT_METRICS:
        d = abs(va - vb)
        if d > count:
          count, worst_count = d, f"{key}:{m} {va} vs {vb}"
      else:
        d = abs(va - vb) / (abs(vb) + 1e-3)
        if d != d or d > rel:  # NaN counts as the worst
          rel, worst = (float("inf") if d != d else d), f"{key}:{m} {va} vs {vb}"
  return {"max_rel_dev": rel, "worst": worst, "max_count_dev": count, "worst_count": worst_count,
          "compared": compared, "missing": missing[:20]}


def agreement(tmp: str, default_precision: bool = True) -> dict:
  """CPU vs the default backend on the smoke LM and SAE jobs (module docstring, item 1);
  `default_precision=False` skips the third run (at the backend's default precision)."""
  hi = {"JAX_DEFAULT_MATMUL_PRECISION": "highest"}
  cpu = _run_child(tmp, "cpu", "", dict(hi, JAX_PLATFORMS="cpu"))
  if cpu["rc"]:
    return {"pass": False, "error": "the CPU run failed", "runs": [cpu]}
  runs = [cpu]
  out = {"backend": jax.default_backend(), "rel_tolerance": REL_TOLERANCE,
         "count_tolerance": COUNT_TOLERANCE}
  for name, env in (("default_highest", hi), ("default_default", {}))[:2 if default_precision
                                                                       else 1]:
    r = _run_child(tmp, name, cpu["lm"], env)
    runs.append(r)
    if r["rc"]:
      out[name] = {"error": "run failed"}
      continue
    out[name] = {
        "lm": compare_records(_records(os.path.join(r["lm"], "metrics.jsonl")),
                              _records(os.path.join(cpu["lm"], "metrics.jsonl"))),
        "sae": compare_records(_records(os.path.join(r["sae"], "metrics.jsonl")),
                               _records(os.path.join(cpu["sae"], "metrics.jsonl")))}
  hi_res = out.get("default_highest", {})
  out["pass"] = bool("lm" in hi_res and all(
      hi_res[j]["max_rel_dev"] <= REL_TOLERANCE and hi_res[j]["max_count_dev"] <= COUNT_TOLERANCE
      and not hi_res[j]["missing"] and hi_res[j]["compared"] > 0 for j in ("lm", "sae")))
  out["runs"] = [{k: v for k, v in r.items() if k not in ("lm", "sae")} for r in runs]
  return out


# ----------------------------------------------------------------------------- throughput


def _grid_config(lm_dir: str, shape: dict, loss: str, n: int, steps: int,
                 activation: str = "relu"):
  """One group of `n` SAEs (seeds 0 … n − 1): ReLU + L1 λ 1, or TopK k = `TOPK_K`."""
  c = sae_base.base_config(language=shape["language"], lm_workdir=lm_dir)
  c.positions = "all"
  c.batch_size, c.max_len, c.forward_len, c.site = (shape["batch_size"], shape["seq_len"],
                                                    shape["seq_len"], shape["site"])
  c.steps = c.log_every = c.checkpoint_every = steps
  fields = ({"sparsity_coeff": 1.0} if activation == "relu"
            else {"activation": activation, "k": TOPK_K})
  c.sweep = [{"product": {"seed": list(range(n))},
              "set": {"loss": loss, "expansion": shape["expansion"], **fields}}]
  return c


def memory_bytes(compiled) -> int | None:
  """Bytes a compiled program holds at once: arguments + outputs − donated aliases + temps."""
  try:
    m = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except  (backends without the analysis)
    return None
  if m is None:
    return None
  return int(m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
             + m.temp_size_in_bytes)


def _peak_bytes() -> int | None:
  stats = jax.devices()[0].memory_stats()
  return int(stats["peak_bytes_in_use"]) if stats and "peak_bytes_in_use" in stats else None


def time_group(lm_dir: str, shape: dict, loss: str, n: int, steps: int, repeats: int,
               activation: str = "relu") -> dict:
  """Compiles one (loss, N, activation) group's chunk of `steps` steps and times it."""
  config = _grid_config(lm_dir, shape, loss, n, steps, activation)
  train_sae.validate_config(config)
  setup, lm, root = train_sae.prepare(config)
  state = grid_setup.place_state(grid_setup.init_grid(setup, lm, root), setup)
  hypers = tuple(grid_step.group_hyper(s) for s in setup.specs)
  key = jax.random.key(0)
  t0 = time.perf_counter()
  compiled = train_sae.make_chunk_fn(setup, steps, state).lower(
      state, hypers, lm.params, key).compile()
  compile_s = time.perf_counter() - t0
  box = {"state": state}

  def call():
    box["state"], metrics = compiled(box["state"], hypers, lm.params, key)
    return metrics

  jax.block_until_ready(call())
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    metrics = call()
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - t0)
  step_s = statistics.median(times) / steps
  finite = bool(jnp.all(jnp.isfinite(jax.tree_util.tree_leaves(metrics)[0])))
  tokens = setup.batch_size * setup.forward_len
  return {"loss": loss, "n": n, "activation": activation, "variant_loop": setup.variant_loop,
          "step_s": step_s,
          "tokens_per_s": tokens / step_s, "variant_tokens_per_s": n * tokens / step_s,
          "compile_s": compile_s, "call_times_s": times, "finite": finite,
          "memory_bytes": memory_bytes(compiled), "device_peak_bytes": _peak_bytes()}


def grid_throughput(tmp: str, shape: dict, ns: list[int], losses: list[str], steps: int,
                    repeats: int, topk_ns: tuple[int, ...] = ()) -> list[dict]:
  """ReLU groups per loss and N (memory slope over N), then TopK k = `TOPK_K` groups at
  `topk_ns`, each with `speedup_vs_relu` = its variant-tokens/s over ReLU's at the same N."""
  config = lm_configs.get_config(f"language={shape['language']}"
                                 + (",smoke" if shape is SMOKE_SHAPE else ""))
  config.max_len = shape["seq_len"]
  lm_dir = train_lm.write_untrained(config, os.path.join(tmp, "lm_untrained"))
  results = []
  for loss in losses:
    rows = []
    for n in ns:
      try:
        rows.append(time_group(lm_dir, shape, loss, n, steps, repeats))
      except Exception as e:  # pylint: disable=broad-except  (out of memory at large N, say)
        rows.append({"loss": loss, "n": n, "error": f"{type(e).__name__}: {str(e)[:400]}"})
      print(f"# {loss} N={n}: {json.dumps(_short(rows[-1]))}", file=sys.stderr, flush=True)
    ok = [r for r in rows if r.get("memory_bytes") is not None]
    if len(ok) >= 2 and ok[-1]["n"] > ok[0]["n"]:
      slope = (ok[-1]["memory_bytes"] - ok[0]["memory_bytes"]) / (ok[-1]["n"] - ok[0]["n"])
      for r in rows:
        r["memory_per_variant_mb"] = slope / 2**20
    relu = {r["n"]: r for r in rows if "variant_tokens_per_s" in r}
    for n in topk_ns:
      try:
        r = time_group(lm_dir, shape, loss, n, steps, repeats, activation="topk")
        if n in relu:
          r["speedup_vs_relu"] = r["variant_tokens_per_s"] / relu[n]["variant_tokens_per_s"]
      except Exception as e:  # pylint: disable=broad-except
        r = {"loss": loss, "n": n, "activation": "topk",
             "error": f"{type(e).__name__}: {str(e)[:400]}"}
      print(f"# {loss} topk N={n}: {json.dumps(_short(r))}", file=sys.stderr, flush=True)
      rows.append(r)
    results += rows
  return results


def _short(r: dict) -> dict:
  return {k: (round(v, 5) if isinstance(v, float) else v) for k, v in r.items()
          if k != "call_times_s"}


def _agreement_part(tmp, shape, ns, args, steps, repeats):
  del shape, ns, steps, repeats
  # On a CPU-only machine the default-precision run repeats the highest-precision one.
  return agreement(tmp, default_precision=not args.smoke or jax.default_backend() != "cpu")


def _grid_part(tmp, shape, ns, args, steps, repeats):
  topk_ns = tuple(int(x) for x in (args.topk_n if args.topk_n is not None
                                   else ("" if args.smoke else "8,32")).split(",") if x)
  return [_short(r) for r in grid_throughput(tmp, shape, ns, args.losses.split(","), steps,
                                             repeats, topk_ns)]


def _lm_part(tmp, shape, ns, args, steps, repeats):
  del tmp, ns
  config = lm_configs.get_config(f"language={shape['language']}"
                                 + (",smoke" if args.smoke else ""))
  config.batch_size, config.max_len = shape["lm_batch"], shape["lm_len"]
  r = lm_bench.train_throughput(config, steps_per_call=2 if args.smoke else 10, calls=repeats)
  return {k: v for k, v in r.items() if k not in ("state", "setup")}


_PARTS = {"agreement": _agreement_part, "grid": _grid_part, "lm": _lm_part}


def main() -> None:
  if len(sys.argv) == 5 and sys.argv[1] == "--child":
    child(*sys.argv[2:])
    return
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--smoke", action="store_true", help="tiny shapes (a test of the script)")
  parser.add_argument("--n", default="", help="variant counts (default 1,8,32,128; smoke 1,2)")
  parser.add_argument("--losses", default="local,e2e")
  parser.add_argument("--topk-n", default=None,
                      help=f"variant counts of the TopK k={TOPK_K} groups timed against ReLU "
                           "(default 8,32; none under --smoke; '' for none)")
  parser.add_argument("--steps", type=int, default=0, help="steps per timed call (default 5)")
  parser.add_argument("--repeats", type=int, default=0, help="timed calls (default 3)")
  parser.add_argument("--skip", default="", help="parts to skip: agreement,grid,lm")
  parser.add_argument("--out", default="", help="also write the JSON here")
  args = parser.parse_args()
  shape = SMOKE_SHAPE if args.smoke else FULL_SHAPE
  ns = [int(x) for x in (args.n or ("1,2" if args.smoke else "1,8,32,128")).split(",")]
  steps = args.steps or (1 if args.smoke else 5)
  repeats = args.repeats or (1 if args.smoke else 3)
  skip = set(filter(None, args.skip.split(",")))
  t_start = time.perf_counter()
  result = {"backend": jax.default_backend(), "devices": [str(d) for d in jax.devices()],
            "device_kind": jax.devices()[0].device_kind, "jax": jax.__version__,
            "machine": platform.machine(), "cpu_count": os.cpu_count(), "smoke": args.smoke,
            "shape": shape, "steps_per_call": steps, "repeats": repeats,
            "matmul_precision": os.environ.get("JAX_DEFAULT_MATMUL_PRECISION", "backend default")}
  with tempfile.TemporaryDirectory() as tmp:
    for part in ("agreement", "grid", "lm"):
      if part in skip:
        continue
      t0 = time.perf_counter()
      try:  # a part that fails is reported and the others still run
        result[part] = _PARTS[part](tmp, shape, ns, args, steps, repeats)
      except Exception as e:  # pylint: disable=broad-except
        result[part] = {"error": f"{type(e).__name__}: {str(e)[:1000]}"}
      print(f"# {part} done in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
      if args.out:  # what is done so far survives a later part that hangs
        jsonio.write(args.out, result)
  result["wall_s"] = round(time.perf_counter() - t_start, 1)
  text = json.dumps(result, indent=1)
  if args.out:
    jsonio.write(args.out, result)
  print(text)


if __name__ == "__main__":
  main()
