"""Mixture of experts and expert parallelism: the MoE block against the dense MLP and
against its own definition (ties, the load-balancing loss and its gradient); its experts'
grouped and padded matmuls against the loop they replaced, and its reads on the host; every EP
layout against one process with the same experts in float64, routing ties and empty
experts included; the all-to-all bytes and the state per rank against the cost model;
checkpoints across EP sizes; the layouts refused."""
import dataclasses

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from harness import (assert_records_match, assert_resumes_across, flags, run_distributed,
                     tiny_params_bound, tiny_run, trainer_records)
from nanodist.planner import cost, traffic
from nanodist.run.config import TrainConfig, parse_args, resolve
from nanodist.errors import UserError
from nanodist.model.gpt import GPT, MLP, GPTConfig
from nanodist import compat
from nanodist.model.moe import Experts, MoE, moe_layers
from nanodist.parallel.layout import Layout
from nanodist.run.trainer import Trainer
from nanodist_tools.measure import state_bytes

MOE = dict(moe_experts=4, moe_top_k=2, moe_every=2)  # blocks 1 and 3 of the tiny model's 4
N_PARAMS = tiny_params_bound(**MOE)                    # the float64 bound's parameter count
F64 = dict(dtype="float64")


def small(**overrides) -> GPTConfig:
    return GPTConfig(**{**dict(block_size=8, vocab_size=64, n_layer=2, n_head=2, n_embd=16, **MOE),
                        **overrides})


# ---------------------------------------------------------------- the block


def test_identical_experts_are_the_dense_mlp():
    """E copies of one MLP, any router: the gates of each token sum to 1, so the MoE is the
    MLP. Float64: the same products in another kernel order, <= 4C terms of rounding
    1.1e-16 each, plus the gates' sum (2 ulp): 1e-12 relative is a bound, not a fit."""
    torch.manual_seed(0)
    cfg = small()
    mlp, moe = MLP(cfg).double(), MoE(cfg).double()
    with torch.no_grad():
        for e in range(cfg.moe_experts):
            moe.experts.fc_weight[e] = mlp.c_fc.weight.t()
            moe.experts.fc_bias[e] = mlp.c_fc.bias
            moe.experts.proj_weight[e] = mlp.c_proj.weight.t()
            moe.experts.proj_bias[e] = mlp.c_proj.bias
        moe.router.weight.normal_()
    x = torch.randn(3, 8, cfg.n_embd, dtype=torch.float64)
    expected = mlp(x)
    torch.testing.assert_close(moe(x), expected, rtol=1e-12, atol=1e-12 * expected.abs().max().item())


def test_ties_go_to_the_lower_expert_and_the_balanced_loss_is_one():
    """A zero router: every probability 1/E, a tie among all experts; the stable sort gives
    each token experts 0..k-1 and the others none. With uniform probabilities the
    Switch loss E sum_e f_e P_e is E x (1/E) x sum_e f_e = 1, whatever the routing."""
    cfg = small()
    moe = MoE(cfg).double()
    with torch.no_grad():
        moe.router.weight.zero_()
    tokens = torch.randn(10, cfg.n_embd, dtype=torch.float64)
    gates, experts, counts, aux = moe.route(tokens)
    assert experts.tolist() == [[0, 1]] * 10
    assert counts.tolist() == [10, 10, 0, 0]
    assert gates.tolist() == [[0.5, 0.5]] * 10
    assert aux.item() == pytest.approx(1.0, rel=1e-15)


def test_the_aux_loss_gradient_is_that_of_the_weighted_loss():
    """The block's output carries weight x aux's gradient: as if it had been added to the
    loss. Float64, the same terms summed in another graph order: 1e-13 relative."""
    torch.manual_seed(1)
    cfg = small()
    x = torch.randn(2, 8, cfg.n_embd, dtype=torch.float64)
    carried, explicit = MoE(cfg).double(), MoE(cfg).double()
    with torch.no_grad():
        for p in carried.parameters():
            p.normal_(0.0, 0.3)
    explicit.load_state_dict(carried.state_dict())
    carried.aux_loss_weight, explicit.aux_loss_weight = 0.3, 0.0
    carried(x).square().sum().backward()
    aux = explicit.route(x.reshape(-1, cfg.n_embd))[3]
    (explicit(x).square().sum() + 0.3 * aux).backward()
    for (name, a), b in zip(carried.named_parameters(), explicit.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-13, atol=1e-13 * b.grad.abs().max().item(),
                                   msg=name)


