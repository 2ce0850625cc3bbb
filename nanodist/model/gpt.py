"""GPT-2 as published, free of any parallelism (DESIGN.md invariant 4).

Learned position embeddings, pre-LayerNorm blocks, tanh-GELU MLP (4x), causal
self-attention through scaled_dot_product_attention, lm_head tied to wte. The state
dict uses GPT-2's names, so published weights load (hf.py).

Three details let the parallel strategies transform the model without changing it:
- attention takes its head count and sequence length from the c_attn output (heads
  split across TP ranks leave fewer local heads; under sequence parallelism the block
  input is a slice of the sequence, gathered by c_attn);
- the attention core (`sdpa`) is a module of its own and `forward` takes the tokens'
  positions: context parallelism swaps the one for ring attention and passes the other;
- initialisation draws every parameter from a generator seeded by (seed, name), so any
  slice of any parameter can be reproduced alone (DESIGN.md invariant 1).
"""
import math
import zlib
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanodist.model.loss import HeadLoss
from nanodist.model.moe import MoE


@dataclass
class GPTConfig:
    block_size: int = 1024
    vocab_size: int = 50304     # GPT-2's 50257 padded to a multiple of 64
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True
    moe_experts: int = 0        # > 0: every moe_every-th block's MLP is a mixture of experts (moe.py)
    moe_top_k: int = 2          # experts per token
    moe_every: int = 1          # blocks i with i % moe_every == moe_every - 1 are MoE
    moe_aux_loss_coef: float = 0.01  # weight of the load-balancing loss

    def is_moe(self, layer: int) -> bool:
        return self.moe_experts > 0 and layer % self.moe_every == self.moe_every - 1

    @property
    def n_moe_layers(self) -> int:
        return sum(self.is_moe(i) for i in range(self.n_layer))


PRESETS = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),          # 124M
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),  # 350M
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),   # 774M
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),      # 1558M
    "tiny": dict(n_layer=4, n_head=4, n_embd=128),            # for CPUs
}


def padded_vocab_size(vocab_size: int, multiple: int = 64) -> int:
    """50257 -> 50304: a multiple of 64 is faster on GPUs and divides by TP sizes."""
    return -(-vocab_size // multiple) * multiple


def model_config(preset: str, block_size: int, vocab_size: int, dropout: float = 0.0,
                 **moe) -> GPTConfig:
    """`moe`: the moe_* fields of GPTConfig (none: the dense GPT-2)."""
    if preset not in PRESETS:
        raise KeyError(f"unknown model preset {preset!r}; choose from {sorted(PRESETS)}")
    return GPTConfig(block_size=block_size, vocab_size=padded_vocab_size(vocab_size),
                     dropout=dropout, **PRESETS[preset], **moe)


class ScaledDotProductAttention(nn.Module):
    """softmax(q k^T / sqrt(d), causal) v, (B, heads, T, d) -> (B, heads, T, d). A module
    of its own, without parameters, so that context parallelism can swap it."""

    def __init__(self, dropout: float = 0.0):
        super().__init__()
        self.dropout = dropout

    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                              dropout_p=self.dropout if self.training else 0.0)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.head_dim = config.n_embd // config.n_head
        self.sdpa = ScaledDotProductAttention(config.dropout)

    def forward(self, x):
        qkv = self.c_attn(x)
        B, T, _ = qkv.shape
        q, k, v = (t.view(B, T, -1, self.head_dim).transpose(1, 2) for t in qkv.chunk(3, dim=-1))
        y = self.sdpa(q, k, v)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class Block(nn.Module):
    def __init__(self, config: GPTConfig, moe: bool = False):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MoE(config) if moe else MLP(config)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


# the two names of the one tied weight (a pipeline's first and last stage each hold one)
TIED_NAMES = ("transformer.wte.weight", "lm_head.weight")


