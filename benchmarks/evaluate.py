"""Evaluation throughput: held-out metrics per group (N = 1, 32) and spliced generation at grid scale.

    python benchmarks/evaluate.py [--n 1,32] [--repeats 3] [--loops auto,vmap,map]
    python benchmarks/evaluate.py --grid [--norm input_recon] [--modes corrected,original]
        [--positions all] [--batches 5] [--batch-size 128] [--steady 3,7] [--full-eval]

Reference shape (as `benchmarks/sae.py`): an untrained English LM of the spec's size (2 layers,
d_model 128, d_mlp 512, vocab 69), held-out batches of 32 sequences × 128 tokens, one ReLU SAE
group of expansion 8 (F = 1,024) at resid_post.0, every non-pad position counted and spliced
(`mask_positions='all'`, `positions='all'`). One "variant-evaluation" is every held-out metric
of `jaxsae.evaluation.evaluate` (L0 and firing counts, MSE / EV, the spliced forward to the logits with CE,
KL, top-1, TV, grammatical mass, downstream MSE / EV) for one variant on one batch of 4,096
tokens. Per batch the clean pass (clean forward, zero- and mean-ablation forwards; shared by
every variant) runs once, then the group's pass over all N variants; the time is the median of
`--repeats` batches after compilation.

Prints one JSON object with, per (variant loop, N): `batch_s` (clean + group pass),
`clean_s` (the shared part alone), `variant_evaluations_per_s` = N / batch_s,
`variant_tokens_per_s` = N × 4,096 / batch_s, and `cost_ratio_vs_n1` = batch_s(N) /
batch_s(1), which is far below N when cost does not grow linearly with N at small N (the clean
pass and the per-call overheads are shared).

Last measured (`--loops vmap,map`, jax 0.10.2, 2 CPU cores shared with other jobs, load
average 3.3-4.1; 'map' is what the grid's variant_loop='auto' picks on CPU):

| loop | N | batch s | clean s | variant-evaluations/s | variant-tokens/s | cost vs N=1 |
|---|---|---|---|---|---|---|
| vmap | 1 | 0.172 | 0.087 | 5.8 | 23.8k | 1 |
| vmap | 32 | 3.41 | 0.170 | 9.4 | 38.5k | 19.8 |
| map | 1 | 0.172 | 0.093 | 5.8 | 23.8k | 1 |
| map | 32 | 1.88 | 0.084 | 17.0 | 69.7k | 10.9 |

Half the N = 1 cost is the shared clean pass (three forwards: clean, zero- and mean-ablated),
which N = 32 amortises; on CPU XLA's batched matmuls make 'vmap' the slower loop, as in
training. Re-measure on an idle machine (and on an accelerator, where 'vmap' is the default).

`--grid`: spliced grammaticality over the 44-SAE Menon grid (`experiments/configs/sae_menon.py`,
English, untrained SAE params on the untrained spec-size LM: the cost does not depend on the
weights except through how soon generations emit <eos>), 5 × 128 generations of up to 118 new
tokens per SAE and combination, through `spliced_generation.spliced_grammaticality` exactly as
the eval job calls it, compilation and the clean model's generations included. `--norm
input_recon` (default) makes the two splice modes different functions, so both are generated
(with `none` they coincide and are generated once). Reports wall and CPU seconds, the stages
(clean, generation, recognition), sequences/s; `--steady` groups timed again (compiled):
sequences/s per SAE = 640 / (seconds of the group's call / its variants); `--full-eval` the
eval job's `evaluate.evaluate_trained` with its defaults on the Menon grid (norm none: held-out
metrics on 10 × 128 sequences; grammaticality for both modes × positions all / sentence).

Last measured, `--grid --steady 3,7` (commit b22aafe, jax 0.10.2, 2 CPU cores shared with other
workers' jobs, load average 5.6 before / 5.0 after; our process got 237 CPU s in 378 s wall):
44 SAEs × 640 generations × 2 splice modes = 56,320 sequences in **378 s wall** (149
sequences/s; target ≤ 600 s met under load): clean generations 18 s, spliced generation 204 s
(8 compilations included), the rest waiting in the recogniser's eager ops (fixed since: the
stages are now timed after every group is collected). Sequences/s per SAE, compiled, under the
same load: 245 for ReLU ×8 (width 1,024, 6 SAEs), 172 for TopK ×8 (5 SAEs). About 82% of the
generations emit <eos> within the budget, so early stopping rarely ends a 128-row batch early
on this untrained LM; a trained LM's sentences end sooner.

Idle-machine estimate: the process used 237 CPU s; on 2 idle cores the wall time lies between
CPU/2 ≈ 120 s (both cores busy all the time) and CPU ≈ 240 s (one core): ≈ 2-4 minutes for the
grid's generations in both modes (contention also inflates CPU time, so this is an upper
estimate of the CPU needed).

Before (commit 60d7be5, same machine, load average 5.9): one 128 × 118 batch per call and
variant took 2.5-3.3 s (a 128-row decode step 19 ms: the KV cache re-stacked every step and
`jax.nn.dot_product_attention`'s head transposes), 4-7 s to compile each (group, mode,
positions): ≈ 440 × 2.7 s + 16 × 5 s ≈ 21 minutes for the same workload. What changed: the
`[L, B, N, S, H]` cache updated in place with batch-leading per-head attention (decode step
≈ 3 ms at B 128), every variant and batch of a group in one call (`lax.map` on CPU), the prompt
prefilled once per variant (once for the grid where it stays clean), one compilation per group
for both modes and positions (traced flags), generation stopping once every row of a batch has
emitted <eos>, and groups compiled while earlier ones run. The tokens are identical to the
previous path (checked on 4,096 rows over all 8 groups × 2 modes × 2 positions at this shape,
and the smoke eval.json is bit-identical).
"""

