"""The rank side of `python -m nanodist_tools.diverge`: one Trainer of train.py's flags runs
K steps while hooks keep, on the CPU, this rank's piece of

    every module's forward output and the gradient reaching it (a hook on the output
    tensor), the k-th call of a module being micro-step k (micro-batch k of a pipeline);
    the loss of the step (the trainer's: the global batch's mean);
    every parameter's reduced gradient (before AdamW steps) and its value after the step,
    as full GPT-2 tensors (`Params.full_tensors`, the checkpoints' machinery; rank 0 keeps them)

and with each piece the traffic Comm had counted so far on this rank. What the pieces
need to be reassembled (diverge_assemble.py) is saved beside them: which DP slot, CP
tokens and TP columns this rank holds. Nothing is gathered inside a module's hook: a
collective there could deadlock a pipeline whose stages run different modules (the
optimizer's hooks, which every rank reaches together, gather the parameters).
"""
import math
import time
from collections import Counter
from dataclasses import asdict
from functools import partial
from pathlib import Path

import torch
from torch.distributed.tensor import DTensor

from nanodist.model.gpt import GPT
from nanodist.parallel.context_parallel import local_tokens
from nanodist.parallel.tp_plan import gpt_plan
from nanodist.run.config import parse_args
from nanodist.run.trainer import Trainer
from nanodist_tools.diverge_assemble import FORMAT, flat_index, full_shape, sampled


def _local(t):
    return t.to_local() if isinstance(t, DTensor) else t


def feature_sharded(layout, n_layer: int) -> dict[str, int]:
    """Module path -> blocks, for the outputs TP splits on their last dim (columns, or the
    vocabulary under loss parallelism) or on the heads (the attention core): the TP plan's
    colwise modules (c_attn's q, k, v as 3 blocks, placement.to_rank_major)."""
    if layout.tp == 1:
        return {}
    out = {}
    for path, style in gpt_plan(n_layer, layout.sequence_parallel, layout.loss_parallel).items():
        if style.kind == "colwise" or (style.kind == "head" and style.loss_parallel):
            out[path] = 3 if style.qkv else 1
    out.update({f"transformer.h.{i}.attn.sdpa": 1 for i in range(n_layer)})
    return out


SKIPPED = (torch.nn.ModuleList, torch.nn.ModuleDict, torch.nn.Identity)  # containers; another stage's block


class Recorder:
    def __init__(self, trainer: Trainer, samples: int = 0):
        """`samples`: 0 keeps whole pieces; n > 0 a digest, about n entries of each full tensor."""
        self.trainer, self.step, self.records, self.handles = trainer, 0, [], []
        self.calls, self.samples = Counter(), samples
        with torch.device("meta"):  # the model's own paths and shapes: no wrapper's, no swapped core's
            self.plain = GPT(trainer.model_cfg, seed=None)
        self.info = self.meta()
        plain = {path for path, _ in self.plain.named_modules() if path}
        for part in trainer.parallel.parts:
            modules = dict(part.gpt.named_modules())
            # a block whose forward activation checkpointing replaced runs its modules again
            # in backward: only the block's own output is recorded (its hook fires once)
            recomputed = tuple(f"{path}." for path, m in modules.items() if "forward" in vars(m))
            for path, module in modules.items():
                if path in plain and not isinstance(module, SKIPPED) and not path.startswith(recomputed or "\0"):
                    self.handles.append(module.register_forward_hook(partial(self._forward, path)))
        optimizer = trainer.optimizer
        self.handles.append(optimizer.register_step_pre_hook(lambda *_: self._params("grad")))
        self.handles.append(optimizer.register_step_post_hook(lambda *_: self._params("value")))

    def remove(self):
        for handle in self.handles:
            handle.remove()

    def keep(self, name: str, kind: str, tensor: torch.Tensor, step: int | None = None,
             calls: dict | None = None):
        """This rank's piece, and the collectives Comm counted so far (`calls`, or now)."""
        key = (self.step if step is None else step, name, kind)
        piece = _local(tensor).detach().to("cpu", copy=True)
        if self.samples and kind != "loss":
            piece = self.digest(piece, name, kind, self.calls[key])
        calls = dict(self.trainer.comm.counter.calls) if calls is None else calls  # {}: none counted yet
        self.records.append((*key, self.calls[key], piece, calls))
        self.calls[key] += 1

    def digest(self, piece: torch.Tensor, name: str, kind: str, micro: int) -> torch.Tensor:
        """(2, n): the flat indices in the full tensor and the values of this piece's entries
        among the full tensor's sampled ones (parameters: rank 0 has them whole)."""
        if kind in ("forward", "backward"):
            shape = full_shape(self.info, name, piece.shape)
            flat = flat_index(piece.shape, shape, self.info, micro, self.info["feature_sharded"].get(name, 1))
        else:
            shape, flat = piece.shape, torch.arange(piece.numel()).view(piece.shape)
        keep = sampled(flat, self.samples, math.prod(shape))
        return torch.stack([flat[keep].double(), piece[keep].double()])

    def _forward(self, path, module, inputs, output):
        per_token = isinstance(output, torch.Tensor) and _local(output).dim() in (3, 4)
        if not (torch.is_grad_enabled() and per_token):
            return  # an evaluation; the loss (kept from the trainer), the router's and experts' rows
        self.keep(path, "forward", output)
        if output.requires_grad:
            output.register_hook(lambda grad: self.keep(path, "backward", grad))

    @torch.no_grad()
    def _params(self, kind: str):
        """Collective (every rank's optimizer steps): the full tensors, kept by rank 0."""
        params = self.trainer.params
        tensors = [(p.grad if p.grad is not None else torch.zeros_like(p)) if kind == "grad" else p
                   for p in params.param_list()]
        calls = dict(self.trainer.comm.counter.calls)
        with self.trainer.comm.counting():  # the tool's own gathers are not the layout's traffic
            for name, full in params.full_tensors(tensors):
                if self.trainer.rank == 0:
                    self.keep(name, kind, full, calls=calls)
        if kind == "value":
            self.step += 1

    def meta(self) -> dict:
        """What reassembling this rank's pieces needs, and what the report names."""
        t, mesh, cfg = self.trainer, self.trainer.mesh, self.trainer.cfg
        layout = t.layout
        positions = torch.arange(cfg.block_size)
        if layout.cp > 1:  # the tokens this CP rank holds, zigzag order included
            positions = local_tokens(positions, 0, mesh.cp_ring, mesh.cp_ulysses)
        return {"rank": t.rank, "world": mesh.world_size, "layout": layout.name,
                "coordinates": layout.coordinates(t.rank), "dp": mesh.dp.size, "dp_rank": mesh.dp.rank,
                "tp": mesh.tp.size, "tp_rank": mesh.tp.rank, "divisor": grad_divisor(layout, t.micro_steps),
                "positions": positions.tolist(), "micro_steps": t.micro_steps,
                "batch_size": cfg.batch_size, "block_size": cfg.block_size, "dtype": cfg.dtype,
                # the peak learning rate: no step's is larger, so the bound it enters stays a bound
                "lr": cfg.learning_rate, "eps": t.optimizer.param_groups[0]["eps"], "model": asdict(t.model_cfg),
                "n_params": t.n_params, "seed": cfg.seed, "data": [cfg.dataset, str(cfg.data_dir)],
                "gradient_clipping": cfg.max_grad_norm if cfg.gradient_clipping else None,
                "feature_sharded": feature_sharded(layout, t.model_cfg.n_layer),
                "placements": {name: asdict(p) for name, p in _placements(t.params).items()},
                "param_shapes": {name: list(p.shape) for name, p in self.plain.named_parameters()},
                "layout_fields": asdict(layout), "samples": self.samples, "format": FORMAT}


