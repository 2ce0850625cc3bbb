"""`python -m nanodist_tools.published`: the planner against published GPU training runs.

docs/plan/published_runs.json holds GPT-2-shaped runs read from their sources (each with
its link, the quoted figure and how its step time follows from it): the model's shape,
the GPUs, the layout the run used, its kernels (eager PyTorch, or fused: torch.compile,
llm.c, Megatron, flash-attention's training scripts) and its published step time. For
each, the planner predicts the step time of that very layout on the GPU's data sheet
(plan.estimate: no calibration), and ranks every layout of the same job for its own
choice. Writes docs/plan/published.md (`--write`); tests/test_published.py holds the
predictions to the published figures (within 1.5x each, median within 1.1x) and the
page to this output.
"""
import json
import math
import statistics
import sys
from pathlib import Path

from tqdm import tqdm

from nanodist import cli
from nanodist.errors import UserError
from nanodist.model.gpt import GPTConfig
from nanodist.parallel.layout import Layout
from nanodist.planner import plan
from nanodist.planner.hardware import GPUS, DataSheet

RUNS = Path(__file__).resolve().parents[1] / "docs" / "plan" / "published_runs.json"
PAGE = RUNS.with_name("published.md")
BOUND, MEDIAN_GOAL = 1.5, 1.1
RANKED_UP_TO = 64  # GPUs: the planner's own choice is searched for jobs this size
FIELDS = {"id": str, "source": str, "gpu": str, "gpus": int, "gpus_per_node": int, "n_layer": int,
          "n_head": int, "n_embd": int, "vocab_size": int, "block_size": int, "total_batch_tokens": int,
          "micro_batch": int, "tp": int, "pp": int, "step_time_s": float, "published": str, "derivation": str,
          "kernels": str, "dp_type": str, "recompute": str, "compiled": bool, "held": bool,
          "reshard_after_forward": bool, "sequence_parallel": bool}
CHOICES = {"gpu": set(GPUS), "dp_type": {"ddp", "zero1", "fsdp"}, "recompute": {"none", "selective", "full"}}


def _bad(run: dict) -> str | None:
    """The first field of `run` missing, of another type or out of range, or None."""
    for name, kind in FIELDS.items():
        value = run.get(name)
        if type(value) is not kind and not (kind is float and type(value) is int):
            return name
        if kind in (int, float) and not (math.isfinite(value) and value > 0):
            return name
        if value not in CHOICES.get(name, {value}):
            return name
    if type(run.get("virtual_stages", 1)) is not int or run.get("virtual_stages", 1) < 1:
        return "virtual_stages"
    if not run["held"] and type(run.get("not_held")) is not str:
        return "not_held"  # an exclusion says why
    dp, rest = divmod(run["gpus"], run["tp"] * run["pp"])
    if rest or run["total_batch_tokens"] % (run["micro_batch"] * run["block_size"] * dp):
        return "total_batch_tokens"  # whole micro-steps on whole data-parallel ranks
    return None


def load(path: Path = RUNS) -> list[dict]:
    """The runs of `path`, every field the prediction and the page read checked."""
    try:
        runs = json.loads(Path(path).read_text())
        bad = [(run.get("id"), _bad(run)) for run in runs]
    except (OSError, ValueError, AttributeError, TypeError) as e:
        raise UserError(f"{path}: not a list of published runs ({e})") from e
    bad = [(name, field) for name, field in bad if field]
    if bad or not runs:
        raise UserError(f"{path}: a run's field is missing or out of range: {bad[:3] or 'no runs'}")
    return runs


def job_and_layout(run: dict) -> tuple[plan.Job, Layout, int]:
    """The planner's job, the run's layout and its micro-steps."""
    model = GPTConfig(block_size=run["block_size"], vocab_size=run["vocab_size"], n_layer=run["n_layer"],
                      n_head=run["n_head"], n_embd=run["n_embd"])
    tp, pp = run["tp"], run["pp"]
    dp = run["gpus"] // (tp * pp)
    virtual = run.get("virtual_stages", 1)
    layout = Layout(dp=dp, tp=tp, pp=pp, dp_type=run["dp_type"], reshard_after_forward=run["reshard_after_forward"],
                    sequence_parallel=run["sequence_parallel"], loss_parallel=tp > 1,
                    pp_schedule="interleaved_1f1b" if virtual > 1 else "1f1b", virtual_stages=virtual,
                    checkpointing=run["recompute"], compile=run["compiled"])
    job = plan.Job("custom", model, run["gpus"], run["gpus_per_node"], run["total_batch_tokens"], "bfloat16",
                   "cuda", "custom", run["micro_batch"], run["compiled"])
    return job, layout, run["total_batch_tokens"] // (run["micro_batch"] * run["block_size"] * dp)


def label(row: dict) -> str:
    parts = [row["dp_type"]] + [f"{axis} {row[axis]}" for axis in ("tp", "pp", "cp", "ep") if row[axis] > 1]
    ac, chunks = row["activation_checkpointing"], row["loss_chunks"]
    return " ".join(parts + ([f"AC {ac}"] if ac != "none" else []) + ([f"loss /{chunks}"] if chunks > 1 else [])
                    + [f"mb {row['micro_batch_size']}"])


