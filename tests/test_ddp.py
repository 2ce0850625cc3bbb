"""Data parallel: custom DDP against PyTorch's DDP (bitwise) and against one process."""
from contextlib import nullcontext

import pytest
import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

from harness import (assert_printed_losses_match, assert_records_match, run_distributed, run_train,
                     tiny_run, trainer_records)
from nanodist.model.gpt import GPT, GPTConfig
from nanodist.model.loss import cross_entropy
from nanodist.parallel.comm import Comm
from nanodist.parallel.ddp import DataParallel
from nanodist.parallel.engines import native_ddp
from nanodist.parallel.layout import Layout
from nanodist.parallel.mesh import build_mesh

CPU = torch.device("cpu")
TINY = GPTConfig(block_size=32, vocab_size=128, n_layer=2, n_head=4, n_embd=64)


def global_batch(step: int, n_seq: int):
    tokens = torch.randint(0, TINY.vocab_size, (n_seq, TINY.block_size + 1),
                           generator=torch.Generator().manual_seed(step))
    return tokens[:, :-1], tokens[:, 1:]


def micro_batch(step, micro, accum, dp_size, dp_rank, per_rank=2):
    """Slot micro * dp_size + dp_rank of the global batch (the layout of nanodist.data.loader)."""
    x, y = global_batch(step, per_rank * accum * dp_size)
    slot = slice((micro * dp_size + dp_rank) * per_rank, (micro * dp_size + dp_rank + 1) * per_rank)
    return x[slot], y[slot]


def adamw(model):
    return torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)


# ---- custom vs PyTorch DDP: bitwise ----

def custom_vs_native(steps: int, accum: int):
    mesh = build_mesh(Layout(dp=torch.distributed.get_world_size()), CPU)
    custom = GPT(TINY, seed=1 + mesh.rank)  # each rank draws its own: the broadcast decides
    ddp = DataParallel(custom.parameters(), mesh.dp, bucket_cap_mb=0.05)
    native = native_ddp(GPT(TINY, seed=1 + mesh.rank), mesh.dp, CPU, bucket_cap_mb=25)
    reference = GPT(TINY, seed=1)
    checks = {"initial": all(torch.equal(a, b) and torch.equal(a, c) for a, b, c in zip(
        custom.parameters(), native.module.parameters(), reference.parameters())),
        "logits": [], "grads": [], "params": []}
    opt_c, opt_n = adamw(custom), adamw(native)
    for step in range(steps):
        for micro in range(accum):
            x, y = micro_batch(step, micro, accum, mesh.dp.size, mesh.dp.rank)
            logits = []
            for model, no_sync in ((custom, ddp.no_sync), (native, native.no_sync)):
                with (nullcontext() if micro == accum - 1 else no_sync()):
                    logits.append(model(x))
                    (cross_entropy(logits[-1], y) / accum).backward()
            checks["logits"].append(torch.equal(*logits))
            checks["grads"].append(all(torch.equal(a.grad, b.grad) for a, b in zip(
                custom.parameters(), native.module.parameters())))
        for opt in (opt_c, opt_n):
            opt.step()
            opt.zero_grad(set_to_none=True)
        checks["params"].append(all(torch.equal(a, b) for a, b in zip(
            custom.parameters(), native.module.parameters())))
    return checks, len(ddp.buckets)


def test_custom_equals_pytorch_ddp_bitwise():
    """fp32, gloo: a 2-rank all-reduce sums a + b in one order whatever the bucket
    layout, and both divide by N before summing: logits, gradients after every
    micro-step and parameters after every step are bitwise equal (torch.equal). (With 4
    ranks gloo's ring sums each element in an order set by its place in the bucket, so
    only identical bucket layouts would be bitwise alike: 4 ranks are tested against
    one process below.)"""
    for checks, n_buckets in run_distributed(custom_vs_native, 2, 3, 2):
        assert n_buckets > 1  # several buckets exercised
        assert checks["initial"], "replicas must start as DP rank 0 (broadcast)"
        assert all(checks["logits"]) and all(checks["grads"]) and all(checks["params"]), checks


