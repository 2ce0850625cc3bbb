"""The language-model loss: the head's logits and their cross entropy, whole or in chunks.

    plain    logits = x W^T (B T, V), fp32 log-softmax, mean over the tokens: the reference.
             Its backward holds the fp32 logits, the log-softmax and the logits' gradient at
             once: with GPT-2's V = 50304 each is 201 KB per token (gpt2 at 8 x 1024: 1.6 GB)
    chunked  the B T tokens in n chunks (Liger's FusedLinearCrossEntropy, torchtitan's
             chunked loss); per chunk c of n_c tokens:
                 forward    logits_c = x_c W^T -> lse_c = logsumexp, l_c[target];
                            keeps x, the targets and lse (4 bytes a token), never the logits
                 backward   logits_c again -> g_c = (softmax - onehot) dloss / count
                            grad x_c = g_c W,  grad W += g_c^T x_c
             only one chunk's fp32 logits (and their gradient, in place) exist at a time;
             the price is the head's forward matmul once more (2 B T C V FLOPs).

Both take the head's matmul in the autocast dtype (bf16 logits under mixed precision, as
nn.Linear's) and the softmax in fp32 at least (fp64 for fp64). The chunked function is
also the vocab-parallel one (parallel/loss_parallel.py): W may be a slice of the
vocabulary's rows [vocab_start, vocab_start + V_local), with `all_reduce(t, op)` summing
(op "sum") or maximising ("max") per-token values over the slices; here the identity.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def cross_entropy(logits, targets, ignore_index: int = -1):
    """Mean next-token loss in fp32 (fp64 for fp64 logits) over all non-ignored positions."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return F.cross_entropy(logits.flatten(0, -2), targets.flatten(),
                           ignore_index=ignore_index)


MIN_CHUNK_TOKENS = 1024  # a chunk reads all of W: with fewer tokens, reading W outweighs the matmul


