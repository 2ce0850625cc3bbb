"""The pieces one layout's ranks recorded (diverge_record.py) put back together as full,
layout-free tensors, one at a time, in the order one process computes them.

A piece of a module's output (or of the gradient reaching it), (b, t, c) or, for the
attention core, (b, heads, t, d), sits in the full (B, T, C) at

    batch     rows (k M_dp + dp_rank) b ..: micro-step k of DP rank r (the loader's slots)
    sequence  the tokens this rank holds: its CP positions (zigzag chunks, Ulysses pieces),
              then under sequence parallelism its TP rank's contiguous part of them
    columns   TP rank r's columns of each of `blocks` blocks (c_attn: q_r, k_r, v_r), or
              its heads, or its vocabulary rows (loss parallelism)

A gradient piece is divided by the rank's `divisor` (diverge_record.grad_divisor): each
rank's loss is the mean over its own tokens, the gradient engines divide the parameters'
sums by DP x CP afterwards.
Pieces that land on the same place (TP ranks' replicated activations) must be equal: how
far apart they are is kept as the tensor's `spread`.
"""
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from nanodist.errors import UserError


FORMAT = 2  # of a rank's file: raised when what diverge_record.py saves changes
META_KEYS = {"rank", "world", "layout", "coordinates", "dp", "dp_rank", "tp", "tp_rank", "divisor", "positions",
             "micro_steps", "batch_size", "block_size", "dtype", "lr", "eps", "model", "n_params", "seed", "data",
             "gradient_clipping", "feature_sharded", "placements", "param_shapes", "layout_fields", "samples",
             "format"}
# what two recordings of one comparison must share: the same run, laid out two ways
SAME_RUN = ("model", "block_size", "lr", "eps", "seed", "data", "gradient_clipping", "samples")


@dataclass
class Piece:
    rank: int
    micro: int
    tensor: torch.Tensor
    calls: dict          # the collectives Comm had counted on this rank when it was kept


@dataclass
class Recording:
    """One layout's recording: every rank's meta and its pieces by key (step, name, kind)."""
    metas: list[dict]
    pieces: dict = field(default_factory=dict)      # key -> [Piece]
    order: dict = field(default_factory=dict)       # (name, kind) -> index in its rank's order

    @property
    def meta(self) -> dict:
        return self.metas[0]


def _read(path: Path) -> dict:
    """One rank's file (weights_only: nothing read runs code), checked for its two parts."""
    why = f"{path} is not a recording of this tool"
    try:
        saved = torch.load(path, weights_only=True, mmap=True)
    except Exception as error:  # damaged, truncated, or no torch file at all: torch says it many ways
        raise UserError(f"{why} ({type(error).__name__}); record the layout again") from error
    if not (isinstance(saved, dict) and isinstance(saved.get("meta"), dict) and "rank" in saved["meta"]
            and isinstance(saved.get("records"), list)):
        raise UserError(f"{why} (no meta and records); record the layout again")
    if saved["meta"].get("format") != FORMAT or not META_KEYS <= saved["meta"].keys():
        raise UserError(f"{path} was recorded by another version of the tool; record the layout again")
    if not all(isinstance(r, (list, tuple)) and len(r) == 6 and isinstance(r[4], torch.Tensor)
               and isinstance(r[5], dict) for r in saved["records"]):
        raise UserError(f"{why} (a record is not (step, name, kind, micro, tensor, calls)); record the layout again")
    return saved


def load(directory) -> Recording:
    """The rank<r>.pt files of `directory`, mapped (memory-mapped: read as compared)."""
    files = sorted((p for p in Path(directory).glob("rank*.pt") if re.fullmatch(r"rank\d+", p.stem)),
                   key=lambda p: int(p.stem[4:]))
    if not files:
        raise UserError(f"{directory} holds no rank<r>.pt recording; record one with "
                        f"python -m nanodist_tools.diverge")
    saved = [_read(f) for f in files]
    recording = Recording([s["meta"] for s in saved])
    if [m["rank"] for m in recording.metas] != list(range(recording.meta["world"])):
        raise UserError(f"{directory} holds the files of ranks {[m['rank'] for m in recording.metas]} of "
                        f"{recording.meta['world']}; record the layout again")
    for s in saved:
        rank = s["meta"]["rank"]
        for i, (step, name, kind, micro, tensor, calls) in enumerate(s["records"]):
            recording.pieces.setdefault((step, name, kind), []).append(Piece(rank, micro, tensor, calls))
            recording.order.setdefault((name, kind), (rank, i))
    return recording


