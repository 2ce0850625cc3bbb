"""Context parallelism: ring vs Ulysses vs hybrid, the zigzag split against the contiguous one.

    torchrun --standalone --nproc_per_node=4 bench/cp.py [--block_size 2048 --heads 4]

Types (one run, interleaved): forward + backward of causal attention over the CP ranks
by ring attention, by Ulysses (heads % CP == 0) and by the hybrids (Ulysses over each
proper divisor U of CP that divides the heads, the ring over CP/U): step time, the bytes
counted per rank against traffic.py's model (ring sends + Ulysses all-to-alls), and the
bytes the attention keeps for backward per rank.

Splits (the ring alone): forward + backward of causal attention over the CP ring, B x
heads x T x head_dim split across the ranks, the two splits taking turns step by step.
Work: attention blocks per rank (`ring_attention.attention_blocks`, a causal diagonal
counts 1/2) max / min = 1 with
zigzag, 2C-1 contiguous; the ring waits for its slowest rank, so the step time follows
the max. Traffic: what the mesh's Comm counted per rank against
ring_attention.py's `ring_attention_sends` (one layer, B x T x heads x head_dim).

Long context (--model tiny, --context 2048, 8x the tests' tiny runs): the bytes the whole
model keeps for backward per rank (nanodist_tools/measure.py), one process against CP,
plus the fp32 state (16 bytes a parameter), against a stated per-rank budget
--budget_mib: which of the two fits.
"""
import torch
import torch.distributed as dist

from common import median, parser, print_table, start_processes, time_interleaved, write_json
from nanodist.model.gpt import GPT, ScaledDotProductAttention, model_config
from nanodist.parallel.context_parallel import local_tokens
from nanodist.parallel.layout import Layout
from nanodist.parallel.mesh import Mesh, build_mesh
from nanodist.parallel.parallelize import Setup, parallelize
from nanodist.parallel.ring_attention import RingAttention, attention_blocks, ring_attention_sends, split_sequence
from nanodist.parallel.ulysses import UlyssesAttention, ulysses_sends
from nanodist_tools.measure import saved_activations


def cp_types(cp: int, heads: int) -> dict[str, Layout]:
    """Every CP type these heads allow on cp ranks: name -> its layout."""
    layouts = {"ring": Layout(cp=cp)}
    if heads % cp == 0:
        layouts["ulysses"] = Layout(cp=cp, cp_type="ulysses")
    for u in range(2, cp):
        if cp % u == 0 and heads % u == 0:
            layouts[f"hybrid U={u}"] = Layout(cp=cp, cp_type="hybrid", ulysses_degree=u)
    return layouts


def attention_of(mesh):
    """The CP core of `mesh`'s layout, as context_parallel.apply_cp builds it."""
    core = RingAttention(mesh.cp_ring) if mesh.cp_ring.size > 1 else ScaledDotProductAttention(0.0)
    return UlyssesAttention(core, mesh.cp_ulysses) if mesh.cp_ulysses.size > 1 else core


def compare_types(args, device, cp, q, k, v, probe) -> list[dict]:
    """Step time, bytes counted vs analytic, and bytes kept for backward of each CP type."""
    B, H, T, D = q.shape
    steps, rows = {}, {}
    for name, layout in cp_types(cp, H).items():
        mesh = build_mesh(layout, device)
        mine = [local_tokens(t, 2, mesh.cp_ring, mesh.cp_ulysses) for t in (q, k, v, probe)]
        local, grad, attention = [t.clone().requires_grad_() for t in mine[:3]], mine[3], attention_of(mesh)
        steps[name] = lambda attention=attention, local=local, grad=grad: attention(*local).backward(grad)
        with mesh.comm.counting() as counted:
            with saved_activations() as kept:
                out = attention(*local)
            out.backward(grad)
        u, ring = layout.ulysses, cp // layout.ulysses
        analytic = (ring_attention_sends(B, T, H * D // u, 1, ring)[1] if ring > 1 else 0) + \
            ulysses_sends(B, T // cp, H * D, u, 4)[1] * (u - 1) / u
        rows[name] = {"type": name, "bytes sent MiB": counted.bus_bytes.get("send", 0.0) / 2**20
                      + counted.bus_bytes.get("all_to_all", 0.0) / 2**20, "analytic MiB": analytic / 2**20,
                      "kept for backward MiB": sum(kept.values()) / 2**20}
    times = time_interleaved(steps, args.warmup, args.steps, device, dist.barrier)
    for name, row in rows.items():
        row["step ms"] = median(times[name]) * 1e3
    return list(rows.values())


def kept_per_rank(args, mesh) -> tuple[int, int]:
    """(bytes kept for backward by one micro-batch of the whole model, state bytes) per rank."""
    mcfg = model_config(args.model, args.context, args.vocab_size)  # no dropout: CP has none
    stage = parallelize(GPT(mcfg, seed=1).to(mesh.device), Setup(mesh, seed=1)).parts[0]
    x, y = torch.randint(0, mcfg.vocab_size, (2, args.batch_size, args.context),
                         generator=torch.Generator().manual_seed(0)).to(mesh.device)
    with saved_activations(stage.module.parameters()) as kept:
        loss = stage.module(x, targets=y)
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
    types = compare_types(args, device, cp, q, k, v, probe)
    memory = []
    for name, layout_mesh in (("one process", Mesh.alone(device)), (f"CP={cp}", mesh)):
        kept, state = kept_per_rank(args, layout_mesh)
        memory.append({"layout": name, "activations MiB": kept / 2**20, "state MiB": state / 2**20,
                       "total MiB": (kept + state) / 2**20,
                       f"fits {args.budget_mib:g} MiB": (kept + state) / 2**20 <= args.budget_mib})
    if rank == 0:
        print(f"ring attention: B={B} heads={H} T={T} head_dim={D}, CP={cp} on {device}")
        print_table(types, "\nCP types: forward + backward of one attention layer per rank (median of "
                           "interleaved steps; bytes sent: ring sends + Ulysses all-to-alls, counted and analytic)")
        print_table(rows, "\nring: per-rank attention work and step time (median of interleaved steps)")
        sent = counted.payload_bytes["send"]
        print(f"\nK/V sent per rank and step: {sent / 2**20:.3f} MiB counted, "
              f"{analytic / 2**20:.3f} MiB analytic ((3 CP - 2) x 2 B T/CP heads head_dim fp32)")
        print_table(memory, f"\nlong context: {args.model}, {args.batch_size} x {args.context} tokens, "
                            f"per rank (activations kept for backward + fp32 AdamW state)")
        write_json(args.out, {"args": vars(args), "types": types, "rows": rows, "sent_bytes": sent,
                              "analytic_bytes": analytic, "memory": memory})
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
