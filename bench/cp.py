"""Ring attention: the zigzag split against the contiguous one, in one run.

    torchrun --standalone --nproc_per_node=2 bench/cp.py [--block_size 2048 --heads 4]

Forward + backward of causal attention over the CP ring, B x heads x T x head_dim split
across the ranks, the two splits taking turns step by step. Work: attention blocks per
rank (`context_parallel.attention_blocks`, a causal diagonal counts 1/2) max / min = 1 with
zigzag, 2C-1 contiguous; the ring waits for its slowest rank, so the step time follows
the max. Traffic: what the mesh's Comm counted per rank against
nanodist/planner/traffic.py's `ring_attention_sends` (one layer, B x T x heads x head_dim).

Long context (--model tiny, --context 2048, 8x the tests' tiny runs): the bytes the whole
model keeps for backward per rank (nanodist_tools/measure.py), one process against CP,
plus the fp32 state (16 bytes a parameter), against a stated per-rank budget
--budget_mib: which of the two fits.
"""
import torch
import torch.distributed as dist

from common import median, parser, print_table, start_processes, time_interleaved, write_json
from nanodist.model.gpt import GPT, model_config
from nanodist.parallel.context_parallel import RingAttention, attention_blocks, split_sequence
from nanodist.parallel.layout import Layout, Mesh, build_mesh
from nanodist.parallel.parallelize import Setup, parallelize
from nanodist_tools.measure import saved_activations
from nanodist.planner.traffic import ring_attention_sends


def kept_per_rank(args, mesh) -> tuple[int, int]:
    """(bytes kept for backward by one micro-batch of the whole model, state bytes) per rank."""
    mcfg = model_config(args.model, args.context, args.vocab_size)  # no dropout: CP has none
    stage = parallelize(GPT(mcfg, seed=1).to(mesh.device), Setup(mesh, seed=1)).stages[0]
    x, y = torch.randint(0, mcfg.vocab_size, (2, args.batch_size, args.context),
                         generator=torch.Generator().manual_seed(0)).to(mesh.device)
    with saved_activations(stage.module.parameters()) as kept:
        loss = stage.loss_fn(stage.module(x), y)
    kept.pop(loss.untyped_storage().data_ptr())  # the loss itself
    loss.backward()
    return sum(kept.values()), 16 * sum(p.numel() for p in stage.gpt.parameters())


def main():
    p = parser("cp", __doc__.splitlines()[0])
    p.add_argument("--block_size", type=int, default=2048)
    p.add_argument("--batch_size", type=int, default=1)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head_dim", type=int, default=64)
    p.add_argument("--model", default="tiny")
    p.add_argument("--context", type=int, default=2048, help="long-context block size")
    p.add_argument("--vocab_size", type=int, default=512)
    p.add_argument("--budget_mib", type=float, default=64, help="memory a rank may use")
    args = p.parse_args()

    device, cp = start_processes()
    mesh = build_mesh(Layout(cp=cp), device)
    rank = mesh.cp.rank
    B, H, T, D = args.batch_size, args.heads, args.block_size, args.head_dim
    q, k, v, probe = torch.randn(4, B, H, T, D, generator=torch.Generator().manual_seed(0)).to(device)

    def variant(zigzag):
        local = [split_sequence(t, 2, rank, cp, zigzag).requires_grad_() for t in (q, k, v)]
        grad = split_sequence(probe, 2, rank, cp, zigzag)
        attention = RingAttention(mesh.cp, zigzag)
        return lambda: attention(*local).backward(grad)

    steps = {"zigzag": variant(True), "contiguous": variant(False)}
    times = time_interleaved(steps, args.warmup, args.steps, device, dist.barrier)
    with mesh.comm.counting() as counted:
        steps["zigzag"]()
    _, analytic = ring_attention_sends(B, T, H * D, 1, cp)
    rows = []
    for name, zigzag in (("zigzag", True), ("contiguous", False)):
        blocks = [attention_blocks(r, cp, zigzag) for r in range(cp)]
        rows.append({"split": name, "blocks max": max(blocks), "blocks min": min(blocks),
                     "max / min": max(blocks) / min(blocks), "step ms": median(times[name]) * 1e3})
    memory = []
    for name, layout_mesh in (("one process", Mesh.alone(device)), (f"CP={cp}", mesh)):
        kept, state = kept_per_rank(args, layout_mesh)
        memory.append({"layout": name, "activations MiB": kept / 2**20, "state MiB": state / 2**20,
                       "total MiB": (kept + state) / 2**20,
                       f"fits {args.budget_mib:g} MiB": (kept + state) / 2**20 <= args.budget_mib})
    if rank == 0:
        print(f"ring attention: B={B} heads={H} T={T} head_dim={D}, CP={cp} on {device}")
        print_table(rows, "\nper-rank attention work and step time (median of interleaved steps)")
        sent = counted.payload_bytes["send"]
        print(f"\nK/V sent per rank and step: {sent / 2**20:.3f} MiB counted, "
              f"{analytic / 2**20:.3f} MiB analytic ((3 CP - 2) x 2 B T/CP heads head_dim fp32)")
        print_table(memory, f"\nlong context: {args.model}, {args.batch_size} x {args.context} tokens, "
                            f"per rank (activations kept for backward + fp32 AdamW state)")
        write_json(args.out, {"args": vars(args), "rows": rows, "sent_bytes": sent,
                              "analytic_bytes": analytic, "memory": memory})
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
