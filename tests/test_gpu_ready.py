"""What only a GPU run would show, caught on CPU: references kept alive, one GPU per
process, TF32 and the MFU peak, the bench's CUDA memory figure, bf16 traffic, host syncs,
and the audit of every pending async collective (no access to its buffers before wait()).
CUDA queries are monkeypatched; nothing here needs a GPU."""
import gc
import subprocess
import sys
import weakref
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode

from harness import REPO, run_distributed, tiny_run
from nanodist import compat
from nanodist.run import metrics
from nanodist.run.config import TrainConfig
from nanodist.errors import UserError
from nanodist.run.launch import pick_device
from nanodist.model.gpt import GPT, GPTConfig
from nanodist.parallel.comm import Comm
from nanodist.parallel.ddp import DataParallel
from nanodist.parallel.fsdp import FSDP, apply_fsdp
from nanodist.parallel.layout import Layout
from nanodist.parallel.mesh import Mesh, build_mesh
from nanodist.parallel.parallelize import ModelPart, Setup, apply_materialize
from nanodist.parallel.params import ModuleParams
from nanodist.parallel.tensor_parallel import apply_tp
from nanodist.run.trainer import Trainer
from nanodist_tools.layouts import BENCH
from nanodist_tools.measure import TrafficMode, peak_tensor_bytes
from nanodist.planner.traffic import traffic_bytes

sys.path.insert(0, str(REPO / "bench"))
from run import layouts_that_fit  # noqa: E402

MODEL = GPTConfig(block_size=32, vocab_size=128, n_layer=2, n_head=4, n_embd=64)
CPU = torch.device("cpu")


# ---- 1. custom TP x custom FSDP keeps no stale TP parameter alive ----

def _stale_tp_params(deferred: bool):
    """2 x 2, custom: parallelize's steps with weakrefs to the TP parameters FSDP replaces."""
    setup = Setup(build_mesh(Layout(dp=2, tp=2, dp_type="fsdp", sequence_parallel=True), CPU), seed=0)
    with torch.device("meta" if deferred else "cpu"):
        model = GPT(MODEL, seed=None if deferred else 0)
    stage = apply_tp(ModelPart(model, model, ModuleParams(model, setup.mesh)), setup)
    before = [weakref.ref(p) for p in stage.gpt.parameters()]
    stage = apply_materialize(apply_fsdp(stage, setup), setup)
    gc.collect()
    optimizer_params = {id(p) for p in stage.params.param_list()}
    sharded_over = stage.params.sharded_over
    return (sum(ref() is not None for ref in before),
            all(id(p) in optimizer_params for p in sharded_over), len(sharded_over))


@pytest.mark.parametrize("deferred", [False, True], ids=["eager", "deferred"])
def test_fsdp_over_custom_tp_drops_the_tp_parameters(deferred):
    for alive, keys_are_optimizer_params, n in run_distributed(_stale_tp_params, 4, deferred,
                                                                timeout=120):
        assert alive == 0  # FSDP's flats replaced every one of them
        assert keys_are_optimizer_params and n > 0


# ---- 2. one GPU per process ----

def _fake_gpus(monkeypatch, count: int, name: str = "NVIDIA H100 80GB HBM3"):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)


def test_pick_device_wants_one_gpu_per_local_process(monkeypatch):
    _fake_gpus(monkeypatch, 2)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert pick_device("auto") == torch.device("cuda", 1)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    for rank in ("0", "3"):  # every rank says so, not only those past the device count
        monkeypatch.setenv("LOCAL_RANK", rank)
        with pytest.raises(UserError, match="4 processes .* 2 visible.*--nproc_per_node=2"):
            pick_device("auto")
    assert pick_device("cpu") == CPU


def test_bench_skips_layouts_larger_than_the_gpu_count(monkeypatch):
    _fake_gpus(monkeypatch, 2)
    run, skipped = layouts_that_fit(BENCH, "auto")
    assert skipped == ["hsdp2x2", "dp2xtp2-lp"] and run == [n for n in BENCH if n not in skipped]
    assert layouts_that_fit(BENCH, "cpu") == (BENCH, [])  # CPU processes share the cores


# ---- 3. TF32 and the MFU peak by SKU and dtype ----

@contextmanager
def _matmul_precision(value: str):
    saved = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(value)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(saved)


