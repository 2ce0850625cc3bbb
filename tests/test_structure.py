"""The package's shape: imports flow one way, model <- parallel <- planner <- train <- tools,
with no circle anywhere (function-level imports included), read from the source with ast.
The planner is a layer of the library, under training: train.py asks it before building.
Each layer below training is a folder of nanodist/, so `ls nanodist` draws this order."""
import ast
from pathlib import Path

from harness import REPO

# lowest first; a module may import its own layer and the ones before it
LAYERS = [
    ("base", ("nanodist.errors", "nanodist.compat", "nanodist.cli")),
    ("model", ("nanodist.model",)),
    ("data", ("nanodist.data",)),
    ("parallel", ("nanodist.parallel",)),
    ("planner", ("nanodist.planner",)),
    ("train", ("nanodist",)),
    ("tools", ("nanodist_tools",)),
]
PACKAGES = ("nanodist", "nanodist_tools")


def modules() -> dict[str, Path]:
    """Every module of the two packages, by dotted name."""
    found = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def layer(module: str) -> int:
    """The index of the most specific LAYERS prefix that holds `module`."""
    best = max(((len(prefix), i) for i, (_, prefixes) in enumerate(LAYERS) for prefix in prefixes
                if module == prefix or module.startswith(prefix + ".")), default=None)
    assert best is not None, f"{module} belongs to no layer"
    return best[1]


def imports(path: Path, known: dict) -> set[str]:
    """The project modules `path` imports, anywhere in it (a `from package import module`
    counts as the module)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in known else node.module
                     for alias in node.names]
        else:
            continue
        out.update(name for name in names if name in known)
    return out


def graph() -> dict[str, set[str]]:
    known = modules()
    return {module: imports(path, known) - {module} for module, path in known.items()}


def test_every_import_goes_down_the_layers():
    upward = [f"{module} ({LAYERS[layer(module)][0]}) imports {target} ({LAYERS[layer(target)][0]})"
              for module, targets in graph().items() for target in targets
              if layer(target) > layer(module)]
    assert upward == []


def test_no_import_cycles():
    edges, state, cycles = graph(), {}, []

    def visit(module, path):
        state[module] = "open"
        for target in sorted(edges[module]):
            if state.get(target) == "open":
                cycles.append(path[path.index(target):] + [target])
            elif target not in state:
                visit(target, path + [target])
        state[module] = "done"

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])
    assert cycles == []


def test_the_walk_sees_what_it_must():
    """The checks above are only as good as the graph: it holds the known arrows."""
    edges = graph()
    assert "nanodist.parallel.layout" in edges["nanodist.run.config"]    # train -> parallel
    assert "nanodist.parallel.comm" in edges["nanodist.parallel.tensor_parallel"]
    assert "nanodist.parallel.pipeline_native" in edges["nanodist.parallel.parallelize"]  # in a function
    assert "nanodist.run.trainer" in edges["nanodist_tools.measure"]         # tools -> train
    assert "nanodist.planner.plan" in edges["nanodist.run.preflight"]                # train -> planner
    assert layer("nanodist.compat") < layer("nanodist.model.gpt") < layer("nanodist.parallel.fsdp") \
        < layer("nanodist.planner.plan") < layer("nanodist.checkpoint.format") < layer("nanodist_tools.planner")


STRATEGIES = tuple(f"nanodist.parallel.{name}" for name in (
    "tensor_parallel", "context_parallel", "expert_parallel", "activation_checkpoint", "fsdp", "ddp",
    "zero1", "pipeline"))


def test_strategies_are_peers():
    """No strategy imports another: what they share (placements, engines, comm) sits below
    them, so a student reads one strategy in its file (and its kernels: ring_attention.py,
    ulysses.py, loss_parallel.py, the native twins)."""
    edges = graph()
    assert [(a, b) for a in STRATEGIES for b in edges[a] if b in STRATEGIES] == []
    assert "nanodist.model.moe" not in edges["nanodist.run.trainer"]  # the model reports its metrics


def test_library_files_stay_short():
    """picotron's rule (DESIGN.md): a file of the library reads in one sitting."""
    long = {path.relative_to(REPO).as_posix(): n for path in (REPO / "nanodist").rglob("*.py")
            if (n := len(path.read_text().splitlines())) > 300}
    assert long == {}
