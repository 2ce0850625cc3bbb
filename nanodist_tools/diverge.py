"""python -m nanodist_tools.diverge: where do two layouts part?

    python -m nanodist_tools.diverge single tp2-sp-lp -- --model tiny --dataset shakespeare_char \
        --block_size 32 --batch_size 2 --total_batch_size 128
    python -m nanodist_tools.diverge --recorded DIR_A DIR_B       (recordings kept with --out)
    python -m nanodist_tools.diverge --checkpoints CKPT_A CKPT_B  (two checkpoints, layout-free)
    python -m nanodist_tools.diverge --logs RUN_A RUN_B           (two runs' TensorBoard losses)

A layout is a name of nanodist_tools/layouts.py or its train.py flags without their dashes
("tensor_parallel_size=2,sequence_parallel=true"); the flags after `--` are shared.
Each layout trains --steps steps in fresh processes, every rank recording its pieces
(diverge_record.py); they are made whole one tensor at a time (diverge_assemble.py) and
compared in the order one process computes them (diverge_compare.py). The verdict: the
first tensor past the bound rounding explains, with the rank that holds it and what ran
before it; or, for layouts that agree, the worst difference of each stage against its bound.
"""
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

from nanodist import cli
from nanodist.errors import UserError
from nanodist.parallel.layout import Layout
from nanodist.parallel.placement import to_rank_major
from nanodist.data.loader import load_split
from nanodist.run.config import fit, layout_of, parse_args, resolve
from nanodist_tools.diverge_assemble import check_same_run, load, twins_of
from nanodist_tools.diverge_compare import compare, next_module, owning_steps, scale_hint, stage_label
from nanodist_tools.layouts import LAYOUTS
from nanodist_tools.processes import on_processes

DEFAULTS = ["--dtype=float64", "--eval_iters=1", "--checkpoint_interval=-1", "--warmup_steps=0",
            "--dist_timeout=300"]
KINDS = {"forward": "output of", "backward": "gradient reaching the output of",
         "grad": "reduced gradient of", "value": "value after AdamW of"}


def layout_flags(spec: str, shared: list[str]) -> tuple[list[str], int]:
    """train.py's flags of a layout (a name, or flags) and its number of processes."""
    if spec in LAYOUTS:
        flags = LAYOUTS[spec].flags()
    elif "=" in spec:
        flags = [f"--{flag.strip()}" for flag in spec.split(",")]
    else:
        raise UserError(f"layout {spec!r}: name one of {', '.join(LAYOUTS)}, or give its train.py "
                        f"flags as 'tensor_parallel_size=2,sequence_parallel=true'")
    cfg = parse_args([*DEFAULTS, *shared, *flags])
    layout = layout_of(cfg, 1)
    layout = layout_of(cfg, layout.pp * layout.cp * layout.tp)  # --data_parallel_size 0: 1
    if layout.pp > 1 and layout.pp_schedule == "zero_bubble":
        raise UserError(f"{spec}: zero_bubble's split backward computes each gradient twice, which the "
                        f"tool does not follow yet; compare another --pipeline_schedule")
    resolve(cfg, layout.world, "cpu")  # a bad flag: one line here, not a traceback per rank
    return [*DEFAULTS, *shared, *flags, f"--data_parallel_size={layout.dp}"], layout.world


def check_budget(spec: str, shared: list[str], steps: int, dtype: str, budget_mib: float, samples: int):
    """The data, the model's rules and the bytes the recording keeps, before any process starts."""
    from nanodist_tools.diverge_record import kept_bytes
    flags, world = layout_flags(spec, shared)
    cfg, layout, micro_steps = resolve(parse_args(flags), world, "cpu")
    data = load_split(cfg.data_dir or Path("data", cfg.dataset), "val", cfg.block_size, cfg.dataset)
    model = fit(cfg, layout, micro_steps, data.vocab_size, "cpu")
    kept = kept_bytes(model, cfg.total_batch_size, micro_steps, steps, 8 if dtype == "float64" else 4,
                      samples, layout.tp) / 2**20
    if kept > budget_mib:
        raise UserError(f"{spec}: recording {steps} step(s) of {cfg.total_batch_size} tokens keeps up to "
                        f"{kept:,.0f} MiB on its {world} process(es), over --max_memory_mib {budget_mib:,.0f}; lower --total_batch_size "
                        f"(or --steps), keep a --digest, or raise --max_memory_mib")


