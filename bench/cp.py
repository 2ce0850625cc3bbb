"""Ring attention: the zigzag split against the contiguous one, in one run.

    torchrun --standalone --nproc_per_node=2 bench/cp.py [--block_size 2048 --heads 4]

Forward + backward of causal attention over the CP ring, B x heads x T x head_dim split
across the ranks, the two splits taking turns step by step. Work: attention blocks per
rank (`context_parallel.attention_blocks`, a causal diagonal counts 1/2) max / min = 1 with
zigzag, 2C-1 contiguous; the ring waits for its slowest rank, so the step time follows
the max. Traffic: what comm.py counted per rank against nanodist/cost.py's
`ring_attention_sends` (one layer, B x T x heads x head_dim).
"""
import torch
import torch.distributed as dist

from nanodist.cost import ring_attention_sends
from common import median, parser, print_table, start_processes, time_interleaved, write_json
from nanodist.parallel import comm
from nanodist.parallel.context_parallel import RingAttention, attention_blocks, split_sequence


def main():
    p = parser("cp", __doc__.splitlines()[0])
    p.add_argument("--block_size", type=int, default=2048)
    p.add_argument("--batch_size", type=int, default=1)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head_dim", type=int, default=64)
    args = p.parse_args()

    device, cp = start_processes()
    rank, group = dist.get_rank(), dist.group.WORLD
    B, H, T, D = args.batch_size, args.heads, args.block_size, args.head_dim
    q, k, v, probe = torch.randn(4, B, H, T, D, generator=torch.Generator().manual_seed(0)).to(device)

    def variant(zigzag):
        local = [split_sequence(t, 2, rank, cp, zigzag).requires_grad_() for t in (q, k, v)]
        grad = split_sequence(probe, 2, rank, cp, zigzag)
        attention = RingAttention(group, zigzag)
        return lambda: attention(*local).backward(grad)

    steps = {"zigzag": variant(True), "contiguous": variant(False)}
    times = time_interleaved(steps, args.warmup, args.steps, device, dist.barrier)
    with comm.counting() as counted:
        steps["zigzag"]()
    _, analytic = ring_attention_sends(B, T, H * D, 1, cp)
    rows = []
    for name, zigzag in (("zigzag", True), ("contiguous", False)):
        blocks = [attention_blocks(r, cp, zigzag) for r in range(cp)]
        rows.append({"split": name, "blocks max": max(blocks), "blocks min": min(blocks),
                     "max / min": max(blocks) / min(blocks), "step ms": median(times[name]) * 1e3})
    if rank == 0:
        print(f"ring attention: B={B} heads={H} T={T} head_dim={D}, CP={cp} on {device}")
        print_table(rows, "\nper-rank attention work and step time (median of interleaved steps)")
        sent = counted.payload_bytes["send"]
        print(f"\nK/V sent per rank and step: {sent / 2**20:.3f} MiB counted, "
              f"{analytic / 2**20:.3f} MiB analytic ((3 CP - 2) x 2 B T/CP heads head_dim fp32)")
        write_json(args.out, {"args": vars(args), "rows": rows, "sent_bytes": sent,
                              "analytic_bytes": analytic})
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