def loss_chunks(chunks: int, tokens: int, vocab_rows: int, n_embd: int) -> int:
    """--loss_chunks resolved for a micro-batch of `tokens` and a head of `vocab_rows` rows
    (V, or V / tp under loss parallelism): at most one chunk a token. 0 (automatic) is
    Liger's rule, chunks whose logits are about as large as the head's input x (tokens x
    C), ceil(V / C) of them (66 for gpt2), but none under MIN_CHUNK_TOKENS tokens (gpt2
    at 64 x 1024: 64 chunks, at 8 x 1024: 8; below 2048 tokens the loss stays whole)."""
    automatic = min(math.ceil(vocab_rows / n_embd), tokens // MIN_CHUNK_TOKENS)
    return max(1, min(chunks or automatic, tokens))


def _spans(n: int, chunks: int) -> list[slice]:
    bounds = [n * i // chunks for i in range(chunks + 1)]
    return [slice(a, b) for a, b in zip(bounds, bounds[1:])]


def _identity_reduce(t: torch.Tensor, op: str):
    return None


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The head matmul's dtype: autocast's where it is on, else x's."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


def target_columns(targets, vocab_start: int, vocab_rows: int, ignore_index: int):
    """Where each target's logit is among this head's rows [vocab_start, + vocab_rows):
    its column (clamped: any, where it is elsewhere), whether it is here and counts, and
    whether it counts at all (not ignore_index)."""
    local = targets - vocab_start
    valid = targets != ignore_index
    here = (local >= 0) & (local < vocab_rows) & valid
    return local.clamp(0, vocab_rows - 1), here, valid


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, targets, chunks, ignore_index, vocab_start, all_reduce):
        """x (N, C), weight (V_local, C), targets (N,) -> the mean loss (a 0-d tensor)."""
        compute = _compute_dtype(x)
        acc = torch.promote_types(compute, torch.float32)
        local, here, valid = target_columns(targets, vocab_start, weight.size(0), ignore_index)
        x_dtype, x, w = x.dtype, x.to(compute), weight.to(compute)  # x kept as the plain head keeps it
        lse = torch.empty(len(x), dtype=acc, device=x.device)
        loss_sum = torch.zeros((), dtype=acc, device=x.device)
        for rows in _spans(len(x), chunks):
            logits = F.linear(x[rows], w).to(acc)
            m = logits.max(-1).values
            all_reduce(m, "max")
            target_logit = logits.gather(-1, local[rows].unsqueeze(-1)).squeeze(-1) * here[rows]
            sums = torch.stack([logits.sub_(m.unsqueeze(-1)).exp_().sum(-1), target_logit])
            all_reduce(sums, "sum")  # [sum of exp, the target's logit] over the vocabulary
            lse[rows] = m + sums[0].log()
            loss_sum += ((lse[rows] - sums[1]) * valid[rows]).sum()
        count = valid.sum()
        ctx.save_for_backward(x, weight, targets, lse, count)
        ctx.chunks, ctx.ignore_index, ctx.vocab_start, ctx.x_dtype = chunks, ignore_index, vocab_start, x_dtype
        return loss_sum / count

    @staticmethod
    def backward(ctx, grad_loss):
        x, weight, targets, lse, count = ctx.saved_tensors
        local, here, valid = target_columns(targets, ctx.vocab_start, weight.size(0), ctx.ignore_index)
        w = weight.to(x.dtype)
        scale = valid * (grad_loss / count.clamp(min=1))  # no token counts: zeros, as F.cross_entropy's
        grad_x = torch.empty_like(x)
        grad_w = torch.zeros_like(weight, dtype=lse.dtype)  # fp32 at least: summed over every chunk
        for rows in _spans(len(x), ctx.chunks):
            g = F.linear(x[rows], w).to(lse.dtype).sub_(lse[rows].unsqueeze(-1)).exp_()  # softmax
            g.scatter_add_(-1, local[rows].unsqueeze(-1), -here[rows].unsqueeze(-1).to(g.dtype))
            g = g.mul_(scale[rows].unsqueeze(-1)).to(x.dtype)
            grad_x[rows] = g @ w  # a partial sum under vocab parallelism
            if g.dtype == grad_w.dtype:
                grad_w.addmm_(g.t(), x[rows])  # no V x C temporary
            else:  # the compute dtype's product (bf16), summed in fp32
                grad_w += g.t() @ x[rows]
        return grad_x.to(ctx.x_dtype), grad_w.to(weight.dtype), None, None, None, None, None


def chunked_cross_entropy(x, weight, targets, chunks: int, ignore_index: int = -1,
                          vocab_start: int = 0, all_reduce=_identity_reduce):
    """The mean cross entropy of x W^T against targets, `chunks` chunks of tokens at a
    time: x (..., C), weight (V or V_local, C), targets (...)."""
    return _ChunkedLinearCrossEntropy.apply(x.flatten(0, -2), weight, targets.flatten(), chunks,
                                            ignore_index, vocab_start, all_reduce)


class HeadLoss(nn.Module):
    """The head's matmul and the loss: (x (B, T, C) after ln_f, the head, targets (B, T)) ->
    the mean cross entropy. A module without parameters, so that loss parallelism can swap
    it (as context parallelism swaps the attention core). `chunks`: 1 = the whole logits
    (the reference), n > 1 = n chunks, 0 = automatic (`loss_chunks`)."""

    def __init__(self, chunks: int = 1):
        super().__init__()
        self.chunks = chunks

    def n_chunks(self, targets: torch.Tensor, head_weight: torch.Tensor) -> int:
        """`chunks` resolved for these targets (all of a sequence-parallel x's tokens) and this
        rank's rows of the head: the same on every rank of a TP group."""
        return loss_chunks(self.chunks, targets.numel(), head_weight.size(0), head_weight.size(1))

    def forward(self, x, head, targets):
        chunks = self.n_chunks(targets, head.weight)
        if chunks == 1:
            return cross_entropy(head(x), targets)
        return chunked_cross_entropy(x, head.weight, targets, chunks)
