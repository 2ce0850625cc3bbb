"""`python -m nanodist_tools.planner --validate`: the model the planner ranks with (cost.py,
traffic.py, plan.py), held to what the real code allocates, sends and takes.

For each layout, 2 or 4 gloo processes on this machine train one step of the tiny model
(custom implementation, fp32) and every rank reports

    state    bytes of parameters, gradients and AdamW moments right after optimizer.step()
             (measure.state_bytes: unique storages)
    traffic  bus bytes per collective kind: every c10d collective (measure.TrafficMode: the
             strategies' and the trainer's own loss mean) and the point-to-point sends of
             the pipeline (the Trainer's comm counter; the dispatch mode does not see them)
    activations  the most bytes saved for backward alive at once during the step
             (measure.peak_saved_bytes: one micro-batch's, or a pipeline's in flight)
    peak     the step's peak of live tensor bytes (metrics.StepMemory, what train.py logs)

against cost.state_bytes / traffic.traffic_bytes / cost.activations_in_flight /
plan.memory of its pipeline stage. State and traffic are exact arithmetic on shapes: their tolerance is 0.5%
(what the model leaves out: FSDP's padding to a multiple of N, DDP's one-float "used" flag
per parameter). Activations: 5% (the model counts the tensors each layer keeps; autograd
also keeps a few small ones of its own, e.g. the shapes of views). Peak: between what
lives through the step and that plus the largest transient, within plan.MEMORY_MARGIN
(the band is the prediction: the ratio shown is to its top, what train.py checks).
Writes docs/plan/validation.md and validation.json; exits 1 when a prediction is off.
Without --data_dir the steps read synthetic tokens (what is measured does not depend on
which tokens).

A simulated cluster (simulate.py): one process plays one rank of a layout of 64 or 512
ranks over torch's fake process group and runs the same real code on gpt2-medium to
gpt2-xl, held to the same predictions.

Step time: plan.estimate at this machine's calibrated profile (calibrate.py; --profile
FILE, or measured first), for the step the trainer measured (its tokens per step: CP
ranks read the same sequences), against the median of TIMED_STEPS measured steps of each
real layout: how many are within 1.5x, the median ratio (the larger over the smaller)
and Spearman's rank correlation (the goals: all, <= 1.2x, >= 0.9).
"""
import json
import statistics
import tempfile
from functools import partial
from pathlib import Path

from tqdm import tqdm

from nanodist.planner import cost, plan, traffic
from nanodist.errors import UserError
from nanodist.planner.hardware import Profile
from nanodist.model.gpt import GPTConfig
from nanodist.parallel.layout import Layout
from nanodist_tools.calibrate import calibrate, synthetic_dataset
from nanodist_tools.layouts import LAYOUTS, VALIDATION
from nanodist_tools.measure import measure_run, step_argv
from nanodist_tools.processes import on_processes
from nanodist_tools.simulate import SIMULATED, simulate

TOLERANCE = {"activations": 0.05}  # every other quantity but the peak: EXACT
EXACT = 0.005
TIMED_STEPS = 5
GOALS = {"within 1.5x": 1.5, "median": 1.2, "rho": 0.9}


def job_of(layout: Layout, m: dict, dtype: str = "float32") -> plan.Job:
    """The planner's job of a measured step (its own tokens per step)."""
    return plan.Job("tiny", GPTConfig(**m["model"]), layout.world, layout.world, m["tokens_per_step"],
                    dtype, "cpu")


