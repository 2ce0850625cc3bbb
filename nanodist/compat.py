"""Every torch API that is private, unstable or newer than the oldest torch nanodist
supports (MINIMUM_TORCH), in one place.

Private names move between torch releases. Each is reached through here, by its purpose,
so that a torch without it fails with one line that names it (a `UserError`), not an
ImportError deep inside a strategy; optional ones (CPU memory statistics) return None
and their caller falls back. Public names newer than MINIMUM_TORCH (`NEWER`) are used
where this torch has them, else the older call that does the same (`collective`).
Every other torch name nanodist uses is in MINIMUM_TORCH (tests/test_torch_versions.py
lists them). nanodist is tested with torch TESTED_TORCH.

    newer public name             since   on older torch
    dist.all_gather_single        2.13    dist.all_gather_into_tensor (same arguments)
    dist.reduce_scatter_single    2.13    dist.reduce_scatter_tensor  (same arguments)

    name                          module . attribute                              used for
    TorchDispatchMode             torch.utils._python_dispatch                   counting ops (tools, tests)
    tree_leaves                   torch.utils._pytree                            walking op arguments (tools)
    FakeStore                     torch.testing._internal.distributed.fake_pg    the simulated cluster (tools)
    MemTracker                    torch.distributed._tools.mem_tracker           the bench's CPU peak (tools)
    replicate                     torch.distributed._composable.replicate_with_fsdp  PyTorch DDP of DTensor/PP stages
    ContextParallel, cp_options,  torch.distributed.tensor.experimental._context_parallel  PyTorch's CP
      enable_cp_dispatcher
    C10dBackend                   torch._C._distributed_c10d.Backend             group options carrying a timeout
    resolve_process_group         torch.distributed.distributed_c10d             group size of a functional collective
    functional_collectives()      torch.ops._c10d_functional                     AC's save list, traffic counting
    flatten(mesh, name)           DeviceMesh._flatten                            the dp x cp dimension
    set_timeout(options, t)       ProcessGroup options ._timeout                 --dist_timeout on mesh groups
    queue_callback(fn)            Variable._execution_engine.queue_callback      end-of-backward hooks (DDP, FSDP)
    materialize_meta(module, d)   nn.Module._apply                               deferred init, meta tensors only
    allocation_events(prof)       torch._C._profiler._ExtraFields_Allocation,    CPU peak memory (optional)
                                  profile.profiler.kineto_results
    count_cpu_allocations()       c10's FLAGS_caffe2_report_cpu_memory_usage     CPU peak memory (optional)
    mergeable_ranks(encoding)     tiktoken Encoding._mergeable_ranks             HF tokenizer export
    foreach_norm(tensors, dtype)  torch._foreach_norm                            gradient norm in few kernels
    foreach_mul_(tensors, s)      torch._foreach_mul_                            gradient clipping in few kernels
    grouped_mm(a, b, offsets)     torch.nn.functional.grouped_mm (a prototype)   the experts' matmuls
    grouped_mm_fits(a, *bs)       its kernels' rules in 2.11 and 2.13            grouped or padded experts
"""
import ctypes
import importlib
import sys
from pathlib import Path

import torch

from nanodist.errors import UserError

MINIMUM_TORCH = "2.11"
TESTED_TORCH = "2.11.0 and 2.13.0"

NEWER = {  # torch.distributed name -> (the release that added it, its equivalent before)
    "all_gather_single": ("2.13", "all_gather_into_tensor"),
    "reduce_scatter_single": ("2.13", "reduce_scatter_tensor"),
}