def test_no_experts_is_the_dense_model_bitwise(char_data, tmp_path):
    """--moe_experts 0 is the model of today, the same steps; the other moe fields leave it
    dense (as flags they are refused without experts: test_inputs)."""
    dense = trainer_records(tiny_run(char_data, tmp_path / "a"))
    assert trainer_records(tiny_run(char_data, tmp_path / "b", moe_experts=0)) == dense
    assert not moe_layers(GPT(small(moe_experts=0, moe_top_k=3, moe_every=3, moe_aux_loss_coef=0.5)))


def test_an_active_parameter_count_for_the_flops():
    """6N counts the k of E experts a token passes: the dense model's N plus, per MoE
    block, router and (k - 1) more MLPs (derived from the parameter counts)."""
    from nanodist.model.gpt import flops_per_token
    cfg, dense = small(moe_top_k=2, moe_every=1), small(moe_experts=0)
    n = sum(p.numel() for p in GPT(cfg, seed=None).parameters())
    n_dense = sum(p.numel() for p in GPT(dense, seed=None).parameters())
    C = cfg.n_embd
    mlp = 8 * C * C + 5 * C
    assert flops_per_token(cfg, n) - flops_per_token(dense, n_dense) == \
        6 * cfg.n_layer * (cfg.moe_experts * C + (cfg.moe_top_k - 1) * mlp)


def test_logged_token_counts_are_the_steps(char_data, tmp_path):
    """Per MoE block, the logged tokens per expert sum to k x the step's tokens, the same
    with the blocks' forwards recomputed (full checkpointing runs each twice)."""
    logged = {}
    for ac in ("none", "full"):
        trainer = Trainer(TrainConfig(**tiny_run(char_data, tmp_path / ac, **MOE, activation_checkpointing=ac)))
        logged[ac] = trainer.train_step(0)["metrics"]
        for layer in (1, 3):
            counts = [logged[ac][f"MoE/tokens/layer{layer}/expert{e}"] for e in range(MOE["moe_experts"])]
            assert sum(counts) == MOE["moe_top_k"] * trainer.tokens_per_step
    assert {k: v for k, v in logged["full"].items() if "tokens" in k} == \
        {k: v for k, v in logged["none"].items() if "tokens" in k}


# ---------------------------------------------------------------- the experts' matmuls


def loop_experts(experts, routed, counts, pre: list):
    """The experts as nanodist ran them before grouped matmuls: the counts read on the host,
    one matmul per expert; `pre` collects each expert's pre-activation (gradient kept)."""
    outputs = []
    for e, rows in enumerate(routed.split(counts.tolist())):
        h = rows @ experts.fc_weight[e] + experts.fc_bias[e]
        h.retain_grad()
        pre.append(h)
        outputs.append(F.gelu(h, approximate="tanh") @ experts.proj_weight[e] + experts.proj_bias[e])
    return torch.cat(outputs)


def output_and_grads(experts, run, routed, counts, grad) -> list[torch.Tensor]:
    """run(routed, counts) and the gradients of routed and of the experts' tensors."""
    experts.zero_grad(set_to_none=True)
    routed = routed.detach().requires_grad_()
    out = run(routed, counts)
    out.backward(grad)
    return [out.detach(), routed.grad] + [p.grad for p in experts.parameters()]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["padded-f64", "grouped-f32"])
