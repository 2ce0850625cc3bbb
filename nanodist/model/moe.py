"""Mixture of experts: GPT-2's MLP replaced, in every `moe_every`-th block, by E expert
MLPs and a router (Switch Transformer, GShard, Mixtral), free of any parallelism.

    x (B, T, C) -> tokens (N, C) -> router -> p = softmax (N, E) -> top-k experts per token,
        gates = their p (renormalised over the k when k > 1)
    the N k (token, expert) assignments sorted by expert:  [e0 e0 e0 | e1 | | e3 e3 ...]
        -> experts(routed, counts): expert e's MLP on its `counts[e]` rows
        -> back to (N, k, C), sum of gate x output over the k -> (B, T, C)

Dropless: every token reaches its k experts, however uneven (no capacity factor, no
token dropped, as torchtitan's and Megatron's dropless MoE); an expert may get none.
Ties: a stable sort, so equal probabilities go to the lower expert index (the same
choice on every layout).

Load balancing (Switch Transformer, eq. 4): aux = E sum_e f_e P_e, with f_e the share of
the N k assignments that went to expert e and P_e the mean router probability of e;
1 when balanced. It is computed per micro-batch (its token statistics summed by
`token_sum`, the identity here; context parallelism sums them over the ranks holding
parts of the same sequences, as it swaps the attention core), and its gradient (weighted
by `aux_loss_weight`) is added in backward by the block's output itself (Megatron's
MoEAuxLossAutoScaler), so that the loss, the runners and the pipeline stages need
nothing. `stats` sums it and the assignments per expert for the trainer's logs
(`step_stats`, `step_loads`; gpt.StepMetrics names and gathers them).

`experts` is the one seam expert parallelism replaces (parallel/expert_parallel.py):
the same call, the routed rows sent to the ranks that hold their experts and back.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from nanodist import compat


class Experts(nn.Module):
    """n GPT-2 MLPs as stacked tensors (expert parallelism shards dim 0):
    fc_weight (n, C, 4C), fc_bias (n, 4C), proj_weight (n, 4C, C), proj_bias (n, C).

    All n run at once, one of two ways, no loop over them in Python:

        grouped  routed (N, C), offsets = cumsum(counts) on the device
                 -> grouped mm with fc_weight (N, 4C) -> gelu -> grouped mm with proj_weight (N, C)
        padded   routed placed in (n, M, C), M the largest count, zeros past each count
                 -> bmm (n, M, 4C) -> gelu -> bmm (n, M, C) -> its N real rows, in order

    Grouped where compat.grouped_mm_fits (CPU in float32 or bf16; CUDA in bf16 on an H100):
    nothing is read on the host. Padded elsewhere (float64, CUDA in float32, other GPUs):
    n M rows, N times the busiest expert's count over the mean; M is read on the host, one
    wait per layer (none under expert parallelism: its host has the counts already). A
    static M = N / k, the tokens (no expert gets one twice), would spare the wait and cost
    n/k times the matmuls' FLOPs and activations (4x with 8 experts, top-2) where the wait
    costs one drained launch queue: padded waits.

    Every expert runs, on no rows too: its gradient is then zeros, not None, as in a layout
    where its rows are elsewhere (AdamW steps it either way). `host_reads` counts what this
    module read on the host (`host`)."""

    def __init__(self, n: int, n_embd: int, bias: bool = True):
        super().__init__()
        self.fc_weight = nn.Parameter(torch.empty(n, n_embd, 4 * n_embd))
        self.proj_weight = nn.Parameter(torch.empty(n, 4 * n_embd, n_embd))
        self.fc_bias = nn.Parameter(torch.empty(n, 4 * n_embd)) if bias else None
        self.proj_bias = nn.Parameter(torch.empty(n, n_embd)) if bias else None
        self.host_reads = 0

    def host(self, t: torch.Tensor) -> list:
        """t's values on the host, counted (on CUDA the host waits for the GPU to reach t)."""
        self.host_reads += 1
        return t.tolist()

    def forward(self, routed: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """routed (sum counts, C): the rows of expert 0, then 1, ...; counts (n,) on its
        device -> the same shape. Its gradient must be dense (torch's grouped mm refuses a
        broadcast one): MoE's is a gather's."""
        return self.run(routed, counts)

    def run(self, routed: torch.Tensor, counts: torch.Tensor, most: int | None = None) -> torch.Tensor:
        """`forward`; `most`, the largest count, where the host knows it already."""
        device = routed.device.type
        autocast = torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device)
        # the matmuls' dtype, cast as autocast casts for bmm (it does not cover grouped_mm)
        dtype = torch.get_autocast_dtype(device) if autocast else self.fc_weight.dtype
        x, w1, w2 = routed.to(dtype), self.fc_weight.to(dtype), self.proj_weight.to(dtype)
        ends = counts.cumsum(0)
        expert = torch.bucketize(torch.arange(len(x), device=x.device), ends, right=True)  # of each row
        if compat.grouped_mm_fits(x, w1, w2):
            offsets = ends.to(torch.int32)
            h = self._bias(compat.grouped_mm(x, w1, offsets), self.fc_bias, expert)
            return self._bias(compat.grouped_mm(F.gelu(h, approximate="tanh"), w2, offsets), self.proj_bias, expert)
        n, most = len(counts), self.host(counts.max()) if most is None else most
        slot = torch.arange(len(x), device=x.device) + expert * most - (ends - counts)[expert]  # in (n, M)
        padded = x.new_zeros(n * most, x.size(1)).index_copy(0, slot, x).view(n, most, x.size(1))
        h = self._bias(torch.bmm(padded, w1), self.fc_bias)
        y = self._bias(torch.bmm(F.gelu(h, approximate="tanh"), w2), self.proj_bias)
        return y.view(n * most, y.size(2)).index_select(0, slot)

    @staticmethod
    def _bias(h: torch.Tensor, bias: torch.Tensor | None, expert: torch.Tensor | None = None) -> torch.Tensor:
        """h plus its expert's bias, in h's dtype as nn.Linear's (bf16 under autocast): per
        row of (N, D) by `expert` (a lookup: its backward sums each expert's rows in order),
        or per expert of (n, M, D)."""
        if bias is None:
            return h
        bias = bias.to(h.dtype)
        return h + (F.embedding(expert, bias) if expert is not None else bias.unsqueeze(1))