_PRIVATE = {  # name -> (module, attribute, what nanodist needs it for)
    "TorchDispatchMode": ("torch.utils._python_dispatch", "TorchDispatchMode", "counting ops"),
    "tree_leaves": ("torch.utils._pytree", "tree_leaves", "walking op arguments"),
    "FakeStore": ("torch.testing._internal.distributed.fake_pg", "FakeStore", "the simulated cluster"),
    "MemTracker": ("torch.distributed._tools.mem_tracker", "MemTracker", "the bench's CPU peak memory"),
    "replicate": ("torch.distributed._composable.replicate_with_fsdp", "replicate",
                  "PyTorch's DDP of tensor-parallel models and pipeline stages"),
    "ContextParallel": ("torch.distributed.tensor.experimental._context_parallel", "_ContextParallel",
                        "PyTorch's context parallel"),
    "cp_options": ("torch.distributed.tensor.experimental._context_parallel", "_cp_options",
                   "PyTorch's context parallel"),
    "enable_cp_dispatcher": ("torch.distributed.tensor.experimental._context_parallel",
                             "_enable_context_parallel_dispatcher", "PyTorch's context parallel"),
    "C10dBackend": ("torch._C._distributed_c10d", "Backend", "--dist_timeout on the mesh's groups"),
    "resolve_process_group": ("torch.distributed.distributed_c10d", "_resolve_process_group",
                              "counting functional collectives"),
}


def _missing(where: str, what: str) -> UserError:
    return UserError(f"{what} needs {where}, which torch {torch.__version__} does not have; "
                     f"nanodist supports torch >= {MINIMUM_TORCH} and is tested with {TESTED_TORCH}")


def __getattr__(name: str):
    """compat.<name> of the table above, imported on first use."""
    if name not in _PRIVATE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module, attribute, what = _PRIVATE[name]
    try:
        value = getattr(importlib.import_module(module), attribute)
    except (ImportError, AttributeError):
        raise _missing(f"{module}.{attribute}", what) from None
    globals()[name] = value
    return value


def collective(transport, name: str):
    """transport.<name> (a NEWER collective of torch.distributed, or of a stand-in), or, on
    a torch before its release, the older function with the same arguments (torch 2.13
    deprecates the older names: they are only the fallback)."""
    found = getattr(transport, name, None)
    return found if found is not None else getattr(transport, NEWER[name][1])


def _method(obj, attribute: str, what: str):
    try:
        return getattr(obj, attribute)
    except AttributeError:
        raise _missing(f"{type(obj).__name__}.{attribute}", what) from None


def functional_collectives():
    """torch.ops._c10d_functional: the ops DTensor lowers its collectives to."""
    return torch.ops._c10d_functional


def flatten(device_mesh, name: str):
    """A 1-D mesh over the dims of `device_mesh` (a sub-mesh), named `name`."""
    return _method(device_mesh, "_flatten", "flattening mesh dimensions")(name)


def set_timeout(options, timeout):
    options._timeout = timeout  # read by DeviceMesh when it creates the groups
    return options


def queue_callback(fn):
    """Run `fn` once the current backward pass has finished."""
    engine = _method(torch.autograd.Variable, "_execution_engine", "end-of-backward callbacks")
    engine.queue_callback(fn)


def materialize_meta(module: torch.nn.Module, device: torch.device):
    """Give every meta tensor of `module` storage on `device` (values undefined); others stay."""
    module._apply(lambda t: torch.empty_like(t, device=device) if t.is_meta else t)


def allocation_events(prof) -> list | None:
    """The allocation events of a finished torch.profiler profile (profile_memory=True), in
    time order, each with `total_allocated` and `alloc_size`; None where this torch has none."""
    try:
        from torch._C._profiler import _ExtraFields_Allocation
        roots = prof.profiler.kineto_results.experimental_event_tree()
    except (ImportError, AttributeError):
        return None

    def walk(nodes):
        for node in nodes:
            yield node
            yield from walk(node.children)
    events = [node for node in walk(roots) if isinstance(node.extra_fields, _ExtraFields_Allocation)]
    return [node.extra_fields for node in sorted(events, key=lambda node: node.start_time_ns)]


def count_cpu_allocations() -> bool:
    """Make c10's CPU allocator keep a running total of its live bytes (which the profiler
    reports with each allocation event): c10's flag caffe2_report_cpu_memory_usage, which
    torch does not expose. False where this torch lacks the flag or the events."""
    if not hasattr(torch._C._profiler, "_ExtraFields_Allocation"):
        return False
    name = "libc10.dylib" if sys.platform == "darwin" else "libc10.so"
    try:
        lib = ctypes.CDLL(str(Path(torch.__file__).parent / "lib" / name))
        ctypes.c_bool.in_dll(lib, "FLAGS_caffe2_report_cpu_memory_usage").value = True
    except (OSError, ValueError):
        return False
    return True