@pytest.mark.parametrize("counts", [[7, 0, 12, 0, 5], [0, 0, 0, 0, 0]], ids=["empty-experts", "no-rows"])
def test_the_experts_are_the_loop_of_before(dtype, counts):
    """Both ways of running the experts against one matmul per expert, forward and every
    gradient, experts with no rows included (their gradients zeros, not None). float64 takes
    the padded bmm (grouped_mm has no float64): other kernels over the same products, each
    sum <= max(4C, N) = 64 terms, so <= 2 x 64 x 1.1e-16 of the terms' magnitudes apart;
    1e-12 of the largest value leaves 70x for cancellation. float32 takes the grouped mm on
    CPU: the same mm per expert in C++, so bitwise, but for the biases' gradients, sums of
    a bias's rows in another order: <= 2 x rows x 2**-24 x the sum of their magnitudes."""
    torch.manual_seed(0)
    experts = Experts(len(counts), 16).to(dtype)
    for p in experts.parameters():
        nn.init.normal_(p, std=0.3)
    counts = torch.tensor(counts)
    routed = torch.randn(int(counts.sum()), 16, dtype=dtype)
    grad = torch.randn_like(routed)
    assert compat.grouped_mm_fits(routed, experts.fc_weight, experts.proj_weight) == (dtype == torch.float32)
    new = output_and_grads(experts, experts, routed, counts, grad)
    pre = []
    old = output_and_grads(experts, lambda r, c: loop_experts(experts, r, c, pre), routed, counts, grad)
    names = ["output", "routed"] + [name for name, _ in experts.named_parameters()]
    for name, a, b in zip(names, new, old):
        if dtype == torch.float64:
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12 * b.abs().max().item() if b.numel() else 0,
                                       msg=name)
        elif name.endswith("bias"):
            rows = counts.view(-1, 1).to(dtype)
            terms = grad if name == "proj_bias" else torch.cat([h.grad for h in pre])
            magnitude = torch.stack([t.abs().sum(0) for t in terms.split(counts.tolist())])
            assert ((a - b).abs() <= 2 * rows * 2**-24 * magnitude).all(), name
        else:
            assert torch.equal(a, b), name
    for name, p in experts.named_parameters():
        assert torch.equal(p.grad[counts == 0], torch.zeros_like(p.grad[counts == 0])), name
    assert experts.host_reads == (dtype == torch.float64)  # padded: the largest count


def test_the_grouped_layer_reads_nothing_on_the_host():
    """A MoE layer on the meta device (shapes, no values: any read of one raises), in bf16
    so that its experts run grouped: routing, experts, combine and backward all run. In
    float64 the padded experts read their largest count: it raises."""
    cfg = small()
    with torch.device("meta"):
        moe = MoE(cfg).to(torch.bfloat16)
        x = torch.empty(2, 8, cfg.n_embd, dtype=torch.bfloat16, requires_grad=True)
    moe(x).sum().backward()
    assert moe.experts.host_reads == 0 and moe.experts.fc_weight.grad.shape == moe.experts.fc_weight.shape
    with pytest.raises(RuntimeError, match="meta tensor"):
        moe.double()(x.double())


def moe_host_reads(kwargs):
    """Rank side: per MoE layer, its experts' reads on the host in one step, and the step's forwards."""
    trainer = Trainer(TrainConfig(**kwargs))
    trainer.train_step(0)
    return [moe.experts.host_reads for moe in trainer.metrics.moe.values()], trainer.micro_steps


@pytest.mark.parametrize("world, dtype, reads", [(1, "float32", 0), (1, "float64", 1), (2, "float32", 1),
                                                 (2, "float64", 1)],
                         ids=["grouped", "padded", "ep2-grouped", "ep2-padded"])
def test_host_reads_per_moe_layer_forward(char_data, tmp_path, world, dtype, reads):
    """Per MoE layer forward: none with grouped experts, the largest count with padded ones
    (float64 on CPU), and under EP only the all-to-all's split sizes (from which the host
    also knows the largest count). Backward reads nothing (the splits are saved)."""
    kwargs = tiny_run(char_data, tmp_path, **MOE, dtype=dtype, data_parallel_size=world,
                      expert_parallel_size=world)
    for layers, micro_steps in run_distributed(moe_host_reads, world, kwargs):
        assert layers == [reads * micro_steps] * 2


