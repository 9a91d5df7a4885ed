"""Distil a pruned student with Megatron-LM's ``pretrain``, nemo-minitron's teacher and losses.

Megatron-LM's pretrain_gpt.py, with two changes: a pre-wrap hook on the model config attaches
the teacher, and nemo-minitron's forward step computes the loss. Written against Megatron-LM
at commit d98e8a6 (2026-08, ``pretrain(config_container, ...)`` and ``GPTModelConfig.pre_wrap_hooks``);
run it from a Megatron-LM checkout (it imports pretrain_gpt for the data set and batches) with
pretrain_gpt.py's usual flags plus the two below. It cannot run in this repository's CPU tests,
which drive the same hook and forward step through megatron-core's schedules.

    nemo-minitron export pruned/ --megatron-out student_mg/ --tp 8
    torchrun --nproc-per-node 8 examples/megatron_lm_pretrain_distill.py --use-checkpoint-args \\
        --load student_mg/ --finetune --tensor-model-parallel-size 8 ... \\
        --kd-teacher /ckpts/teacher --kd-temperature 1.0

Megatron-LM has no callback after the optimizer step, so intermediate pairs take a fixed weight here.
"""

from functools import partial

import pretrain_gpt  # Megatron-LM's: its data set provider, get_batch and BATCH_KEYS
from megatron.core.enums import ModelType
from megatron.training import pretrain
from megatron.training.argument_utils import gpt_config_from_args, pretrain_cfg_container_from_args
from megatron.training.arguments import parse_and_validate_args

from nemo_minitron.integrations import KDLoss, megatron_lm_forward_step, teacher_hook


def kd_args(parser):
    group = parser.add_argument_group("nemo-minitron distillation")
    group.add_argument("--kd-teacher", required=True, help="teacher checkpoint (nemo-minitron, Megatron-LM, Bridge, NeMo 2)")
    group.add_argument("--kd-temperature", type=float, default=1.0)
    group.add_argument("--kd-pairs", default="", help="intermediate pairs, e.g. embedding:embedding,15:31")
    return parser


def batch(data_iterator):
    return dict(zip(pretrain_gpt.BATCH_KEYS, pretrain_gpt.get_batch(data_iterator)))


if __name__ == "__main__":
    args = parse_and_validate_args(extra_args_provider=kd_args, args_defaults={"tokenizer_type": "HuggingFaceTokenizer"})
    model_cfg = gpt_config_from_args(args)
    loss = KDLoss(temperature=args.kd_temperature, pairs=args.kd_pairs, pair_weight=1.0)
    model_cfg.pre_wrap_hooks.append(teacher_hook(args.kd_teacher, loss=loss))
    pretrain_gpt.train_valid_test_datasets_provider.is_distributed = True  # as pretrain_gpt.py's main does
    pretrain(pretrain_cfg_container_from_args(args, model_cfg), pretrain_gpt.train_valid_test_datasets_provider,
             ModelType.encoder_or_decoder, partial(megatron_lm_forward_step, get_batch=batch))