def predict(run: dict) -> dict:
    """The planner's step time of the run's own layout on its GPU's data sheet."""
    job, layout, M = job_and_layout(run)
    row = plan.estimate(job, DataSheet(run["gpu"]), layout, run["micro_batch"], M)
    return {"id": run["id"], "predicted_s": row["step_time_s"], "ratio": row["step_time_s"] / run["step_time_s"],
            "mfu": row["mfu"], "layout": label(row), "row": row}


def choice(run: dict, predicted: dict) -> str:
    """The planner's own first layout for the run's job (its micro-batch), against the
    run's: the same, or which and why (searched up to RANKED_UP_TO GPUs)."""
    if run["gpus"] > RANKED_UP_TO:
        return f"not searched (over {RANKED_UP_TO} GPUs)"
    job, _, _ = job_and_layout(run)
    ranked, row = plan.rank(job, DataSheet(run["gpu"])), predicted["row"]
    best = ranked[0]
    if label(best) == label(row):
        return "the same"
    why = (f"the run's layout does not fit nanodist ({row['memory_gib']:.0f} GiB)" if not row["fits"] else
           "the run's layout is not in the planner's space" if all(label(r) != label(row) for r in ranked) else
           "a tie within 2%, ranked by the tie rule" if best["step_time_s"] >= row["step_time_s"] / (1 + plan.TIE)
           else "faster")
    return f"{label(best)}, {best['step_time_s'] / row['step_time_s']:.2f}x the time: {why}"


def table(runs: list[dict], rows: list[dict], choices: list[str]) -> str:
    lines = ["| run | source | model (L / heads / C, V, T) | GPUs | kernels | layout | published s | "
             "predicted s | predicted / published | planner's choice |", "|---|---|---|---|---|---|---|---|---|---|"]
    for run, row, chosen in zip(runs, rows, choices):
        held = "" if run["held"] else " (not held: see below)"
        lines.append(
            f"| {run['id']}{held} | [link]({run['source'].split(' ')[0]}) | {run['n_layer']} / {run['n_head']} / "
            f"{run['n_embd']}, {run['vocab_size']}, {run['block_size']} | {run['gpus']} x {run['gpu']} | "
            f"{'fused' if run['compiled'] else 'eager'} | {row['layout']} | {run['step_time_s']:.3f} | "
            f"{row['predicted_s']:.3f} | {row['ratio']:.2f} | {chosen} |")
    return "\n".join(lines)


def summary(runs: list[dict], rows: list[dict]) -> dict:
    off = [max(r["ratio"], 1 / r["ratio"]) for run, r in zip(runs, rows) if run["held"]]
    return {"runs": len(off), "sources": len({run["source"].split("/blob/")[0] for run in runs if run["held"]}),
            "within": sum(x <= BOUND for x in off), "median": statistics.median(off), "worst": max(off)}


def page(runs: list[dict], rows: list[dict], choices: list[str]) -> str:
    s = summary(runs, rows)
    notes = "\n".join(f"- {run['id']}: {run['not_held']}" for run in runs if not run["held"])
    quotes = "\n".join(f"- {run['id']}: {run['published']} ({run['derivation']}) Kernels: {run['kernels']}."
                       for run in runs)
    return (f"# The planner against published GPU runs\n\nGenerated by `python -m nanodist_tools.published "
            f"--write` from `docs/plan/published_runs.json` (each run's source, quoted figure and layout); "
            f"tests/test_published.py holds it. Predictions on the GPU's data sheet, uncalibrated, of the "
            f"run's own layout (bf16; fp16 runs priced as bf16).\n\n**{s['within']} of {s['runs']} held runs "
            f"from {s['sources']} sources within {BOUND}x; median {s['median']:.3f}x, worst {s['worst']:.2f}x** "
            f"(the larger over the smaller).\n\n{table(runs, rows, choices)}\n\nNot held:\n\n{notes}\n\n"
            f"## The figures as published\n\n{quotes}\n")


def run(argv) -> int:
    p = cli.OneLineParser(description="Predict published GPU runs with the planner (docs/plan/published.md).")
    p.add_argument("--runs", default=str(RUNS), help="the runs (JSON)")
    p.add_argument("--write", action="store_true", help=f"write {PAGE.relative_to(RUNS.parents[2])}")
    args = p.parse_args(argv)
    runs = load(Path(args.runs))
    rows = [predict(r) for r in tqdm(runs, desc="predicting", unit="run")]
    choices = [choice(run, row) for run, row in tqdm(list(zip(runs, rows)), desc="ranking", unit="run")]
    if args.write:
        PAGE.write_text(page(runs, rows, choices))
    print(table(runs, rows, choices))
    s = summary(runs, rows)
    print(f"\n{s['within']} of {s['runs']} held runs ({s['sources']} sources) within {BOUND}x, "
          f"median {s['median']:.3f}x, worst {s['worst']:.2f}x" + (f"; wrote {PAGE}" if args.write else ""))
    return 0


def main(argv=None) -> int:
    return cli.run(run, argv)


if __name__ == "__main__":
    sys.exit(main())