# ---------------------------------------------------------------- layouts vs one process


@pytest.fixture(scope="module")
def single_moe(char_data, tmp_path_factory):
    """The one-process float64 reference with the MoE model's experts (not conftest's dense one)."""
    return trainer_records(tiny_run(char_data, tmp_path_factory.mktemp("single_moe"), **F64, **MOE))


@pytest.mark.parametrize("world, layout", [
    (2, dict(data_parallel_size=2, expert_parallel_size=2)),
    (2, dict(data_parallel_size=2, expert_parallel_size=2, data_parallel_type="fsdp", deferred_init=True)),
    (4, dict(data_parallel_size=4, expert_parallel_size=2)),
    (4, dict(data_parallel_size=4, expert_parallel_size=4, data_parallel_type="fsdp")),
    (4, dict(data_parallel_size=2, expert_parallel_size=2, tensor_parallel_size=2,
             enable_loss_parallelism=True)),
    (4, dict(data_parallel_size=2, expert_parallel_size=2, pipeline_parallel_size=2)),
    (4, dict(data_parallel_size=2, expert_parallel_size=4, context_parallel_size=2)),
    (2, dict(data_parallel_size=2, expert_parallel_size=2, activation_checkpointing="full")),
    (4, dict(data_parallel_size=4, expert_parallel_size=2, data_parallel_type="zero1", loss_chunks=3)),
    (4, dict(data_parallel_size=4, data_parallel_type="fsdp", implementation="pytorch")),
    (2, dict(data_parallel_size=2, implementation="pytorch")),
    (2, dict(tensor_parallel_size=2, enable_loss_parallelism=True, implementation="pytorch", loss_chunks=3)),
    (2, dict(data_parallel_size=2, data_parallel_type="zero1")),
    (4, dict(data_parallel_size=4, data_parallel_type="fsdp", data_parallel_replicas=2, loss_chunks=3)),
], ids=["ep2", "ep2-fsdp", "dp4-ep2", "ep4-fsdp", "tp2xep2", "pp2xep2", "cp2xep4", "ep2-ac",
        "zero1-4-ep2-chunks", "moe-fsdp2-native", "moe-ddp-native", "moe-dtensor-tp2-chunks", "moe-zero1", "moe-hsdp2x2-chunks"])
def test_matches_one_process(char_data, tmp_path, single_moe, world, layout):
    """Float64 AdamW steps with clipping: harness.assert_records_match's bound over the
    MoE model's parameters (routing is discontinuous, but no two experts of one token lie
    within that bound of each other in these runs)."""
    kwargs = tiny_run(char_data, tmp_path, **F64, **MOE, **layout)
    for records in run_distributed(trainer_records, world, kwargs):
        assert_records_match(records, single_moe, str(layout), n_params=N_PARAMS)


def tied_router_records(kwargs):
    """Rank side: routers with experts 1 = 0 and 3 = 2 (k = 1): every token's choice is a
    tie, the lower expert wins, experts 1 and 3 get no token on step 0. Returns (loss,
    norm) per step and step 0's share of assignments per expert."""
    trainer = Trainer(TrainConfig(**kwargs))
    params = trainer.params
    full = {name: t.clone() for name, t in params.full_tensors(params.param_list())}
    for name, weight in full.items():
        if name.endswith("router.weight"):
            weight[1], weight[3] = weight[0], weight[2]
    params.load_full_tensors(full.__getitem__, params.param_list())
    records = [trainer.train_step(step) for step in range(3)]
    return [(r["loss"], r["grad_norm"]) for r in records], records[0]["metrics"]


