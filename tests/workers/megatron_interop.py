"""Worker (2 ranks): Megatron checkpoints in and out, and the teacher wrapper inside a
Megatron-style training step, at TP=2 and PP=2; writes everything the tests compare.

    megatron_interop.py SPEC.json

1. Writes, with megatron-core alone (tests/megatron_layouts.py): a Megatron-LM checkpoint
   at TP=2 (iterations 5 and 10, stacked keys, vocabulary padded to 96 x TP) and a NeMo 2
   checkpoint at TP=2 (``module.`` keys, padded to 128 x TP); a Megatron-Bridge checkpoint
   at PP=2 (per-layer keys, tied embeddings, unpadded vocabulary).
2. Reads each at the other layout with nemo_minitron (logits).
3. Exports the Bridge checkpoint with ``export --megatron-out`` at TP=2 and loads the
   result into GPTModels built as Megatron-LM (from common.pt's args) and Megatron-Bridge
   (from run_config.yaml) build them, with StrictHandling.RAISE_ALL (logits).
4. Runs one distillation forward-backward through get_forward_backward_func with
   ``teacher_hook`` and the Megatron-LM forward step at TP=2, the Bridge forward step at
   PP=2 (losses reported, gradients, "auto" pair weights after ``step_end``).
"""

import json
import sys
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import common


def _logits(model, tokens, vocab):
    from nemo_minitron.model.forward import full_logits

    return full_logits(model, tokens, vocab)


def _write_and_read(spec, out: Path, tokens, results):
    import torch
    import yaml
    from megatron_layouts import (
        bridge_model_section,
        fill_from_hf,
        gpt_from_args,
        gpt_from_provider,
        megatron_lm_args,
        nemo2_config_as_args,
        nemo2_model_yaml,
        save_bridge,
        save_megatron_lm,
        save_nemo2,
        saved_args,
        strict_load,
    )

    from nemo_minitron.checkpoint.api import export, open_model
    from nemo_minitron.runtime.distributed import init_distributed

    tok = Path(spec["tokenizer"])
    # ---- TP=2: Megatron-LM (two iterations) and NeMo 2
    init_distributed(2, 1, seed=1)
    for iteration, hf, latest in ((5, spec["mlm_hf_old"], False), (10, spec["mlm_hf"], True)):
        args = megatron_lm_args(Path(hf), tp=2, pp=1, divisible_by=96, tokenizer_model=str(tok))
        model = gpt_from_args(args)
        fill_from_hf(model, Path(hf), seed=iteration)
        save_megatron_lm(model, args, out / "megatron_lm", iteration, latest=latest)
    model_yaml = nemo2_model_yaml(Path(spec["nemo_hf"]))
    model = gpt_from_args(nemo2_config_as_args(model_yaml, tp=2, vocab=spec["vocab"]))
    fill_from_hf(model, Path(spec["nemo_hf"]), seed=3)
    save_nemo2(model, model_yaml, out / "nemo2", tok)

    # ---- PP=2: Megatron-Bridge; read the TP=2 checkpoints here
    init_distributed(1, 2, seed=1)
    section = bridge_model_section(Path(spec["bridge_hf"]), tp=1, pp=2, should_pad_vocab=False)
    model = gpt_from_provider(section)
    fill_from_hf(model, Path(spec["bridge_hf"]), seed=7)
    save_bridge(model, section, out / "bridge", 7, tok)
    for name in ("megatron_lm", "nemo2"):
        opened = open_model(str(out / name))
        results[f"{name}@pp2"] = _logits(opened.model, tokens, opened.description.vocab_size)

    # ---- TP=2: read Bridge's PP=2 checkpoint; export it; load the export as Megatron-LM / Bridge do
    init_distributed(2, 1, seed=1)
    opened = open_model(str(out / "bridge"))
    vocab = opened.description.vocab_size
    results["bridge@tp2"] = _logits(opened.model, tokens, vocab)
    export(str(out / "bridge"), megatron_out=str(out / "bridge_export"), tp=2, pp=1)
    written = out / "bridge_export" / "iter_0000000"
    args = saved_args(written)  # as Megatron-LM reads it
    results["export_args_padded_vocab"] = args.padded_vocab_size
    results["export@megatron_lm"] = _logits(strict_load(gpt_from_args(args), written), tokens, vocab)
    provider = yaml.safe_load((written / "run_config.yaml").read_text())["model"]
    results["export@bridge"] = _logits(strict_load(gpt_from_provider(provider), written), tokens, vocab)