class _AuxLossGradient(torch.autograd.Function):
    """Forward: `out` unchanged. Backward: `out`'s gradient, and `weight` as the gradient
    of `aux`: as if weight x aux had been added to the loss."""

    @staticmethod
    def forward(ctx, out, aux, weight: float):
        ctx.weight, ctx.aux = weight, (aux.dtype, aux.device)
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad):
        dtype, device = ctx.aux
        return grad, torch.full((), ctx.weight, dtype=dtype, device=device), None


class TokenSum(nn.Module):
    """Per-token statistics summed over every rank holding part of the micro-batch: here
    all of its tokens are local, so the identity."""

    def forward(self, stats):
        return stats


class MoE(nn.Module):
    """Router and experts in place of a block's MLP: (B, T, C) -> (B, T, C)."""

    def __init__(self, config):
        super().__init__()
        self.token_sum = TokenSum()
        self.n_experts, self.top_k = config.moe_experts, config.moe_top_k
        self.router = nn.Linear(config.n_embd, config.moe_experts, bias=False)
        self.experts = Experts(config.moe_experts, config.n_embd, config.bias)
        self.dropout = nn.Dropout(config.dropout)
        # the loss weight of aux per micro-step: the coefficient / micro-steps per step
        # (parallelize sets it: the loss is a mean over the micro-steps too)
        self.aux_loss_weight = config.moe_aux_loss_coef
        self.reset_stats()

    def reset_stats(self):
        """calls, sum of aux, sum of assignments per expert (this rank's tokens; on its device:
        the trainer reads them once a step, not every forward)."""
        self.stats = [0, 0.0, 0]

    def step_stats(self) -> torch.Tensor:
        """The forwards' stats since `reset_stats`, on the device: [aux sum, assignments per
        expert...], in float64 (counts stay exact)."""
        _, aux, assigned = self.stats
        return torch.cat([torch.as_tensor(aux, device=assigned.device).double().view(1), assigned.double()])

    def step_loads(self, stats: list[float], micro_steps: int) -> tuple[float, list[float]]:
        """`step_stats` on the host -> the load-balancing loss (mean over the forwards) and
        the (token, expert) assignments of this rank's tokens per expert in the step (a
        checkpointed block's recomputed forward is not counted twice)."""
        calls = self.stats[0]  # forwards per micro-step: 1, or 2 (recomputed)
        return stats[0] / calls, [n * micro_steps / calls for n in stats[1:]]

    def route(self, x: torch.Tensor):
        """x (N, C) -> gates (N, k), experts (N, k), assignments per expert (E,) and the
        load-balancing loss."""
        logits = self.router(x)
        probs = logits.to(torch.promote_types(logits.dtype, torch.float32)).softmax(-1)
        gates, experts = torch.sort(probs, dim=-1, descending=True, stable=True)
        gates, experts = gates[:, :self.top_k], experts[:, :self.top_k]
        if self.top_k > 1:
            gates = gates / gates.sum(-1, keepdim=True)
        assigned = experts.flatten()  # a scatter, not bincount: on CUDA that waits for the max id
        counts = torch.zeros(self.n_experts, dtype=torch.long, device=x.device).scatter_add_(
            0, assigned, torch.ones_like(assigned))
        E = self.n_experts
        stats = self.token_sum(torch.cat([counts.to(probs.dtype), probs.sum(0), probs.new_full((1,), len(x))]))
        share, mean_prob = stats[:E] / (stats[-1] * self.top_k), stats[E:2 * E] / stats[-1]
        aux = E * (share * mean_prob).sum()
        return gates, experts, counts, aux

    def forward(self, x):
        B, T, C = x.shape
        tokens = x.reshape(-1, C)
        gates, experts, counts, aux = self.route(tokens)
        order = torch.argsort(experts.flatten(), stable=True)  # assignments by expert
        out = self.experts(tokens[order // self.top_k], counts)
        unsorted = torch.empty_like(out)
        unsorted[order] = out
        y = (gates.to(out.dtype).unsqueeze(-1) * unsorted.view(-1, self.top_k, C)).sum(1)
        y = self.dropout(y.view(B, T, C))
        calls, aux_sum, assigned = self.stats
        self.stats = [calls + 1, aux_sum + aux.detach(), assigned + counts.detach()]
        if torch.is_grad_enabled() and y.requires_grad and self.aux_loss_weight:
            y = _AuxLossGradient.apply(y, aux, self.aux_loss_weight)
        return y


def moe_layers(model: nn.Module) -> list[MoE]:
    return [m for m in model.modules() if isinstance(m, MoE)]