from __future__ import annotations

# pylint: disable=protected-access

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from experiments.configs import lm as lm_configs  # pylint: disable=g-import-not-at-top
from experiments.configs import sae_base  # pylint: disable=g-import-not-at-top
from experiments.configs import sae_menon  # pylint: disable=g-import-not-at-top
from jaxsae.evaluation import eval_passes  # pylint: disable=g-import-not-at-top
from jaxsae.evaluation import evaluate as ev  # pylint: disable=g-import-not-at-top
from jaxsae.evaluation import spliced_generation as sg  # pylint: disable=g-import-not-at-top
from jaxsae.grid import grid_setup  # pylint: disable=g-import-not-at-top
from jaxsae.grid import grid_step  # pylint: disable=g-import-not-at-top
from jaxsae.grid import train_sae  # pylint: disable=g-import-not-at-top
from jaxsae.grid import trained as trained_lib  # pylint: disable=g-import-not-at-top
from jaxsae.lm import generate as generate_lib  # pylint: disable=g-import-not-at-top
from jaxsae.lm import train_lm  # pylint: disable=g-import-not-at-top

LANGUAGE = "english"
BATCH_SIZE, SEQ_LEN, EXPANSION, SITE = 32, 128, 8, "resid_post.0"


def write_untrained_lm(directory: str) -> str:
  """An LM workdir with the default (non-smoke) model and an untrained checkpoint at step 0."""
  config = lm_configs.get_config(f"language={LANGUAGE}")
  config.max_len = SEQ_LEN
  return train_lm.write_untrained(config, directory)


def _setup(lm_dir: str, n: int, loop: str):
  c = sae_base.base_config(language=LANGUAGE, lm_workdir=lm_dir)
  c.positions = "all"
  c.batch_size, c.max_len, c.forward_len, c.site = BATCH_SIZE, SEQ_LEN, SEQ_LEN, SITE
  if "variant_loop" in c:
    c.variant_loop = loop
  c.sweep = [{"product": {"seed": list(range(n))},
              "set": {"loss": "local", "expansion": EXPANSION, "sparsity_coeff": 1.0}}]
  train_sae.validate_config(c)
  setup, lm, _ = train_sae.prepare(c)
  return setup, lm


def _times(fn, repeats: int) -> list[float]:
  out = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    out.append(time.perf_counter() - t0)
  return out


def time_group(lm_dir: str, n: int, loop: str, repeats: int, data) -> dict:
  """Compiles the clean pass and one group's pass for N variants and times a batch."""
  setup, lm = _setup(lm_dir, n, loop)
  spec = setup.specs[0]
  state = grid_step.init_group(spec, setup, None)
  hparams = grid_step.group_hyper(spec).hparams
  ref = ev.reference(lm.params, data, setup)
  st = eval_passes.static_for(setup, "all")
  gst = eval_passes.GroupStatic(base=st, sae=spec.sae, splice_mode=spec.splice_mode,
                                variant_loop=setup.variant_loop)
  batch = (data.tokens_KBT[0], data.next_KBT[0], data.mask_KBT[0], data.valid_KBTV[0])
  batch = jax.device_put(batch)
  left = jnp.int32(2**30)

  def clean():
    return eval_passes.clean_pass(lm.params, *batch, ref, left, st=st)

  def both():
    c, sums = clean()
    return sums, eval_passes.group_pass(state.params, state.sae_state, hparams, lm.params, c,
                                        ref, st=gst)

  t0 = time.perf_counter()
  jax.block_until_ready(both())
  first = time.perf_counter() - t0
  batch_s = statistics.median(_times(both, repeats))
  clean_s = statistics.median(_times(clean, repeats))
  tokens = BATCH_SIZE * SEQ_LEN
  out = {"n": n, "variant_loop": setup.variant_loop, "batch_s": batch_s, "clean_s": clean_s,
         "variant_evaluations_per_s": n / batch_s, "variant_tokens_per_s": n * tokens / batch_s,
         "first_call_s": first}
  return out