def run_of(recording: Recording, dtype: bool = True) -> dict:
    """What makes two recordings the same run: model, data, seed, global batch, lr, steps."""
    meta = recording.meta
    out = {key: meta[key] for key in SAME_RUN}
    out["global batch"] = meta["batch_size"] * meta["micro_steps"] * meta["dp"]
    out["steps"] = 1 + max((key[0] for key in recording.pieces), default=-1)
    if dtype:
        out["dtype"] = meta["dtype"]
    return out


def check_same_run(x: Recording, y: Recording, names: tuple, dtype: bool = True):
    """One line if `x` and `y` are not one run laid out two ways."""
    rx, ry = run_of(x, dtype), run_of(y, dtype)
    differ = [key for key in rx if rx[key] != ry[key]]
    if differ:
        key = differ[0]
        raise UserError(f"{names[0]} and {names[1]} are not the same run: {key} {rx[key]!r} vs {ry[key]!r}"
                        f"{f' (and {len(differ) - 1} more)' if len(differ) > 1 else ''}; record both with "
                        f"the same flags")


def stage_of(name: str, n_layer: int) -> int:
    """0: the embeddings; 1 + i: block i; n_layer + 1: the head."""
    if name.startswith("transformer.h."):
        return 1 + int(name.split(".")[2])
    return 0 if name.startswith(("transformer.wte", "transformer.wpe", "transformer.drop")) else n_layer + 1


def forward_order(recordings: list[Recording]) -> list[str]:
    """The modules in the order one process runs them: by stage, then in the order the
    ranks holding that stage ran them (the first recording's order where it has one)."""
    n_layer = recordings[0].meta["model"]["n_layer"]
    at = {}
    for recording in reversed(recordings):
        at.update({name: i for (name, kind), (_, i) in recording.order.items() if kind == "forward"})
    return sorted(at, key=lambda name: (stage_of(name, n_layer), at[name]))


def _indices(piece: torch.Size, shape: list[int], meta: dict, micro: int, blocks: int) -> list:
    """Per dim of a piece of shape `piece`, the indices of the full tensor it fills."""
    ndim, b = len(piece), piece[0]
    seq_dim, col_dim = (2, 1) if ndim == 4 else (1, ndim - 1)
    rows = torch.arange(b) + (micro * meta["dp"] + meta["dp_rank"]) * b
    tokens = torch.tensor(meta["positions"])
    if piece[seq_dim] != len(tokens):  # sequence parallel: its TP part of them
        tokens = tokens.chunk(meta["tp"])[meta["tp_rank"]]
    if piece[seq_dim] == shape[seq_dim]:
        tokens = torch.arange(shape[seq_dim])
    cols = torch.arange(piece[col_dim])
    if piece[col_dim] != shape[col_dim]:  # TP rank r's part of each block
        width = shape[col_dim] // blocks
        part = width // meta["tp"]
        cols = torch.cat([torch.arange(part) + i * width + meta["tp_rank"] * part for i in range(blocks)])
    out = [rows, None, None] + [None] * (ndim - 3)
    out[seq_dim], out[col_dim] = tokens, cols
    for d in range(ndim):
        if out[d] is None:
            out[d] = torch.arange(piece[d])
    return out


def _grid(index: list) -> tuple:
    """Per-dim indices broadcast against each other: full[grid] is the piece's place."""
    return tuple(ix.view([-1 if d == j else 1 for d in range(len(index))]) for j, ix in enumerate(index))


def flat_index(piece: torch.Size, shape: list[int], meta: dict, micro: int, blocks: int) -> torch.Tensor:
    """The flat index in the full tensor of every entry of a piece (digests sample by it)."""
    strides = [math.prod(shape[d + 1:]) for d in range(len(shape))]
    grid = _grid(_indices(piece, shape, meta, micro, blocks))
    return sum(ix * stride for ix, stride in zip(grid, strides)).expand(piece)


def sampled(flat: torch.Tensor, samples: int, numel: int) -> torch.Tensor:
    """About `samples` entries of a full tensor of `numel`, chosen by a hash of their flat
    index: the same entries for every layout, spread over every dim."""
    return (flat * 2654435761) % 2**32 < samples * 2**32 // max(numel, samples)


