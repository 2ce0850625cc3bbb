"""python -m nanodist_tools.diverge: clean layouts agree with one process tensor by tensor
within the rounding bound, and each known bug, injected by a test-only patch of one
strategy (the anchors' trackers' complaints), is named at the right first tensor."""
import pytest
import torch

from harness import run_distributed
from nanodist.parallel import context_parallel, ddp, expert_parallel, parallelize, pipeline, tensor_parallel
from nanodist.errors import UserError
from nanodist.parallel.comm import all_reduce, conjugate
from nanodist.parallel.placement import Placement
from nanodist_tools import diverge, diverge_posthoc as posthoc, diverge_record
from nanodist_tools.diverge_assemble import load
from nanodist_tools.diverge_assemble import Full
from nanodist_tools.diverge_compare import Row, compare, diff_of, longest_sum, max_abs
from nanodist_tools.processes import on_processes
from nanodist_tools.layouts import MOE

CHAR_VOCAB = 65  # tiny Shakespeare's characters: 128 rows once padded, 64 a TP rank


def shared(data_dir, moe=False) -> list[str]:
    """The tiny model on 2 x 32-token sequences per rank and micro-step, 4 sequences a step."""
    return ["--device=cpu", "--model=tiny", "--dataset=shakespeare_char", f"--data_dir={data_dir}",
            "--block_size=32", "--batch_size=2", "--total_batch_size=128", *(MOE if moe else [])]


def flags(spec, data_dir, out_dir, moe=False, extra=()) -> tuple[list[str], int]:
    argv, world = diverge.layout_flags(spec, shared(data_dir, moe) + list(extra))
    return [*argv, f"--out_dir={out_dir}/run"], world


@pytest.fixture(scope="module")
def references(char_data, tmp_path_factory):
    """One process's recording, dense (2 steps, checkpointed) and MoE (1 step), in this process."""
    out = {}
    for moe, steps in ((False, 2), (True, 1)):
        d = tmp_path_factory.mktemp("moe" if moe else "dense")
        argv, _ = flags("single", char_data, d, moe, ["--checkpoint_interval=1"])
        diverge_record.record_rank(argv, str(d), steps)
        out[moe] = d
    return out


def first_divergence(reference, out_dir):
    a, b = load(reference), load(out_dir)
    rows = compare(a, b)
    text, _ = diverge.report(a, b, rows)
    return next((row for row in rows if row.parts), None), text, rows


# ---------------------------------------------------------------- the bugs, one patch each

def _swap(owner, attr, value):
    old = getattr(owner, attr)
    setattr(owner, attr, value)
    return lambda: setattr(owner, attr, old)


def skip_f_backward():  # TP: f's all-reduce (the column-parallel input's) skipped in backward
    return _swap(tensor_parallel, "copy_to_tp", conjugate("CopyToTP", lambda x, g: x, lambda dy, g: dy))


def dp_not_divided():  # DDP: the summed gradients not divided by the group size
    engine_params = ddp.engine_params
    return _swap(ddp, "engine_params", lambda part, mesh: [(group, 1.0, members) for group, _, members
                                                           in engine_params(part, mesh)])


def cp_loss_per_rank():  # CP: each rank's loss normalised by the whole sequence's tokens
    def apply_cp(part, setup):
        part = context_parallel.apply_cp(part, setup)
        part.gpt.register_forward_hook(lambda m, args, out: out / setup.mesh.cp.size if out.dim() == 0 else out)
        return part
    steps = tuple((name, applies, apply_cp if name == "context parallel" else step)
                  for name, applies, step in parallelize.STEPS)
    return _swap(parallelize, "STEPS", steps)


def zigzag_swapped():  # CP: a rank's two zigzag chunks fed in the wrong order
    split_sequence = context_parallel.split_sequence

    def swapped(x, dim, rank, cp, zigzag=True):
        return torch.cat(split_sequence(x, dim, rank, cp, zigzag).chunk(2, dim)[::-1], dim)
    return _swap(context_parallel, "split_sequence", swapped)


