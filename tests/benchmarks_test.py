"""Tests for benchmarks/peer.py: the side-by-side ratios, the target checks, finding the peer
environment and running a peer script (a stand-in script here: the suite never needs torch)."""

import os
import stat
import sys
import textwrap

import pytest

from benchmarks import peer


def test_speedups_against_hand_computed_ratios():
  # Peer tokens/s per round: median of all five is 40k, fastest 60k, slowest 30k; round medians
  # 35k (30k, 40k) and 50k (40k, 50k, 60k).
  cell = peer.speedups(120e3, [[30e3, 40e3], [40e3, 60e3, 50e3]], [105e3, 150e3])
  assert cell["peer_tokens_per_s"] == 40e3
  assert cell["speedup"] == pytest.approx(3.0)
  assert cell["range"] == pytest.approx([2.0, 4.0])
  assert cell["rounds"] == pytest.approx([3.0, 3.0])
  assert "rounds" not in peer.speedups(120e3, [[30e3, 40e3]])


@pytest.mark.parametrize("seed", range(5))
def test_speedup_lies_in_its_range(seed):
  import random  # pylint: disable=import-outside-toplevel
  rng = random.Random(seed)
  rounds = [[rng.uniform(1e3, 1e5) for _ in range(rng.randint(1, 3))] for _ in range(3)]
  cell = peer.speedups(rng.uniform(1e3, 1e6), rounds)
  lo, hi = cell["range"]
  assert lo <= cell["speedup"] <= hi
  # A faster peer everywhere lowers every ratio in proportion.
  doubled = peer.speedups(cell["speedup"] * cell["peer_tokens_per_s"],
                          [[2 * x for x in r] for r in rounds])
  assert doubled["speedup"] == pytest.approx(cell["speedup"] / 2)
  assert doubled["range"] == pytest.approx([lo / 2, hi / 2])


@pytest.mark.parametrize("jax_rate, rounds, jax_rounds", [
    (1e5, [], None), (1e5, [[]], None), (1e5, [[1e4, 0.0]], None), (0.0, [[1e4]], None),
    (1e5, [[1e4], [2e4]], [1e5]),
])
def test_speedups_rejects_bad_input(jax_rate, rounds, jax_rounds):
  with pytest.raises(ValueError):
    peer.speedups(jax_rate, rounds, jax_rounds)


def test_check_targets_boundaries_and_missing_cells():
  targets = (peer.Target("local", 32, 3.0), peer.Target("e2e", 32, 2.5),
             peer.Target("e2e", 1, 1.5))
  cells = {("local", 32): {"speedup": 3.0, "range": [2.9, 3.2]},   # exactly on target
           ("e2e", 32): {"speedup": 2.4, "range": [2.2, 2.6]},
           ("e2e", 8): {"speedup": 9.0, "range": [9.0, 9.0]}}    # no target at N = 8
  out = peer.check_targets(cells, targets)
  assert set(out) == {t.name for t in targets}
  local = out[targets[0].name]
  assert local["met"] and not local["met_over_range"] and local["target"] == 3.0
  assert not out[targets[1].name]["met"]
  assert out[targets[2].name] == {"measured": False}


def test_target_names_are_distinct():
  assert len({t.name for t in peer.TARGETS}) == len(peer.TARGETS)


def test_peer_python_needs_an_executable_interpreter(tmp_path):
  assert peer.peer_python(str(tmp_path / "absent")) is None
  bin_dir = tmp_path / "venv" / "bin"
  bin_dir.mkdir(parents=True)
  python = bin_dir / "python"
  python.write_text("#!/bin/sh\n")
  assert peer.peer_python(str(tmp_path / "venv")) is None  # not executable
  python.chmod(python.stat().st_mode | stat.S_IXUSR)
  assert peer.peer_python(str(tmp_path / "venv")) == str(python)
  assert peer.SETUP_COMMAND in peer.missing_message(str(tmp_path / "venv"))


def _script(tmp_path, body: str) -> str:
  """A stand-in peer script that parses the real script's flags and runs `body`."""
  path = tmp_path / "fake_peer.py"
  path.write_text(textwrap.dedent("""
      import argparse, json, sys
      p = argparse.ArgumentParser()
      for flag in ("--losses", "--steps", "--repeats", "--warmup", "--threads"):
        p.add_argument(flag)
      p.add_argument("--check", action="store_true")
      a = p.parse_args()
      losses = a.losses.split(",")
  """) + textwrap.dedent(body))
  return str(path)


def test_run_passes_flags_and_keys_results_by_loss(tmp_path):
  script = _script(tmp_path, """
      print("a log line first")
      print(json.dumps({"argv": sys.argv[1:], "results": [
          {"loss": l, "tokens_per_s": 1000.0 * (i + 1), "step_s": 4.096 / (i + 1)}
          for i, l in enumerate(losses)]}))
  """)
  out = peer.run(sys.executable, ["e2e", "local"], steps=4, repeats=2, warmup=1, threads=3,
                 script=script)
  assert out["argv"] == ["--losses", "e2e,local", "--steps", "4", "--repeats", "2",
                         "--warmup", "1", "--threads", "3"]
  assert out["by_loss"]["e2e"]["tokens_per_s"] == 1000.0
  assert out["by_loss"]["local"]["tokens_per_s"] == 2000.0
  check = peer.run(sys.executable, ["local"], steps=1, repeats=1, warmup=0, threads=1,
                   script=script, check=True)
  assert check["argv"][-1] == "--check"


@pytest.mark.parametrize("body, needle", [
    ("sys.stderr.write('boom: no module named torch'); sys.exit(3)", "status 3"),
    ("print('not json')", "no JSON"),
    ("print(json.dumps({'results': [{'loss': 'e2e', 'tokens_per_s': 1.0}]}))", "not for"),
    ("print(json.dumps({'results': [{'loss': l, 'tokens_per_s': 0.0} for l in losses]}))",
     "positive"),
])
def test_run_explains_a_failed_peer(tmp_path, body, needle):
  script = _script(tmp_path, body)
  with pytest.raises(RuntimeError, match=needle) as e:
    peer.run(sys.executable, ["local"], steps=1, repeats=1, warmup=0, threads=1, script=script)
  assert peer.SETUP_COMMAND in str(e.value)
  if "status" in needle:
    assert "boom" in str(e.value)


def test_run_reports_a_timeout(tmp_path):
  script = _script(tmp_path, "import time; time.sleep(5)")
  with pytest.raises(RuntimeError, match="ran past"):
    peer.run(sys.executable, ["local"], steps=1, repeats=1, warmup=0, threads=1,
             script=script, timeout_s=0.5)


def test_peer_files_are_where_the_setup_expects():
  assert os.path.isfile(peer.PEER_SCRIPT)
  assert os.path.isfile(os.path.join(peer.HERE, "peer_setup.sh"))
  requirements = open(os.path.join(peer.HERE, "peer_requirements.txt")).read().splitlines()
  pins = [x for x in requirements if x and not x.startswith("#")]
  assert pins and all("==" in x for x in pins), [x for x in pins if "==" not in x]
  assert "torch==2.13.0" in pins
