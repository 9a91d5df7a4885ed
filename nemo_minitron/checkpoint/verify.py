"""Check an exported Hugging Face directory against the megatron-core model it came from."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM

from nemo_minitron.checkpoint.decilm import CODE_DIR, CODE_FILES
from nemo_minitron.model.description import ModelDescription
from nemo_minitron.model.forward import full_logits
from nemo_minitron.runtime.distributed import broadcast_object, is_rank0

log = logging.getLogger("nemo_minitron")


def ships_our_code(path: str | Path) -> bool:
    """Whether the directory's modeling code is exactly the one this project ships with a
    heterogeneous model's export (``checkpoint/decilm/``): the only code we let transformers run."""
    return all((Path(path) / name).is_file() and (Path(path) / name).read_bytes() == (CODE_DIR / name).read_bytes()
               for name in CODE_FILES)


def load_hf_model(path: str | Path, dtype: torch.dtype = torch.float32):
    """An exported directory in transformers; a heterogeneous model's export runs the modeling
    code it ships when, and only when, that code is this project's own."""
    key = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
    model = AutoModelForCausalLM.from_pretrained(str(path), trust_remote_code=ships_our_code(path), **{key: dtype})
    return model.eval()


class ExportMismatch(RuntimeError):
    pass


def verify_export(model, desc: ModelDescription, hf_dir: str | Path, seq_len: int = 64) -> float:
    """Collective: compare logits on a fixed random prompt; raise if they disagree.

    fp32 models must agree to 1e-3 with the same argmax everywhere; half-precision
    models (whose two implementations round differently) to 5% of the logit range."""
    tokens = torch.randint(0, desc.vocab_size, (1, seq_len), generator=torch.Generator().manual_seed(0))
    ours = full_logits(model, tokens, desc.vocab_size)
    diff = None
    if is_rank0():
        with torch.no_grad():
            theirs = load_hf_model(hf_dir)(tokens).logits.float()
        diff = (ours - theirs).abs().max().item()
        same_argmax = bool((ours.argmax(-1) == theirs.argmax(-1)).all())
        log.info("export check: max |logit difference| %.2e, same argmax everywhere: %s", diff, same_argmax)
        fp32 = next(model.parameters()).dtype == torch.float32
        tolerance = 1e-3 if fp32 else 0.05 * theirs.abs().max().item()
        ok = diff <= tolerance and (same_argmax or not fp32)
        diff = (diff, tolerance, ok)
    diff, tolerance, ok = broadcast_object(diff)
    if not ok:
        raise ExportMismatch(f"exported model disagrees with the checkpoint: max logit difference {diff:.3g} "
                             f"(allowed {tolerance:.3g})")
    return diff
