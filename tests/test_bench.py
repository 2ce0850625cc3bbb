"""The cost model (nanodist/planner/cost.py, traffic.py) against hand-worked examples and
the real model, the benchmark's traffic counter against comm.py's, and smoke runs of
bench/run.py and bench/peer.py (schema, not speed)."""
import json
import math
import subprocess
import sys

import pytest
import torch

from harness import REPO, run_distributed

from nanodist.model.gpt import GPT, GPTConfig
from nanodist.parallel.comm import Comm
from nanodist.parallel.layout import Layout
from nanodist.planner.cost import activation_bytes, param_counts, state_bytes
from nanodist_tools.measure import TrafficMode
from nanodist.parallel.tensor_parallel import tp_collectives
from nanodist.planner.traffic import traffic_bytes

# hand-worked: L=1, C=2, V=4, T=3
#   root  wte 4*2 = 8, wpe 3*2 = 6, ln_f 2*2 = 4                      -> 18
#   block c_attn 3*4+6 = 18, attn.c_proj 4+2 = 6, c_fc 4*4+8 = 24,
#         mlp.c_proj 4*4+2 = 18, ln_1 4, ln_2 4                        -> 74
#   TP-sharded: wte 8 + c_attn 18 + attn.c_proj.w 4 + c_fc 24 + mlp.c_proj.w 16 = 70
SMALL = GPTConfig(block_size=3, vocab_size=4, n_layer=1, n_head=1, n_embd=2)


def test_param_counts_by_hand_and_against_the_model():
    assert param_counts(SMALL) == {"blocks": 74, "root": 18, "tp_sharded": 70,
                                   "replicated": 22, "experts": 0, "total": 92}
    tiny = GPTConfig(block_size=32, vocab_size=128, n_layer=2, n_head=4, n_embd=64)
    model = GPT(tiny, seed=0)  # tied wte / lm_head: parameters() yields it once
    assert param_counts(tiny)["total"] == sum(p.numel() for p in model.parameters())


def test_state_bytes_follow_zero_16_bytes_per_parameter():
    assert state_bytes(SMALL, Layout()) == {"params": 368, "grads": 368,
                                            "optimizer": 736, "total": 1472}
    assert state_bytes(SMALL, Layout(dp=2))["total"] == 16 * 92  # replicated
    assert state_bytes(SMALL, Layout(dp=2, dp_type="fsdp"))["total"] == 16 * 46
    assert state_bytes(SMALL, Layout(dp=4, dp_type="fsdp", reshard_after_forward=False))["total"] == 16 * 23
    assert state_bytes(SMALL, Layout(tp=2))["total"] == 16 * (70 / 2 + 22)


def test_zero1_and_hsdp_state_and_traffic_by_hand():
    """ZeRO-1 keeps weights and gradients whole and 1/d of Adam: (4 + 4 + 8/d) Psi, 8 + 8/d
    with fp32 gradients in Megatron's distributed-optimizer table; its reduce-scatter and
    all-gather send DDP's all-reduce bytes. HSDP 2 x 2: the state of FSDP over 2, and an
    all-reduce of the half shard's gradient between the 2 replicas."""
    for d in (2, 4):
        state = state_bytes(SMALL, Layout(dp=d, dp_type="zero1"))
        assert state == {"params": 4 * 92, "grads": 4 * 92, "optimizer": 8 * 92 / d,
                         "total": (4 + 4 + 8 / d) * 92}
    ddp, zero1 = (traffic_bytes(SMALL, Layout(dp=2, dp_type=t), 1, 1) for t in ("ddp", "zero1"))
    assert zero1["reduce_scatter"] + zero1["all_gather"] == ddp["all_reduce"] - 4  # its loss mean
    assert zero1["all_reduce"] == 4 + 4  # the loss mean, the norm of the sharded gradients
    hsdp = Layout(dp=4, dp_type="fsdp", hsdp_replicas=2)
    assert state_bytes(SMALL, hsdp)["total"] == state_bytes(SMALL, Layout(dp=2, dp_type="fsdp"))["total"]
    z3 = traffic_bytes(SMALL, hsdp, 1, 1)  # shards of 2: (N-1)/N = 1/2
    assert z3["all_gather"] == 2 * 368 / 2 and z3["reduce_scatter"] == 368 / 2
    # replicas: 2 (R-1)/R * 4 Psi / shards; scalars: the loss over 4 (6/4 * 4), the norm over 2
    assert z3["all_reduce"] == 368 / 2 + 6 + 4


def test_traffic_by_hand():
    # DDP, N=2: all-reduce 2 (N-1)/N * 4 * 92 = 368 bytes of gradients + the 4-byte loss mean
    assert traffic_bytes(SMALL, Layout(dp=2), 1, 1) == {"all_reduce": 368 + 4}
    # ZeRO-3, N=4, 2 micro-steps: gather every unit twice, 2 * 92 * 4 bytes * 3/4 per micro-step,
    # reduce-scatter 92 * 4 * 3/4 per micro-step (the trainer's FSDP reduces each one),
    # loss mean + grad norm scalars 2 * 4 * 6/4
    z3 = traffic_bytes(SMALL, Layout(dp=4, dp_type="fsdp"), 1, 2)
    assert z3 == {"all_gather": 2 * 184 * 3, "reduce_scatter": 2 * 276, "all_reduce": 12}
    z2 = traffic_bytes(SMALL, Layout(dp=4, dp_type="fsdp", reshard_after_forward=False), 1, 1)
    assert z2["all_gather"] == 276 == z2["reduce_scatter"]
    # TP, B=1: activations B T C * 4 = 24 bytes; L=1 -> 6 all-reduces of them + grad norm,
    # no loss parallelism: the logits all-gather B T V * 4 = 48 bytes
    assert tp_collectives(1, 3, 2, 4, 1, sp=False, lp=False) == {"all_reduce": (7, 6 * 24 + 4),
                                                                 "all_gather": (1, 48)}
    tp = traffic_bytes(SMALL, Layout(tp=2), 1, 1)
    assert tp == {"all_reduce": 2 * 0.5 * (6 * 24 + 4), "all_gather": 0.5 * 48}


