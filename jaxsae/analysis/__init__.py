"""Analysis of a trained grid: feature recovery, interventions, causality, comparisons."""
