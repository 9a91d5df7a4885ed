"""Worker: convert and/or load a checkpoint at a TP/PP layout and write full logits.

    python -m torch.distributed.run --nproc-per-node N checkpoint_layouts.py \
        --tp T --pp P --tokens TOKENS.pt --logits OUT.pt (--checkpoint CKPT | --convert-from SRC --save CKPT)
"""

import argparse

import torch


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--tokens", required=True)
    p.add_argument("--logits", required=True)
    p.add_argument("--checkpoint")
    p.add_argument("--convert-from")
    p.add_argument("--save")
    args = p.parse_args()

    from nemo_minitron.checkpoint.api import convert, open_model
    from nemo_minitron.model.forward import full_logits
    from nemo_minitron.runtime.distributed import init_distributed, is_rank0

    if args.convert_from:
        convert(args.convert_from, args.save, tp=args.tp, pp=args.pp)
        args.checkpoint = args.save
    init_distributed(args.tp, args.pp)
    opened = open_model(args.checkpoint)
    tokens = torch.load(args.tokens)
    logits = full_logits(opened.model, tokens, opened.description.vocab_size)
    if is_rank0():
        torch.save(logits, args.logits)


if __name__ == "__main__":
    main()
