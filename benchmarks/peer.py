"""The PyTorch peer seen from `benchmarks/sae.py`: finding it, running it, and the ratios.

The peer (`peer_e2e_sae.py`) runs e2e_sae's own training step in its own virtual environment
(`peer_setup.sh` makes it; the project's environment has no torch), one subprocess per
measurement, so `sae.py` can interleave it with its own measurements. Nothing here imports torch
or JAX.

Ratios: for a (loss, N) cell, jaxsae's `variant_tokens_per_s` (N variants × batch tokens per
second) over the peer's per-SAE tokens/s for the same loss, every peer measurement of the run
counting (`speedup`: against their median; `range`: against their fastest and slowest, the
spread the peer's noise alone puts on the ratio; `rounds`: each round's jaxsae figure over that
round's peer median). The targets are checked on `speedup`, and `met_over_range` tells whether
the slowest-peer end of the range meets them too.
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import subprocess
import sys
from typing import Mapping, Sequence

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_VENV = os.path.join(HERE, ".peer-venv")
PEER_SCRIPT = os.path.join(HERE, "peer_e2e_sae.py")
SETUP_COMMAND = "bash benchmarks/peer_setup.sh"


@dataclasses.dataclass(frozen=True)
class Target:
  """jaxsae per variant must reach `min_speedup` × the peer's per-SAE rate at (loss, n)."""
  loss: str
  n: int
  min_speedup: float

  @property
  def name(self) -> str:
    return f"{self.loss}_n{self.n}_ge_{self.min_speedup:g}x_pytorch"


# The reference shape's targets, per variant against e2e_sae's one SAE, side by side.
TARGETS = (Target("local", 32, 3.0), Target("e2e", 32, 2.5), Target("e2e_ds", 32, 2.5),
           Target("local", 1, 2.0), Target("e2e", 1, 1.5))


def peer_python(venv: str = DEFAULT_VENV) -> str | None:
  """The peer environment's interpreter, or None when `venv` holds no runnable one."""
  path = os.path.join(venv, "bin", "python")
  return path if os.path.isfile(path) and os.access(path, os.X_OK) else None


def missing_message(venv: str) -> str:
  return (f"No PyTorch peer environment at {venv}: create it with `{SETUP_COMMAND}` (about a "
          f"minute, 1.5 GB; needs the package registry). Printing jaxsae's numbers without "
          f"ratios.")


def run(python: str, losses: Sequence[str], *, steps: int, repeats: int, warmup: int,
        threads: int, script: str = PEER_SCRIPT, check: bool = False,
        timeout_s: float = 900.0) -> dict:
  """Runs the peer script once and returns its JSON; per-loss results keyed under `by_loss`.

  Raises:
    RuntimeError: the peer failed, timed out, printed no JSON, or not the losses asked for; the
      message carries its exit status and the end of its stderr.
  """
  cmd = [python, script, "--losses", ",".join(losses), "--steps", str(steps),
         "--repeats", str(repeats), "--warmup", str(warmup), "--threads", str(threads)]
  if check:
    cmd.append("--check")
  try:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, check=False)
  except subprocess.TimeoutExpired as e:
    raise RuntimeError(f"the PyTorch peer ran past {timeout_s:.0f} s: {' '.join(cmd)}") from e
  hint = f"(rerun `{' '.join(cmd)}` to see it; `{SETUP_COMMAND}` rebuilds the environment)"
  if proc.returncode != 0:
    raise RuntimeError(f"the PyTorch peer exited with status {proc.returncode} {hint}:\n"
                       f"{proc.stderr[-2000:]}")
  lines = [x for x in proc.stdout.splitlines() if x.strip()]
  try:
    out = json.loads(lines[-1])
  except (IndexError, json.JSONDecodeError) as e:
    raise RuntimeError(f"the PyTorch peer printed no JSON on its last line {hint}: "
                       f"{proc.stdout[-500:]!r}") from e
  if check:
    return out
  got = [r.get("loss") for r in out.get("results", [])]
  if got != list(losses) or any(not r.get("tokens_per_s", 0) > 0 for r in out["results"]):
    raise RuntimeError(f"the PyTorch peer returned results for {got}, not for {list(losses)} "
                       f"with positive tokens_per_s {hint}")
  out["by_loss"] = {r["loss"]: r for r in out["results"]}
  return out


def speedups(variant_tokens_per_s: float, peer_rounds: Sequence[Sequence[float]],
             variant_tokens_per_s_rounds: Sequence[float] | None = None) -> dict:
  """Ratios of one (loss, N) cell against the peer measurements of its loss.

  Args:
    variant_tokens_per_s: jaxsae's reported figure for the cell.
    peer_rounds: per round, the peer's tokens/s measured in it (before and after, say).
    variant_tokens_per_s_rounds: jaxsae's figure in each round (same length as `peer_rounds`).

  Returns:
    `speedup` (over the median of every peer measurement), `range` ([over the fastest, over the
    slowest]), `peer_tokens_per_s` (that median) and, given the per-round figures, `rounds`
    (each round's figure over that round's peer median).
  """
  flat = [x for r in peer_rounds for x in r]
  if not flat or min(flat) <= 0 or variant_tokens_per_s <= 0:
    raise ValueError(f"speedups need positive rates, got jaxsae {variant_tokens_per_s} and peer "
                     f"{list(peer_rounds)}")
  out = {"speedup": variant_tokens_per_s / statistics.median(flat),
         "range": [variant_tokens_per_s / max(flat), variant_tokens_per_s / min(flat)],
         "peer_tokens_per_s": statistics.median(flat)}
  if variant_tokens_per_s_rounds is not None:
    if len(variant_tokens_per_s_rounds) != len(peer_rounds):
      raise ValueError(f"{len(variant_tokens_per_s_rounds)} jaxsae rounds against "
                       f"{len(peer_rounds)} peer rounds")
    out["rounds"] = [v / statistics.median(p)
                     for v, p in zip(variant_tokens_per_s_rounds, peer_rounds)]
  return out


def check_targets(cells: Mapping[tuple[str, int], Mapping[str, object]],
                  targets: Sequence[Target] = TARGETS) -> dict:
  """Each target against the `speedups` of its (loss, n) cell; `measured: False` if absent."""
  out = {}
  for t in targets:
    cell = cells.get((t.loss, t.n))
    if cell is None:
      out[t.name] = {"measured": False}
      continue
    lo, hi = cell["range"]
    out[t.name] = {"measured": True, "target": t.min_speedup, "speedup": cell["speedup"],
                   "range": [lo, hi], "met": cell["speedup"] >= t.min_speedup,
                   "met_over_range": lo >= t.min_speedup}
  return out


def warn(message: str) -> None:
  print(f"# {message}", file=sys.stderr, flush=True)
