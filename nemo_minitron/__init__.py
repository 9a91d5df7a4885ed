"""nemo-minitron: Minitron pruning and distillation for megatron-core models."""

__version__ = "0.1.0"
