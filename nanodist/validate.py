"""`python -m nanodist.plan --validate`: the cost model the planner ranks with
(nanodist/cost.py), held to what the real code allocates and sends.

For each layout, 2 or 4 gloo processes on this machine train one step of the tiny model
(custom implementation, fp32) and every rank reports

    state    bytes of parameters, gradients and AdamW moments right after optimizer.step()
             (measure.state_bytes: unique storages)
    traffic  bus bytes per collective kind: every c10d collective (measure.TrafficMode: the
             strategies' and the trainer's own loss mean) and the point-to-point sends of
             the pipeline (comm.py's counter; the dispatch mode does not see them)
    activations  the most bytes saved for backward alive at once during the step
             (measure.peak_saved_bytes: one micro-batch's, or a pipeline's in flight)

against cost.state_bytes / cost.traffic_bytes / cost.activations_in_flight of its
pipeline stage. State and traffic are exact arithmetic on shapes: their tolerance is 0.5%
(what the model leaves out: FSDP's padding to a multiple of N, DDP's one-float "used" flag
per parameter). Activations: 5% (the model counts the tensors each layer keeps; autograd
also keeps a few small ones of its own, e.g. the shapes of views). Writes
docs/plan/validation.md and validation.json; exits 1 when a prediction is off.

A simulated cluster (SIMULATED): one process plays one rank of a layout of 64 or 512
ranks over torch's fake process group (collectives return at once and move nothing) and
runs the same real code on gpt2-medium to gpt2-xl (block 64, one micro-batch of 1), held
to the same predictions. Values do not matter there: parameters start at zero (no 1.5e9
random draws; the loss stays finite) and the played rank decides about its run directory
alone.

Step time: plan.cost's prediction at this machine's calibrated speeds (`calibrate`)
against the median of TIMED_STEPS measured steps of each real layout, compared as orders
(Spearman's rho, at least RHO_MIN): a CPU's absolute times say little about a GPU's.
"""
import json
import os
import socket
import statistics
import tempfile
import time
from dataclasses import asdict
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from tqdm import tqdm

from nanodist import cost
from nanodist.config import UserError, parse_args
from nanodist.cost import Layout
from nanodist.model import GPTConfig

TOLERANCE = {"activations": 0.05}  # every other quantity: EXACT
EXACT = 0.005
LAYOUTS = [
    Layout("ddp2", dp=2),
    Layout("fsdp2", dp=2, dp_type="fsdp"),
    Layout("zero2", dp=2, dp_type="fsdp", zero3=False),
    Layout("tp2-sp-lp", tp=2, sequence_parallel=True, loss_parallel=True),
    Layout("cp2", cp=2),
    Layout("pp2-1f1b", pp=2),
    Layout("pp2-gpipe-zero2", pp=2, pp_schedule="gpipe", dp=2, dp_type="fsdp", zero3=False),
    Layout("pp2-1f1b-zero3", pp=2, dp=2, dp_type="fsdp"),
    Layout("pp2-interleaved-v2", pp=2, pp_schedule="interleaved_1f1b", virtual_stages=2),
    Layout("dp2xtp2", dp=2, tp=2),
    Layout("fsdp2xtp2-sp", dp=2, tp=2, dp_type="fsdp", sequence_parallel=True),
    Layout("pp2xtp2", pp=2, tp=2),
    Layout("cp2xfsdp2", cp=2, dp=2, dp_type="fsdp"),
]
MICRO_STEPS = 4  # per optimizer step: M of the pipeline (a multiple of P for interleaving)
TIMED_STEPS = 5
RHO_MIN = 0.48  # Spearman: P(rho >= 0.48 | unrelated orders) < 5% for 13 layouts
CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
SIMULATED = [  # (layout, model); played: the first rank of the first and of the last stage
    (Layout("fsdp64", dp=64, dp_type="fsdp"), "gpt2-xl"),
    (Layout("fsdp16xtp4-sp-lp", dp=16, tp=4, dp_type="fsdp", sequence_parallel=True,
            loss_parallel=True), "gpt2-large"),
    (Layout("pp8xfsdp8", pp=8, dp=8, dp_type="fsdp"), "gpt2-xl"),
    (Layout("fsdp64xtp8", dp=64, tp=8, dp_type="fsdp", sequence_parallel=True), "gpt2-medium"),
    (Layout("pp8xfsdp64-zero2", pp=8, dp=64, dp_type="fsdp", zero3=False), "gpt2-xl"),
    (Layout("pp4xdp32xtp4", pp=4, dp=32, tp=4), "gpt2-large"),
    (Layout("cp8xfsdp64", cp=8, dp=64, dp_type="fsdp"), "gpt2-xl"),
]


