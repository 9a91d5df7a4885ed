"""The teacher-student model: one module the pipeline schedules drive like a GPTModel.

On every pipeline stage it runs the student's layers (with gradients) and the frozen
teacher's layers (``no_grad``, eval mode) of that stage. Between stages the p2p tensor
is the concatenation [student hidden | teacher hidden | carried states] (the schedule's
shapes are widened with ``adjust_tensor_shapes_fn``), so teacher and student may differ
in width and depth.

With sequence parallelism (a mixture-of-experts student at TP > 1) every tensor-parallel
rank holds a slice of the sequence: a pair's loss on a rank is its slice's mean divided
by the TP size (the ranks' parts add up to the mean over all tokens, in the logs and in
the gradients), and the projections' gradients are summed over the TP ranks by
megatron's gradient finalisation (``sequence_parallel`` parameters).

Intermediate pairs (student layer i, teacher layer j) are computed on the later of the
two layers' stages; the earlier state is carried forward in the p2p tensor (a carried
student state keeps its gradient path). A pair whose stage is not the last adds its
loss through an autograd hook on the stage's output (as megatron's MoE auxiliary
losses do), so it works on any stage. Each pair has its own projection (student width
to teacher width) when the widths differ; it starts as the channel selection when the
student was pruned from the teacher's width, random otherwise.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from nemo_minitron.config import DEFAULT_SEED
from nemo_minitron.distill.losses import intermediate_loss
from nemo_minitron.model.builder import balanced_stages


@dataclasses.dataclass(frozen=True)
class LayerPair:
    student: int
    teacher: int


def stage_of(layer: int, num_layers: int, pp: int) -> int:
    bounds, start = [], 0
    for n in balanced_stages(num_layers, pp):
        bounds.append((start, start + n))
        start += n
    return next(s for s, (lo, hi) in enumerate(bounds) if lo <= layer < hi)


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


class DistillationModel(torch.nn.Module):
    def __init__(self, student, teacher, pairs: list[LayerPair], pair_loss: str = "cosine",
                 student_layers: int | None = None, teacher_layers: int | None = None,
                 projection_init: torch.Tensor | None = None, seed: int = DEFAULT_SEED) -> None:
        from megatron.core import parallel_state as ps

        super().__init__()
        self.student, self.teacher = student, teacher
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.teacher.eval()
        self.config = student.config
        self.model_type = student.model_type
        self.pairs, self.pair_loss = list(pairs), pair_loss
        self.pp, self.stage = ps.get_pipeline_model_parallel_world_size(), ps.get_pipeline_model_parallel_rank()
        # sequence-parallel ranks each hold 1/tp of the tokens: their pair losses add up to the mean
        self.sequence_shards = ps.get_tensor_model_parallel_world_size() if student.config.sequence_parallel else 1
        self.is_first, self.is_last = ps.is_pipeline_first_stage(), ps.is_pipeline_last_stage()
        self.hs, self.ht = student.config.hidden_size, teacher.config.hidden_size
        self.ls, self.lt = student_layers or student.config.num_layers, teacher_layers or teacher.config.num_layers

        # where each pair's states live and where its loss is computed
        self.pair_stages = [(stage_of(p.student, self.ls, self.pp), stage_of(p.teacher, self.lt, self.pp))
                            for p in self.pairs]
        self.carry = [self._carried_over(b) for b in range(self.pp - 1)]
        carried = [sum(self.hs if side == "student" else self.ht for _, side in items) for items in self.carry]
        self.width = self.hs + self.ht + max(carried, default=0)

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
            for layer in model.decoder.layers:
                index = layer.layer_number - 1
                if (side, index) in wanted:
                    def capture(module, args, output, key=(side, index)):
                        self._captured[key] = output[0] if isinstance(output, tuple) else output
                    layer.register_forward_hook(capture)

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

    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata=None):
        """The student's state and this stage's projections; never the teacher's."""
        from megatron.core import parallel_state as ps
        from megatron.core.dist_checkpointing.mapping import ShardedTensor

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
            # the last stage divides its loss by the number of micro-batches; match it
            out = _AddAuxLoss.apply(out, weighted, 1.0 / self.num_microbatches)
        return out

    def adjust_tensor_shapes(self, recv_shapes, send_shapes):
        """For the 1F1B schedule: every p2p tensor is [seq, batch, width]."""
        widen = [(s[0], s[1], self.width) for s in recv_shapes]
        return widen, [(s[0], s[1], self.width) for s in send_shapes]
