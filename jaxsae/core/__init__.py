"""Files every stage shares: JSON files, workdirs, checkpoints, processes, statistics."""