# ---- DP = N against one process with the same global batch ----

def against_one_process(steps: int, accum: int, implementation: str):
    mesh = build_mesh(Layout(dp=torch.distributed.get_world_size()), CPU)
    single = GPT(TINY, seed=1)
    model = GPT(TINY, seed=1)
    if implementation == "custom":
        no_sync = DataParallel(model.parameters(), mesh.dp, bucket_cap_mb=0.05).no_sync
    else:
        model = native_ddp(model, mesh.dp, CPU, bucket_cap_mb=25)
        no_sync = model.no_sync
    # SGD: AdamW would blow up the last-bit differences of near-zero gradients to ~lr
    opt_s, opt_d = (torch.optim.SGD(m.parameters(), lr=0.5) for m in (single, model))
    losses, grad_diff = [], 0.0
    for step in range(steps):
        x, y = global_batch(step, 2 * accum * mesh.dp.size)
        loss_s = cross_entropy(single(x), y)
        loss_s.backward()
        loss_d = 0.0
        for micro in range(accum):
            xm, ym = micro_batch(step, micro, accum, mesh.dp.size, mesh.dp.rank)
            with (nullcontext() if micro == accum - 1 else no_sync()):
                loss = cross_entropy(model(xm), ym) / accum
                loss.backward()
            loss_d += loss.item()
        loss_d = torch.tensor(loss_d)
        torch.distributed.all_reduce(loss_d)
        losses.append((loss_s.item(), loss_d.item() / mesh.dp.size))
        grad_diff = max(grad_diff, max((a.grad - b.grad).abs().max().item()
                                       for a, b in zip(single.parameters(), model.parameters())))
        for opt in (opt_s, opt_d):
            opt.step()
            opt.zero_grad(set_to_none=True)
    param_diff = max((a - b).abs().max().item() for a, b in zip(single.parameters(), model.parameters()))
    return losses, grad_diff, param_diff


@pytest.mark.parametrize("world,implementation", [(2, "custom"), (4, "custom"), (4, "pytorch")])
def test_matches_one_process(world, implementation):
    """fp32: only the order of the float sums differs (per-rank means, then all-reduce).
    Measured over 4 SGD steps: losses (~4.8) within 1e-6, gradients (max ~0.1) within
    2e-8, parameters within 1.2e-7; asserted with a few ulps of margin."""
    for losses, grad_diff, param_diff in run_distributed(against_one_process, world, 4, 2, implementation):
        for loss_single, loss_dp in losses:
            assert loss_dp == pytest.approx(loss_single, abs=4e-6)
        assert grad_diff < 1e-7 and param_diff < 1e-6


# ---- buckets, one all-reduce per bucket per step, overlap with backward ----

class RecordingTransport:
    """torch.distributed, with each all-reduce's tensor noted first (Comm's transport)."""

    def __init__(self, seen):
        self.seen = seen

    def __getattr__(self, name):
        return getattr(torch.distributed, name)

    def all_reduce(self, tensor, *args, **kwargs):
        self.seen(tensor)
        return torch.distributed.all_reduce(tensor, *args, **kwargs)


