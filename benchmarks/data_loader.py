#!/usr/bin/env python3
"""Distillation tokens/s reading batches from a Megatron data set (streaming) against the
old in-memory path, on the same run.

One trainer (random Llama-style teacher and student, vocabulary 32,000) distils in blocks
of ``--block`` steps, alternating its training data between
- streaming: a TokenDataset over a synthetic Megatron data set (megatron-core's
  GPTDataset, memory-mapped), read by the DataLoader with ``--workers`` processes, and
- in memory: the same samples stacked into one tensor beforehand, indexed in the training
  process (what every stage did before: ``load_samples``),
so both see the same model, optimizer state and machine load. Each block's tokens/s
counts its wall time, DataLoader start included. Reported: the ratio streaming / in
memory over all blocks (target >= 0.98) and per round.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from pathlib import Path

from common import HERE, parser, write_results

VOCAB = 32000


def _model(path: Path, hidden: int, ffn: int, layers: int) -> Path:
    import torch
    import transformers

    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=ffn,
                                      num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=4,
                                      max_position_embeddings=4096, tie_word_embeddings=False, bos_token_id=1,
                                      eos_token_id=2)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(str(path), safe_serialization=True)
    sys.path.insert(0, str(HERE.parent / "tests"))
    from tiny_models import byte_tokenizer

    byte_tokenizer().save_pretrained(str(path))
    return path


def _dataset(prefix: Path, tokens: int) -> str:
    import numpy as np
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    rng = np.random.default_rng(0)
    builder = IndexedDatasetBuilder(str(prefix) + ".bin", dtype=np.uint16)
    written = 0
    while written < tokens:
        length = int(rng.integers(200, 3800))
        doc = rng.integers(3, VOCAB, length, dtype=np.uint16)
        doc[-1] = 2
        builder.add_document(doc, [length])
        written += length
    builder.finalize(str(prefix) + ".idx")
    return str(prefix)


def main() -> int:
    p = parser(__doc__.split("\n\n")[0])
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--global-batch", type=int, default=8)
    p.add_argument("--micro-batch", type=int, default=2)
    p.add_argument("--block", type=int, default=6, help="steps per block")
    p.add_argument("--rounds", type=int, default=4, help="pairs of blocks (streaming, in memory)")
    p.add_argument("--workers", type=int, default=None,
                   help="DataLoader processes of the streaming path (default: distill's for this device, "
                        "none on a CPU)")
    args = p.parse_args()

    import torch

    from nemo_minitron.distill.config import resolved_data_workers

    # what a user's distill run reads with here: on a 2-core CPU worker processes compete
    # with training (docs/benchmarks.md, issue 25), so the CPU default is none
    args.workers = resolved_data_workers(args.workers, gpu=torch.cuda.is_available())

    from nemo_minitron.checkpoint.api import convert
    from nemo_minitron.checkpoint.store import load_checkpoint, read_info
    from nemo_minitron.data.dataset import check_corpus
    from nemo_minitron.distill.config import DistillConfig
    from nemo_minitron.distill.train import Trainer
    from nemo_minitron.runtime.distributed import init_distributed

    work = Path(tempfile.mkdtemp(prefix="loader-bench-"))
    try:
        init_distributed(1, 1, 1234)
        teacher = convert(str(_model(work / "hf-teacher", 256, 768, 4)), str(work / "teacher"))
        student = convert(str(_model(work / "hf-student", 192, 512, 3)), str(work / "student"))
        total_steps = 2 * args.rounds * args.block
        prefix = _dataset(work / "corpus_text_document", 20_000_000)
        corpus = check_corpus([prefix], vocab_size=VOCAB, cache_dir=str(work / "cache"))
        streaming = corpus.dataset(None, seq_len=args.seq_len, seed=1234,
                                   num_samples=total_steps * args.global_batch)
        in_memory = streaming.take(total_steps * args.global_batch)  # the same samples, loaded beforehand

        cfg = DistillConfig(steps=total_steps, global_batch=args.global_batch, micro_batch=args.micro_batch,
                            seq_len=args.seq_len, lr=1e-4, warmup_steps=0, save_every=0, log_every=10_000,
                            data_workers=args.workers)
        s_desc, t_desc = read_info(student).description, read_info(teacher).description
        trainer = Trainer(load_checkpoint(student, dtype=torch.bfloat16)[0],
                          load_checkpoint(teacher, dtype=torch.bfloat16)[0], streaming, None, work / "out", cfg,
                          seed=1234, student_desc=s_desc, teacher_desc=t_desc, progress=False)
        trainer.prepare()
        rates: dict[str, list[float]] = {"streaming": [], "in_memory": []}
        for _ in range(args.rounds):
            for name, samples, workers in (("streaming", streaming, args.workers), ("in_memory", in_memory, 0)):
                trainer.train_samples, trainer.cfg.data_workers = samples, workers
                trainer.cfg.steps = trainer.step + args.block
                start = time.time()
                result = trainer.train()
                rates[name].append(args.block * args.global_batch * args.seq_len / (time.time() - start))
                assert result["trained_steps"] == args.block
        trainer.close()
        per_round = [s / m for s, m in zip(rates["streaming"], rates["in_memory"])]
        results = {
            "tokens_per_step": args.global_batch * args.seq_len, "steps_per_block": args.block,
            "data_workers": args.workers, "teacher": t_desc.summary(), "student": s_desc.summary(),
            "tokens_per_second_streaming": round(sum(rates["streaming"]) / args.rounds, 1),
            "tokens_per_second_in_memory": round(sum(rates["in_memory"]) / args.rounds, 1),
            "ratio_streaming_over_in_memory": round(sum(rates["streaming"]) / sum(rates["in_memory"]), 4),
            "ratio_per_round": [round(r, 4) for r in per_round],
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)
    write_results(args, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