def test_activation_bytes_by_hand():
    # B=1, T=3, C=2, a=1, V=4: bsh = 6; per layer 4*6 + 12*6 + 3 + LayerNorm stats 4*3 = 111
    # floats; head ln_f 6 + 6 + lm_head 6 + log-softmax 12 + total weight 1; ids, targets
    # and positions 3 * 3 * 8 bytes
    assert activation_bytes(SMALL, Layout(), 1) == 4 * (111 + 31) + 72
    # TP 2 + SP + LP: per layer 2*6/2 + 2*6 + 12*6/2 + 3/2 + 12/2 = 61.5; head 6 + 6 + 6 + 1
    layout = Layout(tp=2, loss_parallel=True, sequence_parallel=True)
    assert activation_bytes(SMALL, layout, 1) == 4 * (61.5 + 19) + 72
    # full checkpointing keeps the block input (6); selective also c_attn 18, attention
    # 6 + 3, c_fc 24, the two row matmuls 12
    assert activation_bytes(SMALL, Layout(), 1, "full") == 4 * (6 + 31) + 72
    assert activation_bytes(SMALL, Layout(), 1, "selective") == 4 * (69 + 31) + 72


def _traffic_vs_comm_py():
    """The dispatch-mode counter sees what comm.py counts, collective by collective."""
    comm = Comm()
    group = comm.group(torch.distributed.group.WORLD)
    x, out = torch.ones(10), torch.empty(20)
    with TrafficMode() as mode, comm.counting() as counted:
        group.all_reduce(x)
        group.all_gather(out, x)
        group.reduce_scatter(x[:5], out[:10])
        group.broadcast(x, 0)
    return mode.counter.summary(), counted.summary()


def test_traffic_mode_counts_like_comm_py():
    mode, counted = run_distributed(_traffic_vs_comm_py, 2)[0]
    assert mode == counted and set(mode) == {"all_reduce", "all_gather", "reduce_scatter", "broadcast"}


def test_quick_run_writes_the_report(char_data, tmp_path):
    """bench/run.py --quick on two layouts: JSON schema, Markdown and plots exist."""
    done = subprocess.run([sys.executable, str(REPO / "bench" / "run.py"), "--quick", "--out",
                           str(tmp_path), "--layouts", "single", "fsdp2", "--data_dir", char_data],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    records = json.loads((tmp_path / "results.json").read_text())["records"]
    assert [(r["layout"], r["implementation"]) for r in records] == [
        ("single", "custom"), ("fsdp2", "custom"), ("fsdp2", "pytorch")]
    for r in records:
        for key in ("tokens_per_s", "step_ms", "state_bytes", "state_analytic_bytes", "state_ratio",
                    "activation_bytes", "peak_bytes", "comm_bus_bytes", "comm_analytic_bus_bytes",
                    "traffic", "loss", "flops_per_token"):
            assert key in r, key
        assert r["loss"] and all(isinstance(v, float) for v in r["loss"])
    fsdp = records[1]
    assert fsdp["compute_ms"] is not None and fsdp["custom_over_pytorch"] > 0
    assert set(fsdp["traffic"]) >= {"all_gather", "reduce_scatter"}
    assert fsdp["comm_ratio"] == pytest.approx(1, abs=0.05)  # exact counts; padding only
    assert fsdp["state_ratio"] == pytest.approx(1, abs=0.1)
    for name in ("report.md", "throughput.png", "memory.png", "loss.png"):
        assert (tmp_path / name).stat().st_size > 0, name


def test_peer_bench_times_both_jobs_in_both_modes(char_data, tmp_path):
    """bench/peer.py on the tiny model, two rounds: a row per mode, both jobs training on the
    data (first loss ~ ln of the vocabulary padded to 128), JSON and Markdown; --profile
    prints each job's phases."""
    peer = [sys.executable, str(REPO / "bench" / "peer.py"), "--model", "tiny", "--block_size", "32",
            "--batch_size", "2", "--steps", "2", "--warmup", "1", "--data_dir", char_data]
    done = subprocess.run(peer + ["--out", str(tmp_path / "peer.json"), "--markdown", str(tmp_path / "peer.md")],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads((tmp_path / "peer.json").read_text())
    assert [row["mode"].split(":")[0] for row in result["rows"]] == ["one", "ddp"]
    assert all(row["speed ratio (paired median)"] > 0 for row in result["rows"])
    for mode in result["modes"].values():
        assert {job: len(seconds) for job, seconds in mode["step_seconds"].items()} == {"reference": 2, "nanodist": 2}
        assert all(abs(losses[0] - math.log(128)) < 0.3 for losses in mode["losses"].values())
    assert "| ddp: 2 process(es) x 1 thread(s) |" in (tmp_path / "peer.md").read_text()
    profiled = subprocess.run(peer + ["--modes", "one", "--profile"], cwd=REPO, capture_output=True, text=True,
                              timeout=300)
    assert profiled.returncode == 0, profiled.stdout + profiled.stderr
    phases = {line.split("|")[0].strip() for line in profiled.stdout.split("where the step time goes")[1].splitlines()}
    assert {"data", "forward", "backward", "grad_norm", "optimizer", "other"} <= phases
