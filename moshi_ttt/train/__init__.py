"""Training: typed config, the in-order chunk-stream loop, checkpoints and resume, DDP/FSDP, metrics, the command."""
