"""The chunked (fused linear) cross entropy of model/loss.py against the plain loss: one
process in float64 and under bf16 autocast, vocab-parallel over TP ranks (the function,
its all-reduces counted), the bytes it keeps against the cost model. Its modules under
loss parallelism (custom and DTensor, +-SP) and every layout with --loss_chunks run
against one process in test_2d.py, test_pipeline.py, test_context_parallel.py and
test_moe.py; its peak memory in test_plan.py."""
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
    """Float64, a derived bound. A float sum of n terms is off by at most (n - 1) u S in any
    order (S = the sum of their magnitudes, u the unit roundoff). Each logit is a sum of C
    products; each token's log-sum-exp one of V exponentials; the mean one of N tokens;
    grad x sums V rows, grad W N tokens, each a handful of ops more. With K = 2 (N + V + C
    + 8) u (two computations, each within half): the loss within K A (A = max |logit| +
    log V), grad x within K 2 max|w| / count and grad W within K 2 max|x| (a token's
    softmax - onehot has magnitudes summing to <= 2, the mean divides by count)."""
    x, w, targets = _inputs(torch.float64)
    loss, gx, gw = _loss_and_grads(_plain, x, w, targets)
    c_loss, c_gx, c_gw = _loss_and_grads(lambda *a: chunked_cross_entropy(*a, chunks), x, w, targets)
    logits, count = x @ w.t(), (targets != -1).sum()
    K = 2 * (N + V + C + 8) * U64
    assert abs(c_loss - loss) <= K * (logits.abs().max() + torch.log(torch.tensor(V)))
    assert (c_gx - gx).abs().max() <= K * 2 * w.abs().max() / count
    assert (c_gw - gw).abs().max() <= K * 2 * x.abs().max()
    assert not torch.equal(c_gw, torch.zeros_like(c_gw))


def _integer_inputs():
    """x and W of small integers: bf16 holds them exactly, and a bf16 matmul's fp32 sums of
    their products are exact in any order (< 2^24), so its output is exactly those sums
    rounded to bf16, on any CPU (an fp32 matmul's: not rounded)."""
    gen = torch.Generator().manual_seed(2)
    x = torch.randint(-8, 9, (2, N // 2, C), generator=gen).float()
    w = torch.randint(-24, 25, (V, C), generator=gen).float()
    targets = torch.randint(0, V, (2, N // 2), generator=gen)
    targets[0, :3] = -1
    return x, w, targets


@pytest.mark.parametrize("chunks", [1, 3])
def test_under_bf16_autocast_the_matmul_is_bf16_and_the_softmax_fp32(chunks):
    """The plain (chunks 1) and the chunked loss under CPU bf16 autocast against the
    float64 loss of the exact logits rounded to bf16 (`_integer_inputs`): the softmax's
    fp32 arithmetic alone separates them, K = 2 (N + V + 8) 2^-24 A (as in float64, u =
    2^-24); an fp32 matmul (logits not rounded) or a bf16 softmax would be off by ulps of
    bf16, far more. Gradients: both paths round g = softmax - onehot to bf16 from fp32
    values within K of each other, then the same bf16 matmuls with fp32 sums: within
    (2^-8 + K) of sum |g| |w| (|x|) per entry, on top of one bf16 rounding of the result."""
    x, w, targets = _integer_inputs()
    exact = (x.double() @ w.double().t()).bfloat16().double()
    reference = cross_entropy(exact, targets)
    K = 2 * (N + V + 8) * 2 ** -24 * (exact.abs().max() + torch.log(torch.tensor(V)))
    head = torch.nn.Linear(C, V, bias=False)
    grads = {}
    for n in (1, chunks):
        with torch.no_grad():
            head.weight.copy_(w)
        head.weight.grad = None
        xi = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = HeadLoss(n)(xi, head, targets)
        assert loss.dtype == torch.float32
        assert abs(loss.double() - reference) <= K, n
        loss.backward()
        grads[n] = xi.grad, head.weight.grad
    (gx, gw), (c_gx, c_gw) = grads[1], grads[chunks]
    assert c_gx.dtype == gw.dtype == c_gw.dtype == torch.float32
    count = (targets != -1).sum()
    slack = 2 ** -8 + K / count + 2 ** -7  # g's rounding, its fp32 inputs' difference, the output's
    assert (c_gx - gx).abs().max() <= slack * 2 * w.abs().max() / count
    assert (c_gw - gw).abs().max() <= slack * 2 * x.abs().max()


def test_the_automatic_count_makes_chunks_of_the_heads_input_size():
    """Liger's rule, ceil(V / C) chunks (gpt2: 50304 / 768 -> 66), none under 1024 tokens."""
    assert loss_chunks(0, 128 * 1024, 50304, 768) == 66
    assert loss_chunks(0, 64 * 1024, 50304 // 4, 768) == 17  # a TP rank's vocabulary
    assert loss_chunks(0, 8 * 1024, 50304, 768) == 8
    assert loss_chunks(0, 2047, 50304, 768) == 1
    assert loss_chunks(5, 3, 100, 10) == 3 and loss_chunks(1, 8 * 1024, 50304, 768) == 1


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

def _saved_bytes(chunks, autocast: bool):
    model = GPT(GPTConfig(block_size=32, vocab_size=512, n_layer=2, n_head=4, n_embd=64), seed=0)
    model.head_loss.chunks = chunks
    idx, targets = (t.clone() for t in  # each a storage of its own, as the trainer's
                    torch.randint(0, 512, (2, 2, 32), generator=torch.Generator().manual_seed(0)))
    with saved_activations(model.parameters()) as kept, \
            torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = model(idx, targets=targets)
    kept.pop(loss.untyped_storage().data_ptr())  # the caller's own result
    loss.backward()
    return sum(kept.values()), model.config


@pytest.mark.parametrize("autocast", [False, True])
def test_saved_activations_follow_the_cost_model(autocast):
    """What autograd keeps after the forward, counted (measure.saved_activations): the
    whole loss keeps the fp32 log-softmax (b s V), the chunked one its logsumexp (b s);
    under bf16 autocast the chunked loss keeps the head's input in bf16, as the head does,
    and no cast of its weight."""
    compute = 2 if autocast else 4
    whole, cfg = _saved_bytes(1, autocast)
    chunked, _ = _saved_bytes(4, autocast)
    assert whole == activation_bytes(cfg, Layout(), 2, compute_bytes=compute)
    assert chunked == activation_bytes(cfg, Layout(loss_chunks=4), 2, compute_bytes=compute)
    b_s, V, C = 2 * 32, 512, 64  # the log-softmax and nll's total weight, for the logsumexp and the count
    weight_cast = autocast * 2 * V * C
    assert whole - chunked == (4 * b_s * V + 4) + weight_cast - (4 * b_s + 8)