def buckets_and_overlap(cap_mb: float, steps: int, accum: int):
    events = []
    record = lambda tensor: events.append(  # noqa: E731
        f"all_reduce {[b.buffer is tensor for b in ddp.buckets].index(True)}")
    mesh = build_mesh(Layout(dp=torch.distributed.get_world_size()), CPU, Comm(RecordingTransport(record)))
    model = GPT(TINY, seed=1)
    ddp = DataParallel(model.parameters(), mesh.dp, bucket_cap_mb=cap_mb)
    index = {p: i for i, p in enumerate(model.parameters())}
    layout = [[index[p] for p in bucket.params] for bucket in ddp.buckets]
    sizes = [sum(p.numel() * p.element_size() for p in bucket.params) for bucket in ddp.buckets]
    model.transformer.h[0].register_full_backward_pre_hook(
        lambda *_: events.append("backward reaches h.0"))
    calls, views = [], []
    for step in range(steps):
        for micro in range(accum):
            x, y = micro_batch(step, micro, accum, mesh.dp.size, mesh.dp.rank)
            with mesh.comm.counting() as counter, (nullcontext() if micro == accum - 1 else ddp.no_sync()):
                events.append(f"step {step} micro {micro}")
                cross_entropy(model(x), y).backward()
                events.append("backward returned")
            calls.append((counter.calls["all_reduce"], counter.payload_bytes["all_reduce"]))
        views.append(all(p.grad.untyped_storage().data_ptr() == b.buffer.untyped_storage().data_ptr()
                         for b in ddp.buckets for p in b.params))
        model.zero_grad(set_to_none=True)
    buffer_bytes = sum(b.buffer.numel() * b.buffer.element_size() for b in ddp.buckets)
    return layout, sizes, events, calls, views, buffer_bytes, len(index)


def test_buckets_one_all_reduce_each_and_overlap():
    cap_mb, steps, accum = 0.05, 2, 2
    layout, sizes, events, calls, views, buffer_bytes, n_params = \
        run_distributed(buckets_and_overlap, 2, cap_mb, steps, accum)[0]
    cap = int(cap_mb * 2**20)
    # reverse registration order, greedy under the cap (a bigger param alone)
    assert [i for bucket in layout for i in bucket] == list(range(n_params))[::-1]
    assert all(size <= cap or len(bucket) == 1 for size, bucket in zip(sizes, layout))
    assert all(size + next_size > cap for size, next_size in zip(sizes, sizes[1:]))
    assert len(layout) > 3
    # none inside no_sync; on the last micro-step one per bucket, the whole buckets
    assert calls == [(0, 0), (len(layout), buffer_bytes)] * steps
    assert all(views), "param.grad must be views into the buckets"
    # launched in bucket order, the first while backward still has block 0 to do
    for step in range(steps):
        start = events.index(f"step {step} micro {accum - 1}")
        window = events[start:events.index("backward returned", start)]
        assert [e for e in window if e.startswith("all_reduce")] == \
            [f"all_reduce {b}" for b in range(len(layout))]
        assert window.index("all_reduce 0") < window.index("backward reaches h.0")


# ---- a parameter without gradient: no hang, no corruption ----

