#!/usr/bin/env python3
"""A small trained hybrid Mamba-Transformer (Nemotron-H-like) for the hybrid benchmarks.

No trained hybrid small enough for a CPU ships anywhere we can reach, and a random one
cannot rank anything, so this script makes one: a byte-level BPE tokenizer (4,096 ids)
trained on ``builtin:train``, then transformers' ``NemotronHForCausalLM`` (hidden 384,
pattern ``M-M-M*-M-M-M*-``: 6 Mamba-2, 6 squared-ReLU MLP, 2 attention layers; 24 Mamba
heads of 32 channels in 4 groups, state 32; ffn 1536; 6 attention heads in 2 groups;
separate output layer: transformers 5's NemotronHForCausalLM never ties it, whatever
``tie_word_embeddings`` says; 17.0M parameters) trained from scratch with cross-entropy on
``builtin:train`` (sequences of 256 tokens, 8 per step, AdamW 2e-3 with warm-up and
cosine decay, bf16 autocast) until a CPU-time (or wall-time) budget runs out. The result (Hugging Face
directory with its tokenizer) is kept in benchmarks/.cache/hybrid-trained and converted
to a project checkpoint next to it; its held-out losses are in ``train.json``.

    python benchmarks/hybrid_model.py [--cpu-minutes 35] [--quick]
"""

from __future__ import annotations

import json
import math
import random
import time
from pathlib import Path

import torch

from common import CACHE, parser

OUT = CACHE / "hybrid-trained"
SEQ, BATCH, VOCAB = 256, 8, 4096
CONFIG = dict(vocab_size=VOCAB, hidden_size=384, intermediate_size=1536, hybrid_override_pattern="M-M-M*-M-M-M*-",
              num_attention_heads=6, num_key_value_heads=2, head_dim=64, mamba_num_heads=24, mamba_head_dim=32,
              n_groups=4, ssm_state_size=32, conv_kernel=4, chunk_size=64, tie_word_embeddings=False,
              layer_norm_epsilon=1e-5, max_position_embeddings=1024)


def train_tokenizer(directory: Path):
    """Byte-level BPE over builtin:train, saved as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from nemo_minitron.data.builtin import builtin_documents

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(builtin_documents("train"), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>")
    fast.save_pretrained(str(directory))
    return fast


def sequences(tokenizer, split: str) -> torch.Tensor:
    """The split's documents, joined by end-of-text, cut into SEQ + 1 token rows."""
    from nemo_minitron.data.builtin import builtin_documents

    ids: list[int] = []
    for doc in builtin_documents(split):
        ids += tokenizer(doc)["input_ids"] + [tokenizer.eos_token_id]
    n = (len(ids) - 1) // SEQ
    return torch.tensor(ids[: n * SEQ + 1])[:-1].view(n, SEQ), torch.tensor(ids[1: n * SEQ + 1]).view(n, SEQ)


def heldout_loss(model, data) -> float:
    x, y = data
    model.eval()
    total = 0.0
    with torch.no_grad():
        for i in range(0, len(x), 16):
            logits = model(x[i:i + 16]).logits.float()
            total += torch.nn.functional.cross_entropy(logits.flatten(0, 1), y[i:i + 16].flatten(), reduction="sum").item()
    model.train()
    return total / y.numel()


def make(cpu_minutes: float, quick: bool = False, wall_minutes: float = 10**6) -> Path:
    import transformers

    out = OUT / ("quick" if quick else "hf")
    if (out / "train.json").is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(out)
    train, heldout = sequences(tokenizer, "train"), sequences(tokenizer, "heldout")
    heldout = (heldout[0][:64], heldout[1][:64])
    torch.manual_seed(0)
    config = transformers.NemotronHConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                          **CONFIG)
    model = transformers.AutoModelForCausalLM.from_config(config)
    params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, betas=(0.9, 0.95), weight_decay=0.1)
    budget = cpu_minutes * 60
    wall_budget = wall_minutes * 60
    # cosine over the steps the budget is expected to allow (re-estimated from the measured step time)
    planned, warmup, step, log = 10**6, 20, 0, []
    order: list[int] = []
    start_cpu, start_wall = time.process_time(), time.time()
    before = heldout_loss(model, heldout) if not quick else None
    while time.process_time() - start_cpu < budget and time.time() - start_wall < wall_budget and step < planned:
        if not order:
            order = list(range(len(train[0])))
            random.Random(step).shuffle(order)
        batch = [order.pop() for _ in range(min(BATCH, len(order)))]
        lr = 2e-3 * min(1.0, (step + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, step / planned))))
        for group in opt.param_groups:
            group["lr"] = lr
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(train[0][batch], labels=None).logits.float()
        loss = torch.nn.functional.cross_entropy(loss.flatten(0, 1), train[1][batch].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        step += 1
        if step == 10:  # plan the schedule from the CPU and wall time of the first steps
            planned = max(warmup + 1, int(min(budget / ((time.process_time() - start_cpu) / 10),
                                              wall_budget / ((time.time() - start_wall) / 10))))
        if step % 10 == 0 or quick:
            log.append({"step": step, "loss": loss.item(), "lr": lr, "cpu_s": time.process_time() - start_cpu})
            print(json.dumps(log[-1]), flush=True)
        if quick and step >= 3:
            break
    model.save_pretrained(str(out))
    summary = {"parameters": params, "steps": step, "tokens": step * BATCH * SEQ, "planned_steps": planned,
               "cpu_seconds": time.process_time() - start_cpu, "wall_seconds": time.time() - start_wall,
               "train_tokens_per_epoch": train[0].numel(), "heldout_loss_before": before,
               "heldout_loss_after": heldout_loss(model, heldout), "config": CONFIG, "log": log}
    (out / "train.json").write_text(json.dumps(summary, indent=2))
    return out


def trained_hybrid_checkpoint(quick: bool = False) -> Path:
    """The trained hybrid as a project checkpoint (trained and converted on first use)."""
    from nemo_minitron.checkpoint.api import convert
    from nemo_minitron.checkpoint.store import is_checkpoint

    hf = make(35, quick=quick)
    path = hf.parent / ("quick-checkpoint" if quick else "checkpoint")
    if not is_checkpoint(path):
        convert(str(hf), str(path))
    return path


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--cpu-minutes", type=float, default=35)
    p.add_argument("--wall-minutes", type=float, default=10**6, help="also stop after this wall-clock time "
                   "(a shared machine)")
    p.add_argument("--quick", action="store_true", help="three steps (make bench's quick size)")
    args = p.parse_args()
    out = make(args.cpu_minutes, quick=args.quick, wall_minutes=args.wall_minutes)
    summary = json.loads((out / "train.json").read_text())
    summary.pop("log")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
