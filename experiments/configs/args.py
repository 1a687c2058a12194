"""Parsing of the `:arg` suffix of `--config=experiments/configs/<file>.py:<arg>`.

The suffix is a comma-separated list of `key=value` settings and bare switches, e.g.
`language=english,smoke`. Unknown keys are an error naming the known ones.
"""

from __future__ import annotations


def parse(arg: str | None, *, switches: tuple[str, ...], keys: dict[str, object]) -> dict:
  """Returns {key: value} with defaults from `keys` and {switch: bool} for `switches`.

  Values are converted to the type of the default (bool, int, float, str).
  """
  out: dict[str, object] = dict(keys)
  out.update({s: False for s in switches})
  for item in filter(None, (arg or "").split(",")):
    name, sep, value = item.partition("=")
    name = name.strip()
    if not sep:
      if name not in switches:
        raise ValueError(f"unknown config switch '{name}'; known switches: {list(switches)}, "
                         f"settings: {sorted(keys)}")
      out[name] = True
      continue
    if name not in keys:
      raise ValueError(f"unknown config setting '{name}'; known settings: {sorted(keys)}, "
                       f"switches: {list(switches)}")
    default = keys[name]
    if isinstance(default, bool):
      out[name] = value.strip().lower() in ("1", "true", "yes")
    elif isinstance(default, (int, float)):
      out[name] = type(default)(value)
    else:
      out[name] = value.strip()
  return out