def vocab_padded_wrongly():  # TP: a rank's vocabulary rows start at r ceil(V / tp) of the unpadded V
    forward = tensor_parallel.VocabParallelEmbedding.forward

    def shifted(self, idx):  # the padded split starts rank r at r V_padded / tp
        wrong, right = self.group.rank * -(-CHAR_VOCAB // self.group.size), self.group.rank * self.weight.size(0)
        return forward(self, idx - (wrong - right))
    return _swap(tensor_parallel.VocabParallelEmbedding, "forward", shifted)


def expert_wrong_divisor():  # EP: the experts' gradient divided by the expert-data group, not DP x CP
    return _swap(expert_parallel, "EXPERTS", Placement(shards=(("ep", 0),), reduce="edp", divisor="edp"))


def tied_sum_dropped():  # PP: the stages never add their tied wte / lm_head gradients
    return _swap(pipeline.Split, "sum_tied_grads", lambda self: None)


def tp_sum_in_bf16():  # TP: g's forward all-reduce payload rounded to bfloat16 in a float32 run
    def rounded(x, group):
        return all_reduce(x.bfloat16().to(x.dtype) if x.dtype == torch.float32 else x, group)
    return _swap(tensor_parallel, "reduce_from_tp", conjugate("ReduceFromTP", rounded, lambda dy, g: dy))


def record_mutated(patch, argv, out_dir, steps=1, samples=0):
    """Rank side: record with one strategy patched, then undo it (the pool's processes live on)."""
    undo = globals()[patch]()
    try:
        return diverge_record.record_rank(argv, out_dir, steps, samples)
    finally:
        undo()


# (patch, layout, MoE, anchor issue, the tensor the tool must name first, the step it blames)
MUTATIONS = [
    ("skip_f_backward", "tp2", False, "Megatron-LM#1736, torchtitan#1750", ("transformer.ln_f", "backward"),
     "through lm_head, owned in B by: tensor parallel (head)"),
    ("dp_not_divided", "ddp2", False, "the issue's list", ("transformer.wte.weight", "grad"), "DDP"),
    ("cp_loss_per_rank", "cp2", False, "torchtitan#3280", ("loss", "loss"), "context parallel"),
    ("zigzag_swapped", "cp2", False, "Megatron-LM#1464", ("transformer.h.0.attn.sdpa", "forward"),
     "context parallel (ring attention core)"),
    ("vocab_padded_wrongly", "tp2", False, "Megatron-LM#1754", ("transformer.wte", "forward"),
     "tensor parallel (vocab_embedding)"),
    ("expert_wrong_divisor", "data_parallel_size=2,expert_parallel_size=2", True,
     "the issue's list (MoE, cf. torchtitan#3280)", ("transformer.h.1.mlp.experts.fc_weight", "grad"),
     "expert parallel"),
    ("tied_sum_dropped", "pp2-1f1b", False, "torchtitan#771", ("transformer.wte.weight", "grad"),
     "pipeline split (tied embedding)"),
]


@pytest.mark.parametrize("patch, spec, moe, anchor, expected, blamed", MUTATIONS, ids=[m[0] for m in MUTATIONS])
def test_a_bug_is_named_at_its_first_tensor(patch, spec, moe, anchor, expected, blamed, char_data, references,
                                            tmp_path):
    argv, world = flags(spec, char_data, tmp_path, moe)
    run_distributed(record_mutated, world, patch, argv, str(tmp_path))
    first, text, _ = first_divergence(references[moe], tmp_path)
    assert first is not None, text
    assert first.key[1:] == expected, text
    assert first.diff > 1e3 * first.bound, text  # a bug, not a rounding bound set too tight
    assert blamed in text, text
    print(f"{patch} ({anchor}): {text.splitlines()[1]}")


CLEAN = ["ddp2", "fsdp2", "zero1-2", "tp2-sp-lp", "cp2", "pp2-1f1b",
         "activation_checkpointing=full,data_parallel_size=2",
         "data_parallel_size=2,implementation=pytorch", "pipeline_parallel_size=2,implementation=pytorch",
         "data_parallel_size=2,data_parallel_type=fsdp,implementation=pytorch",
         "tensor_parallel_size=2,sequence_parallel=true,enable_loss_parallelism=true,implementation=pytorch",
         "fsdp2xtp2-sp",  # 4 processes: DP x TP, the batch and the columns split at once
         "data_parallel_size=2,expert_parallel_size=2"]  # MoE (layouts.MOE): experts split over EP


@pytest.mark.parametrize("spec", CLEAN)
def test_a_clean_layout_stays_within_the_rounding_bound(spec, char_data, references, tmp_path):
    argv, world = flags(spec, char_data, tmp_path, moe := "expert_parallel_size" in spec)
    run_distributed(diverge_record.record_rank, world, argv, str(tmp_path))
    first, text, rows = first_divergence(references[moe], tmp_path)
    assert first is None, text
    kinds = {row.key[2] for row in rows}
    assert kinds == {"forward", "backward", "loss", "grad", "value"}, kinds
    assert "no divergence" in text and "step 1 backward block 0" in text
    assert max(row.ratio for row in rows) < 1e-2, text  # rounding, far below its bound


def test_two_steps_checkpoints_and_logs_agree_or_part(char_data, references, tmp_path):
    """Step 2 of a clean layout within the bound after AdamW; its checkpoint and losses too.
    A pipeline that drops the tied gradient: wte's checkpoint past its bound, and the loss
    of step 2 (the first the wrong update reaches)."""
    reference = references[False]
    clean, broken = tmp_path / "clean", tmp_path / "broken"
    argv, world = flags("ddp2", char_data, clean, extra=["--checkpoint_interval=1"])
    run_distributed(diverge_record.record_rank, world, argv, str(clean), 2)
    first, text, rows = first_divergence(reference, clean)
    assert first is None and {row.key[0] for row in rows} == {0, 1}, text
    text, parts = posthoc.compare_checkpoints(reference / "run" / "step_0000001", clean / "run" / "step_0000001")
    assert not parts and "no divergence" in text, text
    # after 2 steps the sqrt(P) carry of the bound passes what AdamW can move: no verdict
    text, parts = posthoc.compare_checkpoints(reference / "run", clean / "run")
    assert not parts and "no verdict possible at this size" in text, text
    text, parts = posthoc.compare_logs(reference / "run", clean / "run")
    assert not parts and "no divergence" in text, text

    argv, world = flags("pp2-1f1b", char_data, broken, extra=["--checkpoint_interval=1"])
    run_distributed(record_mutated, world, "tied_sum_dropped", argv, str(broken), 2)
    text, parts = posthoc.compare_checkpoints(reference / "run" / "step_0000001", broken / "run" / "step_0000001")
    assert parts and "first divergence (model order): transformer.wte.weight" in text, text
    text, parts = posthoc.compare_logs(reference / "run", broken / "run")
    assert parts and "first divergence: step 1," in text, text


def pooled(world, work, *args, timeout=None):
    """on_processes through the test pools (one rank: this process): no process to start."""
    return run_distributed(work, world, *args) if world > 1 else [work(*args)]


def test_float32_is_held_to_each_layouts_distance_from_float64(char_data, tmp_path, capsys, monkeypatch):
    """The whole command line: single vs tp2-sp-lp in float32, each with its float64 run."""
    monkeypatch.setattr(diverge, "on_processes", pooled)
    code = diverge.main(["single", "tp2-sp-lp", "--dtype=float32", f"--out={tmp_path}", "--",
                         *shared(char_data)])
    assert code == 0 and "no divergence" in capsys.readouterr().out
    a, b, a64, b64 = (load(tmp_path / side) for side in ("a", "b", "a64", "b64"))
    rows = compare(a, b, a64, b64)
    assert not any(row.parts for row in rows)
    assert max(row.diff for row in rows) > 1e-9  # float32 rounding seen, and explained
    # a float32-only bug (B's TP sum in bfloat16) leaves B's float64 path, not A64 vs B64's
    argv, world = flags("tp2-sp-lp", char_data, tmp_path / "bf16", extra=["--dtype=float32"])
    run_distributed(record_mutated, world, "tp_sum_in_bf16", argv, str(tmp_path / "bf16"))
    text, parts = diverge.report(a, load(tmp_path / "bf16"), rows := compare(a, load(tmp_path / "bf16"), a64, b64))
    first = next((row for row in rows if row.parts), None)
    assert parts and first.key[1:] == ("transformer.wte", "forward"), text
    assert first.check.startswith("B vs its float64 run") and first.diff > 10 * first.bound, text
    assert "it parts in B vs its float64 run (float32 rounding)" in text, text


@pytest.mark.parametrize("argv, says", [
    (["single", "nonsense"], "layout 'nonsense': name one of"),
    (["single", "ddp2", "--steps=0"], "--steps 0: give 1 to 100"),
    (["single", "ddp2", "--max_memory_mib=1"], "lower --total_batch_size"),
    (["single", "tensor_parallel_size=3"], "divisible"),
    (["--recorded", "/nonexistent", "/nonexistent"], "holds no rank<r>.pt recording"),
    (["--checkpoints", "/nonexistent", "/nonexistent"], "no checkpoint there"),
    (["--logs", "/nonexistent", "/nonexistent"], "no such directory"),
])
def test_bad_input_is_one_line(argv, says, char_data, capsys, monkeypatch):
    monkeypatch.delenv("NANODIST_DEBUG", raising=False)
    assert diverge.main([*argv, "--", *shared(char_data)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and says in err and err.count("\n") == 1, err


def test_a_digest_finds_the_same_first_tensor(char_data, tmp_path):
    """About 64 sampled entries of each full tensor, the same for every layout: a clean
    layout agrees, the TP bug is named at the same tensor as with whole tensors."""
    reference, clean, broken = tmp_path / "single", tmp_path / "clean", tmp_path / "broken"
    argv, _ = flags("single", char_data, reference)
    diverge_record.record_rank(argv, str(reference), 1, 64)
    argv, world = flags("tp2-sp-lp", char_data, clean)
    run_distributed(diverge_record.record_rank, world, argv, str(clean), 1, 64)
    argv, world = flags("tp2", char_data, broken)
    run_distributed(record_mutated, world, "skip_f_backward", argv, str(broken), 1, 64)
    first, text, rows = first_divergence(reference, clean)
    digests = [row.b for row in rows if row.key[2] != "loss"]
    assert first is None and all(d.index is not None and len(d.value) < 300 for d in digests), text
    first, text, _ = first_divergence(reference, broken)
    assert first is not None and first.key[1:] == ("transformer.ln_f", "backward"), text


def test_nan_or_inf_on_one_side_is_a_divergence(references):
    """A non-finite entry the other side lacks parts, whatever the bound; max|x| is the finite's."""
    full = lambda *values: Full(torch.tensor(values, dtype=torch.float64), None, 0.0, [])  # noqa: E731
    assert diff_of(full(1.0, float("nan")), full(1.0, float("nan"))) == float("inf")  # NaN != NaN
    assert diff_of(full(1.0, float("inf")), full(1.0, 2.0)) == float("inf")
    assert diff_of(full(1.0, float("inf")), full(1.5, float("inf"))) == 0.5
    assert max_abs(torch.tensor([3.0, float("inf"), float("nan")])) == 3.0
    assert Row((0, "x", "forward"), float("nan"), 1.0, full(0.0), full(0.0)).parts
    a, b = load(references[False]), load(references[False])
    piece = b.pieces[(0, "transformer.h.1.mlp.c_fc", "forward")][0]
    piece.tensor = piece.tensor.flatten().index_fill(0, torch.tensor([7]), float("nan")).view_as(piece.tensor)
    first = next(row for row in compare(a, b) if row.parts)
    assert first.key == (0, "transformer.h.1.mlp.c_fc", "forward") and first.diff == float("inf")
    assert longest_sum({**a.meta, "gradient_clipping": 1.0}) == a.meta["n_params"] > longest_sum(a.meta)  # the norm


def test_a_rank_error_and_reused_output_are_one_line(references, char_data, tmp_path, capsys, monkeypatch):
    """A child rank's UserError reaches the parent as its line; --out must be new or empty;
    two recordings of different runs are refused; an unforeseen error exits 3, not 1."""
    monkeypatch.delenv("NANODIST_DEBUG", raising=False)
    with pytest.raises(UserError, match="^layout 'nonsense': name one of"):  # the rank's own line
        on_processes(1, diverge.layout_flags, "nonsense", [])
    for argv, says in (([f"--out={references[False]}"], "not an empty directory"),
                       (["--out=/proc/nanodist_x"], "cannot write there"),
                       (["--recorded", str(references[False]), str(references[True])], "not the same run: model")):
        assert diverge.main(["single", "ddp2", *argv, "--", *shared(char_data)]) == 2
        err = capsys.readouterr().err
        assert says in err and err.count("\n") == 1, err
    monkeypatch.setattr(diverge, "main_of", lambda argv: 1 / 0)
    assert diverge.main(["--recorded", "x", "y"]) == diverge.ERROR == 3


def test_a_damaged_recording_is_one_line(references, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("NANODIST_DEBUG", raising=False)
    (tmp_path / "rank0.pt").write_bytes(b"not a torch file")
    assert diverge.main(["--recorded", str(tmp_path), str(tmp_path)]) == 2
    assert "rank0.pt is not a recording of this tool" in capsys.readouterr().err
    saved = torch.load(references[False] / "rank0.pt", weights_only=True)
    for damage, says in (({"records": [(0, "loss", "loss")]}, "a record is not"),
                         ({"meta": {**saved["meta"], "seed": 1}}, "not the same run: seed 1 vs 1337"),
                         ({"meta": {k: v for k, v in saved["meta"].items() if k != "seed"}}, "another version")):
        torch.save({**saved, **damage}, tmp_path / "rank0.pt")
        assert diverge.main(["--recorded", str(tmp_path), str(references[False])]) == 2
        err = capsys.readouterr().err
        assert says in err and err.count("\n") == 1, err
