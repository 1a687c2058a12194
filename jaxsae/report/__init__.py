"""The report: tables and plots assembled from evaluation and analysis results."""
