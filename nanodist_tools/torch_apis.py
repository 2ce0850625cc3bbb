"""`python -m nanodist_tools.torch_apis`: every torch name nanodist's code uses, and the
torch release that has it.

The names are read from the source (imports from torch, and attribute chains on a name
bound to a torch module: `dist.all_gather_single`, `torch.cuda.synchronize`, ...) and
resolved on the torch of this interpreter. A name in compat.NEWER is newer than
compat.MINIMUM_TORCH and is used through compat.collective only; every other name must
exist in MINIMUM_TORCH: run this under that torch and it says so (exit 1 when a name does
not resolve). Names private to torch are compat.py's too (its table).
"""
import argparse
import ast
import importlib
import sys
from pathlib import Path

import torch

from nanodist import compat

REPO = Path(__file__).resolve().parents[1]
SOURCES = ["nanodist", "nanodist_tools", "bench", "data", "train.py", "sample.py"]
CUDA_BUILDS_ONLY = {"torch.distributed.ProcessGroupNCCL"}  # absent from CPU builds of torch


def source_files() -> list[Path]:
    files = []
    for entry in SOURCES:
        path = REPO / entry
        files += sorted(path.rglob("*.py")) if path.is_dir() else [path]
    return files


def _chain(node: ast.AST) -> list[str] | None:
    """['dist', 'all_gather_single'] of `dist.all_gather_single`; None if not a name chain."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    return [node.id, *reversed(parts)] if isinstance(node, ast.Name) else None


def direct_uses_of_newer(path: Path) -> list[str]:
    """`path:line name` of each attribute named like a compat.NEWER collective: on an older
    torch such a call fails; compat.collective picks what this torch has."""
    tree = ast.parse(path.read_text())
    return [f"{path.relative_to(REPO)}:{node.lineno} {node.attr}" for node in ast.walk(tree)
            if isinstance(node, ast.Attribute) and node.attr in compat.NEWER]


def names_used(path: Path) -> dict[str, int]:
    """Each torch name `path` uses -> the first line that uses it."""
    tree, aliases, used = ast.parse(path.read_text()), {}, {}
    for node in ast.walk(tree):  # aliases first: `import torch.distributed as dist`, `from torch import nn`
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == "torch":
                    aliases[a.asname or a.name.split(".")[0]] = a.name if a.asname else "torch"
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "torch":
            for a in node.names:
                full = f"{node.module}.{a.name}"
                used.setdefault(full, node.lineno)
                aliases[a.asname or a.name] = full
    inner = {id(node.value) for node in ast.walk(tree) if isinstance(node, ast.Attribute)}
    for node in ast.walk(tree):  # whole chains only: `a.b.c`, not also `a.b`
        if isinstance(node, ast.Attribute) and id(node) not in inner:
            chain = _chain(node)
            if chain and chain[0] in aliases:
                used.setdefault(".".join([aliases[chain[0]], *chain[1:]]), node.lineno)
    return used


def resolve(name: str):
    """The object `name` (a dotted path from torch) is on this torch; raises if absent."""
    parts = name.split(".")
    for i in range(len(parts), 0, -1):  # the longest prefix that imports as a module
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for part in parts[i:]:
            obj = getattr(obj, part)
        return obj
    raise ImportError(name)


def table() -> list[tuple[str, str, str, str]]:
    """(name, where first used, release that has it, state on this torch) of every name."""
    first: dict[str, str] = {}
    for path in source_files():
        for name, line in names_used(path).items():
            first.setdefault(name, f"{path.relative_to(REPO)}:{line}")
    rows = [(f"torch.distributed.{name}", "nanodist/compat.py (collective)", since,
             f"{'present' if hasattr(torch.distributed, name) else 'absent'}: else {instead}")
            for name, (since, instead) in compat.NEWER.items()]
    for name, where in sorted(first.items()):
        try:
            resolve(name)
            state = "present"
        except (ImportError, AttributeError):
            state = ("CUDA builds only" if name.startswith(tuple(CUDA_BUILDS_ONLY)) else "MISSING")
        rows.append((name, where, f"<= {compat.MINIMUM_TORCH}", state))
    return rows


def main():
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()
    rows = table()
    width = max(len(r[0]) for r in rows)
    print(f"torch {torch.__version__}: {len(rows)} names used by nanodist\n"
          f"{'name':<{width}}  {'since':<7}  {'here':<16}  first used at")
    for name, where, since, state in rows:
        print(f"{name:<{width}}  {since:<7}  {state:<16}  {where}")
    missing = [r[0] for r in rows if r[3] == "MISSING"]
    direct = [use for path in source_files() if path.name != "compat.py" for use in direct_uses_of_newer(path)]
    for problem, names in ((f"missing on torch {torch.__version__}", missing),
                           ("called directly (use compat.collective)", direct)):
        if names:
            print(f"{problem}: {', '.join(names)}", file=sys.stderr)
    sys.exit(1 if missing or direct else 0)


if __name__ == "__main__":
    main()
