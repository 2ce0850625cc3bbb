"""Token datasets: what the prepare scripts write, and the batches the trainer reads.

A prepared dataset is a directory with train.bin and val.bin (uint16 token ids, one flat
stream) and meta.json (vocab_size, tokenizer, token counts).

Sampling is layout-invariant (DESIGN.md, invariant 2). The global batch of one step is
G = grad_accum * dp_size * batch_size sequence starts, drawn by a generator seeded from
(seed, split, step) only. Micro-step m of DP rank r reads slot m * dp_size + r of it:

    G starts:  [ m0 r0 | m0 r1 | m1 r0 | m1 r1 ]    dp_size=2, grad_accum=2, each slot
                                                     batch_size sequences
So every layout with the same G trains on the same sequences in each step, DP ranks read
different slots, and TP ranks (same dp_rank) read the same data.
"""
import errno
import hashlib
import json
import os
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.profiler import record_function

from nanodist.errors import UserError

REPO_ROOT = Path(__file__).resolve().parents[2]
DATASETS = ("shakespeare", "shakespeare_char", "openwebtext")
SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"


# ---- writing: shared by data/*/prepare.py ----

def read_text(input_path: str | None, url: str) -> str:
    """The text of `input_path`, or downloaded from `url` when no path is given."""
    if input_path:
        try:
            return Path(input_path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"cannot read --input {input_path}: {e}") from e
    print(f"downloading {url}")
    try:
        with urllib.request.urlopen(url, timeout=15) as response:
            return response.read().decode("utf-8")
    except OSError as e:  # URLError and timeouts are OSErrors
        raise UserError(f"could not download {url} ({e}); pass --input PATH to a local copy") from e


def split_text(text: str, train_fraction: float = 0.9) -> tuple[str, str]:
    """First 90% of the characters for training, the rest for validation."""
    n = int(len(text) * train_fraction)
    return text[:n], text[n:]


def check_split_sizes(source: str, counts: dict[str, int]) -> None:
    """Refuse, before anything is written, splits too short to train or evaluate on: each
    needs block_size + 1 tokens, so at least 2 (the loader checks the real block_size)."""
    if min(counts.values()) < 2:
        raise UserError(f"{source} gives " + " and ".join(f"{n} {split}" for split, n in counts.items())
                        + " tokens; each split needs block_size + 1 tokens or more: pass a longer text")


@contextmanager
def writing(path):
    """The writes of a prepared dataset's file `path`: a full or read-only disk is one line."""
    try:
        yield
    except OSError as e:
        raise UserError(f"cannot write {path} ({e.strerror or e}): free space, or pick a writable "
                        f"--out_dir") from e


def prepare_out_dir(out_dir: str | Path) -> Path:
    """Create `out_dir` and drop an old meta.json: a prepare that dies half-way then leaves
    .bin files that the loader refuses, instead of ones an old meta.json vouches for."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out_dir {out_dir} is a file; pick a directory")
    with writing(out_dir):
        out_dir.mkdir(parents=True, exist_ok=True)
        if not os.access(out_dir, os.W_OK | os.X_OK):  # a read-only file system, even for root
            raise PermissionError(errno.EACCES, "not writable")
        (out_dir / "meta.json").unlink(missing_ok=True)
    return out_dir


def write_split(out_dir: Path, split: str, tokens) -> int:
    """Write tokens as uint16 to <out_dir>/<split>.bin; returns how many."""
    tokens = np.asarray(tokens)
    assert tokens.size == 0 or 0 <= tokens.min() and tokens.max() < 2**16, "token ids must fit uint16"
    with writing(out_dir / f"{split}.bin"):
        tokens.astype(np.uint16).tofile(out_dir / f"{split}.bin")
    return int(tokens.size)


def write_meta(out_dir: Path, **meta) -> None:
    """meta.json is written last: its token counts vouch for complete .bin files."""
    with writing(out_dir / "meta.json"):
        (out_dir / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")


# ---- reading: used by the trainer ----

@dataclass
class TokenData:
    """One split's tokens, memmapped once (not reopened per batch)."""
    tokens: np.memmap  # uint16, one flat stream
    vocab_size: int
    meta: dict         # meta.json: the tokenizer ("gpt2" or "char" with its itos), counts

    def __len__(self) -> int:
        return len(self.tokens)