@pytest.mark.parametrize("world, layout", [
    (2, dict(data_parallel_size=2, expert_parallel_size=2)),
    (4, dict(data_parallel_size=4, expert_parallel_size=4, data_parallel_type="fsdp")),
], ids=["ep2", "ep4-fsdp"])
def test_routing_ties_and_empty_experts_match_one_process(char_data, tmp_path, world, layout):
    moe = dict(MOE, moe_top_k=1)
    one, shares = tied_router_records(tiny_run(char_data, tmp_path / "one", **F64, **moe))
    for layer in (1, 3):
        assert shares[f"MoE/tokens/layer{layer}/expert1"] == shares[f"MoE/tokens/layer{layer}/expert3"] == 0
    kwargs = tiny_run(char_data, tmp_path / "ep", **F64, **moe, **layout)
    for records, rank_shares in run_distributed(tied_router_records, world, kwargs):
        assert rank_shares["MoE/tokens/layer1/expert1"] == 0  # every rank's tokens tie alike
        assert_records_match(records, one, str(layout), n_params=N_PARAMS)


# ---------------------------------------------------------------- the cost model


def counted_step(kwargs):
    """Rank side: one step's all-to-all calls and payload (comm.py's counter), the state
    bytes held at its optimizer step (gradients included), and the model's config."""
    trainer = Trainer(TrainConfig(**kwargs))
    state = {}
    trainer.optimizer.register_step_post_hook(lambda *_: state.update(state_bytes(trainer)))
    with trainer.comm.counting() as counted:
        trainer.train_step(0)
    return counted.summary().get("all_to_all"), state["total"], trainer.model_cfg


@pytest.mark.parametrize("world, layout", [
    (2, dict(data_parallel_size=2, expert_parallel_size=2)),
    (4, dict(data_parallel_size=4, expert_parallel_size=2, data_parallel_type="fsdp")),
    (4, dict(data_parallel_size=2, expert_parallel_size=2, context_parallel_size=2)),
    (4, dict(data_parallel_size=4, expert_parallel_size=2, data_parallel_type="zero1", loss_chunks=3)),
], ids=["ep2", "dp4-ep2-fsdp", "cp2xep2", "zero1-4-ep2"])
def test_all_to_all_and_state_follow_the_cost_model(char_data, tmp_path, world, layout):
    """Calls exactly; payload summed over the ranks exactly (every row a rank sends, one
    receives: the cost model's balanced payload is each rank's mean); state within the
    flat shards' padding (1%)."""
    kwargs = tiny_run(char_data, tmp_path, **MOE, **layout)
    results = run_distributed(counted_step, world, kwargs)
    cfg = results[0][2]
    lay = resolve(TrainConfig(**kwargs), world, "cpu")[1]
    B, M = kwargs["batch_size"], lay.micro_steps(kwargs["total_batch_size"], kwargs["batch_size"],
                                                 kwargs["block_size"])
    calls, bus = traffic.collectives(cfg, lay, B, M)[("ep", "all_to_all")]
    payload = bus * lay.ep / (lay.ep - 1)
    assert all(counted["calls"] == calls for counted, _, _ in results)
    assert sum(c["payload_bytes"] for c, _, _ in results) == pytest.approx(world * payload, rel=1e-12)
    assert 0 < sum(c["bus_bytes"] for c, _, _ in results) < world * payload  # rows kept at home are not sent
    expected_state = cost.state_bytes(cfg, lay)["total"]
    for _, held, _ in results:
        assert held == pytest.approx(expected_state, rel=0.01)


def test_param_counts_are_the_models():
    """cost.param_counts of a MoE model against the model's own parameters; a rank of ep
    holds 1/ep of the experts and all of the rest."""
    for moe in (dict(moe_experts=4, moe_top_k=2, moe_every=1), dict(moe_experts=8, moe_top_k=1, moe_every=3)):
        cfg = small(n_layer=3, **moe)
        model = GPT(cfg, seed=0)
        experts = sum(p.numel() for name, p in model.named_parameters() if ".experts." in name)
        counts = cost.param_counts(cfg)
        assert counts["total"] == sum(p.numel() for p in model.parameters())
        assert counts["experts"] == experts
        assert cost.param_counts(cfg, ep=2)["total"] == counts["total"] - experts / 2