def foreach_norm(tensors: list, dtype: torch.dtype) -> list:
    """The L2 norm of each tensor, computed in `dtype`, in a few kernels for the whole list
    (as torch.nn.utils.clip_grad_norm_ does); one by one where this torch lacks it."""
    if hasattr(torch, "_foreach_norm"):
        return torch._foreach_norm(tensors, 2, dtype=dtype)
    return [torch.linalg.vector_norm(t, dtype=dtype) for t in tensors]


def foreach_mul_(tensors: list, scale: torch.Tensor):
    """Multiply each tensor by the scalar tensor `scale`, in place, in a few kernels."""
    if hasattr(torch, "_foreach_mul_"):
        torch._foreach_mul_(tensors, scale)
    else:
        for t in tensors:
            t.mul_(scale)


def mergeable_ranks(encoding) -> dict[bytes, int]:
    """tiktoken's BPE ranks of an Encoding (token bytes -> merge rank)."""
    return _method(encoding, "_mergeable_ranks", "exporting the GPT-2 tokenizer")


def grouped_mm(a: torch.Tensor, b: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """a (N, K) cut into row groups by `offsets` (int32, cumulative ends, on a's device) times
    b (G, K, M): rows [offsets[g-1], offsets[g]) @ b[g] -> (N, M), rows past offsets[-1]
    undefined; differentiable. torch.nn.functional.grouped_mm: public since 2.11 but a
    prototype (torch._grouped_mm underneath); call it only where `grouped_mm_fits`."""
    return torch.nn.functional.grouped_mm(a, b, offs=offsets)


_GROUPED_DTYPES = {"cpu": (torch.float32, torch.bfloat16, torch.float16),
                   "cuda": (torch.bfloat16,), "meta": (torch.bfloat16,)}


def grouped_mm_fits(a: torch.Tensor, *bs: torch.Tensor) -> bool:
    """Whether `grouped_mm` runs a against each b here in one call that reads nothing on the
    host, by the sources of torch 2.11 and 2.13 (the same rules in both):
    - GroupedMMUtils.h `_grouped_mm_validate_inputs`: float32, bfloat16 or float16 (not
      float64); each operand's last dim contiguous and its row stride a multiple of 16
      bytes (`check_valid_strides_and_return_transposed`), on CUDA its address too.
    - CPU (Blas.cpp `_grouped_mm`): `_grouped_mm_fallback`, a C++ loop of mm over the
      groups; the offsets are on the host already.
    - CUDA (cuda/GroupedBlas.cpp `_grouped_mm_cuda`): CUTLASS's grouped GEMM, offsets read
      on the device, only for bfloat16 on compute capability 9.x or 10.x
      (`_scaled_mm_allowed_device(sm90_only, sm100_only)`); anything else takes the
      fallback, whose `offs.cpu()` is a sync, then one mm per group. So: bf16 on 9.x (H100,
      H200). Not 10.x: pytorch#172439 (open), non-zero weight gradients for empty groups
      on B200. Not ROCm: its fast path is off unless built with CK. Group sizes need no
      alignment for a row-major a, nor in backward (a transposed against a row-major
      gradient: cuda/GroupMMCommon.cuh asserts it for the other layouts only).
    - meta: its shape function takes bfloat16 only."""
    if getattr(torch.nn.functional, "grouped_mm", None) is None:
        return False
    if a.dtype not in _GROUPED_DTYPES.get(a.device.type, ()):
        return False
    if a.device.type == "cuda" and (torch.version.hip or torch.cuda.get_device_capability(a.device)[0] != 9):
        return False
    aligned = a.device.type != "cuda" or all(t.data_ptr() % 16 == 0 for t in (a, *bs))
    return aligned and all(t.dtype == a.dtype and t.device == a.device and t.stride(-1) == 1
                           and t.stride(-2) * t.element_size() % 16 == 0 for t in (a, *bs))
