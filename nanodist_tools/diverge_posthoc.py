"""After the fact: two checkpoints tensor by tensor, or two runs' TensorBoard losses,
against the float64 bound of diverge_compare.py after s AdamW steps (docs/diverge.md):

    a step's gradient    2 u D g, D = (20 n_layer + 11) L, the depth of a step's last
                         gradient in the recorded comparison, g <= 1 (a mean loss's gradient)
    parameters, step s   s lr / eps times that (AdamW's update has slope <= 1/eps in g)
    loss, step s         |loss| (2 u D + sqrt(P) times the parameters' bound at s): the
                         harness's argument with |loss| for the gradient norm (P parameters)

Runs in float32 or bfloat16 have no such bound: the tool says so and lists the largest
differences (record their steps with the tool instead: it measures each one's rounding).
"""
import math
from pathlib import Path

import torch

from nanodist import checkpoint
from nanodist.data.loader import load_split
from nanodist.errors import UserError
from nanodist.model.gpt import GPT, model_config
from nanodist_tools.diverge_compare import UNIT_ROUNDOFF

EPS = 1e-8  # AdamW's, as the trainer builds it


def grad_noise(n_layer: int, n_embd: int, block_size: int, vocab_size: int, tokens: int) -> float:
    """2 u D: the float64 bound of a step's gradient entries (each <= 1)."""
    longest = max(4 * n_embd, block_size, vocab_size, tokens)
    return 2 * UNIT_ROUNDOFF["float64"] * (20 * n_layer + 11) * longest


def _checkpoint(path) -> Path:
    path = Path(path)
    found = path if path.name.startswith("step_") else (checkpoint.checkpoints(path) or [None])[-1]
    if found is None or not found.is_dir():
        raise UserError(f"{path}: no checkpoint there; give a step_<N> directory or a run directory holding one")
    return found


def compare_checkpoints(path_a, path_b) -> tuple[str, bool]:
    a_path, b_path = _checkpoint(path_a), _checkpoint(path_b)
    (model_a, info_a), (model_b, info_b) = checkpoint.load_model(a_path), checkpoint.load_model(b_path)
    if info_a["model"] != info_b["model"]:
        raise UserError(f"{a_path} and {b_path} hold different models; compare checkpoints of one model")
    steps = checkpoint.step_of(a_path)
    if steps != checkpoint.step_of(b_path):
        raise UserError(f"{a_path} is at step {steps}, {b_path} at {checkpoint.step_of(b_path)}: "
                        f"compare checkpoints of the same step")
    cfg, m = info_a["config"], info_a["model"]
    float64 = cfg["dtype"] == "float64" and info_b["config"]["dtype"] == "float64"
    noise = grad_noise(m["n_layer"], m["n_embd"], m["block_size"], m["vocab_size"], cfg["total_batch_size"])
    b_params = dict(model_b.named_parameters())
    rows = []
    for name, pa in model_a.named_parameters():
        pb = b_params[name]
        diff = (pa.double() - pb.double()).abs().max().item()
        bound = steps * cfg["learning_rate"] / EPS * noise + 2 * UNIT_ROUNDOFF["float64"] * pa.abs().max().item()
        rows.append((name, diff, bound))
    lines = [f"A = {a_path}, B = {b_path}: step {steps}, {len(rows)} parameters"]
    if not float64:
        worst = sorted(rows, key=lambda r: -r[1])[:5]
        lines.append("not both float64: no rounding bound after AdamW steps; the largest differences:")
        lines += [f"  {name:<40} {diff:.3e}" for name, diff, _ in worst]
        return "\n".join(lines), False
    parted = [r for r in rows if r[1] > r[2]]
    if parted:
        name, diff, bound = parted[0]
        lines.append(f"first divergence (model order): {name}, |A - B| = {diff:.3e} > bound {bound:.3e}; "
                     f"{len(parted)} of {len(rows)} parameters past their bound")
    else:
        name, diff, bound = max(rows, key=lambda r: r[1] / r[2])
        lines.append(f"no divergence: the worst, {name}, {diff:.3e} <= {bound:.3e}")
    return "\n".join(lines), bool(parted)


def _events(run) -> tuple[dict, list]:
    """The run's config (its TensorBoard text) and its (step, loss) pairs."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(run), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    if "Loss/train" not in events.Tags().get("scalars", []):
        raise UserError(f"{run}: no TensorBoard losses there; give a run directory (its --log_dir)")
    config = {}
    for tag in events.Tags().get("tensors", []):
        if tag.startswith("config"):
            text = events.Tensors(tag)[0].tensor_proto.string_val[0].decode()
            config = {key.strip(): value.strip() for key, _, value in
                      (line.partition(" = ") for line in text.splitlines())}
    return config, [(e.step, e.value) for e in events.Scalars("Loss/train")]


def compare_logs(run_a, run_b) -> tuple[str, bool]:
    (cfg, losses_a), (cfg_b, losses_b) = _events(run_a), _events(run_b)
    b_at = dict(losses_b)
    common = [(step, loss, b_at[step]) for step, loss in losses_a if step in b_at]
    if not common:
        raise UserError(f"{run_a} and {run_b} share no logged step")
    lines = [f"A = {run_a}, B = {run_b}: {len(common)} common steps"]
    if not (cfg.get("dtype") == cfg_b.get("dtype") == "float64"):
        step, la, lb = max(common, key=lambda r: abs(r[1] - r[2]))
        lines.append(f"not both float64 (or no config logged): no rounding bound; the largest difference: "
                     f"step {step}, {la:.6f} vs {lb:.6f}")
        return "\n".join(lines), False
    block, lr = int(cfg["block_size"]), float(cfg["learning_rate"])
    try:  # the run's vocabulary; GPT-2's, the largest, where its data is gone
        data_dir = cfg["data_dir"] or Path("data", cfg["dataset"])
        vocab = load_split(data_dir, "val", block, cfg["dataset"]).vocab_size
    except UserError:
        vocab = 50257
    with torch.device("meta"):
        model = GPT(model_config(cfg["model"], block, vocab), seed=None)
    m = model.config
    n_params = sum(p.numel() for p in model.parameters())
    noise = grad_noise(m.n_layer, m.n_embd, block, m.vocab_size, int(cfg["total_batch_size"]))
    for step, la, lb in common:  # TensorBoard keeps float32 scalars: their rounding too
        drift = math.sqrt(n_params) * step * lr / EPS * noise  # step: the updates before it
        bound = abs(la) * (noise + drift) + UNIT_ROUNDOFF["float32"] * (abs(la) + abs(lb))
        if abs(la - lb) > bound:
            lines.append(f"first divergence: step {step}, loss {la:.6f} vs {lb:.6f}, "
                         f"|A - B| = {abs(la - lb):.3e} > bound {bound:.3e}")
            return "\n".join(lines), True
    lines.append(f"no divergence: the losses agree within the bound at every step ({common[-1][0]} last)")
    return "\n".join(lines), False
