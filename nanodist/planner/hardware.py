"""What a machine can do, as the planner's step-time model (step_time.py) reads it.

    DataSheet  a GPU model from its vendor's data sheet, derated to what kernels reach
               (`DERATE`): a matmul at the roofline of its shape (its FLOPs at the matmul
               peak, or its operands' bytes at the memory bandwidth, whichever binds),
               memory-bound work at the memory bandwidth, NVLink / network bandwidth and a
               fixed time per collective call, each op's launch on the host, memory
    Profile    this machine, measured (`python -m nanodist_tools.planner --calibrate`):
               matmul FLOP/s against the matmul's size, per dtype and processes sharing
               the cores; the framework's time per layer and micro-step and per optimizer
               step; each collective's time against its bytes and group size; a send's
               time; a GPU's memory bandwidth. Read from a JSON file, checked (a file read
               is never trusted).

Both answer the same questions: `matmul_s(m, n, k, dtype, procs)`, `attention_s(flops,
dtype, procs)`, `memory_s(bytes)`, `collective_s(kind, payload, group, link, procs)`, the
overheads, `memory_bytes` and `overlaps` (whether communication hides behind compute:
NCCL on its own streams does; gloo on shared CPU cores does not).
"""
import dataclasses
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from nanodist.errors import UserError

# Dense tensor-core peaks (TFLOP/s, no sparsity) as (bf16, tf32), from the vendors' data
# sheets; the first key found in the device name wins, so SKUs come before their family
# (an "NVIDIA H100 PCIe" is not an SXM part).
PEAK_TFLOPS = {"H100 PCIe": (756.0, 378.0), "H100 NVL": (835.0, 417.5),
               "H200 NVL": (835.0, 417.5), "H100": (989.0, 494.5), "H200": (989.0, 494.5),
               "A100": (312.0, 156.0), "L40S": (362.0, 183.0), "A10": (125.0, 62.5),
               "RTX 4090": (165.2, 82.6), "RTX 3090": (71.0, 35.6)}
# --gpu: (PEAK_TFLOPS key, memory GiB, in-node GB/s per GPU per direction (NVLink; L40S:
# PCIe 4.0 x16), across-node GB/s per GPU (one 400 / 200 Gb/s NIC each), memory TB/s)
GPUS = {"h100": ("H100", 80, 450, 50, 3.35), "h200": ("H200", 141, 450, 50, 4.8),
        "a100": ("A100", 80, 300, 25, 2.039), "a100-40gb": ("A100", 40, 300, 25, 1.555),
        "l40s": ("L40S", 48, 32, 25, 0.864)}
# the time of a small NCCL collective (nccl-tests' all-reduce of a few bytes): in a node
# over NVLink, across nodes over InfiniBand / RoCE
LATENCY_S = {"intra_node": 15e-6, "inter_node": 30e-6}
# What kernels reach of a data sheet's figures, per GPU family (an uncalibrated GPU's
# defaults; docs/planner.md#the-time-model-on-a-gpu): cuBLAS's large bf16 / TF32 GEMMs and
# FlashAttention-2's causal kernels as fractions of the peak (FA2 on Hopper: 35%, the
# FlashAttention-3 paper), a streaming kernel's share of the memory bandwidth, NCCL's
# bus bandwidth of the nominal link
DERATE = {"matmul": 0.7, "attention": 0.5, "memory": 0.85, "link": 0.8}
HOPPER = {**DERATE, "matmul": 0.65, "attention": 0.35}
FAMILY = {"H100": HOPPER, "H200": HOPPER}
HOST_OP_S = 8e-6  # the host's time to dispatch and launch one op of eager PyTorch
GiB = 2**30
KINDS = ("all_reduce", "all_gather", "reduce_scatter", "broadcast", "send")
DTYPES = ("float32", "bfloat16")  # a profile's matmul tables