# ------------------------------------------------------------------------------------------------
# The grid scale: spliced generation over the Menon grid, and the whole eval job.


def menon_grid(lm_dir: str, norm: str) -> trained_lib.TrainedGrid:
  """The 44-SAE Menon grid on the LM in `lm_dir`, untrained SAE params (timing only)."""
  c = sae_menon.get_config(f"language={LANGUAGE},lm_workdir={lm_dir},norm={norm}")
  train_sae.validate_config(c)
  setup, lm, root = train_sae.prepare(c)
  state = grid_setup.init_grid(setup, lm, root)
  hypers = tuple(grid_step.group_hyper(s) for s in setup.specs)
  return trained_lib.TrainedGrid(config=c, setup=setup, lm=lm, state=state, hypers=hypers)


def _cpu_s() -> float:
  """CPU seconds of this process so far (user + system, every thread)."""
  t = os.times()
  return t.user + t.system


def _generated_combos(spec, modes, positions) -> int:
  normalised = spec.sae.input_norm or spec.sae.recon_norm
  return (len(modes) if normalised else 1) * len(positions)


def time_grid_generation(trained: trained_lib.TrainedGrid, num_batches: int, batch_size: int,
                         modes, positions) -> dict:
  """Spliced grammaticality of the whole grid (`spliced_generation.spliced_grammaticality`, as
  the eval job calls it): wall time, compilation included, and its stages."""
  t0, c0 = time.perf_counter(), _cpu_s()
  out = sg.spliced_grammaticality(trained, num_batches=num_batches, batch_size=batch_size,
                                  modes=modes, positions=positions)
  wall, cpu = time.perf_counter() - t0, _cpu_s() - c0
  specs = trained.setup.specs
  saes = sum(s.size for s in specs)
  seqs = sum(s.size * _generated_combos(s, modes, positions) for s in specs) * (
      num_batches * batch_size)
  finished = [r["finished"] for v in out["variants"].values() for r in v.values()]
  return {"saes": saes, "groups": len(specs), "modes": list(modes), "positions": list(positions),
          "generations_per_sae_and_combo": num_batches * batch_size, "sequences": seqs,
          "wall_s": wall, "cpu_s": cpu, "stages_s": out["seconds"],
          "sequences_per_s": seqs / wall,
          "mean_finished": float(np.mean(finished)), "clean_finished": out["clean"]["finished"]}


def time_group_steady(trained: trained_lib.TrainedGrid, index: int, mode: str, positions: str,
                      num_batches: int, batch_size: int) -> dict:
  """One group's generations (every variant, `num_batches` × `batch_size` each): the first
  call (compilation included) and a second one; sequences/s per SAE from the second."""
  setup, spec = trained.setup, trained.setup.specs[index]
  gs, hyper = trained.state.groups[index], trained.hypers[index]
  key = jax.random.fold_in(jax.random.key(0), sg.GENERATION_STREAM)
  keys = jnp.stack([jax.random.fold_in(key, i) for i in range(num_batches)])
  run = lambda: sg.group_generations(setup, trained.lm.params, spec.sae, gs.params, gs.sae_state,
                                     hyper.hparams, keys, mode=mode, positions=positions,
                                     batch_size=batch_size)
  t0 = time.perf_counter()
  run()
  first = time.perf_counter() - t0
  tokens, done = run()
  steady = time.perf_counter() - first - t0
  t1 = time.perf_counter()
  generate_lib.recognise(setup.grammar, tokens)
  recognise = time.perf_counter() - t1
  return {"group": spec.name, "activation": spec.sae.activation, "width": spec.sae.width,
          "variants": spec.size, "mode": mode, "positions": positions,
          "first_call_s": first, "steady_s": steady, "recognise_s": recognise,
          "sequences_per_s_per_sae": num_batches * batch_size / (steady / spec.size),
          "finished": float(np.mean(done))}


def time_full_eval(trained: trained_lib.TrainedGrid) -> dict:
  """`evaluate.evaluate_trained` with the eval job's defaults (held-out metrics on 10 × 128
  sequences; spliced grammaticality 5 × 128 per SAE for both modes × both positions)."""
  t0, c0 = time.perf_counter(), _cpu_s()
  out = ev.evaluate_trained(trained)
  return {"wall_s": time.perf_counter() - t0, "cpu_s": _cpu_s() - c0, "seconds": out["seconds"]}