@pytest.mark.parametrize("name, bf16, tf32", [
    ("NVIDIA H100 80GB HBM3", 989e12, 494.5e12),  # SXM
    ("NVIDIA H100 PCIe", 756e12, 378e12),
    ("NVIDIA H100 NVL", 835e12, 417.5e12),
    ("NVIDIA A100-SXM4-80GB", 312e12, 156e12),
    ("NVIDIA GeForce GTX 1080", None, None),      # unknown: no MFU rather than a wrong one
])
def test_peak_flops_by_sku_and_dtype(monkeypatch, name, bf16, tf32):
    _fake_gpus(monkeypatch, 1, name)
    cuda = torch.device("cuda", 0)
    with _matmul_precision("highest"):
        assert metrics.device_peak_flops(cuda, "bfloat16") == bf16
        assert metrics.device_peak_flops(cuda, "float32") is None  # CUDA cores: no figure
        assert not metrics.enable_tf32(cuda, "bfloat16") and not metrics.enable_tf32(CPU, "float32")
        assert torch.get_float32_matmul_precision() == "highest"
        assert metrics.enable_tf32(cuda, "float32")  # fp32 on CUDA runs on the tensor cores
        assert metrics.device_peak_flops(cuda, "float32") == tf32
    assert metrics.device_peak_flops(CPU, "bfloat16") is None


# ---- 4. GPU memory figures ----

def test_the_cuda_peak_is_reset_before_every_step(monkeypatch):
    resets, peaks = [], iter([100, 40])
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", resets.append)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: next(peaks))
    cuda = torch.device("cuda", 0)
    memory = metrics.StepMemory(cuda)
    seen = []
    for measure in (True, False):  # CUDA measures every step: it costs nothing
        with memory.step(measure):
            assert memory.peak is None and len(resets) == len(seen) + 1
        seen.append(memory.peak)
    assert seen == [100, 40] and resets == [cuda, cuda]  # init and checkpoints stay out


def test_bench_cuda_peak_leaves_the_other_trainers_out(monkeypatch):
    """The worker holds three Trainers: 7 MB of the others' state sit in the allocator."""
    model = nn.Linear(8, 8)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 8)).sum().backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    own = 4 * (72 + 2 * 72)  # parameters and two moments (grads are None between steps)
    others, step_rise = 7_000_000, 1234
    allocated = {"now": others + own, "peak": 0}

    def train_step(step):
        allocated["peak"] = allocated["now"] + step_rise
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: allocated["now"])
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: allocated["peak"])
    trainer = SimpleNamespace(mesh=SimpleNamespace(device=torch.device("cuda", 0)),
                              parallel=SimpleNamespace(parts=[SimpleNamespace(module=model)]),
                              params=ModuleParams(model, Mesh.alone()), optimizer=optimizer,
                              train_step=train_step)
    assert peak_tensor_bytes(trainer, 0) == own + step_rise


# ---- 6. analytic traffic under bf16 ----

def _traffic_one_step(argv):
    from nanodist.run.config import parse_args
    from nanodist.run.trainer import Trainer
    trainer = Trainer(parse_args(argv))
    with TrafficMode() as traffic:
        trainer.train_step(0)
    return {kind: v["bus_bytes"] for kind, v in traffic.counter.summary().items()}, \
        trainer.model_cfg, trainer.micro_steps


@pytest.mark.parametrize("layout", [
    Layout(dp=2, tp=2, dp_type="fsdp", reshard_after_forward=False, loss_parallel=True,
           sequence_parallel=True),
    Layout(dp=2, tp=2)], ids=["2x2-zero2-sp-lp", "2x2-ddp"])
def test_analytic_traffic_in_bf16_is_the_counted_traffic(char_data, tmp_path, layout):
    """Every collective's bytes follow from shapes and dtypes: bf16 parameters under FSDP
    make the residual stream bf16, DDP keeps it fp32 (nanodist/planner/traffic.py `value_bytes`).
    Exact but for the custom DDP's "used" flags (one fp32 per parameter tensor, 208 bytes
    in 2.6 MB: rel 1e-4, asserted within 1e-3; bf16 vs fp32 differ by > 10%). The tiny
    model's flats divide by 2 (no padding). ZeRO-2: the custom ZeRO-3 re-gathers the root
    for backward, which FSDP2 and the model do not."""
    run = tiny_run(char_data, tmp_path, dtype="bfloat16", implementation="custom")
    argv = [f"--{k}={v}" for k, v in run.items() if k != "implementation"] + layout.flags()
    for counted, model_cfg, accum in run_distributed(_traffic_one_step, 4, argv):
        analytic = traffic_bytes(model_cfg, layout, run["batch_size"], accum, "bfloat16", "cpu")
        assert counted == pytest.approx(analytic, rel=1e-3)
        assert counted != pytest.approx(traffic_bytes(model_cfg, layout, run["batch_size"],
                                                      accum, "float32"), rel=1e-3)