@dataclass(frozen=True)
class DataSheet:
    gpu: str                      # a key of GPUS
    efficiency: float = 0.0       # fraction of the peak FLOP/s a large matmul reaches; 0: `derate`
    intra_gb_s: float = 0.0       # 0: the data sheet's
    inter_gb_s: float = 0.0
    memory_gib: float = 0.0       # per GPU; 0: the data sheet's
    device = "cuda"
    overlaps = True
    per_layer_s = 0.0             # the host's time is its launches (`host_op_s`)
    per_step_s = 0.0
    host_op_s = HOST_OP_S

    def with_memory(self, gib: float) -> "DataSheet":
        return dataclasses.replace(self, memory_gib=gib)

    @property
    def name(self) -> str:
        return GPUS[self.gpu][0]

    def derate(self, what: str) -> float:
        if what == "matmul" and self.efficiency:
            return self.efficiency
        return FAMILY.get(self.name, DERATE)[what]

    @property
    def memory_bytes(self) -> float:
        return (self.memory_gib or GPUS[self.gpu][1]) * GiB

    def peak_flops(self, dtype: str) -> float:
        return PEAK_TFLOPS[GPUS[self.gpu][0]][0 if dtype == "bfloat16" else 1] * 1e12

    def matmul_s(self, m: float, n: float, k: float, dtype: str, procs: int) -> float:
        """(m, k) @ (k, n): its FLOPs at the derated peak, or its operands' and result's
        bytes at the derated memory bandwidth, whichever takes longer (a roofline)."""
        c = 2 if dtype == "bfloat16" else 4
        return max(2 * m * n * k / (self.peak_flops(dtype) * self.derate("matmul")),
                   self.memory_s(c * (m * k + k * n + m * n)))

    def attention_s(self, flops: float, dtype: str, procs: int) -> float:
        return flops / (self.peak_flops(dtype) * self.derate("attention"))

    def memory_s(self, nbytes: float) -> float:
        return nbytes / (GPUS[self.gpu][4] * 1e12 * self.derate("memory"))

    def turns(self, procs: int) -> float:
        return 1.0  # a GPU per process

    def bandwidth(self, link: str) -> float:
        _, _, intra, inter, _ = GPUS[self.gpu]
        nominal = (self.intra_gb_s or intra) if link == "intra_node" else (self.inter_gb_s or inter)
        return nominal * 1e9 * self.derate("link")

    def collective_s(self, kind: str, payload: float, group: int, link: str, procs: int) -> float:
        from nanodist.parallel.comm import BUS_FACTOR
        return BUS_FACTOR[kind](group) * payload / self.bandwidth(link) + LATENCY_S[link]


def _interpolate(points: list, x: float) -> float:
    """y at x on the log-log polyline through `points` [(x, y)], flat beyond its ends."""
    points = sorted(points)
    if x <= points[0][0]:
        return points[0][1]
    if x >= points[-1][0]:
        return points[-1][1]
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x0 <= x <= x1:
            w = (math.log(x) - math.log(x0)) / (math.log(x1) - math.log(x0))
            return math.exp(math.log(y0) + w * (math.log(y1) - math.log(y0)))
    raise AssertionError("unreachable")


