"""The same pipeline through PyTorch's `torch.distributed.pipelining`.

The stages are those of `pipeline.py` (same split, same per-stage TP / FSDP2 /
replicate); each becomes a `PipelineStage` and one of torch's schedules drives them:

    gpipe -> ScheduleGPipe      1f1b -> Schedule1F1B      (one chunk per rank)
    interleaved_1f1b -> ScheduleInterleaved1F1B           zero_bubble -> ScheduleInterleavedZeroBubble

torch splits the whole batch into the M micro-batches itself (our micro-steps,
concatenated on dim 0, split back exactly), computes each micro-batch's mean loss on the
last stage and divides the gradients by M (`scale_grads`), which is our loss / M. The
tied embedding and the gradient norm are handled as in the custom pipeline.
"""
from contextlib import nullcontext

import torch
from torch.distributed.pipelining import (PipelineStage, Schedule1F1B, ScheduleGPipe,
                                          ScheduleInterleaved1F1B, ScheduleInterleavedZeroBubble)

from nanodist.parallel.pipeline import PipelineRunner, Split

NATIVE_SCHEDULES = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B,
                    "interleaved_1f1b": ScheduleInterleaved1F1B,
                    "zero_bubble": ScheduleInterleavedZeroBubble}


class NativePipelineRunner(PipelineRunner):
    def __init__(self, stages: list, split: Split, schedule_name: str, micro_steps: int,
                 micro_batch: tuple):
        super().__init__(stages, split)
        P, rank = self.mesh.pp.size, self.mesh.pp.rank
        self.native_stages = [self._native_stage(s, v * P + rank, micro_batch)
                              for v, s in enumerate(stages)]
        schedule_cls = NATIVE_SCHEDULES[schedule_name]
        multi = schedule_cls in (ScheduleInterleaved1F1B, ScheduleInterleavedZeroBubble)
        # the last stage's module returns its micro-batch's loss (GPT.forward with targets)
        self.native = schedule_cls(self.native_stages if multi else self.native_stages[0],
                                   micro_steps, loss_fn=lambda loss, targets: loss)
        self.holds_last = self.native_stages[-1].is_last

    def _native_stage(self, stage, c: int, batch: tuple) -> PipelineStage:
        """Shapes given, not inferred (inference runs the stage on meta tensors, which
        DTensor TP turns into mismatched collectives)."""
        split = self.split
        hidden = torch.empty(split.act_shape, dtype=split.wire_dtype, device="meta",
                             requires_grad=True)  # its gradient goes back a stage
        inputs = torch.empty(batch, dtype=torch.long, device="meta") if c == 0 else hidden
        outputs = (torch.empty((), dtype=split.loss_dtype, device="meta")
                   if c == split.n_chunks - 1 else hidden)
        return PipelineStage(stage.module, c, split.n_chunks, self.mesh.device, input_args=inputs,
                             output_args=outputs, group=self.mesh.pp.process_group)

    def _step(self, batches, autocast, run) -> torch.Tensor:
        x = torch.cat([x for x, _ in batches])
        y = torch.cat([y for _, y in batches])
        losses = []
        with autocast, (self.stages[-1].loss_context() if self.holds_last else nullcontext()):
            run(x, targets=y, target=y, losses=losses, return_outputs=False)  # targets: every stage's
        loss_sum = (torch.stack([loss.detach() for loss in losses]).sum() / len(batches)
                    if losses else torch.zeros((), dtype=self.split.loss_dtype, device=self.mesh.device))
        self.mesh.pp.all_reduce(loss_sum)  # from the last stage to every rank
        return loss_sum

    def forward_backward(self, batches, autocast) -> torch.Tensor:
        loss = self._step(batches, autocast, self.native.step)
        self.split.sum_tied_grads()
        return loss

    @torch.no_grad()
    def eval_loss(self, batches, autocast) -> torch.Tensor:
        return self._step(batches, autocast, self.native.eval)