def compare(name: str, layout: Layout, measured: list[dict]) -> list[dict]:
    """Per rank and quantity: measured, predicted, their ratio and whether it is within TOLERANCE."""
    rows = []
    for m in measured:
        cfg, b, accum, stage = GPTConfig(**m["model"]), m["micro_batch"], m["micro_steps"], m["pp_rank"]
        predicted = {"state": cost.state_bytes(cfg, layout, stage)["total"],
                     "activations": cost.activations_in_flight(cfg, layout, b, accum, stage),
                     **traffic.traffic_bytes(cfg, layout, b, accum, "float32", "cpu", stage)}
        got = {"state": m["state"], "activations": m["activations"], **m["traffic"]}
        for what in sorted(set(predicted) | set(got)):
            p, g = predicted.get(what, 0.0), got.get(what, 0.0)
            ratio = g / p if p else (1.0 if g == 0 else float("inf"))
            rows.append({"layout": name, "ranks": layout.world, "rank": m["rank"], "what": what,
                         "measured": g, "predicted": p, "ratio": ratio,
                         "ok": abs(ratio - 1) <= TOLERANCE.get(what, EXACT)})
        if m.get("peak") is not None:
            band = plan.memory(job_of(layout, m), layout, b, accum, stage)
            rows.append({"layout": name, "ranks": layout.world, "rank": m["rank"], "what": "peak",
                         "measured": m["peak"], "predicted": band["total"], "ratio": m["peak"] / band["total"],
                         "ok": plan.within_margin(m["peak"], band)})
    return rows


def run_layout(layout: Layout, data_dir: str) -> list[dict]:
    """Measure `layout` (and time TIMED_STEPS steps, then its peak) on layout.world fresh processes."""
    with tempfile.TemporaryDirectory() as tmp:
        return on_processes(layout.world, measure_run, step_argv(layout, data_dir, str(Path(tmp) / "run")),
                            TIMED_STEPS, True)


def predicted_step_s(layout: Layout, m: dict, profile: Profile) -> float:
    """plan.estimate's step time of the measured step at this machine's profile."""
    return plan.estimate(job_of(layout, m), profile, layout, m["micro_batch"], m["micro_steps"])["step_time_s"]


def goals(times: list[dict]) -> dict[str, float]:
    """The step-time figures: layouts within 1.5x, the median ratio, Spearman's rho."""
    off = [max(t["measured_s"] / t["predicted_s"], t["predicted_s"] / t["measured_s"]) for t in times]
    rho = spearman([t["predicted_s"] for t in times], [t["measured_s"] for t in times]) if len(times) > 2 else 1.0
    return {"within 1.5x": sum(x <= GOALS["within 1.5x"] for x in off), "layouts": len(times),
            "median": statistics.median(off) if off else 1.0, "worst": max(off, default=1.0), "rho": rho}


def spearman(xs: list[float], ys: list[float]) -> float:
    """Rank correlation: Pearson's r of the ranks, equal values sharing their mean rank
    (the model predicts the same time for layouts it cannot tell apart, e.g. DDP and
    FSDP on 2 ranks)."""
    def ranks(values):
        order = sorted(values)
        return [order.index(v) + (order.count(v) - 1) / 2 for v in values]
    return statistics.correlation(ranks(xs), ranks(ys))