class GPT(nn.Module):
    def __init__(self, config: GPTConfig, seed: int | None = 0):
        """seed=None leaves parameters uninitialised (for meta-device construction)."""
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList(Block(config, config.is_moe(i)) for i in range(config.n_layer)),
            ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied, counted once
        self.head_loss = HeadLoss()
        if seed is not None:
            self.init_weights(seed)

    def forward(self, idx, targets=None, positions=None):
        """idx (B, T) token ids -> logits (B, T, vocab_size), or with `targets` (B, T) the
        mean loss (nanoGPT's way: inside the forward, the head and the loss are one step,
        loss.py, that may never hold the whole logits). `positions` (T,): the tokens'
        places in their sequences (default 0..T-1; context parallelism passes its chunks').

        A part of the model runs too (torchtitan's way of pipeline stages): without wte
        the input is already the residual stream (B, T, C), without lm_head so is the output."""
        t, x = self.transformer, idx
        if t.wte is not None:
            pos = torch.arange(idx.size(1), device=idx.device) if positions is None else positions
            x = t.drop(t.wte(idx) + t.wpe(pos))
        for block in t.h:
            x = block(x)
        if self.lm_head is None:
            return x
        x = t.ln_f(x)
        return self.lm_head(x) if targets is None else self.head_loss(x, self.lm_head, targets)

    @torch.no_grad()
    def init_weights(self, seed: int):
        for name, param in self.named_parameters():
            param.copy_(self.initial_value(name, seed, param.shape))

    def initial_value(self, name: str, seed: int, shape) -> torch.Tensor:
        """The full initial tensor of parameter `name`, the same on every device and layout.

        GPT-2 init: N(0, 0.02) for weights and embeddings, N(0, 0.02/sqrt(2 n_layer)) for
        the projections that write into the residual stream, zeros for biases, ones for
        LayerNorm weights; experts (stacked, moe.py) and routers alike. Drawn on the CPU
        so CUDA and CPU runs start alike.
        """
        if name == "lm_head.weight":  # tied: one value under either name
            name = "transformer.wte.weight"
        if name.endswith((".bias", "_bias")):
            return torch.zeros(shape, device="cpu")
        if ".ln_" in name:
            return torch.ones(shape, device="cpu")
        std = 0.02
        if name.endswith(("c_proj.weight", "experts.proj_weight")):
            std /= math.sqrt(2 * self.config.n_layer)
        generator = torch.Generator().manual_seed(parameter_seed(seed, name))
        # device="cpu" even under `with torch.device("cuda")`: the CPU generator draws
        return torch.empty(shape, device="cpu").normal_(0.0, std, generator=generator)



class StepMetrics:
    """What the model reports of a training step beside its loss, for the logs: per MoE
    layer its load-balancing loss and tokens per expert (moe.py), and their mean loss.
    `parts`: the model, or this rank's pipeline chunks of it (its blocks keep their indices).

        reset()         before the step's forwards
        tensors()       after its backward, on the device: the trainer copies them to the
                        host with its own values (its one wait of the step)
        read(values)    those values, on the host -> {TensorBoard tag: value}
    `in_line`: the tags the step line shows too, by their short names.
    """
    in_line = {"MoE/aux_loss": "aux"}

    def __init__(self, parts: list[nn.Module], micro_steps: int):
        self.micro_steps = micro_steps
        self.moe = {int(path.split(".")[2]): m for part in parts  # transformer.h.<i>.mlp
                    for path, m in part.named_modules() if isinstance(m, MoE)}

    def reset(self):
        for moe in self.moe.values():
            moe.reset_stats()

    def tensors(self) -> list[torch.Tensor]:
        return [moe.step_stats() for moe in self.moe.values()]

    def read(self, values: list[float]) -> dict[str, float]:
        if not self.moe:
            return {}
        metrics, aux = {}, []
        for layer, moe in self.moe.items():
            n = 1 + moe.n_experts  # step_stats' length
            loss, tokens = moe.step_loads(values[:n], self.micro_steps)
            values = values[n:]
            aux.append(loss)
            metrics[f"MoE/aux_loss/layer{layer}"] = loss
            metrics[f"MoE/max_load/layer{layer}"] = max(tokens) / (sum(tokens) / len(tokens))  # 1: balanced
            metrics.update({f"MoE/tokens/layer{layer}/expert{e}": n for e, n in enumerate(tokens)})
        return {"MoE/aux_loss": sum(aux) / len(aux), **metrics}


def parameter_seed(seed: int, name: str) -> int:
    """A generator seed of (seed, parameter name): each tensor reproducible on its own."""
    return (seed * 0x9E3779B1 + zlib.crc32(name.encode())) % (2**63)


def expert_param_count(cfg: GPTConfig) -> int:
    """Parameters of one expert (a GPT-2 MLP)."""
    C = cfg.n_embd
    return 8 * C * C + (5 * C if cfg.bias else 0)


def flops_per_token(cfg: GPTConfig, n_params: int) -> float:
    """Training FLOPs per token (PaLM appendix B, as nanoGPT): 6N + 12 L T C.

    N: all parameters but the position embeddings; the tied wte/lm_head matrix counts
    once (as lm_head it is a matmul; the embedding lookup is free). 6 = forward 2 +
    backward 4 per weight; 12 L T C: attention scores and weighted sum, fwd + bwd.
    A mixture of experts counts the k of its E experts a token passes (active parameters).
    """
    idle = cfg.n_moe_layers * (cfg.moe_experts - cfg.moe_top_k) * expert_param_count(cfg)
    n = n_params - cfg.block_size * cfg.n_embd - idle
    return 6 * n + 12 * cfg.n_layer * cfg.block_size * cfg.n_embd
