"""Checks of `--config.<field>=<value>` overrides, before absl parses the flags.

ml_collections reports an override of a field the config does not have as
`AttributeError: "'lr'"`, and a value of the wrong type as `invalid literal for int()`.
`problem(argv)` loads the config the way `--config=<file>.py[:<arg>]` does (`get_config(arg)`)
and names the unknown field with the closest field names and the config's fields, or the
field's type and the accepted form of its value. Nothing here runs without overrides.
"""

from __future__ import annotations

import difflib
import importlib.util
from typing import Any, Sequence

import ml_collections

_TRUE, _FALSE = ("1", "true", "yes", "t", "y"), ("0", "false", "no", "f", "n")


def _config_spec(argv: Sequence[str]) -> str | None:
  spec = None
  for i, a in enumerate(argv):
    if a.startswith("--config="):
      spec = a[len("--config="):]
    elif a == "--config" and i + 1 < len(argv):
      spec = argv[i + 1]
  return spec


def _overrides(argv: Sequence[str]) -> list[tuple[str, str | None]]:
  """(dotted field, value or None for a bare boolean switch) of each `--config.` flag."""
  out = []
  for i, a in enumerate(argv):
    for prefix, bare in (("--config.", "true"), ("--noconfig.", "false")):
      if a.startswith(prefix):
        name, sep, value = a[len(prefix):].partition("=")
        if not sep:
          nxt = argv[i + 1] if i + 1 < len(argv) else None
          value = nxt if prefix == "--config." and nxt and not nxt.startswith("-") else None
          value = bare if value is None else value
        out.append((name, value))
  return out


def load_config(spec: str) -> Any:
  """`get_config(arg)` of `<file>.py[:<arg>]`, as ml_collections' config flag loads it."""
  path, _, arg = spec.partition(":")
  module_spec = importlib.util.spec_from_file_location("_config_being_checked", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def _fields(node: Any, prefix: str = "") -> list[str]:
  out = []
  for k, v in node.items():
    name = f"{prefix}{k}"
    if isinstance(v, ml_collections.ConfigDict):
      out.extend(_fields(v, name + "."))
    else:
      out.append(name)
  return out


def _sweep_fields() -> set[str]:
  from jaxsae.grid import sae_groups  # pylint: disable=g-import-not-at-top
  return {f.name for f in sae_groups.registry()}


def _converts(value: str, kind: type) -> bool:
  if kind is bool:
    return value.strip().lower() in _TRUE + _FALSE
  try:
    kind(value)
  except ValueError:
    return False
  return True


def check(config: Any, overrides: Sequence[tuple[str, str | None]], where: str) -> str | None:
  """The first problem among `overrides` of `config` (from `where`), or None.

  Args:
    config: the ConfigDict the overrides apply to.
    overrides: (dotted field, value) pairs.
    where: the config's `--config` value, named in the message.

  Returns:
    A message naming the field and the fix, or None when every override names a field and
    its value converts to the field's type.
  """
  fields = _fields(config)
  for path, value in overrides:
    node = config
    parts = path.split(".")
    for i, part in enumerate(parts):
      if not isinstance(node, ml_collections.ConfigDict) or part not in node:
        close = difflib.get_close_matches(path, fields, n=5, cutoff=0.6)
        close += [f for f in fields
                  if f.split(".")[-1].startswith(parts[-1]) and f not in close][:5]
        hint = f"did you mean {', '.join(close)}? " if close else ""
        if isinstance(node, ml_collections.ConfigDict) and "sweep" in node and (
            parts[-1] in _sweep_fields()):
          hint = (f"{parts[-1]} is set per SAE variant in config.sweep (e.g. "
                  f"{{'set': {{'{parts[-1]}': ...}}}} in the config file), not as a config "
                  f"field; {hint}")
        return (f"--config.{path}: unknown field config.{path}: the config {where} has no "
                f"field {'.'.join(parts[:i + 1])!r}; {hint}its fields are: {', '.join(fields)}")
      node = node[part]
    if value is None or isinstance(node, ml_collections.ConfigDict):
      continue
    for kind, form in ((bool, "a bool: true or false"), (int, "an int"), (float, "a number")):
      if isinstance(node, kind):
        if not _converts(value, kind):
          return (f"--config.{path}={value}: config.{path} takes {form} (it is {node!r}); "
                  f"write --config.{path}=<{kind.__name__}>")
        break
  return None


def problem(argv: Sequence[str]) -> str | None:
  """The first problem with argv's `--config.` overrides, or None (also when there are none,
  or when the config itself does not load: absl reports that)."""
  overrides = _overrides(argv)
  spec = _config_spec(argv)
  if not overrides or spec is None:
    return None
  try:
    config = load_config(spec)
  except Exception:  # pylint: disable=broad-except
    return None
  return check(config, overrides, spec)
