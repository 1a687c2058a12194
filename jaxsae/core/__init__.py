"""Files every stage shares: JSON files, workdirs, checkpoints, processes, statistics, the
variant-axis loop."""
