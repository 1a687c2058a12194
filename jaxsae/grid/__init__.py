"""The SAE grid: architectures, losses, variants and groups, the compiled step, the training job."""
