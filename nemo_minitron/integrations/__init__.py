"""Use the project's teacher and losses inside other trainers (Megatron-LM, Megatron-Bridge).

See ``nemo_minitron.integrations.megatron`` and ``examples/``."""

from nemo_minitron.integrations.megatron import (
    KDLoss,
    PairWeights,
    forward_step,
    megatron_lm_forward_step,
    step_end,
    teacher_hook,
)

__all__ = ["KDLoss", "PairWeights", "forward_step", "megatron_lm_forward_step", "step_end", "teacher_hook"]
