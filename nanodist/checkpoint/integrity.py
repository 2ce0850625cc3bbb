"""Nothing damaged loads silently, and nothing loaded runs code.

    manifest.json    the CRC-32 of every file of a checkpoint, written last by its save;
                     `verify` checks them all before anything parses a tensor (the ranks
                     share the hashing)
    .metadata        DCP's index of the shards is a pickle, and DCP's own reader calls
                     pickle.load, which runs whatever the file names: `Reader` unpickles it
                     allowing only DCP's metadata classes (tensors are read by DCP, and
                     torch.load(weights_only=True) elsewhere)

A checkpoint without manifest (written before manifests existed) cannot be verified: it
is refused unless the user passes TRUST_FLAG, and then only what can be checked without
checksums is (every slice .metadata indexes lies within its file; the loaded tensors are
finite): damage that leaves finite numbers goes unnoticed, which the warning says.
"""
import json
import pickle
import sys
import zlib
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta, TensorStorageMetadata

from nanodist.checkpoint.store import cause, gathered
from nanodist.errors import UserError

MANIFEST = "manifest.json"
TRUST_FLAG = "--trust_unverified_checkpoint"
TRUST_HELP = ("read a checkpoint without manifest.json (older than checksums): damage that leaves finite "
              "numbers goes unnoticed")


def crc32(path: Path) -> str | None:
    """A file's CRC-32 (None if it cannot be read). It catches damage, not forgery: who can
    write the files can write the manifest too (and .metadata runs no code either way)."""
    crc = 0
    try:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 24):
                crc = zlib.crc32(chunk, crc)
    except OSError:
        return None
    return f"{crc:08x}"


def checksums(directory: Path, names, no_dist: bool) -> dict[str, str | None]:
    """The CRC-32 of each file of `names`: each rank hashes its share, all get all."""
    rank, world = (0, 1) if no_dist else (dist.get_rank(), dist.get_world_size())
    mine = {name: crc32(directory / name) for name in sorted(names)[rank::world]}
    return {name: crc for part in gathered(mine, no_dist) for name, crc in part.items()}


def verify(path: Path, no_dist: bool, trust_unverified: bool = False) -> bool:
    """Every file of checkpoint `path` against its manifest; the same verdict on all ranks.
    Returns whether it was verified: False for a checkpoint without manifest that the user
    trusts (`trust_unverified`), which is refused otherwise."""
    try:
        expected = json.loads((path / MANIFEST).read_text())["crc32"]
        if not isinstance(expected, dict):
            raise TypeError("no file list")
    except FileNotFoundError:
        if not trust_unverified:
            raise UserError(f"checkpoint {path} has no {MANIFEST} (it predates them): damage in its "
                            f"files cannot be detected. Use a checkpoint that has one, or accept the "
                            f"risk with {TRUST_FLAG} (then only file sizes and non-finite values are "
                            f"checked)") from None
        if no_dist or dist.get_rank() == 0:
            print(f"warning: checkpoint {path} has no {MANIFEST}: loaded under {TRUST_FLAG} with file "
                  f"sizes and finite values checked; damage that leaves finite numbers goes "
                  f"unnoticed", file=sys.stderr, flush=True)
        return False
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"checkpoint {path} is corrupt ({MANIFEST}: {e}); resume from an older one") from e
    found = checksums(path, expected, no_dist)
    bad = [name for name in sorted(expected) if found[name] != expected[name]]
    if bad:
        what = "is missing" if found[bad[0]] is None else f"does not match its checksum in {MANIFEST}"
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise UserError(f"checkpoint {path} could not be read ({bad[0]} {what}{more}); "
                        f"resume from an older one")
    return True


