"""An lm-evaluation-harness ``LM`` backed by our megatron-core model, at any TP/PP/DP.

``MegatronLM`` subclasses lm-eval's ``TemplateLM``, which turns (context, continuation)
pairs into tokens the same way lm-eval's Hugging Face model does, so both score the
same tokens. What is ours:
- ``_loglikelihood_tokens``: right-padded batches (longest first) through megatron-core's
  pipeline schedule (``model.forward.run_forward_only``); on the last stage the
  log-probabilities of the continuation tokens are computed from the vocab-parallel
  logits (max, sum of exponentials and the target's logit reduced over the TP group),
  in fp32, a chunk of positions at a time;
- ``loglikelihood_rolling``: lm-eval's disjoint rolling windows of the model's context;
- ``generate_until``: megatron-core's inference engine (``generate.engine``).

lm-eval's ``rank``/``world_size`` are the data-parallel rank and size: every rank of a
model replica sees the same requests, replicas get different ones, and results are
gathered over the data-parallel group.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import torch
import torch.distributed as dist
from lm_eval import utils
from lm_eval.api.model import TemplateLM
from megatron.core import parallel_state as ps

from nemo_minitron.config import DEFAULT_SEED
from nemo_minitron.generate.engine import SamplingConfig, TextGenerator
from nemo_minitron.model.forward import mask_padded_vocab, position_ids, run_forward_only, to_device
from nemo_minitron.runtime.distributed import layout

log = logging.getLogger("nemo_minitron")

#: positions whose log-softmax is materialised at once (bounds the fp32 [positions, vocab/tp] temporaries)
_CHUNK = 1024


def continuation_logprobs(logits: torch.Tensor, targets: torch.Tensor,
                          vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For vocab-parallel ``logits [n, V/tp]`` and global ``targets [n]``: each target's
    log-probability (fp32) and whether it is the argmax, identical on every TP rank."""
    group = ps.get_tensor_model_parallel_group()
    logprobs, greedy = [], []
    for start in range(0, len(targets), _CHUNK):
        x = mask_padded_vocab(logits[start:start + _CHUNK].float(), vocab_size)
        t = targets[start:start + _CHUNK]
        local = x.shape[-1]
        first = ps.get_tensor_model_parallel_rank() * local
        mine = (t >= first) & (t < first + local)
        target_logit = torch.where(mine, x.gather(-1, (t - first).clamp(0, local - 1)[:, None])[:, 0],
                                   torch.zeros((), dtype=x.dtype, device=x.device))
        top = x.max(-1).values
        if ps.get_tensor_model_parallel_world_size() > 1:
            dist.all_reduce(target_logit, group=group)
            dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
        sum_exp = (x - top[:, None]).exp().sum(-1)
        if ps.get_tensor_model_parallel_world_size() > 1:
            dist.all_reduce(sum_exp, group=group)
        logprobs.append(target_logit - top - sum_exp.log())
        greedy.append(target_logit >= top)
    if not logprobs:  # no positions to score (an empty continuation)
        return logits.new_zeros(0, dtype=torch.float32), torch.zeros(0, dtype=torch.bool, device=logits.device)
    return torch.cat(logprobs), torch.cat(greedy)


def _scoring_step(vocab_size: int, device: torch.device):
    """Megatron forward step: per row, the summed log-probability of the positions marked
    in ``score`` and whether each of them is the argmax."""
    def forward_step(data_iterator, model):
        batch = to_device(next(data_iterator), device)
        tokens = batch["tokens"]
        output = model(tokens, position_ids(tokens), None)

        def loss_func(out: torch.Tensor, non_loss_data: bool = False):
            score = batch["score"]
            lp, top = continuation_logprobs(out[score], batch["targets"][score], vocab_size)
            rows = score.nonzero()[:, 0]
            total = torch.zeros(len(tokens), dtype=torch.float64, device=out.device).index_add_(0, rows, lp.double())
            misses = torch.zeros(len(tokens), dtype=torch.long, device=out.device).index_add_(0, rows, (~top).long())
            return torch.zeros((), device=out.device), {"logprob": total.cpu(), "greedy": (misses == 0).cpu()}

        return output, loss_func

    return forward_step


