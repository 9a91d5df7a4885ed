"""Batched text generation on megatron-core's inference engine, at any TP/PP layout.

megatron-core's static-batch path does the work: its ``GPTInferenceWrapper`` runs the
model with a KV cache (``StaticInferenceContext``: prefill up to the shortest prompt,
then one token per step, pipeline stages passing activations and the last stage
broadcasting logits), and its ``TextGenerationController`` samples (greedy = top-k 1,
else temperature with top-k or top-p). Two small subclasses add what it lacks:
- the vocabulary's padding columns get -inf logits, so neither greedy nor sampling can
  pick a token that does not exist;
- a prompt is finished by any of several end-of-sequence ids or by a stop string (the
  controller knows one termination id and no stop strings in static batches).

Every rank samples the same tokens: TP ranks see identical gathered logits, PP stages
get them broadcast, and the sampling generator is seeded per batch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections import OrderedDict
from typing import Sequence

import megatron.core.inference.utils as mc_inference_utils
import torch
from megatron.core import parallel_state as ps
from megatron.core.inference.contexts import StaticInferenceContext
from megatron.core.inference.inference_request import InferenceRequest
from megatron.core.inference.model_inference_wrappers.gpt.gpt_inference_wrapper import GPTInferenceWrapper
from megatron.core.inference.sampling_params import SamplingParams
from megatron.core.inference.text_generation_controllers.text_generation_controller import TextGenerationController

from nemo_minitron.config import DEFAULT_SEED
from nemo_minitron.generate.config import SamplingConfig

log = logging.getLogger("nemo_minitron")

__all__ = ["Generation", "SamplingConfig", "TextGenerator", "inference_mode"]


def inference_mode() -> contextlib.AbstractContextManager:
    """megatron-core 0.19's modules take their inference paths (the KV cache, the Mamba
    mixer's conv and SSM states) only while its process-wide ``InferenceMode`` flag is set,
    as its engines set it; earlier versions have no flag and look at the context alone."""
    mode = getattr(mc_inference_utils, "InferenceMode", None)
    return mode.active() if mode is not None else contextlib.nullcontext()


@dataclasses.dataclass(frozen=True)
class Generation:
    tokens: list[int]  # generated tokens (a stop string's tokens included, end-of-sequence excluded)
    text: str  # decoded tokens, cut before the first stop string
    finish_reason: str  # "stop" (stop string), "eos", or "length"


class _TokenizerAdapter:
    """The tokenizer interface megatron-core's controller calls (eod, bos, detokenize)."""

    def __init__(self, tokenizer, eod: int):
        self._tok, self.eod, self.bos = tokenizer, eod, tokenizer.bos_token_id

    def tokenize(self, text: str) -> list[int]:
        return self._tok(text, add_special_tokens=False)["input_ids"]

    def detokenize(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)


def _classes():
    """The megatron-core wrapper and controller, subclassed (imported lazily: megatron is slow to import)."""
    class VocabMaskedWrapper(GPTInferenceWrapper):
        vocab_size: int = 0

        def _forward(self, inference_input):
            output = super()._forward(inference_input)
            if ps.is_pipeline_last_stage(ignore_virtual=True) and output.shape[-1] > self.vocab_size:
                output[..., self.vocab_size:] = torch.finfo(output.dtype).min
            return output

    class StoppingController(TextGenerationController):
        eos_ids: torch.Tensor
        stop: tuple[str, ...] = ()
        prompt_lengths: list[int] = []

        def update_generation_status(self, updated_prompts_tokens, generation_started, current_context_end_position,
                                     is_generation_done_tensor, generated_sequence_lengths, termination_id=None):
            latest = updated_prompts_tokens[:, current_context_end_position]
            eos = torch.isin(latest, self.eos_ids.to(latest.device)) & generation_started
            done = is_generation_done_tensor | eos
            generated_sequence_lengths += ~done & generation_started
            if self.stop:
                end = current_context_end_position + 1
                for i in torch.nonzero(generation_started & ~done).flatten().tolist():
                    text = self._tail_text(updated_prompts_tokens[i, self.prompt_lengths[i]:end].tolist())
                    if any(s in text for s in self.stop):
                        done[i] = True
            return done, generated_sequence_lengths.int()

        def _tail_text(self, generated: list[int]) -> str:
            """The end of the generated text, long enough to hold any stop string that the
            latest token completed: a stop string first appears with the latest token, so
            the tokens before it need only provide the stop string's length in characters
            (plus a margin for characters split across tokens). Tokens that decode to
            nothing (byte pieces, special tokens) widen the window."""
            need = max(len(s) for s in self.stop) + 4
            width = need + 4
            while True:
                before = self.tokenizer.detokenize(generated[-width:-1]) if width > 1 else ""
                if len(before) >= need or width >= len(generated):
                    return self.tokenizer.detokenize(generated[-width:])
                width *= 2

    return VocabMaskedWrapper, StoppingController


