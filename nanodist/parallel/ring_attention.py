"""Ring attention by hand: the attention core of context parallelism over a ring of C
ranks, each holding two of the 2C chunks of every sequence (context_parallel.py).

The sequence is cut into 2C chunks; with the causal mask a contiguous split leaves the
first rank almost idle and the last one busy, the zigzag split pairs an early chunk with
a late one:

    2C = 8 chunks     0  1  2  3  4  5  6  7
    contiguous        r0 r0 r1 r1 r2 r2 r3 r3      rank r: chunks 2r, 2r+1
    zigzag            r0 r1 r2 r3 r3 r2 r1 r0      rank r: chunks r, 2C-1-r

The K/V of every rank travel around the ring (point-to-point through comm.py, counted)
while each rank attends with its queries to the block it holds; the partial results
merge through their log-sum-exp (online softmax), so the result is the full causal
attention. A query chunk i sees a key chunk j fully when j < i, causally (the diagonal)
when j = i, not at all when j > i:

    step s:  rank r holds K/V of rank r-s;  out_i, lse_i <- merge(out_i, lse_i, attn(q_i, k_j, v_j))
             merge(o, l, o', l') = (e^(l-L) o + e^(l'-L) o', L)   with L = log(e^l + e^l')
    backward: the K/V ring again, and dK/dV accumulators travel with them: after C steps
             every accumulator holds the contributions of every rank, one more send brings
             it home. dQ stays local.

Per rank and step: C-1 sends of K and V forward, C-1 of K and V plus C of dK and dV in
backward (B x heads x T/C x head_dim floats each). Zigzag does the same number of
attention blocks on every rank; contiguous does 2C-1 times more on the last than the first
(`attention_blocks`).
"""
import torch
import torch.nn as nn

from nanodist.parallel.comm import Group


def chunk_ids(rank: int, cp: int, zigzag: bool) -> tuple[int, int]:
    """The two (of 2C) sequence chunks rank `rank` holds, in its local order."""
    return (rank, 2 * cp - 1 - rank) if zigzag else (2 * rank, 2 * rank + 1)


def split_sequence(x: torch.Tensor, dim: int, rank: int, cp: int, zigzag: bool = True):
    """This rank's part of `x` along `dim` (the sequence): its two chunks, concatenated."""
    chunks = x.chunk(2 * cp, dim)
    return torch.cat([chunks[i] for i in chunk_ids(rank, cp, zigzag)], dim)


def attention_blocks(rank: int, cp: int, zigzag: bool) -> float:
    """Chunk-by-chunk attention work of one rank (a causal diagonal block counts 1/2)."""
    return sum(1.0 if j < i else 0.5 for src in range(cp) for i in chunk_ids(rank, cp, zigzag)
               for j in chunk_ids(src, cp, zigzag) if j <= i)


def _ring_pass(tensor: torch.Tensor, group: Group):
    """Send `tensor` to the next rank of the ring, receive the previous one's (async)."""
    n, rank = group.size, group.rank
    received = torch.empty_like(tensor)
    works = group.send_recv([(tensor, (rank + 1) % n)], [(received, (rank - 1) % n)], async_op=True)
    return received, works


def _wait(works):
    for work in works:
        work.wait()


def _scores(q, k, causal: bool, scale: float):
    """q k^T * scale in fp32 at least (flash attention's S: never rounded to bf16, whose
    2^-8 of a score of 10 would move its probability by 4%), -inf above the diagonal of a
    diagonal block."""
    acc = _accumulator(q.dtype)
    s = (q.to(acc) @ k.to(acc).transpose(-2, -1)) * scale
    if causal:  # the diagonal block: same positions on both sides
        s = s.masked_fill(torch.ones_like(s, dtype=torch.bool).triu(1), float("-inf"))
    return s


def _accumulator(dtype: torch.dtype) -> torch.dtype:
    """What the softmax, its merge and the gradient sums run in: fp32 at least, as flash
    attention does (bf16 would lose the small terms a long sum adds)."""
    return torch.promote_types(dtype, torch.float32)


class _RingAttention(torch.autograd.Function):
    """softmax(q k^T / sqrt(d), causal) v of local q, k, v (B, heads, T/C, d).

    dtypes (flash attention's): the scores S = q k^T and dP = dO v^T, the log-sum-exp merge,
    the output's running sum and dQ, dK, dV in fp32 at least; P and dS cast to the inputs'
    dtype for their matmuls with v, k and q (bf16 under autocast); the output and the
    gradients come back in the inputs' dtype. Autocast is off inside
    (the backward runs outside it anyway), so every dtype is the one written here: CUDA's
    autocast would otherwise run exp in fp32 and the matmuls in bf16, a mix the backward
    cannot follow. float32 and float64 inputs: every cast is a no-op."""

    @staticmethod
    def forward(ctx, q, k, v, group, zigzag):
        with torch.autocast(q.device.type, enabled=False):
            out, lse = _ring_forward(q, k, v, group, zigzag)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.group, ctx.zigzag = group, zigzag
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        with torch.autocast(q.device.type, enabled=False):
            return *_ring_backward(q, k, v, out, lse, dout, ctx.group, ctx.zigzag), None, None


