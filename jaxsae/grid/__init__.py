"""The SAE grid: architectures, losses, variants and groups, the compiled step, its setup, the
training job and the trained grid read back."""
