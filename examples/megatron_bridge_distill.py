"""Distil a pruned student inside Megatron-Bridge's trainer, with nemo-minitron's teacher and losses.

Megatron-Bridge's own recipe (examples/distillation/llama/distill_llama32_3b-1b.py) wraps the
provider with ModelOpt; here a pre-wrap hook attaches nemo-minitron's teacher instead, and the
forward step computes the chunked vocab-parallel KD loss. Written against Megatron-Bridge at
commit 067f987 (2026-08); it needs that project (Python 3.12, CUDA) and cannot run in this
repository's CPU tests, which drive the same hook and forward step through megatron-core's
schedules (tests/test_megatron.py).

    nemo-minitron export pruned/ --megatron-out student_mg/ --tp 8     # the student, padded for TP=8
    torchrun --nproc-per-node 8 examples/megatron_bridge_distill.py student_mg/ /ckpts/teacher kd.yaml

The teacher may be a nemo-minitron, Megatron-LM, Megatron-Bridge or NeMo 2 checkpoint; kd.yaml
is a ModelOpt / Bridge ``kd_config`` (logit_layers, intermediate_layer_pairs, skip_lm_loss,
kd_loss_scale, logit_kl_temperature).
"""

import sys

from megatron.bridge.recipes.llama import llama32_1b_pretrain_config
from megatron.bridge.training.model_load_save import load_model_config
from megatron.bridge.training.pretrain import pretrain

from nemo_minitron.integrations import KDLoss, PairWeights, forward_step, teacher_hook


def main(student: str, teacher: str, kd_yaml: str) -> None:
    cfg = llama32_1b_pretrain_config()                      # data, optimizer, schedule: edit as for any recipe
    cfg.model, _ = load_model_config(f"{student}/iter_0000000")  # the student's GPTModelProvider (run_config.yaml)
    cfg.model.tensor_model_parallel_size = 8
    cfg.checkpoint.pretrained_checkpoint = student          # its weights; no optimizer state
    cfg.model.register_pre_wrap_hook(teacher_hook(teacher, loss=KDLoss.from_modelopt_yaml(kd_yaml)))
    pretrain(cfg, forward_step, callbacks=[PairWeights()])  # PairWeights: "auto" intermediate-pair weights


if __name__ == "__main__":
    main(*sys.argv[1:4])