def _ring_forward(q, k, v, group: Group, zigzag: bool):
    """(out in q's dtype, lse in fp32 at least) of this rank's queries over every K/V block."""
    cp, rank, scale, acc = group.size, group.rank, q.size(-1) ** -0.5, _accumulator(q.dtype)
    q_chunks, q_ids = q.chunk(2, dim=2), chunk_ids(rank, cp, zigzag)
    out = [torch.zeros_like(c, dtype=acc) for c in q_chunks]
    lse = [torch.full(c.shape[:-1], float("-inf"), dtype=acc, device=c.device) for c in q_chunks]
    kv = torch.stack([k, v])
    for step in range(cp):
        if step + 1 < cp:
            next_kv, works = _ring_pass(kv, group)  # overlaps this step's compute
        k_chunks, v_chunks = kv[0].chunk(2, dim=2), kv[1].chunk(2, dim=2)
        for i, qi in enumerate(q_ids):
            for j, kj in enumerate(chunk_ids((rank - step) % cp, cp, zigzag)):
                if kj > qi:
                    continue
                s = _scores(q_chunks[i], k_chunks[j], kj == qi, scale)
                new_lse = torch.logaddexp(lse[i], s.logsumexp(-1))
                p = (s - new_lse.unsqueeze(-1)).exp()
                out[i] = ((lse[i] - new_lse).exp().unsqueeze(-1) * out[i]
                          + (p.to(v.dtype) @ v_chunks[j]).to(acc))
                lse[i] = new_lse
        if step + 1 < cp:
            _wait(works)
            kv = next_kv
    return torch.cat(out, dim=2).to(q.dtype), torch.cat(lse, dim=2)


def _ring_backward(q, k, v, out, lse, dout, group: Group, zigzag: bool):
    """dq, dk, dv (the inputs' dtype): the K/V ring again, the dK/dV accumulators (fp32 at
    least) travelling with it."""
    cp, rank, scale, acc = group.size, group.rank, q.size(-1) ** -0.5, _accumulator(q.dtype)
    dout = dout.to(q.dtype)
    dq = torch.zeros_like(q, dtype=acc)
    q_ids = chunk_ids(rank, cp, zigzag)
    q_chunks, dq_chunks, dout_chunks = q.chunk(2, 2), dq.chunk(2, 2), dout.chunk(2, 2)
    lse_chunks = lse.chunk(2, 2)
    delta_chunks = (dout.to(acc) * out.to(acc)).sum(-1).chunk(2, 2)  # rowsum(dO o O) = rowsum(P o dP)
    kv, arriving = torch.stack([k, v]), None
    for step in range(cp):
        if step + 1 < cp:
            next_kv, works = _ring_pass(kv, group)
        k_chunks, v_chunks = kv[0].chunk(2, 2), kv[1].chunk(2, 2)
        dkv = torch.zeros_like(kv, dtype=acc)  # this step's part of the dK, dV of rank r-step
        dk_chunks, dv_chunks = dkv[0].chunk(2, 2), dkv[1].chunk(2, 2)
        for i, qi in enumerate(q_ids):
            for j, kj in enumerate(chunk_ids((rank - step) % cp, cp, zigzag)):
                if kj > qi:
                    continue
                p = (_scores(q_chunks[i], k_chunks[j], kj == qi, scale)
                     - lse_chunks[i].unsqueeze(-1)).exp()
                dv_chunks[j].add_(p.to(q.dtype).transpose(-2, -1) @ dout_chunks[i])
                dp = dout_chunks[i].to(acc) @ v_chunks[j].to(acc).transpose(-2, -1)  # fp32, as S
                ds = p * (dp - delta_chunks[i].unsqueeze(-1))
                ds = ds.to(q.dtype)
                dq_chunks[i].add_(ds @ k_chunks[j], alpha=scale)
                dk_chunks[j].add_(ds.transpose(-2, -1) @ q_chunks[i], alpha=scale)
        if arriving is not None:  # the accumulator of rank r-step, from the previous rank
            _wait(arriving[1])
            dkv += arriving[0]
        arriving = _ring_pass(dkv, group)
        if step + 1 < cp:
            _wait(works)
            kv = next_kv
    _wait(arriving[1])  # after C steps, one more pass: our own dK, dV come home
    dk, dv = arriving[0]
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


class RingAttention(nn.Module):
    """Drop-in for the model's attention core (q, k, v (B, heads, T/C, d) -> out)."""

    def __init__(self, group: Group, zigzag: bool = True):
        super().__init__()
        self.group, self.zigzag = group, zigzag

    def forward(self, q, k, v):
        return _RingAttention.apply(q, k, v, self.group, self.zigzag)


def ring_attention_sends(B: int, T: int, C: int, L: int, cp: int,
                         value_bytes: int = torch.float32.itemsize) -> tuple[int, int]:
    """(sends, payload bytes) of ring attention in one forward + backward per rank: per
    layer cp-1 K/V blocks forward, cp-1 K/V and cp dK/dV blocks backward, each K and V of
    B x T/cp tokens x C (C: the local width, n_embd / TP) values; K/V in the matmuls'
    dtype (`value_bytes`), the dK/dV accumulators in fp32 at least."""
    sends = L * (3 * cp - 2)
    block = 2 * B * T * C // cp
    return sends, L * block * ((2 * cp - 2) * value_bytes + cp * max(value_bytes, torch.float32.itemsize))