def run_argv(layout: Layout, data_dir: str, out_dir: str, model: str = "tiny", block_size: int = 32,
             micro_batch: int = 2, micro_steps: int = MICRO_STEPS) -> list[str]:
    """train.py's flags of the measured step (char-level data): by default the tiny
    model, 4 micro-batches of 2 x 32 tokens."""
    return ["--device=cpu", f"--model={model}", "--dataset=shakespeare_char", f"--data_dir={data_dir}",
            f"--block_size={block_size}", f"--batch_size={micro_batch}",
            f"--total_batch_size={micro_batch * block_size * layout.dp * micro_steps}",
            "--max_steps=1", "--warmup_steps=0", f"--out_dir={out_dir}", *layout.flags()]


def measure(argv: list[str], timed_steps: int = 0) -> dict:
    """Rank side: one optimizer step; this rank's state, activation and bus bytes per
    kind; then the median time of `timed_steps` more steps (none: no time)."""
    from nanodist.measure import TrafficMode, peak_saved_bytes, state_bytes
    from nanodist.parallel import comm
    from nanodist.trainer import Trainer
    trainer = Trainer(parse_args(argv))
    state = {}
    hook = trainer.optimizer.register_step_post_hook(
        lambda opt, *_: state.update(state_bytes(trainer.par.model, opt)))
    with TrafficMode() as traffic, comm.counting() as counted, peak_saved_bytes() as saved:
        trainer.train_step(0)
    hook.remove()
    bus = {kind: v["bus_bytes"] for kind, v in traffic.counter.summary().items()}
    if "send" in counted.bus_bytes:
        bus["send"] = counted.bus_bytes["send"]
    times = []
    for step in range(1, timed_steps + 1):
        start = time.perf_counter()
        trainer.train_step(step)
        times.append(time.perf_counter() - start)
    return {"rank": trainer.mesh.rank, "pp_rank": trainer.mesh.pp_rank, "state": state["total"],
            "traffic": bus, "activations": saved["bytes"], "micro_batch": trainer.cfg.batch_size,
            "grad_accum": trainer.grad_accum, "model": asdict(trainer.model_cfg),
            "step_s": statistics.median(times) if times else None,
            "flops_per_step": trainer.flops_per_step}


def compare(layout: Layout, measured: list[dict]) -> list[dict]:
    """Per rank and quantity: measured, predicted, their ratio and whether it is within TOLERANCE."""
    rows = []
    for m in measured:
        cfg, b, accum, stage = GPTConfig(**m["model"]), m["micro_batch"], m["grad_accum"], m["pp_rank"]
        predicted = {"state": cost.state_bytes(cfg, layout, stage)["total"],
                     "activations": cost.activations_in_flight(cfg, layout, b, accum, stage),
                     **cost.traffic_bytes(cfg, layout, b, accum, "float32", "cpu", stage)}
        got = {"state": m["state"], "activations": m["activations"], **m["traffic"]}
        for what in sorted(set(predicted) | set(got)):
            p, g = predicted.get(what, 0.0), got.get(what, 0.0)
            ratio = g / p if p else (1.0 if g == 0 else float("inf"))
            rows.append({"layout": layout.name, "ranks": layout.world, "rank": m["rank"], "what": what, "measured": g,
                         "predicted": p, "ratio": ratio,
                         "ok": abs(ratio - 1) <= TOLERANCE.get(what, EXACT)})
    return rows


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank, world, port, out_dir, work, *args):
    torch.set_num_threads(1)  # the processes share the machine's cores
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        Path(out_dir, f"{rank}.json").write_text(json.dumps(work(*args)))
    finally:
        dist.destroy_process_group()


def _on_processes(world: int, work, *args) -> list:
    """work(*args) on `world` fresh gloo processes: what each returned, rank by rank."""
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(_rank_main, args=(world, _free_port(), tmp, work, *args),
                           nprocs=world, start_method="spawn")
        return [json.loads(Path(tmp, f"{r}.json").read_text()) for r in range(world)]


def run_layout(layout: Layout, data_dir: str) -> list[dict]:
    """Measure `layout` (and time TIMED_STEPS steps) on layout.world fresh processes."""
    with tempfile.TemporaryDirectory() as tmp:
        return _on_processes(layout.world, measure, run_argv(layout, data_dir, str(Path(tmp) / "run")),
                             TIMED_STEPS)