# ---- 7. DDP: one host sync per bucket for the parameters a rank did not use ----

class HostSyncs(compat.TorchDispatchMode):
    """Counts the reads of a tensor's value by the host (`.item()`: a CUDA sync each)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func is torch.ops.aten._local_scalar_dense.default
        return func(*args, **(kwargs or {}))


def _ddp_host_syncs():
    mesh = build_mesh(Layout(dp=torch.distributed.get_world_size()), CPU)
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8))
    ddp = DataParallel(model.parameters(), mesh.dp)
    with HostSyncs() as syncs:
        model[0](torch.ones(2, 8)).sum().backward()  # 4 parameters without gradient
    return syncs.count, len(ddp.buckets)


def test_ddp_unused_parameters_cost_one_host_sync_per_bucket():
    for syncs, buckets in run_distributed(_ddp_host_syncs, 2, timeout=60):
        assert buckets == 1 and syncs <= buckets


# ---- 7b. host syncs of a training step: one, plus one per MoE layer forward ----

class HostReads(TorchFunctionMode):
    """The calls of nanodist's own code that read a tensor's value on the host: each waits
    for the GPU (the data loader's index arithmetic on host tensors aside, data/loader.py).
    torch's own (AdamW's step counts on CPU; the fused CUDA AdamW reads none) are not ours."""
    READS = {"item", "tolist", "__bool__", "__int__", "__float__", "cpu", "numpy", "nonzero",
             "bincount", "unique", "masked_select", "repeat_interleave"}

    def __init__(self):
        super().__init__()
        self.sites = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in self.READS:
            caller = Path(sys._getframe(1).f_code.co_filename).resolve()
            if caller.is_relative_to(REPO / "nanodist") and caller.name != "loader.py":
                self.sites.append(f"{caller.name}:{sys._getframe(1).f_lineno}")
        return func(*args, **(kwargs or {}))


def _host_reads_of_a_step(kwargs) -> tuple[list[str], int, int]:
    trainer = Trainer(TrainConfig(**kwargs))
    trainer.train_step(0)
    with HostReads() as reads:
        trainer.train_step(1)
    return reads.sites, len(trainer.metrics.moe), trainer.micro_steps


@pytest.mark.parametrize("moe, ep", [(False, 1), (True, 1), (True, 2)])
def test_a_step_reads_the_device_once_plus_once_per_moe_layer(char_data, tmp_path, moe, ep):
    """Issue 29: 3 reads per step (loss, norm, stop flag) and 6 per MoE layer forward before.
    Now one copy of everything the log line needs, and per MoE layer forward under EP the
    split sizes of the uneven all-to-all (issue 31: without EP the grouped matmul takes
    its offsets on the device, none)."""
    kwargs = tiny_run(char_data, tmp_path, **(dict(moe_experts=4, moe_top_k=2, moe_every=2) if moe else {}),
                      expert_parallel_size=ep, data_parallel_size=ep)
    for sites, layers, micro_steps in run_distributed(_host_reads_of_a_step, ep, kwargs):
        assert len(sites) == 1 + (layers * micro_steps if ep > 1 else 0), sites
        assert layers == (2 if moe else 0)


# ---- 8. the audit: no access to a pending collective's buffers, nothing left pending ----

def _span(t: torch.Tensor):
    """(storage, first byte, end byte) of the memory `t` covers."""
    extent = 1 + sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))
    start = t.storage_offset() * t.element_size()
    return t.untyped_storage()._cdata, start, start + extent * t.element_size() * (t.numel() > 0)


def _overlaps(a, b) -> bool:
    return a[0] == b[0] and a[1] < b[2] and b[1] < a[2]


class CollectiveAudit(compat.TorchDispatchMode):
    """Records each async collective of comm.py from launch to wait() (its transport is an
    `AuditedTransport` of this audit): its inputs and outputs. Any op that touches a pending
    output, or writes a pending input, is a violation (on CUDA, NCCL's stream may not have
    read / written them yet); so is anything still pending when `backward()` returns."""

    def __init__(self):
        super().__init__()
        self.pending, self.violations, self.launched = {}, [], 0

    def launch(self, kind, output, input, work):
        key, self.launched = object(), self.launched + 1
        self.pending[key] = (kind, _span(input), _span(output))
        wait = work.wait
        return SimpleNamespace(wait=lambda: (self.pending.pop(key, None), wait())[1])

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.pending and not func.is_view:  # a view reads nothing
            for i, arg in enumerate(func._schema.arguments):
                value = args[i] if i < len(args) else kwargs.get(arg.name)
                writes = arg.alias_info is not None and arg.alias_info.is_write
                for t in compat.tree_leaves(value):
                    if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                        continue
                    for kind, input, output in self.pending.values():
                        if _overlaps(_span(t), output) or (writes and _overlaps(_span(t), input)):
                            self.violations.append(f"{func} {'writes' if writes else 'reads'} a "
                                                   f"buffer of a pending {kind}")
        return func(*args, **kwargs)

    def __enter__(self):
        self.backward = torch.Tensor.backward

        def backward(tensor, *args, **kwargs):
            self.backward(tensor, *args, **kwargs)
            if self.pending:
                self.violations.append(f"{len(self.pending)} collective(s) pending after backward")
        torch.Tensor.backward = backward
        return super().__enter__()

    def __exit__(self, *exc):
        torch.Tensor.backward = self.backward
        return super().__exit__(*exc)


class AuditedTransport:
    """torch.distributed for comm.Comm, each async collective reported to `audit`."""
    KINDS = {"all_reduce": "all_reduce", "broadcast": "broadcast",
             "all_gather_single": "all_gather", "reduce_scatter_single": "reduce_scatter",
             "all_gather_into_tensor": "all_gather", "reduce_scatter_tensor": "reduce_scatter"}

    def __init__(self, audit: CollectiveAudit):
        self.audit = audit

    def __getattr__(self, name):
        collective = getattr(torch.distributed, name)
        if name not in self.KINDS:
            return collective

        def call(*args, async_op=False, **kwargs):
            work = collective(*args, async_op=async_op, **kwargs)
            if not async_op:
                return work
            output, input = (args[0], args[0]) if name in ("all_reduce", "broadcast") else args[:2]
            return self.audit.launch(self.KINDS[name], output, input, work)
        return call


def _audit(layouts):
    from nanodist.run.trainer import Trainer
    planted = CollectiveAudit()  # the auditor sees a planted read of a pending output
    group = Comm(AuditedTransport(planted)).group(torch.distributed.group.WORLD)
    with planted:
        x = torch.ones(4)
        work = group.all_reduce(x, async_op=True)
        x.sum()
        work.wait()
    results = {"planted": planted.violations}
    for name, kwargs in layouts.items():
        audit = CollectiveAudit()
        trainer = Trainer(TrainConfig(**kwargs), comm=Comm(AuditedTransport(audit)))
        with audit:
            for step in range(2):  # the second gathers what the first optimizer step wrote
                trainer.train_step(step)
        results[name] = (audit.violations, audit.launched)
    return results


def test_no_access_to_a_pending_collective_s_buffers(char_data, tmp_path):
    """ZeRO-3 fp32 / bf16, ZeRO-2 with no_sync, DDP, ZeRO-1, HSDP, 2 x 2 custom TP (SP + LP)
    x FSDP."""
    run = lambda name, **kw: tiny_run(char_data, tmp_path / name, implementation="custom", **kw)
    layouts = {
        "zero3": run("zero3", data_parallel_size=4, data_parallel_type="fsdp"),
        "zero3-bf16": run("zero3-bf16", data_parallel_size=4, data_parallel_type="fsdp",
                          dtype="bfloat16"),
        "zero2-no_sync": run("zero2", data_parallel_size=4, data_parallel_type="fsdp",
                             fsdp_reshard_after_forward=False, fsdp_reduce_on_last_micro_step=True),
        "ddp": run("ddp", data_parallel_size=4, data_parallel_type="ddp"),
        "zero1": run("zero1", data_parallel_size=4, data_parallel_type="zero1"),
        "hsdp": run("hsdp", data_parallel_size=4, data_parallel_type="fsdp", data_parallel_replicas=2),
        "2x2-sp-lp": run("2x2", data_parallel_size=2, tensor_parallel_size=2,
                         data_parallel_type="fsdp", sequence_parallel=True,
                         enable_loss_parallelism=True),
    }
    for results in run_distributed(_audit, 4, layouts):
        assert any("aten.sum" in v and "reads" in v for v in results.pop("planted"))
        for name, (violations, launched) in results.items():
            assert launched > 0, name  # it did watch async collectives
            assert violations == [], (name, violations[:5])


def test_fsdp_never_frees_a_unit_whose_all_gather_is_in_flight():
    """The custom FSDP runs on one compute stream: a unit is freed after wait() only."""
    mesh = Mesh.alone()
    fsdp = FSDP(GPT(MODEL, seed=0), mesh, seed=0)
    unit = fsdp.units[1]
    unit.unshard()
    with pytest.raises(RuntimeError, match="in flight"):
        unit.reshard()
    unit.wait()
    unit.reshard()
    assert not unit.gathered


# ---- the GPU check (make gpu-check), on CPU ----

def _gpu_check(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "bench" / "gpu_check.py"), "--device", "cpu", *args],
                          cwd=REPO, capture_output=True, text=True, timeout=300)


def test_gpu_check_runs_on_cpu(char_data):
    """bench/gpu_check.py's dry run (make gpu-check on a CPU), its smallest subset: the bf16
    kernels, a strategy's code as rank 0 over the fake group, a layout against one process
    over gloo, the peak memory in the planner's band."""
    done = _gpu_check("--checks", "kernels", "paths", "layouts", "memory", "--layouts", "fsdp2-ep2")
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert sum(line.startswith("PASS kernels") for line in lines) == 2
    assert sum(line.startswith("PASS paths: fsdp2-ep2 custom") for line in lines) == 2  # fp32, bf16
    assert any(line.startswith("PASS layouts: fsdp2-ep2 custom float32") for line in lines)
    assert sum(line.startswith("PASS memory") for line in lines) == 4  # no, full, selective AC; chunked loss
    assert lines[-1].startswith("PASS: 9 passed, 0 failed")


