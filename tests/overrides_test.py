"""`--config.<field>=` overrides: unknown fields and wrong types are named before absl parses."""

import os
import subprocess
import sys

import pytest

from experiments import overrides

ROOT = os.path.join(os.path.dirname(__file__), "..")
SAE = "experiments/configs/sae_e2e.py:smoke"


def _argv(*flags):
  return ["main.py", f"--config={os.path.join(ROOT, SAE)}", "--workdir=/tmp/x", *flags]


@pytest.mark.parametrize("flag, fragments", [
    ("--config.lr=0.1", ["unknown field config.lr", "lr is set per SAE variant in config.sweep",
                         "did you mean lr_floor", "its fields are: adam_b1"]),
    ("--config.stepz=3", ["unknown field config.stepz", "did you mean steps"]),
    ("--config.optim.b1=0.5", ["no field 'optim'"]),
    ("--config.steps=abc", ["config.steps takes an int (it is 4)", "--config.steps=<int>"]),
    ("--config.adam_b1=x", ["config.adam_b1 takes a number"]),
    ("--config.distributed=maybe", ["takes a bool: true or false"]),
])
def test_bad_overrides_name_the_field_and_the_fix(flag, fragments):
  message = overrides.problem(_argv(flag))
  assert message is not None
  for fragment in fragments:
    assert fragment in message, message


@pytest.mark.parametrize("flags", [(), ("--config.steps=6",), ("--config.steps", "6"),
                                   ("--noconfig.distributed",), ("--config.adam_eps=1e-6",),
                                   ("--config.language=english",)])
def test_good_overrides_pass(flags):
  assert overrides.problem(_argv(*flags)) is None


def test_nested_fields_of_the_pipeline_config():
  argv = ["main.py", f"--config={os.path.join(ROOT, 'experiments/configs/pipeline.py')}:smoke"]
  assert overrides.problem(argv + ["--config.lm.optim.b1=0.8"]) is None
  message = overrides.problem(argv + ["--config.sae.lr=0.1"])
  assert "unknown field config.sae.lr" in message and "config.sweep" in message


def test_main_reports_an_unknown_field_without_a_traceback():
  out = subprocess.run(
      [sys.executable, "-m", "experiments.main", f"--config={SAE}", "--config.lr=0.1",
       "--workdir=/tmp/unused"], cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert out.returncode == 1
  assert "FATAL Flags parsing error: --config.lr: unknown field config.lr" in out.stderr
  assert "Traceback" not in out.stderr and "AttributeError" not in out.stderr
