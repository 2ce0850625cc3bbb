"""Custom FSDP (ZeRO-3 / ZeRO-2) and FSDP2 against each other and against one process."""
import dataclasses
import weakref
from contextlib import nullcontext

import pytest
import torch

from harness import assert_records_match, run_distributed, tiny_run, trainer_records
from nanodist import compat
from nanodist.run.config import TrainConfig
from nanodist.model.gpt import GPT, GPTConfig
from nanodist.parallel.engines import fsdp2_no_sync
from nanodist.parallel.layout import Layout
from nanodist.parallel.mesh import Mesh, build_mesh
from nanodist.parallel.parallelize import Setup, parallelize
from nanodist.parallel.params import FlatParams, full_state_dict
from nanodist.run.trainer import Trainer

MODEL = GPTConfig(block_size=32, vocab_size=128, n_layer=2, n_head=4, n_embd=64)
# n_embd 42: each block's no-decay flat (546 values) needs padding on 4 ranks
ODD_MODEL = GPTConfig(block_size=32, vocab_size=128, n_layer=2, n_head=2, n_embd=42)
GLOBAL_BATCH, ACCUM, STEPS, SEED = 8, 2, 3, 1234
CPU = torch.device("cpu")


def _batch(step, micro, dp_size, dp_rank, model_cfg):
    """The global micro-batch of (step, micro), the same for every layout; DP rank's rows."""
    g = torch.Generator().manual_seed(1000 * step + micro)
    data = torch.randint(model_cfg.vocab_size, (GLOBAL_BATCH, model_cfg.block_size + 1), generator=g)
    rows = data.chunk(dp_size)[dp_rank]
    return rows[:, :-1], rows[:, 1:]


def _fsdp_mesh(dp, **layout) -> Mesh:
    return build_mesh(Layout(dp=dp, dp_type="fsdp", **layout), CPU)


def _shard(mesh, model_cfg, deferred_init=False, dtype="float32", seed=SEED):
    """GPT(model_cfg) laid out by `mesh`'s layout: its one Stage."""
    with torch.device("meta" if deferred_init else "cpu"):
        model = GPT(model_cfg, seed=None if deferred_init else seed)
    if dtype == "float64":
        model.to(torch.float64)
    compute = torch.bfloat16 if dtype == "bfloat16" else None
    return parallelize(model, Setup(mesh, seed, compute)).parts[0]


def _full_grads(stage) -> dict:
    """name -> the full (unsharded) gradient, gathered; every rank gets it."""
    if not isinstance(stage.params, FlatParams):
        return {name: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).clone()
                for name, p in stage.gpt.named_parameters()}
    names = {id(p): name for name, p in stage.gpt.named_parameters()}
    grads = {}
    for f in stage.params.all_flats:
        full = torch.empty(f.full.numel(), dtype=f.shard.dtype)
        f.group.all_gather(full, f.shard.grad)
        for p, value in zip(f.params, f.split(full)):
            grads[names[id(p)]] = value.view(p.shape).clone()
    return grads


def _train(mesh, model_cfg=MODEL, steps=STEPS, max_norm=None, defer_sync=False, deferred_init=False,
           dtype="float32"):
    """`steps` optimizer steps of ACCUM micro-steps; losses, last step's (clipped) full
    gradients, and the final full state dict."""
    stage = _shard(mesh, model_cfg, deferred_init, dtype)
    opt = torch.optim.AdamW(stage.params.param_groups(0.1), lr=1e-2)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16")
    dp = mesh.dp
    no_sync = ((stage.params.engines[0].no_sync if isinstance(stage.params, FlatParams)
                else lambda: fsdp2_no_sync(stage.module)) if defer_sync and dp.size > 1 else None)
    losses, norms = [], []
    for step in range(steps):
        total = 0.0
        for micro in range(ACCUM):
            x, y = _batch(step, micro, dp.size, dp.rank, model_cfg)
            with (no_sync() if no_sync and micro < ACCUM - 1 else nullcontext()):
                with autocast:
                    loss = stage.module(x, targets=y) / ACCUM
                loss.backward()
            total += loss.item()
        norms.append(stage.params.clip_grad_norm(max_norm).item())
        grads = _full_grads(stage)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(torch.tensor(total, dtype=torch.float64))
    if dp.size > 1:
        losses = [torch.distributed.all_reduce(l) or l / dp.size for l in losses]
    return dict(loss=torch.stack(losses), norm=torch.tensor(norms), grads=grads,
                params=full_state_dict(stage.params, stage.gpt))


