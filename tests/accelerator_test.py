"""benchmarks/accelerator.py: its comparison logic, and the whole script at smoke size on CPU."""

import importlib.util
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "accelerator.py")


def _module():
  spec = importlib.util.spec_from_file_location("accelerator_bench", SCRIPT)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _records(overrides=None):
  base = {("train", "", 4): {"kind": "train", "step": 4, "loss": 2.0, "grad_norm": 0.5},
          ("", "v000", 2): {"step": 2, "variant": "v000", "loss": 0.1, "l0": 3.0,
                            "frozen": False, "lr": 1e-3}}
  for key, (metric, value) in (overrides or {}).items():
    base[key] = dict(base[key], **{metric: value})
  return base


def test_compare_records_measures_relative_and_count_deviations():
  acc = _module()
  same = acc.compare_records(_records(), _records())
  assert same["max_rel_dev"] == 0 and same["max_count_dev"] == 0
  assert same["compared"] == 4  # loss, grad_norm, loss, l0; step / lr / frozen are skipped
  moved = acc.compare_records(_records({("train", "", 4): ("loss", 2.01)}), _records())
  assert abs(moved["max_rel_dev"] - 0.01 / (2.0 + 1e-3)) < 1e-12
  assert "loss" in moved["worst"]
  counted = acc.compare_records(_records({("", "v000", 2): ("l0", 3.25)}), _records())
  assert counted["max_rel_dev"] == 0 and counted["max_count_dev"] == 0.25
  nan = acc.compare_records(_records({("", "v000", 2): ("loss", float("nan"))}), _records())
  assert nan["max_rel_dev"] == float("inf")
  fewer = _records()
  del fewer[("", "v000", 2)]
  assert acc.compare_records(fewer, _records())["missing"]


def test_script_runs_on_cpu_and_agrees_with_itself(tmp_path):
  out = tmp_path / "acc.json"
  env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
  proc = subprocess.run([sys.executable, SCRIPT, "--smoke", "--out", str(out)], env=env,
                        capture_output=True, text=True, timeout=600, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(out.read_text())
  assert result == json.loads(proc.stdout)
  agreement = result["agreement"]
  assert agreement["pass"], agreement
  assert "default_default" not in agreement  # smoke on CPU: it would repeat default_highest
  for run in ("default_highest",):  # on CPU: the same program, bit-identical
    for job in ("lm", "sae"):
      r = agreement[run][job]
      assert r["compared"] > 0 and not r["missing"]
      assert r["max_rel_dev"] == 0 and r["max_count_dev"] == 0, (run, job, r)
  grid = {(r["loss"], r["n"]): r for r in result["grid"]}
  assert set(grid) == {("local", 1), ("local", 2), ("e2e", 1), ("e2e", 2)}
  for r in grid.values():
    assert r["finite"] and r["variant_tokens_per_s"] > 0 and r["memory_bytes"] > 0
  # Memory grows with the variant count: the slope is positive and the same on every row.
  for loss in ("local", "e2e"):
    assert grid[(loss, 2)]["memory_bytes"] > grid[(loss, 1)]["memory_bytes"]
    assert grid[(loss, 1)]["memory_per_variant_mb"] > 0
  assert result["lm"]["train_tokens_per_s"] > 0


def test_topk_rows_time_against_relu_at_the_same_n(monkeypatch, tmp_path):
  """The grid part's TopK rows carry their speed over ReLU's at the same N and loss (timing is
  stubbed: what is checked is which groups are timed and how the ratio is formed)."""
  acc = _module()
  monkeypatch.setattr(acc.train_lm, "write_untrained", lambda config, path: path)
  speed = {("relu", 1): 10.0, ("relu", 8): 40.0, ("topk", 8): 60.0}

  def fake_time(lm_dir, shape, loss, n, steps, repeats, activation="relu"):
    del lm_dir, shape, steps, repeats
    config = acc._grid_config("lm", acc.SMOKE_SHAPE, loss, n, 1, activation)  # pylint: disable=protected-access
    block = config.sweep[0]
    assert block["product"]["seed"] == list(range(n))
    assert (block["set"].get("activation", "relu"), block["set"].get("k")) == (
        (activation, acc.TOPK_K) if activation == "topk" else ("relu", None))
    return {"loss": loss, "n": n, "activation": activation, "memory_bytes": n,
            "variant_tokens_per_s": speed[(activation, n)]}

  monkeypatch.setattr(acc, "time_group", fake_time)
  rows = acc.grid_throughput(str(tmp_path), acc.SMOKE_SHAPE, [1, 8], ["local"], 1, 1, (8,))
  assert [(r["activation"], r["n"]) for r in rows] == [("relu", 1), ("relu", 8), ("topk", 8)]
  assert rows[-1]["speedup_vs_relu"] == 1.5
  assert "speedup_vs_relu" not in rows[0]