def test_gpu_check_fails_when_nothing_was_compared_or_a_check_breaks(tmp_path):
    """Issue 29: on one GPU every layout was skipped and the check passed. Now a run that
    compares nothing fails, and a check that breaks is its FAIL line, not a traceback."""
    done = _gpu_check("--checks", "numerics", "speed", "matmuls")
    assert done.returncode == 1 and "SKIP numerics" in done.stdout
    assert done.stdout.splitlines()[-1].startswith("FAIL: 0 passed, 0 failed, 3 skipped")
    assert "nothing was compared" in done.stdout
    broken = _gpu_check("--checks", "memory", "--data_dir", str(tmp_path))  # no prepared data there
    assert broken.returncode == 1 and "FAIL memory" in broken.stdout
    assert "Traceback" not in broken.stdout.split("FAIL memory")[0] + broken.stderr


def test_make_gpu_check_with_the_given_python_installs_nothing():
    """A GPU machine without network: `make gpu-check PYTHON=python3` uses that interpreter
    (its own CUDA torch) as it is: no venv, no pip."""
    planned = subprocess.run(["make", "-n", "gpu-check", f"PYTHON={sys.executable}"], cwd=REPO,
                             capture_output=True, text=True, timeout=60)
    assert planned.returncode == 0 and "bench/gpu_check.py" in planned.stdout
    assert "pip install" not in planned.stdout and "-m venv" not in planned.stdout
    done = subprocess.run(["make", "-s", "gpu-check", f"PYTHON={sys.executable}",
                           "GPU_CHECK_FLAGS=--device cpu --checks kernels"], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("PASS kernels") == 2


@pytest.mark.parametrize("flags, says", [(["--budget_s", "-1"], "--budget_s must be > 0"),
                                         (["--speed_steps", "2"], "--speed_steps must be >= 4"),
                                         (["--json", "/nonexistent/x.json"], "cannot write a file there")])
def test_gpu_check_refuses_bad_flags_in_one_line(flags, says):
    done = _gpu_check(*flags)
    assert done.returncode == 2 and says in done.stderr and "Traceback" not in done.stderr
