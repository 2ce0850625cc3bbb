"""Cross entropy on logits sharded over the vocabulary: the full logits never exist.

    rank r holds logits[..., r*V/tp : (r+1)*V/tp]          (the column-parallel lm_head output)
    m      = max over the vocab         all-reduce(max) over TP
    s, t   = sum exp(l - m), l[target]-m  one all-reduce(sum) over TP of both (t is 0 on the
                                        ranks that do not hold the target's column)
    loss   = mean over non-ignored tokens of log s - t
    dloss/dl = softmax(l) - onehot(target): local, no communication in backward

Custom (`vocab_parallel_cross_entropy`) and DTensor (`dtensor_cross_entropy` under
`torch.distributed.tensor.parallel.loss_parallel`) side by side, each the model's
`head_loss` seam (model/loss.py) under loss parallelism. With --loss_chunks both run the
model's chunked loss on this rank's rows of the head (its vocabulary slice): the max and
the [sum exp, target logit] all-reduced over TP per chunk, the head's input gathered
once (its gradient, each rank's partial sum, summed over TP as the head's would be).
"""
import torch
from torch.distributed.tensor import DTensor, Partial, Replicate

from nanodist.model.loss import HeadLoss, chunked_cross_entropy, cross_entropy, target_columns


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, group, ignore_index):
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # fp32 at least
        vocab_local = logits.size(-1)
        local_target, target_here, valid = target_columns(targets, group.rank * vocab_local, vocab_local,
                                                          ignore_index)
        logits_max = logits.max(dim=-1).values
        group.all_reduce(logits_max, op="max")
        shifted = logits - logits_max.unsqueeze(-1)             # <= 0: exp cannot overflow
        exp = shifted.exp()
        target_logit = shifted.gather(-1, local_target.unsqueeze(-1)).squeeze(-1) * target_here
        sums = torch.stack([exp.sum(dim=-1), target_logit])
        group.all_reduce(sums)
        sum_exp, target_logit = sums
        count = valid.sum()
        loss = ((sum_exp.log() - target_logit) * valid).sum() / count
        ctx.save_for_backward(exp.div_(sum_exp.unsqueeze(-1)), local_target, target_here, valid, count)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        softmax, local_target, target_here, valid, count = ctx.saved_tensors
        grad = softmax
        grad.scatter_add_(-1, local_target.unsqueeze(-1), -target_here.unsqueeze(-1).to(grad.dtype))
        grad.mul_((valid * (grad_loss / count)).unsqueeze(-1))
        return grad, None, None, None


def vocab_parallel_cross_entropy(logits, targets, group, ignore_index: int = -1):
    """Mean cross entropy of local vocab-sharded logits (..., V/tp) against targets (...);
    `group`: the TP Group."""
    return _VocabParallelCrossEntropy.apply(logits.flatten(0, -2), targets.flatten(),
                                            group, ignore_index)


def dtensor_cross_entropy(logits, targets, ignore_index: int = -1):
    """The model's loss on a vocab-sharded DTensor (inside `loss_parallel()`), returned as
    a plain tensor so the trainer can add it to its running sums."""
    loss = cross_entropy(logits, targets, ignore_index)
    return loss.to_local() if isinstance(loss, DTensor) else loss


class VocabParallelHeadLoss(HeadLoss):
    """The head's loss under custom loss parallelism: `head` is a ColumnParallelLinear
    (tensor_parallel.py) leaving this rank's V/tp columns of the logits; `group` the TP group."""

    def __init__(self, group, chunks: int = 1):
        super().__init__(chunks)
        self.group = group

    def forward(self, x, head, targets):
        chunks = self.n_chunks(targets, head.weight)
        if chunks == 1:
            return vocab_parallel_cross_entropy(head(x), targets, self.group)
        return self.chunked(head.gather_input(x), head.weight, targets, chunks)

    def chunked(self, x, weight, targets, chunks: int):
        """The model's chunked loss on this rank's rows of the head: x (B, T, C) whole (SP
        gathered), its gradient each rank's partial sum."""
        return chunked_cross_entropy(x, weight, targets, chunks, vocab_start=self.group.rank * weight.size(0),
                                     all_reduce=self.group.all_reduce)


class DTensorHeadLoss(VocabParallelHeadLoss):
    """The head's loss under DTensor loss parallelism: `head` is ColwiseParallel with
    Shard(-1) logits; chunked, its input made Replicate (all-gathered under SP) with a
    Partial gradient (DTensor sums it over TP), and its weight's local rows."""

    def forward(self, x, head, targets):
        weight = head.weight.to_local()
        chunks = self.n_chunks(targets, weight)
        if chunks == 1:
            return dtensor_cross_entropy(head(x), targets)
        if not isinstance(x, DTensor):
            x = DTensor.from_local(x, self.group.device_mesh, [Replicate()], run_check=False)
        x = x.redistribute(placements=[Replicate()]).to_local(grad_placements=[Partial()])
        return self.chunked(x, weight, targets, chunks)
