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
cosine decay over ``--steps``, bf16 autocast). The schedule is fixed by ``--steps``; a call
stops when its ``--cpu-minutes`` / ``--wall-minutes`` run out and the next one resumes from
``resume.pt`` (written atomically every 25 steps), so the hours this takes on 2 CPU cores
can be spread over several sessions. The result (Hugging Face directory with its
tokenizer) is kept in benchmarks/.cache/hybrid-trained/hf once its last step is done, and
converted to a project checkpoint next to it; its held-out losses are in ``train.json``.

    python benchmarks/hybrid_model.py [--steps 700] [--cpu-minutes 60] [--quick]
"""

from __future__ import annotations

import fcntl
import json
import math
import random
import time
from pathlib import Path

import torch

from common import CACHE, parser

OUT = CACHE / "hybrid-trained"
SEQ, BATCH, VOCAB = 256, 8, 4096
# 1.43M tokens, 4 epochs of builtin:train (361k tokens), about 30 CPU minutes on one idle core.
# The corpus is what limits it: on a 1,500-step schedule the held-out loss stopped improving
# after about 2 epochs (4.77 at step 700, 4.90 at 800) while the training loss kept falling
STEPS = 700
# here (2.4 CPU s a step, 1 thread)
SAVE_EVERY = 25
EVAL_EVERY = 100
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


def make(steps: int = STEPS, cpu_minutes: float = float("inf"), quick: bool = False,
         wall_minutes: float = float("inf")) -> Path:
    """The Hugging Face directory of the model trained for ``steps`` steps. Training resumes
    from ``resume.pt`` (saved every SAVE_EVERY steps and when a budget runs out) and stops
    after ``cpu_minutes`` of CPU or ``wall_minutes`` of wall time in this call; the model is
    complete (``train.json`` written) only after its last step: until then SystemExit says
    where it stands."""
    import transformers

    steps = 3 if quick else steps
    out = OUT / ("quick" if quick else "hf")
    if (out / "train.json").is_file():
        done = json.loads((out / "train.json").read_text())
        if done.get("steps") == steps:
            return out
        raise SystemExit(f"{out} holds a model of {done.get('steps')} steps, not {steps}: move it aside "
                         "(it is the model the tables in docs/benchmarks.md name) and rerun")
    out.mkdir(parents=True, exist_ok=True)
    lock = open(out / ".training.lock", "w")  # held until this call returns: one trainer per directory
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise SystemExit(f"{out} is being trained by another process (benchmarks/hybrid_model.py): "
                         "wait for it to finish") from None
    if (out / "tokenizer.json").is_file():
        tokenizer = transformers.PreTrainedTokenizerFast.from_pretrained(str(out))
    else:
        tokenizer = train_tokenizer(out)
    train, heldout = sequences(tokenizer, "train"), sequences(tokenizer, "heldout")
    heldout = (heldout[0][:64], heldout[1][:64])
    torch.manual_seed(0)
    config = transformers.NemotronHConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                          **CONFIG)
    model = transformers.AutoModelForCausalLM.from_config(config)
    params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, betas=(0.9, 0.95), weight_decay=0.1)
    resume = out / "resume.pt"
    if resume.is_file():  # our own file: tensors, numbers and lists only
        state = torch.load(resume, map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        step, order, log, before = state["step"], state["order"], state["log"], state["heldout_loss_before"]
        cpu_before, wall_before = state["cpu_seconds"], state["wall_seconds"]
        print(f"resuming at step {step} of {steps}", flush=True)
    else:
        step, order, log, cpu_before, wall_before = 0, [], [], 0.0, 0.0
        before = heldout_loss(model, heldout) if not quick else None

    def save_resume() -> None:
        tmp = resume.with_suffix(".tmp")
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step, "order": order,
                    "log": log, "heldout_loss_before": before, "cpu_seconds": cpu_before + time.process_time() - start_cpu,
                    "wall_seconds": wall_before + time.time() - start_wall}, tmp)
        tmp.replace(resume)

    warmup = 20
    start_cpu, start_wall = time.process_time(), time.time()
    while step < steps:
        if time.process_time() - start_cpu > cpu_minutes * 60 or time.time() - start_wall > wall_minutes * 60:
            save_resume()
            raise SystemExit(f"stopped at step {step} of {steps} (budget of this call spent); rerun to continue")
        if not order:  # a new epoch, shuffled by the step it starts at (reproducible across resumes)
            order = list(range(len(train[0])))
            random.Random(step).shuffle(order)
        batch = [order.pop() for _ in range(min(BATCH, len(order)))]
        lr = 2e-3 * min(1.0, (step + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / steps)))
        for group in opt.param_groups:
            group["lr"] = lr
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(train[0][batch]).logits.float()
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), train[1][batch].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        step += 1
        if step % 10 == 0 or quick:
            log.append({"step": step, "loss": loss.item(), "lr": lr,
                        "cpu_s": cpu_before + time.process_time() - start_cpu})
            if step % EVAL_EVERY == 0:  # the corpus is small: watch for over-fitting
                log[-1]["heldout_loss"] = heldout_loss(model, heldout)
            print(json.dumps(log[-1]), flush=True)
        if step % SAVE_EVERY == 0 and step < steps:
            save_resume()
    model.save_pretrained(str(out))
    summary = {"parameters": params, "steps": step, "tokens": step * BATCH * SEQ,
               "cpu_seconds": cpu_before + time.process_time() - start_cpu,
               "wall_seconds": wall_before + time.time() - start_wall,
               "train_tokens_per_epoch": train[0].numel(), "heldout_loss_before": before,
               "heldout_loss_after": heldout_loss(model, heldout), "config": CONFIG, "log": log}
    (out / "train.json").write_text(json.dumps(summary, indent=2))
    resume.unlink(missing_ok=True)
    return out


def trained_hybrid_checkpoint(quick: bool = False) -> Path:
    """The trained hybrid as a project checkpoint (trained and converted on first use)."""
    from nemo_minitron.checkpoint.api import convert
    from nemo_minitron.checkpoint.store import is_checkpoint

    hf = make(quick=quick)
    steps = json.loads((hf / "train.json").read_text())["steps"]
    # named by its training: results cached from one model are never read for another
    path = hf.parent / ("quick-checkpoint" if quick else f"checkpoint-{steps}steps")
    if not is_checkpoint(path):
        convert(str(hf), str(path))
    return path


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=STEPS, help="training steps of the whole schedule")
    p.add_argument("--cpu-minutes", type=float, default=float("inf"), help="stop this call after this CPU time "
                   "(a later call resumes)")
    p.add_argument("--wall-minutes", type=float, default=float("inf"), help="also stop after this wall-clock time "
                   "(a shared machine)")
    p.add_argument("--quick", action="store_true", help="three steps (make bench's quick size)")
    args = p.parse_args()
    out = make(args.steps, args.cpu_minutes, quick=args.quick, wall_minutes=args.wall_minutes)
    summary = json.loads((out / "train.json").read_text())
    summary.pop("log")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
