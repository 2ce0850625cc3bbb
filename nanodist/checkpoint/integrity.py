"""Nothing damaged loads silently, and nothing loaded runs code.

    manifest.json    the CRC-32 of every file of a checkpoint, written last by its save;
                     `verify` checks them all before anything parses a tensor (the ranks
                     share the hashing)
    .metadata        DCP's index of the shards is a pickle, and DCP's own reader calls
                     pickle.load, which runs whatever the file names: `Reader` unpickles it
                     allowing only DCP's metadata classes (tensors are read by DCP, and
                     torch.load(weights_only=True) elsewhere)

Checkpoints written before manifests existed load unverified, with a warning: they are
still safe to load, and refusing them would strand the runs they belong to.
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


def verify(path: Path, no_dist: bool):
    """Every file of checkpoint `path` against its manifest; the same verdict on all ranks."""
    try:
        expected = json.loads((path / MANIFEST).read_text())["crc32"]
        if not isinstance(expected, dict):
            raise TypeError("no file list")
    except FileNotFoundError:
        if no_dist or dist.get_rank() == 0:
            print(f"warning: checkpoint {path} has no {MANIFEST} (it predates them): its files "
                  f"are not checked for damage", file=sys.stderr, flush=True)
        return
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"checkpoint {path} is corrupt ({MANIFEST}: {e}); resume from an older one") from e
    found = checksums(path, expected, no_dist)
    bad = [name for name in sorted(expected) if found[name] != expected[name]]
    if bad:
        what = "is missing" if found[bad[0]] is None else f"does not match its checksum in {MANIFEST}"
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise UserError(f"checkpoint {path} could not be read ({bad[0]} {what}{more}); "
                        f"resume from an older one")


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


def open_checked(path: Path, no_dist: bool) -> Reader:
    """Checks checkpoint `path` before anything parses its tensors; its DCP reader."""
    verify(path, no_dist)
    return Reader(path)




def write_manifest(directory: Path, files, no_dist: bool):
    """manifest.json of `files` (hashed by all ranks, written by rank 0); a file that cannot
    be read back fails the save."""
    sums = checksums(directory, files, no_dist)
    if no_dist or dist.get_rank() == 0:
        unread = [name for name, crc in sums.items() if crc is None]
        if unread:
            raise OSError(f"{unread[0]} cannot be read back")
        (directory / MANIFEST).write_text(json.dumps({"crc32": dict(sorted(sums.items()))}, indent=1))