def _all_reduce_seconds(numel: int, repeats: int) -> float:
    x = torch.ones(numel)
    for _ in range(3):
        dist.all_reduce(x)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        dist.all_reduce(x)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def calibrate(data_dir: str) -> tuple[float, float, dict[int, float]]:
    """This machine's speeds for the step-time predictions: the FLOP/s one process
    reaches training the tiny model (the measured layouts' step; N processes on fewer
    cores share them), gloo's bus bytes/s in an all-reduce of 4 MiB between 2, and the
    time of a 4-byte all-reduce among N processes (the latency of a call; beyond the
    cores, the processes take turns on them)."""
    one = run_layout(Layout("one process"), data_dir)[0]
    seconds = _on_processes(2, _all_reduce_seconds, 2**20, 20)
    bus_bytes = cost.BUS_FACTOR["all_reduce"](2) * 4 * 2**20
    latency = {n: max(_on_processes(n, _all_reduce_seconds, 1, 50))
               for n in sorted({layout.world for layout in LAYOUTS})}
    return one["flops_per_step"] / one["step_s"], bus_bytes / max(seconds), latency


def predicted_step_s(layout: Layout, m: dict, speed: tuple) -> float:
    """plan.cost's step time of the measured step, at this machine's calibrated speeds."""
    from nanodist import plan
    args = plan.build_parser().parse_args([
        "--model=tiny", f"--gpus={layout.world}", f"--gpus_per_node={layout.world}",
        f"--block_size={m['model']['block_size']}", "--dtype=float32",
        f"--total_batch_size={m['micro_batch'] * m['model']['block_size'] * layout.dp * layout.cp * m['grad_accum']}"])
    flop_s, bus_s, latency = speed
    shared = flop_s * min(1.0, CORES / layout.world)
    return plan.cost(args, GPTConfig(**m["model"]), layout, m["micro_batch"], m["grad_accum"],
                     speed=(shared, bus_s, bus_s, latency[layout.world]))["step_time_s"]


def spearman(xs: list[float], ys: list[float]) -> float:
    """Rank correlation: Pearson's r of the ranks, equal values sharing their mean rank
    (the model predicts the same time for layouts it cannot tell apart, e.g. DDP and
    FSDP on 2 ranks)."""
    def ranks(values):
        order = sorted(values)
        return [order.index(v) + (order.count(v) - 1) / 2 for v in values]
    return statistics.correlation(ranks(xs), ranks(ys))


def _play_rank(_, world: int, rank: int, argv: list[str], out_file: str):
    from torch.testing._internal.distributed.fake_pg import FakeStore
    from nanodist.model import GPT
    from nanodist.trainer import Trainer
    from nanodist.parallel import comm
    GPT.initial_value = lambda self, name, seed, shape: torch.zeros(shape)  # finite, cheap
    Trainer._decided_by_rank0 = lambda self, decide: decide()
    send_recv = comm.send_recv

    def send_recv_zeros(sends, recvs, group, async_op=False):  # the fake group receives
        for tensor, _ in recvs:  # nothing: zeros rather than uninitialised (NaN) memory
            tensor.zero_()
        return send_recv(sends, recvs, group, async_op)
    comm.send_recv = send_recv_zeros
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)
    try:
        Path(out_file).write_text(json.dumps(measure(argv)))
    finally:
        dist.destroy_process_group()


