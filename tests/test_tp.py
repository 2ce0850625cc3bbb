"""Tensor parallelism: each layer against its unsharded module, vocab-parallel cross
entropy against F.cross_entropy, whole GPT (custom and DTensor, +-SP, +-loss
parallelism, +-deferred init) against one process, and layout-invariant init."""
import copy

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

from harness import adamw_param_bound, relative_drift, run_distributed
from nanodist.model.gpt import GPT, MLP, Block, CausalSelfAttention, GPTConfig
from nanodist.parallel.layout import Layout
from nanodist.parallel.mesh import Mesh, build_mesh
from nanodist.parallel.loss_parallel import vocab_parallel_cross_entropy
from nanodist.parallel.parallelize import Setup, parallelize
from nanodist.parallel.params import full_state_dict
from nanodist.parallel.tensor_parallel import apply_custom_tp
from nanodist.parallel.tp_plan import Style, shard_of

MODEL = GPTConfig(block_size=32, vocab_size=128, n_layer=2, n_head=4, n_embd=64)
SEED = 3
LR = 1e-3  # AdamW in train_tiny


# ---- layers, in float64: only the reduction order differs (1e-12 relative: ~5000 ulp) ----

class _Head(nn.Module):
    def __init__(self):
        super().__init__()
        self.lm_head = nn.Linear(MODEL.n_embd, MODEL.vocab_size, bias=False)


class _Embedding(nn.Module):
    def __init__(self):
        super().__init__()
        self.wte = nn.Embedding(MODEL.vocab_size, MODEL.n_embd)


def _layer_cases():
    col, row, qkv = Style("colwise"), Style("rowwise"), Style("colwise", qkv=True)
    sp_col, sp_row, sp_qkv = (Style("colwise", True), Style("rowwise", True),
                              Style("colwise", True, qkv=True))
    return [  # (name, module, plan, input is sequence-sharded, output is vocab-sharded)
        ("mlp", MLP(MODEL), {"c_fc": col, "c_proj": row}, False, False),
        ("attention", CausalSelfAttention(MODEL), {"c_attn": qkv, "c_proj": row}, False, False),
        ("block", Block(MODEL), {"attn.c_attn": qkv, "attn.c_proj": row,
                                 "mlp.c_fc": col, "mlp.c_proj": row}, False, False),
        ("block+sp", Block(MODEL), {"ln_1": Style("sequence_norm"), "attn.c_attn": sp_qkv,
                                    "attn.c_proj": sp_row, "ln_2": Style("sequence_norm"),
                                    "mlp.c_fc": sp_col, "mlp.c_proj": sp_row}, True, False),
        ("embedding", _Embedding(), {"wte": Style("vocab_embedding")}, False, False),
        ("head", _Head(), {"lm_head": Style("head")}, False, False),
        ("head+lp", _Head(), {"lm_head": Style("head", loss_parallel=True)}, False, True),
        ("head+sp+lp", _Head(), {"lm_head": Style("head", True, loss_parallel=True)}, True, True),
    ]