LAYOUT_FLAGS = ("implementation", "reshard_after_forward")


def _rank_train(dp, kwargs):
    layout = {k: v for k, v in kwargs.items() if k in LAYOUT_FLAGS}
    return _train(_fsdp_mesh(dp, **layout), **{k: v for k, v in kwargs.items() if k not in LAYOUT_FLAGS})


def _single(**kwargs):
    return _train(Mesh.alone(), **{k: v for k, v in kwargs.items() if k not in LAYOUT_FLAGS})


def _assert_close(a, b, **tol):
    torch.testing.assert_close(a["loss"], b["loss"], **tol)
    torch.testing.assert_close(a["norm"], b["norm"], **tol)
    for what in ("grads", "params"):
        assert a[what].keys() == b[what].keys()
        for k in a[what]:
            torch.testing.assert_close(a[what][k], b[what][k], **tol, msg=lambda m: f"{what} {k}: {m}")


def _both(dp, kwargs):
    """The custom run and the FSDP2 run of the same settings, on the same ranks."""
    return [_rank_train(dp, dict(kwargs, implementation=impl)) for impl in ("custom", "pytorch")]


def _custom64(dp, kwargs):
    return _rank_train(dp, dict(kwargs, implementation="custom", dtype="float64"))


# One process vs N ranks, in float64: the same sums in another order. A float64 sum of
# k terms differs between orders by at most k*u*sum|terms| (u = 1.1e-16); the tiny
# model's gradient sums have k <= 1024 terms of size <= 1, so delta <= 1e-13. AdamW's
# update lr*m/(sqrt(v)+eps) moves by at most lr*delta/eps for a gradient noise delta
# (its slope in g is at most 1/eps, eps = 1e-8), so after S = 3 steps at lr 1e-2 the
# parameters differ by at most S*lr*delta/eps = 3e-7 — on any CPU. (In float32 the
# same bound is 3*1e-2*1e-4/1e-8: no bound at all; hence float64.)
ONE_PROCESS_TOL = dict(rtol=0, atol=STEPS * 1e-2 * 1e-13 / 1e-8)


@pytest.mark.parametrize("reshard, deferred", [(True, False), (False, True)], ids=["zero3", "zero2-deferred"])
def test_two_ranks_match_fsdp2_bitwise_and_one_process(reshard, deferred):
    flags = dict(reshard_after_forward=reshard, deferred_init=deferred)
    custom, native = run_distributed(_both, 2, 2, flags)[0]
    # fp32, same per-parameter arithmetic, sums of two values commute: bitwise (the norm sums
    # squares over differently cut shards: float order)
    for what in ("grads", "params"):
        for k in custom[what]:
            assert torch.equal(custom[what][k], native[what][k]), (what, k)
    assert torch.equal(custom["loss"], native["loss"])
    torch.testing.assert_close(custom["norm"], native["norm"], rtol=1e-6, atol=0)
    custom64 = run_distributed(_custom64, 2, 2, flags)[0]
    _assert_close(custom64, _single(deferred_init=deferred, dtype="float64"), **ONE_PROCESS_TOL)


def test_four_ranks_padding_deferred_sync_and_clipping():
    """4 ranks, flats that need padding, grads kept unsharded over micro-steps (no_sync),
    clipping active every step: the clipped gradient is the one-process clipped gradient."""
    flags = dict(model_cfg=ODD_MODEL, defer_sync=True, max_norm=0.3, deferred_init=True,
                 dtype="float64")
    custom, native = run_distributed(_both, 4, 4, flags)[0]
    ref = _single(**flags)
    assert (ref["norm"] > 0.3).all()  # clipping did act
    _assert_close(custom, ref, **ONE_PROCESS_TOL)
    _assert_close(custom, native, **ONE_PROCESS_TOL)  # clipped: norms differ in float order