def simulate(layout: Layout, model: str, data_dir: str, ranks: list[int] | None = None) -> list[dict]:
    """Play `ranks` of `layout` (default: the first rank of the first and of the last
    pipeline stage), each in a fresh process over the fake process group, on `model`
    with one micro-batch of 1 x 64 tokens (M = P: the least a pipeline runs)."""
    ranks = ranks or sorted({0, (layout.pp - 1) * layout.world // layout.pp})
    measured = []
    with tempfile.TemporaryDirectory() as tmp:
        for rank in ranks:
            argv = run_argv(layout, data_dir, str(Path(tmp) / f"run{rank}"), model, block_size=64,
                            micro_batch=1, micro_steps=layout.pp) + ["--deferred_init"]
            out_file = str(Path(tmp) / f"{rank}.json")
            mp.start_processes(_play_rank, args=(layout.world, rank, argv, out_file), nprocs=1,
                               start_method="spawn")
            measured.append(json.loads(Path(out_file).read_text()))
    return measured


def report(rows: list[dict], times: list[dict], rho: float, speed: tuple[float, float]) -> str:
    """Markdown: every rank's prediction per quantity, then the step times."""
    out = ["# Planner validation: predicted against measured, per rank\n",
           __doc__.split("\n\n", 1)[1].strip() + "\n", "![predicted against measured](validation.png)\n",
           "| layout | ranks | rank | what | measured bytes | predicted bytes | measured / predicted | within tolerance |",
           "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['layout']} | {r['ranks']} | {r['rank']} | {r['what']} | {r['measured']:,.0f} | "
                   f"{r['predicted']:,.0f} | {r['ratio']:.4f} | {'yes' if r['ok'] else 'NO'} |")
    out += ["\n## Step time: the predicted order against the measured one\n",
            f"plan.cost's step time at this machine's calibrated speeds ({speed[0] / 1e9:.2f} GFLOP/s "
            f"a process, shared by the processes beyond its {CORES} cores; gloo "
            f"{speed[1] / 1e9:.2f} GB/s of all-reduce bus bytes; a collective call "
            + ", ".join(f"{s * 1e6:.0f} us among {n}" for n, s in speed[2].items())
            + ") against the median of "
            f"{TIMED_STEPS} measured steps of the real layouts. Spearman's rank correlation "
            f"rho = {rho:.2f} over {len(times)} layouts (required: >= {RHO_MIN}, the one-sided 5% "
            f"critical value for 13 layouts).\n",
            "| layout | ranks | measured ms | predicted ms | measured / predicted |", "|---|---|---|---|---|"]
    for t in sorted(times, key=lambda t: t["measured_s"]):
        out.append(f"| {t['layout']} | {t['ranks']} | {t['measured_s'] * 1e3:.1f} | "
                   f"{t['predicted_s'] * 1e3:.1f} | {t['measured_s'] / t['predicted_s']:.2f} |")
    return "\n".join(out) + "\n"


def plot(rows: list[dict], times: list[dict], path: Path):
    """Predicted against measured, log-log: bytes per quantity (real and simulated), times."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 5.5))
    for what in sorted({r["what"] for r in rows}):
        for simulated, marker in ((False, "o"), (True, "^")):
            pts = [(r["predicted"], r["measured"]) for r in rows if r["what"] == what
                   and (r["ranks"] >= 64) == simulated and r["predicted"] > 0]
            if pts:
                left.scatter(*zip(*pts), marker=marker, s=18, label=f"{what}{' (simulated)' if simulated else ''}")
    for ax, unit in ((left, "bytes"), (right, "s")):
        ax.set_xscale("log"), ax.set_yscale("log")
        ax.set_xlabel(f"predicted ({unit})"), ax.set_ylabel(f"measured ({unit})")
    lo, hi = left.get_xlim()
    left.plot([lo, hi], [lo, hi], "k--", lw=0.8)
    left.set_title("bytes per rank: 2-4 gloo processes (o), 64-512 fake ranks (^)")
    left.legend(fontsize=7)
    right.scatter([t["predicted_s"] for t in times], [t["measured_s"] for t in times])
    for t in times:
        right.annotate(t["layout"], (t["predicted_s"], t["measured_s"]), fontsize=6)
    right.set_title("step time, tiny model on this CPU")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(data_dir: str, out_dir: str, names: list[str] | None = None) -> int:
    if not Path(data_dir, "train.bin").exists():
        raise UserError(f"--data_dir {data_dir} holds no prepared shakespeare_char: run "
                        f"python data/shakespeare_char/prepare.py --out_dir {data_dir}")
    speed = calibrate(data_dir)
    runs = [(layout, partial(run_layout, layout, data_dir)) for layout in LAYOUTS]
    runs += [(layout, partial(simulate, layout, model, data_dir)) for layout, model in SIMULATED]
    rows, times = [], []
    for layout, run in tqdm([(l, r) for l, r in runs if not names or l.name in names],
                            desc="layouts", unit="layout"):
        measured = run()
        new = compare(layout, measured)
        rows += new
        worst = max(new, key=lambda r: abs(r["ratio"] - 1))
        tqdm.write(f"{layout.name:20s} {layout.world:4d} ranks, worst {worst['what']} on rank "
                   f"{worst['rank']}: {worst['ratio']:.4f}")
        if measured[0]["step_s"] is not None:  # the slowest rank is the step
            times.append({"layout": layout.name, "ranks": layout.world,
                          "measured_s": max(m["step_s"] for m in measured),
                          "predicted_s": predicted_step_s(layout, measured[0], speed)})
    rho = spearman([t["predicted_s"] for t in times], [t["measured_s"] for t in times])
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "validation.json").write_text(json.dumps({"calibration": dict(zip(("flop_s", "bus_bytes_s", "latency_s"), speed)),
                                                     "bytes": rows, "step_time": times, "spearman": rho},
                                                    indent=1) + "\n")
    (out / "validation.md").write_text(report(rows, times, rho, speed))
    plot(rows, times, out / "validation.png")
    failed = [r for r in rows if not r["ok"]]
    for r in failed:
        print(f"off: {r['layout']} rank {r['rank']} {r['what']}: measured {r['measured']:,.0f}, "
              f"predicted {r['predicted']:,.0f}")
    print(f"{len(rows) - len(failed)} of {len(rows)} byte predictions within tolerance; step-time "
          f"order: Spearman rho {rho:.2f} over {len(times)} layouts (>= {RHO_MIN} required); "
          f"report in {out / 'validation.md'}")
    return 1 if failed or (len(times) >= 3 and rho < RHO_MIN) else 0
