"""The teacher-student model: one module the pipeline schedules drive like a GPTModel.

On every pipeline stage it runs the student's layers (with gradients) and the frozen
teacher's layers (``no_grad``, eval mode) of that stage. Between stages the p2p tensor
is the concatenation [student hidden | teacher hidden | carried states], so teacher and
student may differ in width and depth. The schedule sizes p2p buffers by its model
config's ``hidden_size``: the project's trainer widens them with
``adjust_tensor_shapes_fn``; for other trainers (Megatron-LM, Megatron-Bridge, through
``nemo_minitron.integrations``) this module's ``config`` is a copy of the student's
whose ``hidden_size`` is the p2p width.

With sequence parallelism (a mixture-of-experts student at TP > 1) every tensor-parallel
rank holds a slice of the sequence: a pair's loss on a rank is its slice's mean divided
by the TP size (the ranks' parts add up to the mean over all tokens, in the logs and in
the gradients), and the projections' gradients are summed over the TP ranks by
megatron's gradient finalisation (``sequence_parallel`` parameters).

Intermediate pairs compare a student state with a teacher state: a layer's output
(layer i, 0-indexed), the embedding output (``embedding``) or the final norm's output
(``final_norm``). A pair is computed on the later of its two states' stages; the earlier
state is carried forward in the p2p tensor (a carried student state keeps its gradient
path). A pair whose stage is not the last adds its loss through an autograd hook on the
stage's output (as megatron's MoE auxiliary losses do), so it works on any stage. Each
pair has its own projection (student width to teacher width) when the widths differ; it
starts as the channel selection when the student was pruned from the teacher's width,
random otherwise.

The state dict (plain and sharded) holds the student and the projections only, so any
trainer's checkpointing saves and restores the student.

Logits layout: GPTModel's output layer computes [s, b, vocab] logits and the model
returns them as [b, s, vocab] through a transposed copy of the whole tensor (teacher and
student, and a transposed gradient in backward: on a CPU a few percent of a step). Inside
this model's forward both output layers take their input batch-major instead (a transposed
copy of the [s, b, h] hidden states: h / vocab of the logits' size) and hand their output
back as a transposed view, so GPTModel's transpose is a view that is already contiguous:
no copy. The same rows are computed, in another order.
Not under sequence parallelism, where the output layer gathers the sequence along its
first dimension.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
from typing import Sequence

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.dist_checkpointing.mapping import ShardedTensor

from nemo_minitron.config import DEFAULT_SEED
from nemo_minitron.distill.config import EMBEDDING, FINAL_NORM
from nemo_minitron.distill.losses import intermediate_loss
from nemo_minitron.errors import UsageError, require
from nemo_minitron.model.description import ModelDescription


Point = int | str  # a layer number (0-indexed), EMBEDDING or FINAL_NORM


@dataclasses.dataclass(frozen=True)
class LayerPair:
    student: Point
    teacher: Point

    def __str__(self) -> str:
        return f"{self.student}:{self.teacher}"


def parse_pairs(items: str | Sequence[str], student: ModelDescription, teacher: ModelDescription,
                flag: str = "--kd-pairs") -> list[LayerPair]:
    """['3:7', 'embedding:embedding'] or '3:7,final_norm:final_norm' (student:teacher; a
    0-indexed layer output, the embedding output or the final norm's output) -> pairs,
    each checked against both depths."""
    def point(value: str, item: str, side: str, depth: int):
        value = value.strip()
        if value in (EMBEDDING, FINAL_NORM):
            return value
        try:
            index = int(value)
        except ValueError:
            raise UsageError(f"{flag}: '{item}' is not student:teacher, each a layer number, {EMBEDDING} or "
                             f"{FINAL_NORM} (e.g. 3:7)") from None
        require(0 <= index < depth, f"{flag} {item}: {side} layer {index} is out of range 0..{depth - 1}")
        return index

    items = items.split(",") if isinstance(items, str) else list(items)
    pairs = []
    for item in filter(None, (str(i).strip() for i in items)):
        parts = item.split(":")
        require(len(parts) == 2, f"{flag}: '{item}' is not student_layer:teacher_layer (e.g. 3:7)")
        pairs.append(LayerPair(point(parts[0], item, "student", student.num_layers),
                               point(parts[1], item, "teacher", teacher.num_layers)))
    return pairs


def _layer_stages(model, pp: int) -> dict[int, int]:
    """Global layer index -> pipeline stage holding it, from the models themselves (any
    pipeline layout, also another trainer's); collective over the pipeline group."""
    held = [layer.layer_number - 1 for layer in model.decoder.layers]
    if pp == 1:
        return {i: 0 for i in held}
    everyone: list = [None] * pp
    dist.all_gather_object(everyone, held, group=ps.get_pipeline_model_parallel_group())
    return {i: stage for stage, layers in enumerate(everyone) for i in layers}


class _AddAuxLoss(torch.autograd.Function):
    """Identity on ``output``; in backward, gives ``aux`` the gradient ``scale``."""

    @staticmethod
    def forward(ctx, output, aux, scale: float):
        ctx.save_for_backward(aux)
        ctx.scale = scale
        return output.view_as(output)

    @staticmethod
    def backward(ctx, grad_output):
        (aux,) = ctx.saved_tensors
        return grad_output, torch.full_like(aux, ctx.scale), None


def _batch_major_input(module, args):
    # contiguous: a transposed view that needs gradients makes torch.matmul run a bmm over the
    # batch with the weight broadcast (no folding into one mm), which is far slower on a CPU
    return (args[0].transpose(0, 1).contiguous(), *args[1:])


def _sequence_major_output(module, args, output):
    logits, bias = output
    return logits.transpose(0, 1), bias


@contextlib.contextmanager
def batch_major_logits(*models):
    """Within: each model's output layer computes its logits batch-major (module docstring),
    where that means the same (no sequence parallelism)."""
    handles = []
    for model in models:
        layer = getattr(model, "output_layer", None) if getattr(model, "post_process", False) else None
        if layer is not None and not model.config.sequence_parallel:
            handles += [layer.register_forward_pre_hook(_batch_major_input),
                        layer.register_forward_hook(_sequence_major_output)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


class DistillationModel(torch.nn.Module):
    def __init__(self, student, teacher, pairs: list[LayerPair], pair_loss: str = "cosine",
                 student_layers: int | None = None, teacher_layers: int | None = None,
                 projection_init: torch.Tensor | None = None, seed: int = DEFAULT_SEED) -> None:
        super().__init__()
        self.student, self.teacher = student, teacher
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.teacher.eval()
        self.model_type = student.model_type
        self.pairs, self.pair_loss = list(pairs), pair_loss
        self.pp, self.stage = ps.get_pipeline_model_parallel_world_size(), ps.get_pipeline_model_parallel_rank()
        # sequence-parallel ranks each hold 1/tp of the tokens: their pair losses add up to the mean
        self.sequence_shards = ps.get_tensor_model_parallel_world_size() if student.config.sequence_parallel else 1
        self.is_first, self.is_last = ps.is_pipeline_first_stage(), ps.is_pipeline_last_stage()
        self.hs, self.ht = student.config.hidden_size, teacher.config.hidden_size
        self.ls, self.lt = student_layers or student.config.num_layers, teacher_layers or teacher.config.num_layers

        # where each pair's states live and where its loss is computed
        stages = {"student": _layer_stages(student, self.pp), "teacher": _layer_stages(teacher, self.pp)}

        def stage(side: str, point: Point) -> int:
            if point == EMBEDDING:
                return 0
            if point == FINAL_NORM:
                return self.pp - 1
            return stages[side][point]

        self.pair_stages = [(stage("student", p.student), stage("teacher", p.teacher)) for p in self.pairs]
        self.carry = [self._carried_over(b) for b in range(self.pp - 1)]
        carried = [sum(self.hs if side == "student" else self.ht for _, side in items) for items in self.carry]
        self.width = self.hs + self.ht + max(carried, default=0)
        # other trainers size the p2p buffers by their model config's hidden_size: make it the p2p width
        self.config = copy.copy(student.config)
        self.config.hidden_size = self.width

        self.projections = torch.nn.ModuleDict()
        dtype = next(student.parameters()).dtype
        for i, (p, stages) in enumerate(zip(self.pairs, self.pair_stages)):
            if max(stages) == self.stage and self.hs != self.ht:
                proj = torch.nn.Linear(self.hs, self.ht, bias=False, dtype=dtype,
                                       device=next(student.parameters()).device)
                with torch.no_grad():
                    if projection_init is not None:
                        proj.weight.copy_(projection_init)
                    else:  # seeded per pair, so every layout starts from the same projections
                        g = torch.Generator().manual_seed(seed * 1000 + i)
                        proj.weight.copy_(torch.randn(self.ht, self.hs, generator=g) / math.sqrt(self.hs))
                proj.weight.sequence_parallel = student.config.sequence_parallel  # each rank sees its tokens
                self.projections[str(i)] = proj
        # auto balance: weight of each pair = last step's logit loss / its loss (1 at first)
        self.register_buffer("pair_weights", torch.ones(len(self.pairs), dtype=torch.float64), persistent=False)
        self.num_microbatches = 1
        # float16 training: the schedule multiplies the last stage's loss by the optimizer's
        # loss scale; a pair loss entering backward here must be scaled alike
        self.loss_scale = 1.0
        #: gradient of a non-last stage's pair loss; None: 1 / num_microbatches, as the last
        #: stage's loss is scaled by megatron's schedule (per-token losses: the tokens)
        self.aux_loss_scale: float | None = None
        self.input_tensor: torch.Tensor | None = None
        self._captured: dict[tuple[str, int], torch.Tensor] = {}
        self.step_pair_losses = torch.zeros(len(self.pairs), dtype=torch.float64)
        self.last_teacher_logits: torch.Tensor | None = None
        self.last_pair_loss: torch.Tensor | None = None
        self._hook_layers()

    # ------------------------------------------------------------------ plumbing
    def _carried_over(self, boundary: int) -> list[tuple[int, str]]:
        """States crossing the boundary after stage ``boundary``: (pair, side whose state is early)."""
        items = []
        for i, (s_stage, t_stage) in enumerate(self.pair_stages):
            loss_stage = max(s_stage, t_stage)
            if s_stage <= boundary < loss_stage:
                items.append((i, "student"))
            if t_stage <= boundary < loss_stage:
                items.append((i, "teacher"))
        return items

    def _hook_layers(self) -> None:
        wanted = {("student", p.student) for p in self.pairs} | {("teacher", p.teacher) for p in self.pairs}
        for side, model in (("student", self.student), ("teacher", self.teacher)):
            modules = {layer.layer_number - 1: layer for layer in model.decoder.layers}
            if getattr(model, "pre_process", False):
                modules[EMBEDDING] = model.embedding
            if getattr(model, "post_process", False) and getattr(model.decoder, "final_layernorm", None) is not None:
                modules[FINAL_NORM] = model.decoder.final_layernorm
            for point, module in modules.items():
                if (side, point) in wanted:
                    def capture(module, args, output, key=(side, point)):
                        self._captured[key] = output[0] if isinstance(output, tuple) else output
                    module.register_forward_hook(capture)

    # megatron's gradient finalisation looks these up on the wrapped model (tied embeddings under PP)
    @property
    def pre_process(self) -> bool:
        return self.student.pre_process

    @property
    def share_embeddings_and_output_weights(self) -> bool:
        return self.student.share_embeddings_and_output_weights

    def shared_embedding_or_output_weight(self):
        return self.student.shared_embedding_or_output_weight()

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()  # the teacher never leaves eval mode
        return self

    def set_input_tensor(self, input_tensor) -> None:
        if isinstance(input_tensor, list):
            input_tensor = input_tensor[0]
        self.input_tensor = input_tensor

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """The inverse of ``sharded_state_dict``: student keys, plus ``kd_projection.<i>``."""
        projections = {k: v for k, v in state_dict.items() if k.startswith("kd_projection.")}
        student = {k: v for k, v in state_dict.items() if not k.startswith("kd_projection.")}
        result = self.student.load_state_dict(student, strict=strict, assign=assign)
        with torch.no_grad():
            for key, value in projections.items():
                self.projections[key.split(".", 1)[1]].weight.copy_(value)
        return result

    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata=None):
        """The student's state and this stage's projections; never the teacher's."""
        state = self.student.sharded_state_dict(prefix=prefix, metadata=metadata)
        replica = (0, ps.get_tensor_model_parallel_rank(), ps.get_data_parallel_rank(with_context_parallel=True))
        for name, proj in self.projections.items():
            state[f"{prefix}kd_projection.{name}"] = ShardedTensor.from_rank_offsets(
                f"{prefix}kd_projection.{name}.weight", proj.weight, replica_id=replica)
        return state

    # ------------------------------------------------------------------ forward
    def _pair_loss(self, i: int) -> torch.Tensor:
        pair = self.pairs[i]
        s = self._captured[("student", pair.student)]
        t = self._captured[("teacher", pair.teacher)]
        if str(i) in self.projections:
            s = self.projections[str(i)](s)
        return intermediate_loss(s, t, self.pair_loss) / self.sequence_shards

    def forward(self, input_ids, position_ids, attention_mask=None):
        self._captured.clear()
        if not self.is_first:
            x = self.input_tensor
            self.student.set_input_tensor(x[..., :self.hs])
            self.teacher.set_input_tensor(x[..., self.hs:self.hs + self.ht].detach())
            offset = self.hs + self.ht
            for i, side in self.carry[self.stage - 1]:
                width = self.hs if side == "student" else self.ht
                pair = self.pairs[i]
                key = ("student", pair.student) if side == "student" else ("teacher", pair.teacher)
                self._captured[key] = x[..., offset:offset + width]
                offset += width
        with batch_major_logits(self.student, self.teacher):
            student_out = self.student(input_ids, position_ids, attention_mask)
            with torch.no_grad():
                teacher_out = self.teacher(input_ids, position_ids, attention_mask)

        here = [i for i, stages in enumerate(self.pair_stages) if max(stages) == self.stage]
        pair_losses = {i: self._pair_loss(i) for i in here}
        for i, loss in pair_losses.items():
            self.step_pair_losses[i] += loss.detach().double().cpu() / self.num_microbatches
        weighted = sum((self.pair_weights[i].item() * loss for i, loss in pair_losses.items()),
                       torch.zeros((), device=student_out.device))
        if self.is_last:
            self.last_teacher_logits = teacher_out
            self.last_pair_loss = weighted
            return student_out

        parts = [student_out, teacher_out.detach()]
        for i, side in self.carry[self.stage]:
            pair = self.pairs[i]
            key = ("student", pair.student) if side == "student" else ("teacher", pair.teacher)
            state = self._captured[key]
            parts.append(state if side == "student" else state.detach())
        out = torch.cat(parts, dim=-1)
        if out.shape[-1] < self.width:
            out = torch.nn.functional.pad(out, (0, self.width - out.shape[-1]))
        if pair_losses:
            # the last stage divides its loss by the number of micro-batches (and multiplies
            # it by the float16 loss scale); match it
            scale = self.aux_loss_scale if self.aux_loss_scale is not None else 1.0 / self.num_microbatches
            out = _AddAuxLoss.apply(out, weighted, self.loss_scale * scale)
        return out

    def adjust_tensor_shapes(self, recv_shapes, send_shapes):
        """For the 1F1B schedule: every p2p tensor is [seq, batch, width]."""
        widen = [(s[0], s[1], self.width) for s in recv_shapes]
        return widen, [(s[0], s[1], self.width) for s in send_shapes]