def test_expert_state_divides_by_ep_and_the_all_to_all_by_its_formula():
    """The issue's two formulas against cost.py / traffic.py on GPT-2 124M with 8 experts
    in every other block: experts' state 16 bytes x parameters / P (DDP), / N (FSDP);
    all-to-all bus bytes 2 (P-1)/P of the routed activations (k B T C fp32) per MoE layer
    and direction, plus the counts (E int64, forward)."""
    from nanodist.model.gpt import expert_param_count, model_config
    cfg = model_config("gpt2", 1024, 50257, moe_experts=8, moe_top_k=2, moe_every=2)
    experts = cfg.n_moe_layers * cfg.moe_experts * expert_param_count(cfg)
    base = cost.state_bytes(cfg, Layout(dp=8))["total"]
    for P in (2, 4, 8):
        ddp = cost.state_bytes(cfg, Layout(dp=8, ep=P))["total"]
        assert base - ddp == pytest.approx(16 * experts * (1 - 1 / P), rel=1e-12)
        fsdp = cost.state_bytes(cfg, Layout(dp=8, ep=P, dp_type="fsdp"))["total"]
        dense_fsdp = cost.state_bytes(dataclasses.replace(cfg, moe_experts=0), Layout(dp=8, dp_type="fsdp"))
        routers = cfg.n_moe_layers * cfg.moe_experts * cfg.n_embd
        mlps = cfg.n_moe_layers * expert_param_count(cfg)
        assert fsdp == pytest.approx(dense_fsdp["total"] + 16 * (experts + routers - mlps) / 8, rel=1e-12)
        B, M = 4, 2
        calls, bus = traffic.collectives(cfg, Layout(dp=8, ep=P), B, M)[("ep", "all_to_all")]
        routed = cfg.moe_top_k * B * cfg.block_size * cfg.n_embd * 4
        per_layer = 2 * (2 * (P - 1) / P * routed) + (P - 1) / P * 8 * cfg.moe_experts
        assert bus == pytest.approx(M * cfg.n_moe_layers * per_layer, rel=1e-12)
        assert calls == M * cfg.n_moe_layers * 5


@pytest.mark.parametrize("moe", [dict(moe_experts=4, moe_top_k=2, moe_every=1),
                                 dict(moe_experts=8, moe_top_k=1, moe_every=2)], ids=["E4k2", "E8k1-every2"])
def test_saved_activations_follow_the_cost_model(moe):
    """The bytes one forward keeps for backward (saved-tensor hooks, parameters excluded)
    against cost.activation_bytes: the model leaves out the small (E,) vectors of the
    load-balancing loss and autograd's bookkeeping, well under 1%."""
    from nanodist.model.gpt import model_config
    from nanodist.model.loss import cross_entropy
    from nanodist_tools.measure import saved_activations
    cfg = model_config("tiny", 64, 65, **moe)
    model = GPT(cfg)
    x = torch.randint(0, 65, (4, 64), generator=torch.Generator().manual_seed(0))
    with saved_activations(model.parameters()) as saved:
        loss = cross_entropy(model(x), x)
    loss.backward()
    assert sum(saved.values()) == pytest.approx(cost.activation_bytes(cfg, Layout(), 4), rel=0.01)


def test_the_planner_searches_expert_parallel_sizes():
    """A MoE job's ranking holds EP layouts (each one train.py accepts: candidates asks
    rules.check_layout); a dense job's none."""
    from nanodist.planner import hardware, plan
    from nanodist.model.gpt import model_config
    machine = hardware.DataSheet("h100")
    moe = model_config("gpt2", 1024, 50257, moe_experts=8, moe_every=2)
    job = plan.Job("gpt2", moe, 8, 8, 2**19, micro_batch=8)
    rows = plan.rank(job, machine)
    assert {r["ep"] for r in rows} == {1, 2, 4, 8}
    dense = plan.Job("gpt2", model_config("gpt2", 1024, 50257), 8, 8, 2**19, micro_batch=8)
    assert {r["ep"] for r in plan.rank(dense, machine)} == {1}