def report(rows: list[dict], times: list[dict], figures: dict, profile: Profile, data: str) -> str:
    """Markdown: every rank's prediction per quantity, then the step times."""
    out = ["# Planner validation: predicted against measured, per rank\n",
           __doc__.split("\n\n", 1)[1].strip() + "\n", f"Data: {data}.\n",
           "![predicted against measured](validation.png)\n",
           "| layout | ranks | rank | what | measured bytes | predicted bytes | measured / predicted | within tolerance |",
           "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['layout']} | {r['ranks']} | {r['rank']} | {r['what']} | {r['measured']:,.0f} | "
                   f"{r['predicted']:,.0f} | {r['ratio']:.4f} | {'yes' if r['ok'] else 'NO'} |")
    out += ["\n## Step time\n",
            f"plan.estimate at the profile {profile.name} ({profile.source or 'measured first'}: "
            f"matmuls at up to {profile.peak_flops('float32') / 1e9:.0f} GFLOP/s fp32 a process, "
            f"{profile.per_layer_s * 1e3:.2f} ms of framework per layer and micro-step, "
            f"{profile.per_step_s * 1e3:.2f} ms per optimizer step, each collective's time by its "
            f"bytes and group) against the median of {TIMED_STEPS} measured steps of the real layouts: "
            f"{figures['within 1.5x']} of {figures['layouts']} within 1.5x (goal: all), median "
            f"{figures['median']:.2f}x (goal: <= {GOALS['median']}x), worst {figures['worst']:.2f}x, "
            f"Spearman's rho {figures['rho']:.2f} (goal: >= {GOALS['rho']}).\n",
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


def validate(data_dir: str, report_dir: str, layouts: list[str] | None, profile_path: str) -> int:
    """Measure the layouts, compare, write the report; 1 when a byte prediction is off."""
    known = VALIDATION + [name for name, _, _ in SIMULATED]
    unknown = sorted(set(layouts or []) - set(known))
    if unknown:
        raise UserError(f"--layouts: unknown {', '.join(unknown)}; choose from {' '.join(known)}")
    if data_dir and not Path(data_dir, "train.bin").exists():
        raise UserError(f"--data_dir {data_dir} holds no prepared shakespeare_char: run python "
                        f"data/shakespeare_char/prepare.py --out_dir {data_dir} (or leave it out: "
                        f"synthetic tokens)")
    profile = Profile.load(profile_path) if profile_path else None
    out = Path(report_dir)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        data = f"prepared shakespeare_char in {data_dir}" if data_dir else \
            "synthetic tokens (uniform ids of a 65-token vocabulary; no --data_dir)"
        print(f"validating on {data}")
        data_dir = data_dir or synthetic_dataset(tmp)
        if profile is None:
            print("calibrating this machine first (about a minute; --profile FILE skips it)")
            profile = calibrate(data_dir)
            profile.save(out / "profile.json")
        rows, times = _measure(layouts or known, data_dir, profile)
    figures = goals(times)
    (out / "validation.json").write_text(json.dumps({"profile": profile.name, "bytes": rows,
                                                     "step_time": times, "goals": figures}, indent=1) + "\n")
    (out / "validation.md").write_text(report(rows, times, figures, profile, data))
    plot(rows, times, out / "validation.png")
    failed = [r for r in rows if not r["ok"]]
    for r in failed:
        print(f"off: {r['layout']} rank {r['rank']} {r['what']}: measured {r['measured']:,.0f}, "
              f"predicted {r['predicted']:,.0f}")
    print(f"{len(rows) - len(failed)} of {len(rows)} byte predictions within tolerance; step time: "
          f"{figures['within 1.5x']} of {figures['layouts']} layouts within 1.5x, median "
          f"{figures['median']:.2f}x, worst {figures['worst']:.2f}x, rho {figures['rho']:.2f}; "
          f"report in {out / 'validation.md'}")
    return 1 if failed else 0


def _measure(chosen: list[str], data_dir: str, profile: Profile) -> tuple[list[dict], list[dict]]:
    real = [name for name in VALIDATION if name in chosen]
    runs = [(name, LAYOUTS[name], partial(run_layout, LAYOUTS[name], data_dir)) for name in real]
    runs += [(name, layout, partial(simulate, layout, model, data_dir))
             for name, layout, model in SIMULATED if name in chosen]
    rows, times = [], []
    for name, layout, run in tqdm(runs, desc="layouts", unit="layout"):
        measured = run()
        new = compare(name, layout, measured)
        rows += new
        worst = max(new, key=lambda r: abs(r["ratio"] - 1))
        tqdm.write(f"{name:20s} {layout.world:4d} ranks, worst {worst['what']} on rank "
                   f"{worst['rank']}: {worst['ratio']:.4f}")
        if measured[0]["step_s"] is not None:  # the slowest rank is the step
            times.append({"layout": name, "ranks": layout.world,
                          "measured_s": max(m["step_s"] for m in measured),
                          "predicted_s": predicted_step_s(layout, measured[0], profile)})
    return rows, times