# Everything DCP's .metadata of these checkpoints holds (found by unpickling real ones).
_METADATA_GLOBALS = {
    *(("torch.distributed.checkpoint.metadata", name) for name in (
        "Metadata", "MetadataIndex", "StorageMeta", "TensorStorageMetadata", "BytesStorageMetadata",
        "ChunkStorageMetadata", "TensorProperties", "_MEM_FORMAT_ENCODING")),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),  # where each slice lies
    ("torch", "Size"), ("torch.serialization", "_get_layout"),
    *(("torch", name) for name, value in vars(torch).items() if isinstance(value, torch.dtype)),
    ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"),  # the checkpoint_id it was saved as
}


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP's .metadata, refusing any global it does not hold before importing it."""

    def __init__(self, file, path: Path):
        super().__init__(file)
        self.path = path

    def find_class(self, module, name):
        if (module, name) not in _METADATA_GLOBALS:
            raise UserError(f"checkpoint {self.path} refused: its .metadata asks for {module}.{name}, "
                            f"which DCP metadata never holds (loading it could run code)")
        return super().find_class(module, name)


class Reader(dcp.FileSystemReader):
    """DCP's file reader with its .metadata unpickled safely, once, here: a bad one ends in
    one clear line, before DCP could log its own tracebacks."""

    def __init__(self, path: Path):
        super().__init__(path)
        try:
            with open(path / ".metadata", "rb") as f:
                metadata = _MetadataUnpickler(f, path).load()
        except UserError:
            raise
        except Exception as e:  # noqa: BLE001 - damaged files raise all sorts of errors
            raise UserError(f"checkpoint {path} is corrupt (.metadata: {cause(e)}); resume from "
                            f"an older one") from e
        index = getattr(metadata, "state_dict_metadata", None) if isinstance(metadata, Metadata) else None
        if not isinstance(index, dict) or not all(isinstance(m, TensorStorageMetadata) and
                                                  isinstance(getattr(m, "size", None), torch.Size)
                                                  for m in index.values()):
            raise UserError(f"checkpoint {path} is corrupt (.metadata is not this project's DCP "
                            f"index); resume from an older one")
        metadata.storage_meta = getattr(metadata, "storage_meta", None) or StorageMeta()  # older DCPs
        metadata.storage_meta.load_id = self.load_id  # as DCP's own read_metadata does
        self.metadata = metadata

    def read_metadata(self, *args, **kwargs) -> Metadata:
        return self.metadata


    def check_sizes(self):
        """Every slice the index names lies within its file (a truncated shard of a
        checkpoint without manifest is caught here, not by a parse error)."""
        storage = getattr(self.metadata, "storage_data", None)
        if not isinstance(storage, dict):
            raise UserError(f"checkpoint {self.path} is corrupt (.metadata has no file index); "
                            f"resume from an older one")
        for where in storage.values():
            file = self.path / where.relative_path
            size = file.stat().st_size if file.is_file() else None
            if size is None or size < where.offset + where.length:
                what = "is missing" if size is None else f"is {size} bytes, shorter than its index says"
                raise UserError(f"checkpoint {self.path} is corrupt ({where.relative_path} {what}); "
                                f"resume from an older one")


def open_checked(path: Path, no_dist: bool, trust_unverified: bool = False) -> tuple[Reader, bool]:
    """Checks checkpoint `path` before anything parses its tensors: its DCP reader, and
    whether its checksums were verified (see `verify`)."""
    verified = verify(path, no_dist, trust_unverified)
    reader = Reader(path)
    if not verified:
        reader.check_sizes()
    return reader, verified


def write_manifest(directory: Path, files, no_dist: bool):
    """manifest.json of `files` (hashed by all ranks, written by rank 0); a file that cannot
    be read back fails the save."""
    sums = checksums(directory, files, no_dist)
    if no_dist or dist.get_rank() == 0:
        unread = [name for name, crc in sums.items() if crc is None]
        if unread:
            raise OSError(f"{unread[0]} cannot be read back")
        (directory / MANIFEST).write_text(json.dumps({"crc32": dict(sorted(sums.items()))}, indent=1))