def grad_divisor(layout, micro_steps: int) -> int:
    """What a rank's activation gradients are divided by to be one process's: each rank's
    loss is the mean over its own tokens (DP x CP of them make the global mean), and
    PyTorch's pipelining divides the gradients by the micro-batches after backward, where
    the other runners divide each micro-batch's loss before it."""
    native_pipeline = layout.pp > 1 and layout.implementation == "pytorch"
    return layout.dp_cp * (micro_steps if native_pipeline else 1)


def kept_bytes(model, tokens: int, micro_steps: int, steps: int, itemsize: int, samples: int = 0,
               replicas: int = 1) -> int:
    """What all ranks of a layout keep together (they run on this machine): one process's
    whole model keeps per token and block 16 outputs of 1-4 C values and their gradients,
    the embeddings', ln_f's and the logits'; per step the parameters' gradients and values
    (rank 0 alone). The ranks split the tokens, but `replicas` (TP) ranks may each keep a
    whole copy of an activation (TP without SP). A digest: per tensor and micro-step
    `samples` (index, value) pairs in float64."""
    with torch.device("meta"):
        params = list(GPT(model, seed=None).parameters())
    if samples:
        tensors = replicas * (32 * model.n_layer + 10) * micro_steps + 2 * len(params)
        return steps * tensors * samples * 16
    per_token = (32 * model.n_layer + 6) * model.n_embd + 2 * model.vocab_size
    return steps * (replicas * tokens * per_token + 2 * sum(p.numel() for p in params)) * itemsize


def _placements(params) -> dict:
    """GPT-2 name -> Placement, a pipeline's stages' merged."""
    out = dict(getattr(params, "placements", None) or {})
    for chunk in getattr(params, "chunks", []):
        out.update(_placements(chunk))
    return out


def record_rank(argv: list[str], out_dir: str, steps: int = 1, samples: int = 0) -> dict:
    """Rank side: train `steps` steps of train.py's flags `argv`, recording; save this rank's
    pieces to `out_dir`/rank<r>.pt (tensors, lists and dicts only: read back with weights_only=True)."""
    start = time.perf_counter()
    trainer = Trainer(parse_args([*argv, f"--max_steps={steps}"]))
    recorder = Recorder(trainer, samples)
    for record in trainer.steps():
        if trainer.rank == 0:
            recorder.keep("loss", "loss", torch.tensor(record["loss"], dtype=torch.float64), record["step"])
    recorder.remove()
    kept = sum(r[4].numel() * r[4].element_size() for r in recorder.records)
    torch.save({"meta": recorder.info, "records": recorder.records}, Path(out_dir, f"rank{trainer.rank}.pt"))
    return {"rank": trainer.rank, "bytes": kept, "seconds": time.perf_counter() - start}
