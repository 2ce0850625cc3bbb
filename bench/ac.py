"""Activation checkpointing and the chunked loss: memory kept for backward against step
time, on one process.

    python bench/ac.py [--model tiny --block_size 256 --batch_size 8]

Variants none, full, full every 2nd block, selective, and none and full with the loss in
chunks (--loss_chunks 0: the log-softmax of the logits is what checkpointing cannot
remove) take turns step by step (forward + backward + AdamW step on the same batch). Memory: the bytes one forward keeps for
backward (nanodist_tools/measure.py `saved_activations`) against nanodist/planner/cost.py's
`activation_bytes`; time: median step and its ratio to no checkpointing.
"""
import torch

from common import median, parser, print_table, time_interleaved, write_json
from nanodist.run.launch import pick_device
from nanodist.model.gpt import GPT, model_config
from nanodist.parallel.layout import Layout
from nanodist.parallel.mesh import Mesh
from nanodist.parallel.parallelize import Setup, parallelize
from nanodist.planner.cost import activation_bytes
from nanodist_tools.measure import saved_activations

VARIANTS = {"none": Layout(), "full": Layout(checkpointing="full"),
            "full, every 2nd": Layout(checkpointing="full", ac_every=2),
            "selective": Layout(checkpointing="selective"),
            "none, chunked loss": Layout(loss_chunks=0), "full, chunked loss": Layout(checkpointing="full", loss_chunks=0)}


def main():
    p = parser("ac", __doc__.splitlines()[0])
    p.add_argument("--model", default="tiny")
    p.add_argument("--block_size", type=int, default=256)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--vocab_size", type=int, default=8192)
    args = p.parse_args()

    device = pick_device("auto")
    mcfg = model_config(args.model, args.block_size, args.vocab_size)
    # ids and targets each a storage of its own, as the trainer's (the model counts them apart)
    x, y = (t.clone() for t in torch.randint(0, mcfg.vocab_size, (2, args.batch_size, args.block_size),
                                             generator=torch.Generator().manual_seed(0)).to(device))

    def build(layout):
        with torch.device(device):
            parallel = parallelize(GPT(mcfg, seed=1), Setup(Mesh.alone(device, layout=layout), seed=1))
        stage = parallel.parts[0]
        optimizer = torch.optim.AdamW(parallel.params.param_groups(0.1), lr=1e-4)

        def step():
            stage.module(x, targets=y).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        with saved_activations(stage.module.parameters()) as kept:
            loss = stage.module(x, targets=y)
        kept.pop(loss.untyped_storage().data_ptr())  # the loss itself
        loss.backward()
        optimizer.zero_grad(set_to_none=True)
        return step, sum(kept.values())

    built = {name: build(layout) for name, layout in VARIANTS.items()}
    times = time_interleaved({name: step for name, (step, _) in built.items()},
                             args.warmup, args.steps, device)
    rows = []
    for name, layout in VARIANTS.items():
        kept, analytic = built[name][1], activation_bytes(mcfg, layout, args.batch_size)
        rows.append({"variant": name, "kept MiB": kept / 2**20, "analytic MiB": analytic / 2**20,
                     "ratio": kept / analytic, "step ms": median(times[name]) * 1e3,
                     "time / none": median(times[name]) / median(times["none"])})
    print(f"model {args.model}: L={mcfg.n_layer} C={mcfg.n_embd} V={mcfg.vocab_size}, "
          f"batch {args.batch_size}x{args.block_size} on {device}")
    print_table(rows, "\nactivation memory against step time (median of interleaved steps)")
    write_json(args.out, {"args": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
