"""Ulysses sequence parallelism for the attention core, by hand (DeepSpeed-Ulysses;
Megatron's cp_comm_type "a2a").

Like ring attention (context_parallel.py), each of the P ranks of the Ulysses group holds
a piece of every sequence and everything but attention stays local to its tokens. For
attention it trades the split instead of passing K/V around: one all-to-all turns "all
heads, my tokens" into "my heads, all tokens", the inner core attends over the whole
sequence with H/P heads, and one all-to-all turns the output back:

    rank r, T_l = s/P tokens     q, k, v (B, H, T_l, d)          heads 0..H, tokens r T_l..(r+1) T_l
      all-to-all (q, k, v stacked, one call)
                                 q, k, v (B, H/P, P T_l, d)      heads r H/P..(r+1) H/P, all tokens
      inner(q, k, v)          -> out (B, H/P, P T_l, d)
      all-to-all              -> out (B, H, T_l, d)              back to this rank's tokens

Rank j's tokens land at position j of the inner core's sequence, so the tokens a rank
holds must be a contiguous piece of the sequence the inner core expects, in group-rank
order. Pure Ulysses: the inner core sees the whole sequence in natural order, and causal
attention is just the model's own causal core (any T_l, no zigzag needed: every rank does
the same work, H/P heads of the full triangle). Hybrid (Megatron's "a2a+p2p"): Ulysses
inside, ring across; the inner core is a RingAttention over the ring group, and the
Ulysses ranks of one ring rank hold consecutive pieces of that ring rank's chunks.

Traffic per layer and rank (b micro-batch, s full sequence, h hidden size: h/tp with
TP, the heads this TP rank holds): forward 3 b s h/P values of q, k, v in and b s h/P of
the output, 4 b s h/P in all, (P-1)/P of them leaving the rank; backward the same (each
all-to-all's gradient is the reverse all-to-all). Ring attention sends 2 b s h (C-1)/C
per rank forward whatever C; Ulysses's fall as 1/P, but P cannot exceed the heads.

PyTorch (2.13) has no Ulysses of its own (its context parallelism is ring attention; its
`_RotateMethod.ALL_TO_ALL` passes the ring's K/V): this is the one implementation.
"""
import torch
import torch.nn as nn

from nanodist.parallel.comm import Group


def _all_to_all(x: torch.Tensor, group: Group, to_heads: bool) -> torch.Tensor:
    """(..., H, T_l, d) -> (..., H/P, P T_l, d) if `to_heads`, else the inverse. Equal
    splits on a leading dim of P: piece j goes to rank j, piece j received is rank j's."""
    P = group.size
    if to_heads:  # head group j to rank j
        send = x.unflatten(-3, (P, x.size(-3) // P)).movedim(-4, 0)
    else:  # token chunk j (rank j's tokens) back to rank j
        send = x.unflatten(-2, (P, x.size(-2) // P)).movedim(-3, 0)
    send = send.contiguous()
    received = torch.empty_like(send)  # (P, ..., H/P, T_l, d): received[j] is rank j's piece
    group.all_to_all(received, send, [1] * P, [1] * P)
    if to_heads:  # rank j's tokens at position j of the sequence
        return received.movedim(0, -3).flatten(-3, -2)
    # head group j at position j, stored token-major (B, T_l, H, d) as SDPA's own output is:
    # the model's transpose back to (B, T_l, C) is then free (no copy)
    by_token = received.movedim(0, -4).movedim(-2, -4).contiguous().flatten(-3, -2)
    return by_token.transpose(-3, -2)


class _UlyssesAllToAll(torch.autograd.Function):
    """sequence -> heads (`to_heads`) or heads -> sequence; backward the other one."""

    @staticmethod
    def forward(ctx, x, group: Group, to_heads: bool):
        ctx.group, ctx.to_heads = group, to_heads
        return _all_to_all(x, group, to_heads)

    @staticmethod
    def backward(ctx, grad):
        return _UlyssesAllToAll.apply(grad, ctx.group, not ctx.to_heads), None, None


def sequence_to_heads(x: torch.Tensor, group: Group) -> torch.Tensor:
    """(..., H, T_l, d): all heads, this rank's tokens -> (..., H/P, P T_l, d): heads
    [r H/P, (r+1) H/P), the tokens of every rank in group-rank order. One all-to-all."""
    return _UlyssesAllToAll.apply(x, group, True)


def heads_to_sequence(x: torch.Tensor, group: Group) -> torch.Tensor:
    """The inverse of `sequence_to_heads`: (..., H/P, P T_l, d) -> (..., H, T_l, d)."""
    return _UlyssesAllToAll.apply(x, group, False)


class UlyssesAttention(nn.Module):
    """Drop-in for the model's attention core (q, k, v (B, heads, T_l, d) -> out) over a
    Ulysses group; `inner` attends over the gathered sequence (B, heads/P, P T_l, d): the
    model's causal core, or a RingAttention over another group (the hybrid)."""

    def __init__(self, inner: nn.Module, group: Group):
        super().__init__()
        self.inner, self.group = inner, group

    def forward(self, q, k, v):
        heads, P = q.size(1), self.group.size
        if heads % P:
            raise ValueError(f"Ulysses: the {heads} attention heads (of this TP rank) cannot be "
                             f"split over {P} ranks: the head count must be divisible by the "
                             "Ulysses degree")
        # one all-to-all for q, k, v together: a third of the calls, the same bytes
        q, k, v = sequence_to_heads(torch.stack([q, k, v]), self.group).unbind(0)
        return heads_to_sequence(self.inner(q, k, v), self.group)


def ulysses_sends(B: int, T_l: int, width: int, u: int, value_bytes: int) -> tuple[int, int]:
    """(calls, payload bytes) of one Ulysses layer's all-to-alls in one forward + backward
    per rank, as comm.py counts them: 2 forward (q, k, v stacked; the output) and their 2
    gradients backward, each payload the bytes of its input, 4 B T_l width values per
    direction (width = H d, this TP rank's heads; `value_bytes` the dtype of q, k, v).
    (u-1)/u of it leaves the rank (comm.py's bus bytes). A group of one sends nothing."""
    if u == 1:
        return 0, 0
    return 4, 2 * 4 * B * T_l * width * value_bytes
