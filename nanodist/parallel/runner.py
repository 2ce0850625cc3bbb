"""What runs one global batch: a step runner, the trainer's one door to the model.

    forward_backward(batches, autocast) -> loss    the micro-steps [(x, y), ...] of one
                                                    global batch, gradients synchronised
                                                    once they are all in; their mean loss
    eval_loss(batches, autocast) -> loss           the same, forward only
    train() / eval()                               the model's mode

`MicroSteps` runs one model (a `ModelPart`) micro-step after micro-step (gradient
accumulation: the layout's no_sync on all but the last); `pipeline.PipelineRunner` runs
the micro-batches through the stages by a schedule. The loss comes back unreduced over
DP: each rank's mean of its own micro-batches.
"""
from contextlib import nullcontext

import torch


class MicroSteps:
    """Gradient accumulation over the micro-steps of one global batch, on one ModelPart."""

    def __init__(self, part):
        self.part = part

    def train(self):
        self.part.module.train()

    def eval(self):
        self.part.module.eval()

    def forward_backward(self, batches, autocast) -> torch.Tensor:
        part, loss_sum = self.part, 0.0  # a tensor of the loss's dtype after the first add
        for micro, (x, y) in enumerate(batches):
            last = micro == len(batches) - 1
            with (nullcontext() if last else part.no_sync()), part.loss_context():
                with autocast:
                    loss = part.module(x, targets=y) / len(batches)
                loss.backward()
            loss_sum = loss_sum + loss.detach()
        return loss_sum

    @torch.no_grad()
    def eval_loss(self, batches, autocast) -> torch.Tensor:
        part, loss_sum = self.part, 0.0
        for x, y in batches:
            with part.loss_context(), autocast:
                loss_sum = loss_sum + part.module(x, targets=y) / len(batches)
        return loss_sum
