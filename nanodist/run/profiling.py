"""`--profile_steps A:B`: torch.profiler traces of steps A to B (as printed, inclusive) on
every rank, in the run directory:

    <out_dir>/profile/rank{r}.<time>.pt.trace.json     Chrome / Perfetto trace, also what
                                                        TensorBoard's profiler plugin reads

Open one at https://ui.perfetto.dev (or chrome://tracing), or all with
`tensorboard --logdir <out_dir>/profile` (pip install torch-tb-profiler).
"""
import os
import warnings
from pathlib import Path

from torch.profiler import ProfilerActivity, profile, tensorboard_trace_handler

from nanodist.errors import UserError


def parse_steps(text: str) -> tuple[int, int] | None:
    if not text:
        return None
    try:
        first, last = (int(x) for x in text.split(":"))
    except ValueError:
        first = last = 0
    if not 1 <= first <= last:
        raise UserError(f"--profile_steps takes A:B with 1 <= A <= B (steps as printed), got {text!r}")
    return first, last


# torch 2.11 warns at every stop that a schedule's cycles drop events: these profiles have one
warnings.filterwarnings("ignore", message=".*Profiler clears events at the end of each cycle")


def quiet_profile(**kwargs) -> profile:
    """torch.profiler.profile, without the lines kineto prints to stderr at start and stop."""
    os.environ.setdefault("KINETO_LOG_LEVEL", "6")  # read when the profiler starts
    return profile(**kwargs)


class StepProfiler:
    """Starts torch.profiler before step `first` and writes the trace after step `last`,
    the window clipped to the steps this run trains (`note` says so); `close` stops a
    profiler the run left running (an error mid-window), so none is left to the exit."""

    def __init__(self, steps: str, out_dir, rank: int, device, start: int, end: int):
        """`start`, `end`: the run's first and last step, as printed."""
        self.steps, self.note = parse_steps(steps), None
        if self.steps and start > end:  # a finished run trains nothing: nothing to say
            self.steps = None
        if self.steps:
            first, last = max(self.steps[0], start), min(self.steps[1], end)
            if first > last:
                self.note = (f"warning: --profile_steps {steps} lies outside the steps this run trains "
                             f"({start} to {end}): nothing is profiled")
            elif (first, last) != self.steps:
                self.note = (f"warning: --profile_steps {steps} is clipped to the steps this run trains: "
                             f"{first}:{last}")
            self.steps = (first, last) if first <= last else None
        self.out_dir, self.rank, self.device = Path(out_dir) / "profile", rank, device
        self.profiler = None

    def before(self, step: int):  # step: 0-based, printed as step + 1
        if self.steps and step + 1 == self.steps[0]:
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
            self.profiler = quiet_profile(activities=activities, record_shapes=True,
                                          on_trace_ready=tensorboard_trace_handler(str(self.out_dir), f"rank{self.rank}"))
            self.profiler.start()

    def covers(self, step: int) -> bool:
        return bool(self.steps) and self.steps[0] <= step + 1 <= self.steps[1]

    def after(self, step: int):
        if self.steps and step + 1 == self.steps[1]:
            self.close()

    def close(self):
        if self.profiler is not None:
            self.profiler.stop()  # calls the trace handler: writes the file
            self.profiler = None