def test_bf16_mixed_precision():
    flags = dict(dtype="bfloat16", steps=1)
    custom, native = run_distributed(_both, 2, 2, flags)[0]
    ref = _single(**flags)  # one process under autocast, fp32 parameters
    # same bf16 arithmetic as FSDP2 (fp32 shards, bf16 gather, fp32 reduce-scatter)
    for what in ("grads", "params"):
        for k in custom[what]:
            assert torch.equal(custom[what][k], native[what][k]), (what, k)
    assert torch.equal(custom["loss"], native["loss"])
    # against one process (autocast over fp32 weights): one step's gradients differ by bf16
    # rounding of the weights and activations, ~1e-2 relative (measured up to 1.8e-2)
    torch.testing.assert_close(custom["loss"], ref["loss"], rtol=1e-2, atol=0)
    for k in custom["grads"]:
        err = (custom["grads"][k] - ref["grads"][k]).norm() / ref["grads"][k].norm()
        assert err < 3e-2, (k, err)


def _deferred_state(dp, impl, model_cfg):
    stage = _shard(_fsdp_mesh(dp, implementation=impl), model_cfg, deferred_init=True)
    return full_state_dict(stage.params, stage.gpt)


@pytest.mark.parametrize("impl", ["custom", "pytorch"])
def test_deferred_init_gives_the_single_process_weights(impl):
    """DESIGN.md invariant 1, bitwise: deferred init on 4 ranks (padded flats) starts from
    the weights of GPT(seed) on one process, so no two ranks drew the same shard."""
    state = run_distributed(_deferred_state, 4, 4, impl, ODD_MODEL)[0]
    expected = GPT(ODD_MODEL, seed=SEED).state_dict()
    assert state.keys() == expected.keys()
    for k in expected:
        assert torch.equal(state[k], expected[k]), k