def full_shape(meta: dict, name: str, piece: torch.Size) -> list[int]:
    ndim = len(piece)
    seq_dim, col_dim = (2, 1) if ndim == 4 else (1, ndim - 1)
    shape = list(piece)
    shape[0] = meta["batch_size"] * meta["micro_steps"] * meta["dp"]
    shape[seq_dim] = meta["block_size"]
    if name in meta["feature_sharded"]:
        shape[col_dim] *= meta["tp"]
    return shape


@dataclass
class Full:
    """A recorded tensor made whole: its value, which rank filled each entry, and how far
    apart the pieces that filled the same entries were (0: replicas agreed)."""
    value: torch.Tensor
    owner: torch.Tensor | None
    spread: float
    pieces: list
    index: torch.Tensor | None = None   # a digest's entries: their flat indices in the full tensor


def assemble(recording: Recording, key: tuple) -> Full | None:
    """The full tensor of `key` (step, name, kind); None where this layout recorded none."""
    pieces = recording.pieces.get(key)
    if not pieces:
        return None
    _, name, kind = key
    if kind != "loss" and recording.meta.get("samples"):
        return _assemble_digest(recording, pieces, kind)
    if kind not in ("forward", "backward"):  # the loss and the parameters: rank 0 kept them whole
        return Full(pieces[0].tensor.double(), None, 0.0, pieces)
    shape = full_shape(recording.meta, name, pieces[0].tensor.shape)
    value = torch.zeros(shape, dtype=torch.float64)
    owner = torch.full(shape, -1, dtype=torch.int32)
    spread = 0.0
    for piece in pieces:
        meta = recording.metas[piece.rank]
        local = piece.tensor.double() / (meta["divisor"] if kind == "backward" else 1)
        grid = _grid(_indices(local.shape, shape, meta, piece.micro, meta["feature_sharded"].get(name, 1)))
        filled = owner[grid] >= 0
        if filled.any():  # replicas: the same entries from another rank
            spread = max(spread, (value[grid] - local)[filled].abs().max().item())
        value[grid] = local
        owner[grid] = torch.where(filled, owner[grid], piece.rank)
    if (owner < 0).any():
        raise UserError(f"{name} ({kind}): the ranks' pieces leave entries of the full tensor unfilled; "
                        f"this layout's sharding of it is one the tool does not know")
    return Full(value, owner, spread, pieces)


def _assemble_digest(recording: Recording, pieces: list, kind: str) -> Full:
    """A digest's sampled entries (each piece: flat indices, values), in flat order."""
    flat = torch.cat([p.tensor[0].long() for p in pieces])
    value = torch.cat([p.tensor[1].double() / (recording.metas[p.rank]["divisor"] if kind == "backward" else 1)
                       for p in pieces])
    owner = torch.cat([torch.full((p.tensor.size(1),), p.rank, dtype=torch.int32) for p in pieces])
    order = torch.argsort(flat, stable=True)
    flat, value, owner = flat[order], value[order], owner[order]
    first = torch.ones_like(flat, dtype=torch.bool)
    first[1:] = flat[1:] != flat[:-1]
    group = torch.cumsum(first, 0) - 1  # replicas: the same entry from several ranks
    spread = (value - value[first][group]).abs().max().item() if len(flat) else 0.0
    return Full(value[first], owner[first], spread, pieces, flat[first])


def twins_of(a, b, dir_a: str, dir_b: str) -> tuple:
    """The float64 recordings a float32 or bfloat16 pair is bounded by: --out keeps them
    beside the pair, as a64 and b64."""
    if a.meta["dtype"] == b.meta["dtype"] == "float64":
        return None, None
    twins = [Path(f"{str(d).rstrip('/')}64") for d in (dir_a, dir_b)]
    if not all(t.is_dir() for t in twins):
        raise UserError(f"{dir_a}, {dir_b}: recorded in {a.meta['dtype']} and {b.meta['dtype']}; their bound "
                        f"needs their float64 recordings {twins[0]} and {twins[1]} (--out keeps them)")
    a64, b64 = load(twins[0]), load(twins[1])
    for run, twin, path in ((a, a64, twins[0]), (b, b64, twins[1])):
        if twin.meta["dtype"] != "float64":
            raise UserError(f"{path}: recorded in {twin.meta['dtype']}, not float64; it cannot bound the "
                            f"{run.meta['dtype']} run beside it")
        check_same_run(run, twin, (str(path), "the run beside it"), dtype=False)
        if twin.meta["layout_fields"] != run.meta["layout_fields"]:
            raise UserError(f"{path} is of layout {twin.meta['layout']}, the run beside it of "
                            f"{run.meta['layout']}: a float64 twin is the same layout")
    return a64, b64
