"""What every stage shares: errors, run directories, provenance, checkpoints, JSON and config files,
registries, command-line declarations, devices and torchrun helpers. Imports no other package."""