class LiveBytes(compat.TorchDispatchMode):
    """Counts the storage bytes of the tensors created inside it that are still alive,
    after every op (CPU has no allocator statistics): `peak`, and `probe()` the largest
    value of a user function sampled at every op."""

    def __init__(self, probe=None):
        super().__init__()
        self.tensors, self.peak, self.probe, self.probe_peak = {}, 0, probe, 0

    def live(self) -> int:
        alive = [t for ref in self.tensors.values() if (t := ref()) is not None]
        return sum({t.untyped_storage()._cdata: t.untyped_storage().nbytes() for t in alive}.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in compat.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.tensors[id(t)] = weakref.ref(t)
        self.peak = max(self.peak, self.live())
        if self.probe:
            self.probe_peak = max(self.probe_peak, self.probe())
        return out


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _memory(dp, model_cfg):
    """ZeRO-3 on `dp` ranks, deferred init: bytes while initialising, during a step, between steps."""
    mesh = _fsdp_mesh(dp)
    with torch.device("meta"):
        model = GPT(model_cfg, seed=None)
    with LiveBytes() as init:  # (meta tensors count their logical bytes: made outside)
        stage = parallelize(model, Setup(mesh, SEED)).parts[0]
    [fsdp], dp_rank = stage.params.engines, stage.params.mesh.dp.rank
    unit_bytes = [_nbytes(f.full for f in unit.flats) for unit in fsdp.units]
    gathered = lambda: sum(f.full.untyped_storage().nbytes() for f in fsdp.flats)
    opt = torch.optim.AdamW(stage.params.param_groups(0.1), lr=1e-3)
    for step in range(2):
        x, y = _batch(step, 0, dp, dp_rank, model_cfg)
        with LiveBytes(gathered) as during:
            stage.module(x, targets=y).backward()
        opt.step()
        shards = [f.shard for f in fsdp.flats]
        state = _nbytes(shards) + _nbytes(s.grad for s in shards) + _nbytes(
            t for s in opt.state.values() for t in s.values() if t.dim() > 0)
        model_storage = sum(p.untyped_storage().nbytes() for p in stage.gpt.parameters())
        opt.zero_grad(set_to_none=True)
    return dict(init_peak=init.peak, shard_bytes=_nbytes(f.shard for f in fsdp.flats),
                unit_bytes=unit_bytes, gathered_peak=during.probe_peak, state=state,
                model_storage=model_storage, padding=sum(f.full.numel() - sum(f.numels) for f in fsdp.flats))


def test_memory_is_sharded():
    dp, model_cfg = 4, dataclasses.replace(ODD_MODEL, n_layer=4)
    model_bytes = 4 * sum(p.numel() for p in GPT(model_cfg).parameters())
    for m in run_distributed(_memory, dp, dp, model_cfg):
        root, blocks = m["unit_bytes"][0], sorted(m["unit_bytes"][1:])
        # between steps: shard + its grad + AdamW's two moments, 1/N of the model (+ padding)
        assert m["state"] == 4 * (model_bytes + 4 * m["padding"]) // dp
        assert m["model_storage"] == 0  # the model's parameters hold no memory between steps
        # in a step at most the root and two blocks (the current one and the prefetched) are gathered
        assert m["gathered_peak"] <= root + blocks[-1] + blocks[-2] < model_bytes
        # deferred init: the shards plus one unit unsharded (and one parameter's initial
        # value, drawn in full), never the model
        assert m["init_peak"] <= m["shard_bytes"] + max(m["unit_bytes"]) + 4 * model_cfg.vocab_size * model_cfg.n_embd
        assert m["init_peak"] < model_bytes / 2


def _state_dict_round_trip(dp, impl):
    """Train a step, gather the full state dict, load it into a differently seeded model."""
    run = _rank_train(dp, dict(implementation=impl, steps=1))
    stage = _shard(_fsdp_mesh(dp, implementation=impl), MODEL, seed=SEED + 1)
    state = [run["params"]]
    torch.distributed.broadcast_object_list(state, src=0)  # the full state dict, on every rank
    stage.params.load_full_tensors(state[0].__getitem__, stage.params.param_list())
    return run["params"], full_state_dict(stage.params, stage.gpt)


@pytest.mark.parametrize("impl", ["custom", "pytorch"])
def test_full_state_dict_round_trip(impl):
    saved, loaded = run_distributed(_state_dict_round_trip, 2, 2, impl)[0]
    assert saved.keys() == GPT(MODEL).state_dict().keys()
    for k in saved:
        assert torch.equal(saved[k], loaded[k]), k


@pytest.mark.parametrize("reduce_on_last", [False, True])
def test_trainer_end_to_end(char_data, tmp_path, reduce_on_last):
    """The issue's command, custom and pytorch, against one process (Loss/train); with
    --fsdp_reduce_on_last_micro_step the 2 micro-steps of a step reduce-scatter once."""
    single = trainer_records(tiny_run(char_data, tmp_path / "single", dtype="float64"))
    for impl in ("custom", "pytorch"):
        kwargs = tiny_run(char_data, tmp_path / impl, data_parallel_size=2, data_parallel_type="fsdp",
                          deferred_init=True, implementation=impl, dtype="float64",
                          fsdp_reduce_on_last_micro_step=reduce_on_last)
        for records in run_distributed(trainer_records, 2, kwargs):
            # float64: the bound of harness.assert_records_match holds on any CPU
            assert_records_match(records, single, impl)
    calls, flats = run_distributed(_reduce_scatters_per_step, 2, tiny_run(
        char_data, tmp_path / "count", data_parallel_size=2, data_parallel_type="fsdp",
        fsdp_reduce_on_last_micro_step=reduce_on_last))[0]
    assert calls == flats * (1 if reduce_on_last else 2)  # tiny_run: 2 micro-steps per step


def _reduce_scatters_per_step(kwargs):
    trainer = Trainer(TrainConfig(**kwargs))
    with trainer.comm.counting() as counter:
        trainer.train_step(0)
    return counter.calls["reduce_scatter"], len(trainer.params.all_flats)
