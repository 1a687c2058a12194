"""Configs, one `get_config(arg=None)` per file; see each file's docstring for its command."""