def _check_layers():
    tp = dist.get_world_size()
    torch.manual_seed(0)
    mesh = build_mesh(Layout(tp=tp), torch.device("cpu"))
    rank, group = mesh.tp.rank, mesh.tp
    for name, ref, plan, seq_sharded, vocab_sharded in _layer_cases():
        for p in ref.parameters():  # biases and LayerNorms away from 0 and 1
            nn.init.normal_(p, std=0.5)
        ref = ref.double()
        sharded = copy.deepcopy(ref)
        apply_custom_tp(sharded, plan, mesh.tp, SEED, mesh.device)
        forward = (lambda m, x: m.wte(x)) if name == "embedding" else (
            (lambda m, x: m.lm_head(x)) if name.startswith("head") else (lambda m, x: m(x)))
        if name == "embedding":
            x = torch.randint(0, MODEL.vocab_size, (2, 8))
        else:
            x = torch.randn(2, 8, MODEL.n_embd, dtype=torch.float64, requires_grad=True)
        y_ref = forward(ref, x)
        probe = torch.randn_like(y_ref)  # dL/dy, same on every rank (same seed)
        (y_ref * probe).sum().backward()

        def local(t, seq, vocab):  # this rank's part of a full activation
            t = t.chunk(tp, 1)[rank] if seq else t
            return t.chunk(tp, -1)[rank] if vocab else t

        x_local = local(x.detach(), seq_sharded, False)
        x_local.requires_grad_(x_local.is_floating_point())
        y = forward(sharded, x_local)
        y_seq_sharded = seq_sharded and not name.startswith("head")
        torch.testing.assert_close(y, local(y_ref, y_seq_sharded, vocab_sharded), rtol=1e-12,
                                   atol=1e-12, msg=lambda m: f"{name}: forward\n{m}")
        (y * local(probe, y_seq_sharded, vocab_sharded)).sum().backward()
        if x.requires_grad:
            torch.testing.assert_close(x_local.grad, local(x.grad, seq_sharded, False), rtol=1e-12,
                                       atol=1e-12, msg=lambda m: f"{name}: input grad\n{m}")
        ref_params = dict(ref.named_parameters())
        for pname, p in sharded.named_parameters():
            path, _, leaf = pname.rpartition(".")
            expected = ref_params[pname].grad
            if path in plan:
                expected = shard_of(expected, plan[path], leaf, tp, rank)
            torch.testing.assert_close(p.grad, expected, rtol=1e-12, atol=1e-12,
                                       msg=lambda m: f"{name}: grad of {pname}\n{m}")
    return group.size


@pytest.mark.parametrize("tp", [2, 4])
def test_layers_match_unsharded_modules(tp):
    assert run_distributed(_check_layers, tp) == [tp] * tp


# ---- vocab-parallel cross entropy ----

def _check_cross_entropy():
    tp = dist.get_world_size()
    mesh = build_mesh(Layout(tp=tp), torch.device("cpu"))
    for dtype, tol in ((torch.float32, 1e-6), (torch.float64, 1e-13)):  # ~10 ulp
        gen = torch.Generator().manual_seed(1)
        logits = (torch.randn(3, 10, MODEL.vocab_size, generator=gen) * 8).to(dtype)
        logits[0, 0, 5] = 80.0  # a large logit: the max subtraction must keep exp finite
        targets = torch.randint(0, MODEL.vocab_size, (3, 10), generator=gen)
        targets[1, :4] = -1     # ignored positions
        full = logits.clone().requires_grad_()
        expected = F.cross_entropy(full.flatten(0, 1), targets.flatten(), ignore_index=-1)
        expected.backward()
        local = logits.chunk(tp, -1)[mesh.tp.rank].clone().requires_grad_()
        loss = vocab_parallel_cross_entropy(local, targets, mesh.tp, ignore_index=-1)
        loss.backward()
        assert loss.dtype == dtype
        torch.testing.assert_close(loss, expected, rtol=tol, atol=tol)
        torch.testing.assert_close(local.grad, full.grad.chunk(tp, -1)[mesh.tp.rank],
                                   rtol=tol, atol=tol)
    return True


@pytest.mark.parametrize("tp", [2, 4])
def test_vocab_parallel_cross_entropy(tp):
    assert all(run_distributed(_check_cross_entropy, tp))


# ---- whole GPT against one process ----

def train_tiny(mesh: Mesh, deferred: bool = False, dtype: str = "float32", steps: int = 3):
    """AdamW steps with clipping on fixed random batches, as the trainer does them, in the
    layout of `mesh`. Returns the losses, grad norms and the global GPT-2 state dict."""
    with torch.device("meta" if deferred else "cpu"):
        model = GPT(MODEL, seed=None if deferred else SEED)
    if dtype == "float64":
        model.to(torch.float64)
    stage = parallelize(model, Setup(mesh, SEED)).parts[0]
    optimizer = torch.optim.AdamW(stage.params.param_groups(0.1), lr=LR)
    gen = torch.Generator().manual_seed(0)
    losses, norms = [], []
    for _ in range(steps):
        x, y = torch.randint(0, MODEL.vocab_size, (2, 4, MODEL.block_size), generator=gen)
        with stage.loss_context():
            loss = stage.module(x, targets=y)
            loss.backward()
        norms.append(stage.params.clip_grad_norm(0.5).item())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses, norms, full_state_dict(stage.params, stage.gpt)


