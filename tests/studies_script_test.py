"""experiments/studies.sh with a stand-in Python: how many studies run at once, what it collects."""

import os
import pathlib
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "experiments" / "studies.sh"
# Stands in for `python -m experiments.main --config=... --workdir=W`: logs its start and end
# (seconds since the epoch) and writes a report.json and a checkpoint into W.
FAKE = """#!/bin/bash
for a in "$@"; do
  case $a in --workdir=*) wd=${a#--workdir=};; --config=*) cfg=${a#--config=};; esac
done
echo "start $(basename "$wd") $(date +%s.%N) $cfg" >> "$EVENTS"
sleep 1.5
mkdir -p "$wd/sae/checkpoints"
echo '{}' > "$wd/report.json"; echo x > "$wd/sae/checkpoints/big.json"
echo "end $(basename "$wd") $(date +%s.%N)" >> "$EVENTS"
"""
STUDIES = ["frontier:dyck2:seed=42", "menon:expr_prefix", "causal:english"]


def _run(tmp_path, max_parallel):
  fake = tmp_path / "fake_python"
  fake.write_text(FAKE)
  fake.chmod(0o755)
  events = tmp_path / "events.log"
  env = dict(os.environ, PYTHON=str(fake), EVENTS=str(events), STUDIES_POLL="0.1")
  if max_parallel is not None:
    env["MAX_PARALLEL"] = str(max_parallel)
  proc = subprocess.run(["bash", str(SCRIPT), str(tmp_path / "root"), str(tmp_path / "res"),
                         "smoke", *STUDIES], cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=120, check=False)
  return proc, events


def _spans(events):
  start, end, config = {}, {}, {}
  for line in events.read_text().splitlines():
    kind, name, t, *rest = line.split()
    (start if kind == "start" else end)[name] = float(t)
    if rest:
      config[name] = rest[0]
  return {n: (start[n], end[n]) for n in start}, config


def _most_at_once(spans):
  moments = sorted([(s, 1) for s, _ in spans.values()] + [(e, -1) for _, e in spans.values()])
  running = most = 0
  for _, step in moments:  # an end sorts before a start at the same instant
    running += step
    most = max(most, running)
  return most


@pytest.mark.parametrize("max_parallel, expected", [(1, 1), (2, 2), (None, 3)])
def test_at_most_max_parallel_studies_run_at_once_and_all_finish(tmp_path, max_parallel,
                                                                  expected):
  proc, events = _run(tmp_path, max_parallel)
  assert proc.returncode == 0, proc.stderr
  spans, config = _spans(events)
  names = ["frontier_dyck2", "menon_expr_prefix", "causal_english"]
  assert sorted(spans) == sorted(names)
  assert _most_at_once(spans) == expected
  if max_parallel == 1:  # one after another, in the order given
    assert sorted(names, key=lambda n: spans[n][0]) == names
  assert config["frontier_dyck2"] == ("experiments/configs/study.py:"
                                      "study=frontier,language=dyck2,smoke,seed=42")
  for n in names:
    assert f"{n}: report written" in proc.stdout
    assert (tmp_path / "res" / n / "report.json").exists()  # collected ...
    assert not (tmp_path / "res" / n / "sae" / "checkpoints").exists()  # ... without checkpoints


def test_a_bad_max_parallel_is_refused_before_anything_starts(tmp_path):
  proc, events = _run(tmp_path, 0)
  assert proc.returncode == 2 and "MAX_PARALLEL=0" in proc.stderr
  assert not events.exists()