def _integration(spec, tp: int, pp: int, form: str) -> dict:
    """One step of distillation the way Megatron-LM / Bridge train: pre-wrap hook, DDP,
    get_forward_backward_func with their forward-step signature, no adjust_tensor_shapes_fn."""
    import torch
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.num_microbatches_calculator import (
        init_num_microbatches_calculator,
        unset_num_microbatches_calculator,
    )
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.utils import get_model_config

    from nemo_minitron.checkpoint.store import load_checkpoint, load_tokenizer
    from nemo_minitron.data.dataset import check_corpus
    from nemo_minitron.integrations import KDLoss, forward_step, megatron_lm_forward_step, step_end, teacher_hook
    from nemo_minitron.model.forward import split_microbatches
    from nemo_minitron.model.params import gather, named_weights
    from nemo_minitron.runtime.distributed import init_distributed
    from test_megatron import BATCH, INTEGRATION

    init_distributed(tp, pp, seed=BATCH["seed"])
    student, _ = load_checkpoint(spec["student"])  # the trainer's student
    student.train()
    hook = teacher_hook(spec["teacher"], loss=KDLoss(**INTEGRATION), seed=BATCH["seed"])
    [module] = hook([student])
    config = get_model_config(module)
    ddp = DistributedDataParallel(config=config, ddp_config=DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=False, use_distributed_optimizer=False), module=module)
    config.finalize_model_grads_func = finalize_model_grads
    config.no_sync_func = ddp.no_sync
    num_mb = BATCH["global_batch"] // BATCH["micro_batch"]
    init_num_microbatches_calculator(0, None, BATCH["global_batch"], BATCH["micro_batch"], 1)
    samples = check_corpus(["builtin:train"]).dataset(load_tokenizer(spec["student"]), seq_len=BATCH["seq_len"],
                                                      seed=0, num_samples=16)
    # the trainer's step 0 at DP=1: the first global batch, in order (distill/loader.py)
    batches = split_microbatches(samples.take(BATCH["global_batch"]), BATCH["micro_batch"])
    state = SimpleNamespace(cfg=None, train_state=SimpleNamespace(step=0))  # what Bridge would inject
    step = partial(forward_step, state) if form == "bridge" else megatron_lm_forward_step
    ddp.zero_grad_buffer()
    reported = get_forward_backward_func()(forward_step_func=step, data_iterator=iter(batches), model=[ddp],
                                           num_microbatches=num_mb, seq_length=BATCH["seq_len"],
                                           micro_batch_size=BATCH["micro_batch"], forward_only=False)
    group = ps.get_tensor_model_parallel_group()
    grads = {name: gather(name, p.main_grad.detach().float(), group=group, gated=student.config.gated_linear_unit).cpu()
             for name, p in named_weights(student)}
    for key, proj in module.projections.items():
        grads[f"kd_projection.{key}"] = proj.weight.main_grad.detach().float().cpu()
    step_end([ddp])
    unset_num_microbatches_calculator()
    return {"reported": [{k: v.cpu() for k, v in r.items()} for r in reported], "grads": grads,
            "pair_weights": module.pair_weights.tolist(), "last_stage": ps.is_pipeline_last_stage()}


def main() -> None:
    import torch
    import torch.distributed as dist

    spec = json.loads(Path(sys.argv[1]).read_text())
    out = Path(spec["out"])
    tokens = torch.load(spec["tokens"])
    results: dict = {}
    _write_and_read(spec, out, tokens, results)
    rank = dist.get_rank()
    results["integration"] = {"tp2": _integration(spec, 2, 1, "megatron-lm"), "pp2": _integration(spec, 1, 2, "bridge")}
    from test_megatron import _trainer_step

    logs, _, _ = _trainer_step(spec["teacher"], spec["student"], 1, 2)
    if rank == 0:
        results["trainer@pp2"] = logs
    torch.save(results, out / f"results-rank{rank}.pt")


if __name__ == "__main__":
    common.run(main)
