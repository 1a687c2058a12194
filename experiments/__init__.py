"""Experiment launcher: absl entry point and ml_collections configs (not installed)."""