def record(spec: str, shared: list[str], out_dir: Path, steps: int, dtype: str | None = None,
           samples: int = 0) -> dict:
    """Run one layout in fresh processes, recording into out_dir; its time and bytes kept."""
    from nanodist_tools.diverge_record import record_rank
    flags, world = layout_flags(spec, shared)
    flags += [f"--dtype={dtype}"] if dtype else []
    out_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    ranks = on_processes(world, record_rank, [*flags, f"--out_dir={out_dir / 'run'}"], str(out_dir),
                         steps, samples, timeout=1800)
    return {"seconds": time.perf_counter() - start, "bytes": max(r["bytes"] for r in ranks), "world": world}


def holder(row) -> tuple[tuple, int | None]:
    """The entry of B's largest difference and the rank holding it (None: full on every rank)."""
    gap = (row.b.value - row.a.value).abs().nan_to_num(math.inf)
    at = tuple(int(i) for i in torch.unravel_index(gap.argmax(), gap.shape)) if gap.dim() else ()
    return at, None if row.b.owner is None else int(row.b.owner[at])


def _where(row, recording) -> str:
    """The entry of B's largest difference, and the rank (and its coordinates) holding it."""
    at, rank = holder(row)
    if rank is None:
        return f"at {list(at)} (full on every rank; rank 0 kept it)"
    if row.b.index is not None:  # a digest: the entry's flat index in the full tensor
        at = (int(row.b.index[at]),)
    coords = recording.metas[rank]["coordinates"]
    held = ", ".join(f"{axis} {coords[axis]}" for axis in ("pp", "dp", "cp", "tp") if axis in coords)
    return f"at {list(at)}, held by rank {rank} ({held})"


def placement_of(row, meta: dict) -> str:
    """How B splits the parameter, and which shard holds the largest difference."""
    placement = meta["placements"].get(row.key[1])
    if placement is None:
        return "replicated (reduced over dp_cp, divided by its size)"
    sizes, shape = Layout(**meta["layout_fields"]).group_sizes(), meta["param_shapes"][row.key[1]]
    worst = int((row.b.value - row.a.value).abs().argmax())  # a digest's: its entry's flat index
    flat = worst if row.b.index is None else int(row.b.index[worst])
    at = [int(i) for i in torch.unravel_index(torch.tensor(flat), shape)]
    held, along = [], {}  # dim -> the indices along it of the piece split so far
    for group, dim in placement["shards"]:  # placement.local_part's split, on the indices
        n = sizes[group]
        pieces = to_rank_major(along.get(dim, torch.arange(shape[dim])), n, placement["blocks"]).chunk(n)
        rank = next(r for r, piece in enumerate(pieces) if bool((piece == at[dim]).any()))
        along[dim] = pieces[rank]
        held.append(f"{group} (dim {dim}; the largest difference in {group} rank {rank}'s shard of {n})")
    return (f"split over {', '.join(held) or 'nothing'}; reduced over {placement['reduce']}, divided by "
            f"{placement['divisor']}'s size")


def describe(row) -> str:
    step, name, kind = row.key
    return f"step {step + 1}, " + ("loss" if kind == "loss" else f"{KINDS[kind]} {name}")


def collectives_between(rows, i: int, recording) -> str:
    """Comm's counted collectives on the rank holding the divergent entry (_where's) between
    the tensor recorded before it on that rank and it (custom strategies; PyTorch's own are
    not counted). A gradient or value is kept after the step's whole backward: counted from
    the last backward piece. The loss's counts are the step's end: never a starting point."""
    row = rows[i]
    rank = holder(row)[1]
    rank = row.b.pieces[0].rank if rank is None else rank
    later = next((p for p in row.b.pieces if p.rank == rank), row.b.pieces[0])
    wanted = ("backward",) if row.key[2] in ("grad", "value") else ("forward", "backward", "grad", "value")
    earlier = next((max(ps, key=lambda p: p.micro) for r in reversed(rows[:i]) if r.key[2] in wanted
                    for ps in [[p for p in r.b.pieces if p.rank == rank]] if ps), None)
    if earlier is None:
        return "nothing recorded before it on that rank"
    diff = {kind: n - earlier.calls.get(kind, 0) for kind, n in later.calls.items()
            if n > earlier.calls.get(kind, 0)}
    counted = ", ".join(f"{kind} x{n}" for kind, n in sorted(diff.items())) or "no counted collective"
    return f"{counted} (rank {rank}, Comm's counter)"