class MegatronLM(TemplateLM):
    """lm-eval's view of a megatron-core GPTModel (built at the current layout)."""

    def __init__(self, model, description, tokenizer, *, batch_size: int = 8, max_length: int | None = None,
                 max_gen_toks: int = 256, seed: int = DEFAULT_SEED):
        """``seed``: sampled generate-until requests draw from seed + the batch's position."""
        super().__init__()
        self.model, self.description, self.tokenizer = model, description, tokenizer
        self.batch_size = batch_size
        self._max_length = max_length or description.max_position_embeddings
        self.max_gen_toks = max_gen_toks
        self.seed = seed
        self._device = layout().device
        self._rank, self._world_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
        self._generator = None

    # ------------------------------------------------------------------ what lm-eval asks
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        # like lm-eval's HF model: the token that stands for an empty context
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def tokenizer_name(self) -> str:
        return getattr(self.tokenizer, "name_or_path", "").replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        extra = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
        return self.tokenizer.encode(string, **extra)

    def tok_decode(self, tokens, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(chat_history, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    # ------------------------------------------------------------------ data-parallel collectives
    def _dp_group(self):
        return ps.get_data_parallel_group()

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world_size == 1:
            return tensor
        parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(parts, tensor.contiguous(), group=self._dp_group())
        return torch.stack(parts) if tensor.dim() == 0 else torch.cat(parts)

    def gather_object(self, obj: Any, dst: int = 0):
        if self.world_size == 1:
            return [obj]
        group = self._dp_group()
        out = [None] * self.world_size if self.rank == dst else None
        dist.gather_object(obj, out, dst=dist.get_global_rank(group, dst), group=group)
        return out

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier(group=self._dp_group())

    # ------------------------------------------------------------------ scoring
    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        # lm-eval's tokenizing progress bar, only on a terminal
        return super().loglikelihood(requests, disable_tqdm=disable_tqdm or not sys.stderr.isatty() or self.rank != 0)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """``requests``: ``(key, context_tokens, continuation_tokens)``; the input is cut on the
        left to the model's context, as lm-eval's HF model does."""
        rows = []
        for _, context, continuation in requests:
            whole = (list(context) + list(continuation))[-(self.max_length + 1):]
            rows.append((whole[:-1], whole[1:], len(continuation)))
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
        batches = []
        for start in range(0, len(order), self.batch_size):
            chunk = [rows[i] for i in order[start:start + self.batch_size]]
            width = len(chunk[0][0])
            tokens = torch.zeros(len(chunk), width, dtype=torch.long)
            targets = torch.zeros_like(tokens)
            score = torch.zeros(len(chunk), width, dtype=torch.bool)
            for r, (inp, tgt, n) in enumerate(chunk):
                tokens[r, :len(inp)] = torch.tensor(inp)
                targets[r, :len(tgt)] = torch.tensor(tgt)
                score[r, len(inp) - n:len(inp)] = True
            batches.append({"tokens": tokens, "targets": targets, "score": score})
        was_training = self.model.training
        self.model.eval()
        try:
            reported = run_forward_only(self.model, batches, _scoring_step(self.description.vocab_size, self.device))
        finally:
            self.model.train(was_training)
        results: list[tuple[float, bool] | None] = [None] * len(rows)
        flat = [(float(lp), bool(g)) for r in reported for lp, g in zip(r["logprob"], r["greedy"])]
        for i, value in zip(order, flat):
            results[i] = value
        for (key, _, _), value in zip(requests, results):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, value)
        return results  # type: ignore[return-value]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, owners = [], []
        for i, (text,) in enumerate(req.args for req in requests):
            for context, continuation in map(utils.make_disjoint_window, utils.get_rolling_token_windows(
                    token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, context, continuation))
                owners.append(i)
        scores = self._loglikelihood_tokens(windows)
        totals = [0.0] * len(requests)
        for i, (lp, _) in zip(owners, scores):
            totals[i] += lp
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # ------------------------------------------------------------------ generation
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        if self._generator is None:
            self._generator = TextGenerator(self.model, self.description, self.tokenizer)
        results: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(repr(sorted(req.args[1].items())), []).append(i)
        for members in groups.values():
            kwargs = dict(requests[members[0]].args[1])
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            eot = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
            max_new = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
            sample = bool(kwargs.pop("do_sample", False)) and float(kwargs.get("temperature", 1.0)) > 0
            stop = tuple(s for s in until + [eot] if s)
            if sample:
                sampling = SamplingConfig(max_new_tokens=max_new, temperature=float(kwargs.get("temperature", 1.0)),
                                          top_p=float(kwargs.get("top_p") or 0.0), top_k=int(kwargs.get("top_k") or 0),
                                          stop=stop)
            else:
                sampling = SamplingConfig(max_new_tokens=max_new, stop=stop)
            for start in range(0, len(members), self.batch_size):
                index = members[start:start + self.batch_size]
                prompts = [self.tok_encode(requests[i].args[0])[-(self.max_length - max_new):] for i in index]
                for i, gen in zip(index, self._generator.generate(prompts, sampling, seed=self.seed + start)):
                    results[i] = gen.text
                    self.cache_hook.add_partial("generate_until", requests[i].args, gen.text)
        return results  # type: ignore[return-value]
