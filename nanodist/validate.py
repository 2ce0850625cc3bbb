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
"""
import json
import socket
import tempfile
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

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


MICRO_BATCH = 2


def run_argv(layout: Layout, data_dir: str, out_dir: str) -> list[str]:
    """train.py's flags of the measured step: tiny model, micro-batches of 2 x 32 tokens."""
    return ["--device=cpu", "--model=tiny", "--dataset=shakespeare_char", f"--data_dir={data_dir}",
            "--block_size=32", f"--batch_size={MICRO_BATCH}",
            f"--total_batch_size={MICRO_BATCH * 32 * layout.dp * MICRO_STEPS}", "--max_steps=1",
            "--warmup_steps=0", f"--out_dir={out_dir}", *layout.flags()]


def measure(argv: list[str]) -> dict:
    """Rank side: one optimizer step; this rank's state bytes and bus bytes per kind."""
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
    return {"pp_rank": trainer.mesh.pp_rank, "state": state["total"], "traffic": bus,
            "activations": saved["bytes"],
            "grad_accum": trainer.grad_accum, "model": asdict(trainer.model_cfg)}


def compare(layout: Layout, measured: list[dict]) -> list[dict]:
    """Per rank and quantity: measured, predicted, their ratio and whether it is within TOLERANCE."""
    rows = []
    for rank, m in enumerate(measured):
        cfg = GPTConfig(**m["model"])
        predicted = {"state": cost.state_bytes(cfg, layout, m["pp_rank"])["total"],
                     "activations": cost.activations_in_flight(cfg, layout, MICRO_BATCH,
                                                               m["grad_accum"], m["pp_rank"]),
                     **cost.traffic_bytes(cfg, layout, MICRO_BATCH, m["grad_accum"],
                                          "float32", "cpu", m["pp_rank"])}
        got = {"state": m["state"], "activations": m["activations"], **m["traffic"]}
        for what in sorted(set(predicted) | set(got)):
            p, g = predicted.get(what, 0.0), got.get(what, 0.0)
            ratio = g / p if p else (1.0 if g == 0 else float("inf"))
            rows.append({"layout": layout.name, "rank": rank, "what": what, "measured": g,
                         "predicted": p, "ratio": ratio,
                         "ok": abs(ratio - 1) <= TOLERANCE.get(what, EXACT)})
    return rows


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank, world, port, argv, out_dir):
    torch.set_num_threads(1)  # the processes share the machine's cores
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        Path(out_dir, f"{rank}.json").write_text(json.dumps(measure(argv)))
    finally:
        dist.destroy_process_group()


def run_layout(layout: Layout, data_dir: str) -> list[dict]:
    """Measure `layout` on layout.world fresh processes; their results, rank by rank."""
    with tempfile.TemporaryDirectory() as tmp:
        argv = run_argv(layout, data_dir, str(Path(tmp) / "run"))
        mp.start_processes(_rank_main, args=(layout.world, _free_port(), argv, tmp),
                           nprocs=layout.world, start_method="spawn")
        return compare(layout, [json.loads(Path(tmp, f"{r}.json").read_text())
                                        for r in range(layout.world)])


def report(rows: list[dict]) -> str:
    """Markdown: per layout and quantity, the largest ratio's rank (all ranks in the JSON)."""
    out = ["# Planner validation: predicted against measured, per rank\n",
           __doc__.split("\n\n", 1)[1].strip() + "\n",
           "| layout | rank | what | measured bytes | predicted bytes | measured / predicted | within tolerance |",
           "|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['layout']} | {r['rank']} | {r['what']} | {r['measured']:,.0f} | "
                   f"{r['predicted']:,.0f} | {r['ratio']:.4f} | {'yes' if r['ok'] else 'NO'} |")
    return "\n".join(out) + "\n"


def main(data_dir: str, out_dir: str, names: list[str] | None = None) -> int:
    if not Path(data_dir, "train.bin").exists():
        raise UserError(f"--data_dir {data_dir} holds no prepared shakespeare_char: run "
                        f"python data/shakespeare_char/prepare.py --out_dir {data_dir}")
    rows = []
    for layout in [l for l in LAYOUTS if not names or l.name in names]:
        rows += run_layout(layout, data_dir)
        worst = max((r for r in rows if r["layout"] == layout.name), key=lambda r: abs(r["ratio"] - 1))
        print(f"{layout.name:22s} worst {worst['what']} on rank {worst['rank']}: {worst['ratio']:.4f}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "validation.json").write_text(json.dumps(rows, indent=1) + "\n")
    (out / "validation.md").write_text(report(rows))
    failed = [r for r in rows if not r["ok"]]
    for r in failed:
        print(f"off: {r['layout']} rank {r['rank']} {r['what']}: measured {r['measured']:,.0f}, "
              f"predicted {r['predicted']:,.0f}")
    print(f"{len(rows) - len(failed)} of {len(rows)} predictions within tolerance; "
          f"report in {out / 'validation.md'}")
    return 1 if failed else 0