class Branchy(nn.Module):
    """`b` is used only when asked; `never` is never used."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.never = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x, use_b: bool):
        y = self.a(x)
        return self.b(y) if use_b else y


def unused_parameters(steps: int):
    mesh = build_mesh(Layout(dp=torch.distributed.get_world_size()), CPU)
    custom, native = Branchy(), Branchy()
    ddp = DataParallel(custom.parameters(), mesh.dp)
    native = DistributedDataParallel(native, process_group=mesh.dp.process_group, find_unused_parameters=True)
    opt_c, opt_n = adamw(custom), adamw(native)
    grads_equal, params_equal, b_grad, never_grad = [], [], [], []
    for step in range(steps):
        for micro in range(2):
            use_b = {0: micro == 0 or mesh.rank == 0,  # rank 1 has b's grad from micro-step 0
                     1: micro == 1 and mesh.rank == 0,  # rank 1 has none: gets the average
                     2: False}[step]                    # nobody uses b: grad None everywhere
            x = torch.randn(4, 8, generator=torch.Generator().manual_seed(100 * step + 10 * micro + mesh.rank))
            for model, no_sync in ((custom, ddp.no_sync), (native, native.no_sync)):
                with (nullcontext() if micro == 1 else no_sync()):
                    model(x, use_b).square().mean().backward()
        grads_equal.append(all((a.grad is None and b.grad is None) or torch.equal(a.grad, b.grad)
                               for a, b in zip(custom.parameters(), native.module.parameters())))
        b_grad.append(custom.b.weight.grad)
        never_grad.append(custom.never.weight.grad)
        for opt in (opt_c, opt_n):
            opt.step()
            opt.zero_grad(set_to_none=True)
        params_equal.append(all(torch.equal(a, b) for a, b in zip(custom.parameters(), native.module.parameters())))
    return grads_equal, params_equal, b_grad, never_grad


def test_unused_parameters_neither_hang_nor_corrupt():
    """Against PyTorch's DDP(find_unused_parameters=True), 2 ranks, bitwise: a param
    unused on one rank gets the average with zeros from it; unused everywhere keeps
    grad None (AdamW then leaves it alone, as in one process)."""
    (grads0, params0, b0, never0), (grads1, params1, b1, never1) = \
        run_distributed(unused_parameters, 2, 3, timeout=60)
    assert all(grads0 + params0 + grads1 + params1)
    assert all(torch.equal(x, y) for x, y in zip(b0[:2], b1[:2]))
    assert b0[2] is None and b1[2] is None and never0 == never1 == [None] * 3


# ---- the trainer, end to end ----

def test_trainer_matches_one_process(char_data, tmp_path):
    """Same global batch (one process: 4 micro-steps; DP=2: 2 each), AdamW, clipping on.
    float64: the bound of harness.assert_records_match after AdamW steps holds on any CPU."""
    single = trainer_records(tiny_run(char_data, tmp_path / "single", dtype="float64"))
    for implementation in ("custom", "pytorch"):
        kwargs = tiny_run(char_data, tmp_path / implementation, data_parallel_size=2,
                          data_parallel_type="ddp", implementation=implementation, dtype="float64")
        for records in run_distributed(trainer_records, 2, kwargs):
            assert_records_match(records, single, implementation)
    # the command line, as users launch it
    args = [f"--{k}={v}" for k, v in tiny_run(char_data, tmp_path / "torchrun", data_parallel_size=2,
                                                data_parallel_type="ddp", implementation="custom",
                                                dtype="float64").items()]
    result = run_train(args, nproc=2)
    assert result.returncode == 0, result.stderr
    assert_printed_losses_match(result.stdout, single)


def replicas_after_wrapping(engine_name: str):
    """Rank side: a model drawn from each rank's own seed, wrapped by the custom DDP or
    ZeRO-1 (all its parameters, or a subset: expert parallelism's experts over edp);
    returns every parameter as each rank holds it afterwards."""
    from nanodist.parallel.params import parameter_owners
    from nanodist.parallel.zero1 import ZeRO1
    mesh = build_mesh(Layout(dp=2), CPU)
    model = GPT(TINY, seed=mesh.rank)  # different on every rank
    drawn = {name: p.detach().clone() for name, p in model.named_parameters()}
    named = list(model.named_parameters())
    subset = named[::2] if engine_name.endswith("subset") else named
    if engine_name.startswith("ddp"):
        DataParallel([p for _, p in subset], mesh.dp)
    else:
        ZeRO1(subset, parameter_owners(model), mesh.dp, 25.0, {}, mesh)
    held = {name: p.detach().clone() for name, p in model.named_parameters()}
    return held, drawn, [name for name, _ in subset]


@pytest.mark.parametrize("engine", ["ddp", "ddp-subset", "zero1", "zero1-subset"])
def test_replicas_start_from_rank_0s_values(engine):
    """Whatever each rank drew, the replicas of what an engine holds start as DP rank 0's;
    what it does not hold stays each rank's own."""
    (held_0, drawn_0, names), (held_1, drawn_1, _) = run_distributed(replicas_after_wrapping, 2, engine)
    for name in held_0:
        assert torch.equal(held_0[name], drawn_0[name]), name
        assert torch.equal(held_1[name], drawn_0[name] if name in names else drawn_1[name]), name
    assert not torch.equal(drawn_0["transformer.wte.weight"], drawn_1["transformer.wte.weight"])  # they differed
