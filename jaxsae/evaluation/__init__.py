"""Evaluation of a trained grid: held-out passes, spliced generation, the eval job."""
