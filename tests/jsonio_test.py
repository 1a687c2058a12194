"""Tests for jaxsae.core.jsonio: each file's layout as json.dumps writes it, atomic replacement,
and JSON-lines appends / rewrites / reads (torn last line vs a corrupt file)."""

import json
import os

import pytest

from jaxsae.core import jsonio

VALUE = {"b": [1, 2.5, {"z": None, "a": "nan"}], "a": True, "c": "\u00e9"}


@pytest.mark.parametrize("kwargs", [{}, {"indent": 2}, {"indent": None}, {"sort_keys": True}])
def test_write_keeps_the_layout_of_json_dumps(tmp_path, kwargs):
  path = str(tmp_path / "f.json")
  jsonio.write(path, VALUE, **kwargs)
  want = json.dumps(VALUE, **{"indent": 1, **kwargs})
  assert open(path).read() == want
  assert jsonio.read(path) == VALUE
  assert os.listdir(tmp_path) == ["f.json"]  # no temporary file left behind


def test_a_value_that_cannot_be_written_leaves_the_old_file(tmp_path):
  path = str(tmp_path / "f.json")
  jsonio.write(path, VALUE)
  with pytest.raises(ValueError):
    jsonio.write(path, {"x": float("nan")}, allow_nan=False)
  assert jsonio.read(path) == VALUE
  assert os.listdir(tmp_path) == ["f.json"]


def test_lines_append_rewrite_and_read(tmp_path):
  path = str(tmp_path / "m.jsonl")
  records = [{"step": s, "loss": s / 3} for s in range(4)]
  assert jsonio.read_lines(path) == ([], False)
  jsonio.append_lines(path, records[:2])
  jsonio.append_lines(path, records[2:])
  assert open(path).read() == "".join(json.dumps(r) + "\n" for r in records)
  assert jsonio.read_lines(path) == (records, False)
  with open(path, "a") as f:
    f.write('{"step": 4, "lo')  # a kill mid-append
  assert jsonio.read_lines(path) == (records, True)
  jsonio.write_lines(path, records[:3])
  assert jsonio.read_lines(path) == (records[:3], False)
  with open(path, "a") as f:
    f.write("not json\n" + json.dumps(records[3]) + "\n")
  with pytest.raises(ValueError, match=r"m.jsonl line 4 is not JSON"):
    jsonio.read_lines(path)