def _tp_mesh(mesh: Mesh, implementation: str, sp: bool, lp: bool) -> Mesh:
    return mesh.with_layout(Layout(tp=mesh.tp.size, implementation=implementation,
                                   sequence_parallel=sp, loss_parallel=lp))


def _check_whole_gpt():
    tp = dist.get_world_size()
    mesh = build_mesh(Layout(tp=tp), torch.device("cpu"))
    ref_losses, ref_norms, ref_state = train_tiny(Mesh.alone(), dtype="float64")
    # float64 makes the bounds hold on any CPU (harness.adamw_param_bound): after s AdamW
    # steps the weights differ by <= B(s), the loss of step s by <= sqrt(P) * norm * B(s)
    n_params = sum(v.numel() for k, v in ref_state.items() if k != "lm_head.weight")  # tied
    loss_tol = torch.tensor([relative_drift(s, LR, n_params) * n for s, n in enumerate(ref_norms)])
    norm_rtol = 1e-10 + relative_drift(len(ref_norms) - 1, LR, n_params)
    for sp in (False, True):
        for lp in (False, True):
            runs = {}
            for implementation in ("custom", "pytorch"):
                deferred = sp  # both init paths, each with and without loss parallelism
                runs[implementation] = losses, norms, state = train_tiny(
                    _tp_mesh(mesh, implementation, sp, lp), deferred, "float64")
                what = f"tp={tp} {implementation} sp={sp} lp={lp} deferred={deferred}"
                assert (torch.tensor(losses) - torch.tensor(ref_losses)).abs().le(loss_tol + 1e-10).all(), what
                torch.testing.assert_close(norms, ref_norms, rtol=norm_rtol, atol=0, msg=what)
                for name, value in ref_state.items():
                    torch.testing.assert_close(state[name], value, rtol=0,
                                               atol=adamw_param_bound(len(ref_norms), LR),
                                               msg=lambda m: f"{what}: {name}\n{m}")
            # one plan, two executors: the same model, within the same bounds
            custom, native = runs["custom"], runs["pytorch"]
            assert (torch.tensor(custom[0]) - torch.tensor(native[0])).abs().le(2 * loss_tol + 1e-10).all()
            torch.testing.assert_close(custom[1], native[1], rtol=2 * norm_rtol, atol=0)
    return True


@pytest.mark.parametrize("tp", [2, 4])
def test_whole_gpt_matches_one_process(tp):
    assert all(run_distributed(_check_whole_gpt, tp))


# ---- invariant 1: deferred init under TP gives the global weights of eager init ----

def _check_deferred_init():
    tp = dist.get_world_size()
    mesh = build_mesh(Layout(tp=tp), torch.device("cpu"))
    expected = GPT(MODEL, seed=SEED).state_dict()
    for implementation in ("custom", "pytorch"):
        for deferred in (False, True):
            with torch.device("meta" if deferred else "cpu"):
                model = GPT(MODEL, seed=None if deferred else SEED)
            stage = parallelize(model, Setup(_tp_mesh(mesh, implementation, True, True), SEED)).parts[0]
            state = full_state_dict(stage.params, stage.gpt)
            assert state.keys() == expected.keys()
            for name, value in expected.items():  # bitwise: the same draws, only sliced
                assert torch.equal(state[name], value), f"{implementation} {deferred} {name}"
            shard = stage.gpt.transformer.h[0].mlp.c_fc.weight  # distinct shards per rank
            shard = shard.to_local() if isinstance(shard, DTensor) else shard
            assert torch.equal(shard, expected["transformer.h.0.mlp.c_fc.weight"].chunk(tp)[mesh.tp.rank])
            assert stage.gpt.lm_head.weight is stage.gpt.transformer.wte.weight
    return True


def test_deferred_init_gives_the_eager_global_weights():
    assert all(run_distributed(_check_deferred_init, 2))

