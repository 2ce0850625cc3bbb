"""Ulysses attention against scaled_dot_product_attention on the whole sequence (P = 2
and 4, float64, forward and backward, bitwise), its all-to-all traffic against
`ulysses_sends`, the hybrid with ring attention, and the refusal of an uneven head split."""
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from harness import run_distributed
from nanodist.model.gpt import ScaledDotProductAttention
from nanodist.parallel.comm import Comm
from nanodist.parallel.ring_attention import RingAttention, split_sequence
from nanodist.parallel.ulysses import UlyssesAttention, ulysses_sends

B, T, D = 2, 16, 8


def _full_reference(heads: int):
    """q, k, v and an upstream gradient of the full sequence, the same on every rank (one
    seed), and SDPA's causal out, dq, dk, dv on them in one process."""
    gen = torch.Generator().manual_seed(0)
    q, k, v, probe = (torch.randn(B, heads, T, D, generator=gen, dtype=torch.float64) for _ in range(4))
    for t in (q, k, v):
        t.requires_grad_()
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    out.backward(probe)
    return (q, k, v), probe, [out.detach(), q.grad, k.grad, v.grad]


def _ulysses_vs_sdpa(heads: int):
    """Whether out, dq, dk, dv of this rank's contiguous T/P tokens equal SDPA's bitwise
    (with the largest difference, for the message), and the all-to-all counts."""
    P, rank = dist.get_world_size(), dist.get_rank()
    full, probe, reference = _full_reference(heads)
    mine = lambda t: t.detach().chunk(P, dim=2)[rank]
    local = [mine(t).requires_grad_() for t in full]
    comm = Comm()
    with comm.counting() as counted:
        out = UlyssesAttention(ScaledDotProductAttention(), comm.group(dist.group.WORLD))(*local)
        out.backward(mine(probe))
    got = [out.detach()] + [t.grad for t in local]
    return ([torch.equal(g, mine(r)) for g, r in zip(got, reference)],
            [(g - mine(r)).abs().max().item() for g, r in zip(got, reference)],
            counted.calls["all_to_all"], counted.payload_bytes["all_to_all"], counted.bus_bytes["all_to_all"])


@pytest.mark.parametrize("P,heads", [(2, 4), (4, 8)])
def test_ulysses_matches_sdpa_bitwise(P, heads):
    """Bitwise, not within a bound: the all-to-alls only move values, and the inner core is
    the same causal SDPA on the same full-length rows of each head, a head's result
    independent of which other heads share the call (CPU SDPA works head by head, its
    blocking set by T and d, the same here). Backward: the reverse all-to-alls move the
    gradients exactly. Traffic: what comm.py counts is `ulysses_sends`, 4 calls."""
    for equal, diffs, calls, payload, bus in run_distributed(_ulysses_vs_sdpa, P, heads, timeout=60):
        assert all(equal), diffs
        assert (calls, payload) == ulysses_sends(B, T // P, heads * D, P, torch.float64.itemsize)
        assert payload == 2 * 4 * B * (T // P) * heads * D * 8  # 4 B T_l H d values each way
        assert bus == payload * (P - 1) / P  # what leaves the rank


def _hybrid_vs_sdpa(heads: int, ulysses: int):
    """Ulysses over adjacent ranks inside, ring attention (zigzag) across: the largest
    |difference| of out, dq, dk, dv from SDPA on the full sequence."""
    world, rank = dist.get_world_size(), dist.get_rank()
    ring = world // ulysses
    # every rank creates every group, in the same order (torch.distributed's rule)
    u_groups = [dist.new_group(list(range(c * ulysses, (c + 1) * ulysses))) for c in range(ring)]
    r_groups = [dist.new_group(list(range(j, world, ulysses))) for j in range(ulysses)]
    ring_rank, u_rank = divmod(rank, ulysses)
    full, probe, reference = _full_reference(heads)
    # the ring rank's zigzag chunks, cut into contiguous pieces in Ulysses-rank order
    mine = lambda t: split_sequence(t.detach(), 2, ring_rank, ring).chunk(ulysses, dim=2)[u_rank]
    local = [mine(t).requires_grad_() for t in full]
    comm = Comm()
    attn = UlyssesAttention(RingAttention(comm.group(r_groups[u_rank])), comm.group(u_groups[ring_rank]))
    out = attn(*local)
    out.backward(mine(probe))
    got = [out.detach()] + [t.grad for t in local]
    return [(g - mine(r)).abs().max().item() for g, r in zip(got, reference)]


def test_hybrid_ulysses_inside_ring_across():
    """2 x 2: the ring's blockwise log-sum-exp reorders the sums, so a bound instead of
    bitwise, test_context_parallel's: float64 values O(1) over <= 16 keys, 1e-12."""
    for diffs in run_distributed(_hybrid_vs_sdpa, 4, 4, 2, timeout=60):
        assert max(diffs) < 1e-12, diffs


def test_uneven_heads_are_refused():
    """Checked before any communication: a stand-in group of two will do."""
    attn = UlyssesAttention(ScaledDotProductAttention(), SimpleNamespace(size=2, rank=0))
    q = torch.randn(1, 3, 4, D)
    with pytest.raises(ValueError, match="3 attention heads .* cannot be split over 2 ranks"):
        attn(q, q, q)