def report(a, b, rows, names=("A", "B")) -> tuple[str, bool]:
    """The verdict and whether the layouts part."""
    lines = [f"A = {names[0]} ({a.meta['layout']}, {a.meta['world']} process(es)), "
             f"B = {names[1]} ({b.meta['layout']}, {b.meta['world']} process(es)); {len(rows)} tensors compared"]
    first = next((i for i, row in enumerate(rows) if row.parts), None)
    if first is None:
        worst = {}
        n_layer = a.meta["model"]["n_layer"]
        for row in rows:
            label = stage_label(row.key, n_layer)
            if label not in worst or row.ratio > worst[label].ratio:
                worst[label] = row
        lines.append("no divergence: every tensor within the bound rounding explains. Per stage, the worst "
                     "(and the steps of B that own it):")
        for label, row in worst.items():
            owners = ", ".join(owning_steps(row.key[1], row.key[2], b.meta)) if row.diff else "bitwise equal"
            lines.append(f"  {label:<28} {row.diff:9.2e} <= {row.bound:9.2e}  {row.key[1]} ({owners})"
                         + (f" [{row.check}]" if row.check else ""))
        return "\n".join(lines), False
    row = rows[first]
    step, name, kind = row.key
    lines.append(f"first divergence: {describe(row)}" + (f"; it parts in {row.check}" if row.check else ""))
    held, on = (a, "A") if row.check.startswith("A vs") else (b, "B")  # A itself may leave its path
    gap = {"": "A - B", "t": "A64 - B64", "B": "B - B64", "A": "A - A64"}[row.check[:1]]
    lines.append(f"  |{gap}| = {row.diff:.3e} > bound {row.bound:.3e} ({row.ratio:.1e} x)"
                 f"{scale_hint(row)}")
    if max(row.a.spread, row.b.spread) > row.bound:
        lines.append(f"  the ranks holding copies of it disagree: A by {row.a.spread:.3e}, "
                     f"B by {row.b.spread:.3e}")
    lines.append(f"  largest difference in {on} {_where(row, held)}")
    if first:
        lines.append(f"  last agreeing: {describe(rows[first - 1])}")
    if first and kind != "loss":  # the loss is the trainer's, kept after the step
        lines.append(f"  between them on {on}: {collectives_between(rows, first, held)}")
    for side, rec in (("A", a), ("B", b)):
        lines.append(f"  steps of {side} that own it: {', '.join(owning_steps(name, kind, rec.meta))}")
    consumer = next_module(rows, row) if kind == "backward" else None
    if consumer:  # a gradient is made by the module that read the output
        lines.append(f"  its gradient comes back through {consumer}, owned in {on} by: "
                     f"{', '.join(owning_steps(consumer, 'forward', held.meta))}")
    if kind in ("grad", "value"):
        lines.append(f"  placement in {on}: {placement_of(row, held.meta)}")
    return "\n".join(lines), True


def run_pair(args, shared: list[str], out: Path) -> tuple[str, bool]:
    """Record both layouts (and their float64 twins for a lower precision), compare."""
    for spec in (args.a, args.b):  # both checked before either runs
        check_budget(spec, shared, args.steps, args.dtype, args.max_memory_mib, args.digest)
    recorded, twins = {}, {}
    for side, spec in (("a", args.a), ("b", args.b)):
        recorded[side] = record(spec, shared, out / side, args.steps, args.dtype, args.digest)
        if args.dtype != "float64":
            twins[side] = record(spec, shared, out / f"{side}64", args.steps, "float64", args.digest)
    a, b = load(out / "a"), load(out / "b")
    a64, b64 = (load(out / "a64"), load(out / "b64")) if twins else (None, None)
    start = time.perf_counter()
    text, parts = report(a, b, compare(a, b, a64, b64), (args.a, args.b))
    runs = [f"{side}: {s['seconds']:.1f} s on {s['world']} process(es), {s['bytes'] / 2**20:.1f} MiB kept "
            f"by its largest rank" for side, s in [*((k.upper(), s) for k, s in recorded.items()),
                                                   *((f"{k.upper()}64", s) for k, s in twins.items())]]
    return text + f"\nrecorded {'; '.join(runs)}; compared in {time.perf_counter() - start:.1f} s", parts


