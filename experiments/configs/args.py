"""Parsing of the `:arg` suffix of `--config=experiments/configs/<file>.py:<arg>`.

The suffix is a comma-separated list of `key=value` settings and bare switches, e.g.
`language=english,smoke`. Unknown keys are an error naming the known ones; a value that does
not parse is an error naming the setting and the accepted form (`steps=abc`: "steps takes an
int"). A setting declared with a type instead of a default (`{"steps": int}`) is optional: it
is None unless given, so a config can tell "not given" (use the config's default) from any
value, and 0 is never silently read as "the default".
"""

from __future__ import annotations

import math

_TYPE_NAMES = {bool: "a bool (true / false)", int: "an int", float: "a number", str: "a string"}
_EXAMPLES = {bool: "true", int: "1000", float: "0.001", str: "name"}
_TRUE, _FALSE = ("1", "true", "yes"), ("0", "false", "no")


def _convert(name: str, value: str, kind: type):
  text = value.strip()
  form = f"write {name}=<{kind.__name__}>, e.g. {name}={_EXAMPLES[kind]}"
  bad = ValueError(f"config setting {name}={value!r} is not {_TYPE_NAMES[kind]}; {form}")
  if kind is bool:
    if text.lower() in _TRUE:
      return True
    if text.lower() in _FALSE:
      return False
    raise bad
  if kind is int:
    try:
      return int(text)
    except ValueError:
      raise bad from None
  if kind is float:
    try:
      out = float(text)
    except ValueError:
      raise bad from None
    if not math.isfinite(out):
      raise ValueError(f"config setting {name}={value!r} must be a finite number; {form}")
    return out
  return text


def parse(arg: str | None, *, switches: tuple[str, ...], keys: dict[str, object],
          minimum: dict[str, int | float] | None = None) -> dict:
  """Returns {key: value} with defaults from `keys` and {switch: bool} for `switches`.

  Args:
    arg: the text after the colon (None or '' for none).
    switches: names that may appear bare (then True; False when absent).
    keys: setting name -> default (bool, int, float or str: values are converted to its
      type), or a type (bool, int, float, str): an optional setting, None unless given.
    minimum: setting name -> the smallest value accepted (when given).

  Raises:
    ValueError: an unknown name, a setting given twice, a value that does not convert
      (naming the setting and the accepted form), or one below its minimum.
  """
  out: dict[str, object] = {k: (None if isinstance(v, type) else v) for k, v in keys.items()}
  out.update({s: False for s in switches})
  seen: set[str] = set()
  for item in filter(None, (arg or "").split(",")):
    name, sep, value = item.partition("=")
    name = name.strip()
    if name in seen:
      raise ValueError(f"config setting '{name}' is given twice in {arg!r}; keep one")
    seen.add(name)
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
    kind = default if isinstance(default, type) else type(default)
    out[name] = _convert(name, value, kind)
  for name, low in (minimum or {}).items():
    if out.get(name) is not None and out[name] < low:
      raise ValueError(f"config setting {name}={out[name]} must be >= {low}"
                       + ("; omit it for the config's default" if isinstance(keys[name], type)
                          else ""))
  return out