def load_split(data_dir, split: str, block_size: int, dataset_name: str) -> TokenData:
    """Open <data_dir>/<split>.bin after checking that it is complete and long enough."""
    if dataset_name not in DATASETS:
        raise UserError(f"unknown dataset {dataset_name!r}; use one of {', '.join(DATASETS)}")
    data_dir = Path(data_dir)
    fix = f"run `python data/{dataset_name}/prepare.py"
    if data_dir.resolve() != REPO_ROOT / "data" / dataset_name:
        fix += f" --out_dir {data_dir}"
    fix += "`"
    meta_path, bin_path = data_dir / "meta.json", data_dir / f"{split}.bin"
    for path in (data_dir, meta_path, bin_path):
        if not path.exists():
            raise UserError(f"{path} not found; {fix}")
    try:
        meta = json.loads(meta_path.read_text())
        expected_tokens, vocab_size = int(meta[f"{split}_tokens"]), int(meta["vocab_size"])
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"{meta_path} is malformed ({e!r}); {fix}") from e
    n_bytes = bin_path.stat().st_size
    if n_bytes % 2 or n_bytes // 2 != expected_tokens:
        raise UserError(f"{bin_path} holds {n_bytes} bytes, but meta.json promises {expected_tokens} "
                        f"uint16 tokens ({2 * expected_tokens} bytes): truncated or stale; {fix}")
    if expected_tokens < block_size + 1:
        raise UserError(f"{bin_path} has {expected_tokens} tokens, fewer than block_size + 1 = "
                        f"{block_size + 1}; lower --block_size or prepare more text")
    tokens = np.memmap(bin_path, dtype=np.uint16, mode="r")
    largest = int(tokens.max())  # one vectorised pass: ~12 ms per 100M tokens from the page cache
    if largest >= vocab_size:
        raise UserError(f"{bin_path} holds token id {largest}, but meta.json's vocab_size is "
                        f"{vocab_size}: corrupt or from another tokenizer; {fix}")
    return TokenData(tokens, vocab_size, meta)


class BatchLoader:
    """x, y batches (batch_size, block_size) of one DP rank; y is x shifted by one token."""

    def __init__(self, data_dir, dataset, block_size, batch_size, grad_accum, dp_size, dp_rank,
                 seed, device):
        assert 0 <= dp_rank < dp_size and batch_size >= 1 and grad_accum >= 1
        self.splits = {split: load_split(data_dir, split, block_size, dataset)
                       for split in ("train", "val")}
        self.vocab_size = self.splits["train"].vocab_size
        meta = self.splits["train"].meta  # what decodes the tokens: checkpoints must agree
        self.tokenizer = {"name": meta.get("tokenizer"), "itos": meta.get("itos")}
        self.block_size, self.batch_size, self.grad_accum = block_size, batch_size, grad_accum
        self.dp_size, self.dp_rank, self.seed = dp_size, dp_rank, seed
        self.device = torch.device(device)

    def state_dict(self) -> dict:
        """The data position: the batches of a step follow from (seed, split, step) and the
        global batch size alone, so with the checkpoint's step this is all of it."""
        return {"seed": self.seed, "sequences_per_step": self.grad_accum * self.dp_size * self.batch_size}

    def load_state_dict(self, position: dict):
        """A resumed run continues the data order of the run it resumes (its seed)."""
        self.seed = int(position["seed"])

    def train_batch(self, step: int, micro_step: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self._batch("train", step, micro_step)

    def val_batch(self, index: int, micro_step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Eval batch `index`: the same sequences at every evaluation."""
        return self._batch("val", index, micro_step)

    def global_starts(self, split: str, index: int) -> torch.Tensor:
        """The G sequence starts of one step, the same for every layout with the same G."""
        # seeded from (seed, split, index) alone, never from dp_size or rank
        key = hashlib.sha256(f"{self.seed}/{split}/{index}".encode()).digest()
        generator = torch.Generator().manual_seed(int.from_bytes(key[:8], "little") >> 1)
        n_global = self.grad_accum * self.dp_size * self.batch_size
        # a start leaves room for block_size + 1 tokens: x and its shifted target y
        high = len(self.splits[split]) - self.block_size
        return torch.randint(high, (n_global,), generator=generator)

    def _batch(self, split, index, micro_step):
        assert 0 <= micro_step < self.grad_accum
        with record_function("data"):  # a phase of the step in profiler traces
            slot = (micro_step * self.dp_size + self.dp_rank) * self.batch_size
            starts = self.global_starts(split, index)[slot:slot + self.batch_size].numpy()
            rows = self.splits[split].tokens[starts[:, None] + np.arange(self.block_size + 1)]
            rows = torch.from_numpy(rows.astype(np.int64))
            x, y = rows[:, :-1].contiguous(), rows[:, 1:].contiguous()
            if self.device.type == "cuda":  # pinned host memory lets the copy overlap compute
                x, y = x.pin_memory(), y.pin_memory()
            return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
