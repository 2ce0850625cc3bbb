"""torch from compat.MINIMUM_TORCH on: every torch name nanodist uses exists there or goes
through compat.py, and each fallback of a newer name, forced on today's torch, gives the
primary path's results and counted bytes."""
from contextlib import contextmanager

import torch
import torch.distributed as dist

from harness import run_distributed
from nanodist import compat
from nanodist.parallel.comm import Comm
from nanodist_tools import torch_apis


def test_every_torch_name_exists_or_goes_through_compat():
    rows = torch_apis.table()
    assert len(rows) > 100  # the scan found the code's names (a broken scan finds none)
    assert not [name for name, _, _, state in rows if state == "MISSING"]
    assert {name.removeprefix("torch.distributed.") for name, *_ in rows} >= set(compat.NEWER)
    assert not [use for path in torch_apis.source_files() if path.name != "compat.py"
                for use in torch_apis.direct_uses_of_newer(path)]


@contextmanager
def older_torch(*names):
    """torch.distributed without `names`, as a torch before their release has it."""
    saved = {name: getattr(dist, name) for name in names if hasattr(dist, name)}
    for name in saved:
        delattr(dist, name)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(dist, name, value)


def _gather_and_scatter() -> dict:
    """all_gather and reduce_scatter of comm.Group on this torch, and again with the
    NEWER names hidden: outputs and counted bytes of each."""
    rank, n = dist.get_rank(), dist.get_world_size()
    piece = torch.arange(6.0) * (rank + 1) + 0.1 * rank
    runs = {}
    for path, hidden in (("primary", ()), ("fallback", tuple(compat.NEWER))):
        with older_torch(*hidden):
            comm = Comm()
            group = comm.group(dist.group.WORLD)
            gathered, scattered = torch.empty(6 * n), torch.empty(6 // n)
            group.all_gather(gathered, piece)
            group.reduce_scatter(scattered, piece)
            group.all_gather(gathered.clone(), piece, async_op=True).wait()
            runs[path] = (gathered, scattered, comm.counter.summary(),
                          compat.collective(dist, "all_gather_single").__name__)
    return runs


def test_each_fallback_equals_the_primary_path():
    for runs in run_distributed(_gather_and_scatter, 2):
        (g1, s1, counted1, name1), (g2, s2, counted2, name2) = runs["primary"], runs["fallback"]
        assert torch.equal(g1, g2) and torch.equal(s1, s2) and counted1 == counted2
        assert name2 == "all_gather_into_tensor"
        assert name1 == ("all_gather_single" if torch.__version__ >= "2.13" else "all_gather_into_tensor")
        # the values themselves: rank r's piece is arange(6) (r + 1) + 0.1 r
        full = torch.cat([torch.arange(6.0) * (r + 1) + 0.1 * r for r in range(2)])
        assert torch.equal(g1, full)


def test_the_foreach_fallbacks_equal_the_fused_kernels(monkeypatch):
    """compat.foreach_norm / foreach_mul_ where torch lacks the private _foreach_ kernels:
    one norm, one multiply per tensor. float64, values O(1), 1000 terms per norm: the two
    summation orders differ by a few ulps (1e-13 relative leaves a margin of ~100)."""
    gen = torch.Generator().manual_seed(0)
    tensors = [torch.randn(n, generator=gen, dtype=torch.float64) for n in (1000, 7, 300)]
    scale = torch.tensor(0.37, dtype=torch.float64)
    fused_norms = compat.foreach_norm(tensors, torch.float64)
    fused = [t.clone() for t in tensors]
    compat.foreach_mul_(fused, scale)
    for name in ("_foreach_norm", "_foreach_mul_"):
        monkeypatch.delattr(torch, name)
    looped = [t.clone() for t in tensors]
    compat.foreach_mul_(looped, scale)
    for got, want in zip(compat.foreach_norm(tensors, torch.float64), fused_norms):
        assert abs(got - want) <= 1e-13 * want
    assert all(torch.equal(a, b) for a, b in zip(looped, fused))  # one rounding each: the same
