"""Pipeline schedules as data: per rank, a list of actions F(m, v) / B(m, v) (forward /
backward of micro-batch m on local chunk v); the sends and receives follow from them.
`simulate` places each action in a time slot (as soon as its input can be there), the
timeline `pipeline.py`'s runner executes.

    1F1B, P=4, M=4 (`timeline`):   rank 0 | F0 F1 F2 F3 .  .  .  B0 .  B1 .  B2 .  B3
                                   rank 1 | .  F0 F1 F2 .  .  B0 F3 B1 .  B2 .  B3 .
                                   rank 2 | .  .  F0 F1 .  B0 F2 B1 F3 B2 .  B3 .  .
                                   rank 3 | .  .  .  F0 B0 F1 B1 F2 B2 F3 B3 .  .  .
    bubble (idle fraction) (P-1)/(M+P-1) for GPipe and 1F1B, (P-1)/(V M+P-1) interleaved.
"""
from collections import namedtuple

Action = namedtuple("Action", "kind micro chunk")  # kind "F" | "B"; chunk: local index v


def gpipe(P: int, M: int, V: int = 1) -> list[list[Action]]:
    """All forwards, then all backwards (GPipe, picotron's AFAB): M micro-batches in flight."""
    return [[Action("F", m, v) for v in range(V) for m in range(M)]
            + [Action("B", m, v) for v in reversed(range(V)) for m in range(M)] for _ in range(P)]


def one_f_one_b(P: int, M: int, V: int = 1) -> list[list[Action]]:
    """Rank r runs P-1-r warm-up forwards, then alternates F and B, then drains the Bs:
    at most P - r micro-batches in flight (PipeDream-flush, Megatron, picotron)."""
    schedule = []
    for r in range(P):
        warmup = min(P - 1 - r, M)
        actions = [Action("F", m, 0) for m in range(warmup)]
        for i in range(M - warmup):
            actions += [Action("F", warmup + i, 0), Action("B", i, 0)]
        schedule.append(actions + [Action("B", m, 0) for m in range(M - warmup, M)])
    return schedule


def interleaved_1f1b(P: int, M: int, V: int) -> list[list[Action]]:
    """Megatron's virtual stages: 1F1B over the V chunks of each rank, micro-batches in
    groups of P (M a multiple of P); the k-th forward runs chunk (k // P) % V."""
    total = M * V

    def action(kind, k):
        v = (k // P) % V
        return Action(kind, k // (P * V) * P + k % P, V - 1 - v if kind == "B" else v)

    schedule = []
    for r in range(P):
        warmup = total if M == P else min((P - r - 1) * 2 + (V - 1) * P, total)
        actions = [action("F", k) for k in range(warmup)]
        for k in range(total - warmup):
            actions += [action("F", warmup + k), action("B", k)]
        schedule.append(actions + [action("B", k) for k in range(total - warmup, total)])
    return schedule


SCHEDULES = {"gpipe": gpipe, "1f1b": one_f_one_b, "interleaved_1f1b": interleaved_1f1b}


def bubble_fraction(P: int, M: int, V: int = 1) -> float:
    """Idle fraction of a step (Narayanan et al. 2021): (P-1)/(V M + P-1), V = 1 for GPipe
    and 1F1B. Exact for actions of one time unit (`simulate`); with V = 1 for any times of
    F and B as long as every stage takes the same, communication aside."""
    return (P - 1) / (V * M + P - 1)


def simulate(schedule: list[list[Action]]) -> list[list[tuple[int, Action]]]:
    """(time slot, action) per rank, each action one slot, as soon as its input is there
    (F(m) on stage s needs F(m) of s-1; B(m) of s needs B(m) of s+1). Raises on a
    schedule that cannot run (an action waiting on one that never comes)."""
    P = len(schedule)
    S = P * (1 + max(a.chunk for a in schedule[0]))
    done, clock, next_index = {}, [0] * P, [0] * P
    out = [[] for _ in range(P)]
    while any(i < len(a) for i, a in zip(next_index, schedule)):
        progressed = False
        for r in range(P):
            if next_index[r] == len(schedule[r]):
                continue
            a = schedule[r][next_index[r]]
            s = a.chunk * P + r
            need = ((("F", a.micro, s - 1),) if a.kind == "F" and s > 0 else
                    (("B", a.micro, s + 1),) if a.kind == "B" and s < S - 1 else ()) + \
                   ((("F", a.micro, s),) if a.kind == "B" else ())
            if all(n in done for n in need):
                start = max([clock[r]] + [done[n] for n in need])
                out[r].append((start, a))
                done[(a.kind, a.micro, s)] = clock[r] = start + 1
                next_index[r] += 1
                progressed = True
        if not progressed:
            raise ValueError(f"schedule deadlocks: ranks wait at {next_index}")
    return out


def timeline(schedule: list[list[Action]]) -> str:
    """The schedule as text, one row per rank ('.' = idle), e.g. for the docstring above."""
    slots = simulate(schedule)
    end = max(t for row in slots for t, _ in row) + 1
    multi = any(a.chunk for row in schedule for a in row)
    lines = []
    for r, row in enumerate(slots):
        cells = ["."] * end
        for t, a in row:
            cells[t] = f"{a.kind}{a.micro}" + (f"v{a.chunk}" if multi else "")
        width = max(len(c) for c in cells)
        lines.append(f"rank {r} | " + " ".join(c.ljust(width) for c in cells).rstrip())
    return "\n".join(lines)