class TextGenerator:
    """A model at the current layout, ready to generate. ``generate`` is collective: every
    rank of the model-parallel group calls it with the same prompts."""

    def __init__(self, model, description, tokenizer, *, dtype: torch.dtype | None = None):
        self.model, self.description, self.tokenizer = model, description, tokenizer
        eos = description.eos_token_id if description.eos_token_id is not None else tokenizer.eos_token_id
        self.eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
        self.dtype = dtype or next(model.parameters()).dtype
        self._adapter = _TokenizerAdapter(tokenizer, self.eos_ids[0] if self.eos_ids else 0)
        Wrapper, Controller = _classes()
        self._wrapper_cls, self._controller_cls = Wrapper, Controller
        self.context_length = description.max_position_embeddings

    def _controller(self, batch: int, seq_len: int):
        """A fresh KV cache sized for this batch; the wrapper and controller around it."""
        context = StaticInferenceContext(batch, seq_len)
        try:  # megatron-core 0.16: the settings travel in an InferenceWrapperConfig
            from megatron.core.inference.model_inference_wrappers.inference_wrapper_config import (
                InferenceWrapperConfig,
            )
        except ImportError:  # 0.17+: they come from the model's config and the context
            wrapper = self._wrapper_cls(self.model, context)
        else:
            config = InferenceWrapperConfig(
                hidden_size=self.description.hidden_size, params_dtype=self.dtype,
                inference_batch_times_seqlen_threshold=-1,  # whole batch per pipeline step
                padded_vocab_size=self.description.padded_vocab_size, inference_max_requests=batch,
                inference_max_seq_length=seq_len)
            wrapper = self._wrapper_cls(self.model, config, context)
        wrapper.vocab_size = self.description.vocab_size
        controller = self._controller_cls(wrapper, self._adapter)
        controller.eos_ids = torch.tensor(self.eos_ids, dtype=torch.long)
        return controller

    def generate(self, prompts: Sequence[Sequence[int]], sampling: SamplingConfig,
                 seed: int = DEFAULT_SEED) -> list[Generation]:
        """Complete each tokenised prompt; ``seed`` fixes the samples (ignored when greedy)."""
        if not prompts:
            return []
        longest = max(len(p) for p in prompts)
        controller = self._controller(len(prompts), longest + sampling.max_new_tokens)
        controller.stop = tuple(sampling.stop)
        controller.prompt_lengths = [len(p) for p in prompts]
        if sampling.ignore_eos:
            controller.eos_ids = torch.tensor([], dtype=torch.long)
        controller.sampling_rng.manual_seed(seed)
        if sampling.greedy:
            params = SamplingParams(top_k=1, num_tokens_to_generate=sampling.max_new_tokens)
        else:
            params = SamplingParams(temperature=sampling.temperature, top_k=sampling.top_k, top_p=float(sampling.top_p),
                                    num_tokens_to_generate=sampling.max_new_tokens)
        requests = OrderedDict(
            (i, InferenceRequest(request_id=i, prompt="", prompt_tokens=list(map(int, p)), sampling_params=params))
            for i, p in enumerate(prompts))
        was_training = self.model.training
        try:
            with inference_mode():
                done = controller.generate_all_output_tokens_static_batch(requests)
        finally:
            self.model.train(was_training)
        return [self._finish(done[i], sampling) for i in range(len(prompts))]

    def _finish(self, request, sampling: SamplingConfig) -> Generation:
        tokens = [int(t) for t in request.generated_tokens.tolist()]
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        cut = [text.index(s) for s in sampling.stop if s in text]
        if cut:
            return Generation(tokens, text[:min(cut)], "stop")
        if len(tokens) < sampling.max_new_tokens:
            return Generation(tokens, text, "eos")
        return Generation(tokens, text, "length")