def grid_main(args) -> dict:
  modes = tuple(args.modes.split(","))
  positions = tuple(args.positions.split(","))
  result = {"load_average_before": [round(x, 2) for x in os.getloadavg()]}
  with tempfile.TemporaryDirectory() as tmp:
    config = lm_configs.get_config(f"language={LANGUAGE}")
    lm_dir = train_lm.write_untrained(config, os.path.join(tmp, "lm"))
    trained = menon_grid(lm_dir, args.norm)
    result["norm"] = args.norm
    result["generation"] = time_grid_generation(trained, args.batches, args.batch_size, modes,
                                                positions)
    print(f"# grid generation: {result['generation']['wall_s']:.1f} s", file=sys.stderr,
          flush=True)
    result["load_average_after_generation"] = [round(x, 2) for x in os.getloadavg()]
    if args.steady:
      result["steady"] = [
          time_group_steady(trained, int(i), modes[0], positions[0], args.batches,
                            args.batch_size) for i in args.steady.split(",")]
    if args.full_eval:
      result["full_eval"] = time_full_eval(menon_grid(lm_dir, "none"))
      print(f"# full eval: {result['full_eval']['wall_s']:.1f} s", file=sys.stderr, flush=True)
  result["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
  return result


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--n", default="1,32", help="variant counts, comma-separated")
  parser.add_argument("--repeats", type=int, default=3, help="timed batches (median)")
  parser.add_argument("--loops", default="auto",
                      help="variant loops to time: auto (the grid default), vmap, map")
  parser.add_argument("--grid", action="store_true",
                      help="time spliced generation over the 44-SAE Menon grid instead")
  parser.add_argument("--norm", default="input_recon",
                      help="--grid: the Menon grid's norm (none: both splice modes coincide "
                           "and are generated once)")
  parser.add_argument("--modes", default="corrected,original", help="--grid: splice modes")
  parser.add_argument("--positions", default="all", help="--grid: all and/or sentence")
  parser.add_argument("--batches", type=int, default=5, help="--grid: batches per SAE")
  parser.add_argument("--batch-size", type=int, default=128, help="--grid: sequences per batch")
  parser.add_argument("--steady", default="",
                      help="--grid: group indices to time again after compilation (e.g. 0,7)")
  parser.add_argument("--full-eval", action="store_true",
                      help="--grid: also time the eval job's evaluate_trained (norm=none grid)")
  args = parser.parse_args()
  if args.grid:
    rnd = lambda x: (round(x, 3) if isinstance(x, float) else
                     {k: rnd(v) for k, v in x.items()} if isinstance(x, dict) else
                     [rnd(v) for v in x] if isinstance(x, list) else x)
    out = grid_main(args)
    out.update({"backend": jax.default_backend(), "cpu_count": os.cpu_count(),
                "machine": platform.machine(), "jax": jax.__version__})
    print(json.dumps(rnd(out), indent=1))
    return
  ns = [int(x) for x in args.n.split(",")]
  loops = args.loops.split(",")
  load_before = os.getloadavg()
  results = []
  with tempfile.TemporaryDirectory() as tmp:
    lm_dir = write_untrained_lm(os.path.join(tmp, "lm"))
    setup, _ = _setup(lm_dir, 1, "vmap")
    data = eval_passes.heldout(setup, seed=0, num_batches=1, batch_size=BATCH_SIZE)
    for loop in loops:
      for n in ns:
        r = time_group(lm_dir, n, loop, args.repeats, data)
        print(f"# {r['variant_loop']} N={n}: {r['batch_s']:.3f} s/batch, "
              f"{r['variant_evaluations_per_s']:.2f} variant-evaluations/s", file=sys.stderr,
              flush=True)
        results.append(r)
  for r in results:
    base = [b for b in results if b["n"] == 1 and b["variant_loop"] == r["variant_loop"]]
    if base:
      r["cost_ratio_vs_n1"] = r["batch_s"] / base[0]["batch_s"]
      r["sublinear"] = r["cost_ratio_vs_n1"] < r["n"] or r["n"] == 1
  rnd = lambda r: {k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}
  print(json.dumps({
      "shape": {"language": LANGUAGE, "n_layers": 2, "d_model": 128, "batch_size": BATCH_SIZE,
                "seq_len": SEQ_LEN, "tokens_per_batch": BATCH_SIZE * SEQ_LEN,
                "expansion": EXPANSION, "width": EXPANSION * 128, "site": SITE,
                "positions": "all"},
      "repeats": args.repeats, "results": [rnd(r) for r in results],
      "load_average_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
      "backend": jax.default_backend(), "devices": len(jax.devices()),
      "cpu_count": os.cpu_count(), "machine": platform.machine(), "jax": jax.__version__,
  }, indent=1))


if __name__ == "__main__":
  main()