def build_parser():
    p = cli.OneLineParser(description="Where do two layouts part? The first tensor where a layout leaves "
                                      "one process, and why (docs/diverge.md). Exit code 0: they agree; 1: "
                                      "they part; 2: bad input (one line); 3: an unforeseen error.")
    p.add_argument("a", nargs="?", help="a layout: a name of nanodist_tools/layouts.py, or its train.py flags")
    p.add_argument("b", nargs="?", help="the other layout")
    p.add_argument("--steps", type=int, default=1, help="optimizer steps recorded (1-100)")
    p.add_argument("--dtype", default="float64", choices=("float64", "float32", "bfloat16"),
                   help="of the compared runs; float32/bfloat16 add each layout's float64 run (the bound)")
    p.add_argument("--max_memory_mib", type=float, default=4096,
                   help="the most one layout's recording may keep (its one-process worst case)")
    p.add_argument("--digest", type=int, default=0, metavar="N",
                   help="keep about N sampled entries of each full tensor (0: whole tensors): large models")
    p.add_argument("--out", default="", help="keep the recordings here (compare again with --recorded)")
    p.add_argument("--recorded", nargs=2, metavar="DIR", help="compare two recordings kept with --out")
    p.add_argument("--checkpoints", nargs=2, metavar="CKPT", help="compare two checkpoints, tensor by tensor")
    p.add_argument("--logs", nargs=2, metavar="RUN", help="compare two runs' TensorBoard losses")
    return p


def out_dir(path: str) -> Path:
    """--out: a new or empty directory this process can write, checked before any run."""
    out = Path(path)
    try:
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise UserError(f"--out {out}: not an empty directory; name a new one (recordings are never "
                            f"overwritten)")
        out.mkdir(parents=True, exist_ok=True)
        Path(out, ".write_check").touch()
        Path(out, ".write_check").unlink()
    except OSError as error:
        raise UserError(f"--out {out}: cannot write there ({error.strerror or type(error).__name__})") from error
    return out


def main_of(argv: list[str]) -> int:
    shared = argv[argv.index("--") + 1:] if "--" in argv else []
    args = build_parser().parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    if not 1 <= args.steps <= 100:
        raise UserError(f"--steps {args.steps}: give 1 to 100 optimizer steps")
    if not 0 <= args.digest <= 10**8:
        raise UserError(f"--digest {args.digest}: give 0 (whole tensors) to 100000000 entries per tensor")
    if not args.max_memory_mib > 0:
        raise UserError(f"--max_memory_mib {args.max_memory_mib}: give a positive size")
    if args.checkpoints or args.logs:
        from nanodist_tools.diverge_posthoc import compare_checkpoints, compare_logs
        text, parts = compare_checkpoints(*args.checkpoints) if args.checkpoints else compare_logs(*args.logs)
    elif args.recorded:
        a, b = load(args.recorded[0]), load(args.recorded[1])
        check_same_run(a, b, tuple(args.recorded))
        text, parts = report(a, b, compare(a, b, *twins_of(a, b, *args.recorded)), tuple(args.recorded))
    elif args.a and args.b:
        if args.out:
            text, parts = run_pair(args, shared, out_dir(args.out))
        else:
            with tempfile.TemporaryDirectory() as tmp:
                text, parts = run_pair(args, shared, Path(tmp))
    else:
        raise UserError("name two layouts (or --recorded, --checkpoints, --logs); see --help")
    print(text)
    return 1 if parts else 0


ERROR = 3  # an unforeseen failure: not the verdict's 1 (they part), nor bad input's 2


def main(argv=None) -> int:
    """0: they agree; 1: they part; 2: bad input, one line; 3: an unforeseen error, one line."""
    verdict = []
    code = cli.run(lambda args: verdict.append(main_of(args)) or verdict[0], argv)
    return ERROR if code == 1 and not verdict else code


if __name__ == "__main__":
    sys.exit(main())
