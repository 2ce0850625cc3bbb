"""The chunked (fused linear) cross entropy of model/loss.py against the plain loss: one
process in float64 and under bf16 autocast, vocab-parallel over TP ranks (custom and
DTensor, +-SP), its traffic and memory against the cost model. The layouts' equivalence
runs with --loss_chunks are in test_2d.py, test_pipeline.py, test_context_parallel.py
and test_moe.py."""
import pytest
import torch
import torch.distributed as dist

from harness import run_distributed
from nanodist.errors import UserError
from nanodist.model.gpt import GPT, GPTConfig
from nanodist.model.loss import HeadLoss, chunked_cross_entropy, cross_entropy, loss_chunks
from nanodist.parallel.layout import Layout
from nanodist.parallel.mesh import build_mesh
from nanodist.parallel.rules import check_layout
from nanodist.planner.cost import activation_bytes
from nanodist_tools.measure import saved_activations

U64 = torch.finfo(torch.float64).eps / 2  # unit roundoff
N, C, V = 40, 16, 101


def _inputs(dtype, seed=0, scale=4.0):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(2, N // 2, C, generator=gen) * scale).to(dtype)
    w = torch.randn(V, C, generator=gen).to(dtype)
    targets = torch.randint(0, V, (2, N // 2), generator=gen)
    targets[0, :3] = -1  # ignored positions
    return x, w, targets


def _loss_and_grads(loss_fn, x, w, targets, grad=0.5):
    x, w = x.clone().requires_grad_(), w.clone().requires_grad_()
    loss = loss_fn(x, w, targets)
    loss.backward(torch.tensor(grad, dtype=loss.dtype))
    return loss.detach(), x.grad, w.grad


def _plain(x, w, targets):
    return cross_entropy(x @ w.t(), targets)


@pytest.mark.parametrize("chunks", [2, 3, N])
def test_chunks_match_the_whole_loss_in_float64(chunks):
    """Float64, a derived bound: both compute each token's log-sum-exp over V terms and the
    mean over N tokens (a sum of n terms, |sum| <= S = sum |terms|, is off by at most
    (n - 1) u S in any order), grad W sums over N tokens, grad x over V rows. So with
    A = max |logit| + log V: loss within 2 (N + V + 8) u A; each gradient entry a sum of
    terms |g| |w| (or |g| |x|), sum of |g| <= 2 per token / N: within 2 (N + V + 8) u 2 max|w|
    (max|x| N / N) / N -- a bound of the same form."""
    x, w, targets = _inputs(torch.float64)
    loss, gx, gw = _loss_and_grads(_plain, x, w, targets)
    c_loss, c_gx, c_gw = _loss_and_grads(lambda *a: chunked_cross_entropy(*a, chunks), x, w, targets)
    logits = x @ w.t()
    bound = 2 * (N + V + 8) * U64
    assert abs(c_loss - loss) <= bound * (logits.abs().max() + torch.log(torch.tensor(V)))
    assert (c_gx - gx).abs().max() <= bound * 2 * w.abs().max() / N
    assert (c_gw - gw).abs().max() <= bound * 2 * x.abs().max()
    assert not torch.equal(c_gw, torch.zeros_like(c_gw))


@pytest.mark.parametrize("chunks", [1, 3])
def test_under_bf16_autocast_the_matmul_is_bf16_and_the_softmax_fp32(chunks):
    """The plain and the chunked loss under CPU bf16 autocast, each against the float64
    loss of the bf16-rounded x and W: a bf16 matmul's output is its fp32 sum rounded to
    bf16, |error| <= 2^-8 |logit| + C 2^-23 sum |x||w| per logit, and a token's loss
    moves by at most 2 max |d logit| (its gradient in the logits has L1 norm <= 2). The
    chunked loss is the plain one's arithmetic, chunk by chunk: the same bound."""
    x, w, targets = _inputs(torch.float32)
    xb, wb = x.bfloat16().double(), w.bfloat16().double()
    exact = cross_entropy(xb @ wb.t(), targets)
    terms = (xb.abs() @ wb.abs().t())
    bound = 2 * ((xb @ wb.t()).abs().max() * 2 ** -8 + C * 2 ** -23 * terms.max())
    loss_fn = HeadLoss(chunks)
    head = torch.nn.Linear(C, V, bias=False)
    with torch.no_grad():
        head.weight.copy_(w)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = loss_fn(x, head, targets)
    assert loss.dtype == torch.float32
    assert abs(loss.double() - exact) <= bound
    loss.backward()
    assert head.weight.grad.dtype == torch.float32


def test_the_automatic_count_makes_chunks_of_the_heads_input_size():
    """Liger's rule: ceil(V / C) chunks (gpt2: 50304 / 768 -> 66), none smaller than a token."""
    assert loss_chunks(0, 8 * 1024, 50304, 768) == 66
    assert loss_chunks(0, 8 * 1024, 50304 // 4, 768) == 17  # a TP rank's vocabulary
    assert loss_chunks(0, 10, 50304, 768) == 10 and loss_chunks(5, 3, 100, 10) == 3
    assert loss_chunks(1, 8 * 1024, 50304, 768) == 1


def test_chunks_under_tp_need_loss_parallelism():
    with pytest.raises(UserError, match="--loss_chunks under --tensor_parallel_size > 1 needs "
                                        "--enable_loss_parallelism"):
        check_layout(Layout(tp=2, loss_chunks=3), 2, "cpu", 64)
    check_layout(Layout(tp=2, loss_chunks=3, loss_parallel=True), 2, "cpu", 64)


# ------------------------------------------------------------------ vocab-parallel chunks

def _vocab_parallel(chunks):
    """Rank side: this rank's rows of W through the chunked loss with the TP group's
    all-reduces, against the plain loss on the whole W (float64): loss, grad x summed over
    TP (each rank's partial sum), this rank's rows of grad W; the calls counted."""
    tp = dist.get_world_size()
    mesh = build_mesh(Layout(tp=tp), torch.device("cpu"))
    x, w, targets = _inputs(torch.float64)
    w = torch.cat([w, w[: (-V) % tp]])  # rows divisible by tp
    loss, gx, gw = _loss_and_grads(_plain, x, w, targets)
    rows = w.size(0) // tp
    mine = slice(mesh.tp.rank * rows, (mesh.tp.rank + 1) * rows)
    with mesh.comm.counting() as counted:
        c_loss, c_gx, c_gw = _loss_and_grads(
            lambda x, w, t: chunked_cross_entropy(x, w[mine], t, chunks, vocab_start=mine.start,
                                                  all_reduce=mesh.tp.all_reduce), x, w, targets)
    # per chunk the max and [sum exp, target logit] of its tokens: 3 N float64 in 2 calls each
    assert counted.summary() == {"all_reduce": {"calls": 2 * chunks, "payload_bytes": 3 * N * 8,
                                                "bus_bytes": 2 * (tp - 1) / tp * 3 * N * 8}}
    dist.all_reduce(c_gx)
    bound = 2 * (N + V + 8) * U64
    logits = x @ w.t()
    assert abs(c_loss - loss) <= bound * (logits.abs().max() + torch.log(torch.tensor(float(V))))
    assert (c_gx - gx).abs().max() <= tp * bound * 2 * w.abs().max() / N
    assert (c_gw[mine] - gw[mine]).abs().max() <= bound * 2 * x.abs().max()
    others = torch.ones(w.size(0), dtype=torch.bool)
    others[mine] = False
    assert torch.equal(c_gw[others], torch.zeros_like(c_gw[others]))  # other ranks' rows: none here
    return True


@pytest.mark.parametrize("tp, chunks", [(2, 3), (4, 1)])
def test_vocab_parallel_chunks_match_the_whole_loss(tp, chunks):
    assert all(run_distributed(_vocab_parallel, tp, chunks))


# ------------------------------------------------------------------ memory

def _saved_bytes(chunks):
    model = GPT(GPTConfig(block_size=32, vocab_size=512, n_layer=2, n_head=4, n_embd=64), seed=0)
    model.head_loss.chunks = chunks
    idx, targets = (t.clone() for t in  # each a storage of its own, as the trainer's
                    torch.randint(0, 512, (2, 2, 32), generator=torch.Generator().manual_seed(0)))
    with saved_activations(model.parameters()) as kept:
        loss = model(idx, targets=targets)
    kept.pop(loss.untyped_storage().data_ptr())  # the caller's own result
    loss.backward()
    return sum(kept.values()), model.config


def test_saved_activations_follow_the_cost_model():
    """What autograd keeps after the forward, counted (measure.saved_activations): the
    whole loss keeps the fp32 log-softmax (b s V), the chunked one its logsumexp (b s)."""
    whole, cfg = _saved_bytes(1)
    chunked, _ = _saved_bytes(4)
    assert whole == activation_bytes(cfg, Layout(), 2)
    assert chunked == activation_bytes(cfg, Layout(loss_chunks=4), 2)
    b_s, V = 2 * 32, 512  # the log-softmax and nll's total weight, for the lse, two masks, the count
    assert whole - chunked == (4 * b_s * V + 4) - ((4 + 2) * b_s + 8)