def test_the_planners_commands_train_the_moe_model(capsys):
    """The planner's command line with --moe_experts: every EP row's command is one train.py
    accepts, with the job's experts and the row's EP size; bad MoE flags are one line."""
    import json
    from nanodist_tools import planner
    argv = ["--model=gpt2", "--micro_batch_size=4", "--gpus=8", "--moe_experts=8", "--moe_every=2"]
    assert planner.main(argv + ["--json"]) == 0
    rows = [r for r in json.loads(capsys.readouterr().out) if r["ep"] > 1]
    assert rows
    for r in rows[:: max(len(rows) // 10, 1)]:
        cfg, layout, _ = resolve(parse_args(r["command"].split(" train.py ")[1].split()), 8, "cuda")
        assert (cfg.moe_experts, cfg.moe_every, layout.ep) == (8, 2, r["ep"])
    assert planner.main(argv + ["--moe_top_k=9"]) != 0
    assert "--moe_top_k (9) must be at most --moe_experts (8)" in capsys.readouterr().err


# ---------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("write, read", [
    ((2, ["--expert_parallel_size", "2", "--data_parallel_type", "fsdp"]), (1, [])),
    ((2, ["--expert_parallel_size", "2"]),
     (4, ["--expert_parallel_size", "4", "--data_parallel_type", "fsdp"])),
], ids=["ep2-fsdp-to-1", "ep2-to-ep4-fsdp"])
def test_a_checkpoint_resumes_under_another_ep_size(char_data, tmp_path, write, read):
    moe = ["--moe_experts", "4", "--moe_top_k", "2", "--moe_every", "2"]
    assert_resumes_across(char_data, tmp_path, write, read, *moe, n_params=N_PARAMS)


# ---------------------------------------------------------------- refused


@pytest.mark.parametrize("flags, message", [
    (["--expert_parallel_size", "2", "--data_parallel_size", "2"], "the model has none"),
    (["--moe_experts", "3", "--expert_parallel_size", "2", "--data_parallel_size", "2"], "divisible"),
    (["--moe_experts", "4", "--expert_parallel_size", "4", "--data_parallel_size", "2"], "must divide 2"),
    (["--moe_experts", "4", "--expert_parallel_size", "2", "--data_parallel_size", "2",
      "--implementation", "pytorch"], "hand-written only"),
    (["--moe_experts", "4", "--expert_parallel_size", "2", "--data_parallel_size", "4",
      "--data_parallel_type", "fsdp", "--data_parallel_replicas", "2"], "HSDP"),
    (["--moe_experts", "4", "--tensor_parallel_size", "2", "--sequence_parallel"], "sequence_parallel"),
    (["--moe_experts", "4", "--compile"], "--compile"),
    (["--moe_experts", "4", "--pipeline_parallel_size", "2", "--implementation", "pytorch"], "pipelining"),
    (["--moe_experts", "4", "--init_from", "x"], "no experts"),
    (["--moe_experts", "2", "--moe_top_k", "3"], "at most"),
    (["--moe_experts", "2", "--moe_every", "5"], "no MoE block"),
    (["--moe_experts", "-1"], ">= 0"),
])
def test_bad_moe_flags_are_refused(char_data, flags, message):
    """Each with one message naming the fix, before any process group work."""
    from nanodist.run.config import fit
    args = ["--device", "cpu", "--model", "tiny", "--dataset", "shakespeare_char", "--data_dir",
            str(char_data), "--block_size", "32", "--batch_size", "2", "--total_batch_size", "512"]
    with pytest.raises(UserError, match=message):
        cfg = parse_args(args + flags)
        world = cfg.data_parallel_size or cfg.tensor_parallel_size * cfg.pipeline_parallel_size
        cfg, layout, micro_steps = resolve(cfg, world, "cpu")
        fit(cfg, layout, micro_steps, 65, "cpu")


def test_export_refuses_a_mixture_of_experts(char_data, tmp_path):
    from nanodist.export import export
    Trainer(parse_args(flags(char_data, tmp_path / "run", "--moe_experts", "2", "--moe_top_k", "1",
                             "--max_steps", "1", "--eval_interval", "1"))).train()
    with pytest.raises(UserError, match="no experts"):
        export(tmp_path / "run" / "step_0000001", tmp_path / "hf")