@dataclass(frozen=True)
class Profile:
    """Measured speeds of one machine (see the module doc); `cores` the processes run on."""
    name: str
    device: str               # cpu | cuda: what the layouts run on (their rules differ)
    cores: int                # CPU cores; a GPU profile: the GPUs it was measured on
    memory_gib: float         # the machine's (calibrated); `with_memory`: one rank's share
    matmul: dict              # dtype -> str(procs) -> [(flops, seconds)]
    per_layer_s: float        # framework time per layer and micro-step (forward + backward)
    per_step_s: float         # per optimizer step (AdamW, clipping), one process
    collectives: dict         # kind -> "{group}x{procs}" -> [(payload bytes, seconds)]
    overlaps: bool = False
    memory_gb_s: float = 0.0  # a GPU's measured; 0: memory-bound work is in per_layer_s (CPU)
    host_op_s: float = 0.0    # a GPU's host time per op (0: the framework's is per_layer_s)
    attention_share: float = 1.0  # attention's rate over a matmul's of its size (a GPU: its family's)
    source: str = field(default="", compare=False)

    @property
    def memory_bytes(self) -> float:
        return self.memory_gib * GiB

    def with_memory(self, gib: float) -> "Profile":
        return dataclasses.replace(self, memory_gib=gib)

    def peak_flops(self, dtype: str) -> float:
        """The fastest matmul rate measured (the MFU's reference on this machine)."""
        return max(f / s for f, s in self.matmul[dtype]["1"])

    def matmul_s(self, m: float, n: float, k: float, dtype: str, procs: int) -> float:
        """At the matmul rate measured for this size with the nearest number of processes
        sharing the cores; more processes than measured (and than cores) take turns:
        slower in proportion."""
        return self._flops_s(2 * m * n * k, dtype, procs)

    def attention_s(self, flops: float, dtype: str, procs: int) -> float:
        return self._flops_s(flops, dtype, procs) / self.attention_share

    def _flops_s(self, flops: float, dtype: str, procs: int) -> float:
        table = self.matmul[dtype]
        measured = min(table, key=lambda k: (abs(int(k) - procs), int(k)))
        rates = [(f, f / s) for f, s in table[measured]]
        return self.turns(procs) / self.turns(int(measured)) * flops / _interpolate(rates, flops)

    def memory_s(self, nbytes: float) -> float:
        return nbytes / (self.memory_gb_s * 1e9) if self.memory_gb_s else 0.0

    def turns(self, procs: int) -> float:
        """How much slower a process runs when `procs` share the cores (a GPU each: never)."""
        return 1.0 if self.device == "cuda" else max(1.0, procs / self.cores)

    def collective_s(self, kind: str, payload: float, group: int, link: str, procs: int) -> float:
        # all-to-all is not calibrated: each rank sends (N-1)/N of its payload, as in an
        # all-gather of the same payload (pairwise instead of around a ring)
        table = self.collectives["all_gather" if kind == "all_to_all" else kind]
        key = min(table, key=lambda k: (abs(int(k.split("x")[1]) - procs), abs(int(k.split("x")[0]) - group)))
        points = table[key]
        largest, seconds = max(points)
        if payload > largest:  # beyond what was measured: bandwidth-bound
            return seconds * payload / largest
        return _interpolate(points, max(payload, 1.0))

    def save(self, path):
        Path(path).write_text(json.dumps({k: v for k, v in self.__dict__.items() if k != "source"},
                                         indent=1) + "\n")

    @classmethod
    def load(cls, path, flag: str = "--profile") -> "Profile":
        """A profile file, every field checked: one clear line for anything else (naming
        the `flag` that gave it)."""
        try:
            data = json.loads(Path(path).read_text())
            profile = cls(**data, source=str(path))
            tables = [*profile.matmul.values(), *profile.collectives.values()]
            ok = (profile.device in ("cpu", "cuda") and profile.cores >= 1 and profile.memory_gib > 0
                  and profile.per_layer_s >= 0 and profile.per_step_s >= 0
                  and all(type(x) in (int, float) and math.isfinite(x) and x >= 0
                          for x in (profile.memory_gb_s, profile.host_op_s, profile.attention_share))
                  and profile.attention_share > 0
                  # a GPU's memory-bound work and launches (profiles calibrated before had none)
                  and (profile.device == "cpu" or (profile.memory_gb_s > 0 and profile.host_op_s > 0))
                  and set(profile.matmul) == set(DTYPES) and set(profile.collectives) == set(KINDS)
                  and all(k.isdigit() for table in profile.matmul.values() for k in table)
                  and all("1" in table for table in profile.matmul.values())  # peak_flops' table
                  and all(re.fullmatch(r"\d+x\d+", k) for table in profile.collectives.values() for k in table)
                  and all(table and all(points and all(len(p) == 2 and p[0] > 0 and p[1] > 0 for p in points)
                                        for points in table.values()) for table in tables))
        except (OSError, ValueError, TypeError, AttributeError) as e:
            raise UserError(f"{flag} {path}: not a machine profile ({e}); write one with "
                            f"python -m nanodist_tools.planner --calibrate --out {path}") from e
        if not ok:
            raise UserError(f"{flag} {path}: a field is missing, empty or out of range; calibrate "
                            f"again (python -m nanodist_tools.planner --calibrate)")
        return profile
