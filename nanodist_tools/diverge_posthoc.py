"""After the fact: two checkpoints tensor by tensor, or two runs' TensorBoard losses,
against the float64 bound of diverge_compare.py after s AdamW steps (docs/diverge.md):

    a step's gradient    2 u D g + sqrt(P) d_(s-1), D = (20 n_layer + 11) L, the depth of a
                         step's last gradient in the recorded comparison, g <= 1 (a mean
                         loss's gradient), d the parameters' bound after the step before
    parameters, step s   d_s = d_(s-1) + lr / eps times that (AdamW's update has slope
                         <= 1/eps in g): the recorded comparison's sqrt(P) carry, with the
                         bound d where it has the measured distance
    loss, step s         |loss| (2 u D + sqrt(P) d_s): the harness's argument with |loss| for
                         the gradient norm (P parameters)

Two runs' parameters cannot differ by more than about 2 lr s (AdamW moves an entry by at
most about lr a step), nor their losses by more than the losses: a bound past that holds
nothing, and the tool says no verdict is possible rather than "no divergence".

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
RECORD = "record the steps with python -m nanodist_tools.diverge A B --steps N (it measures each step's distance)"


def param_bound(steps: int, lr: float, noise: float, n_params: int) -> float:
    """d_steps: the parameters' float64 bound after `steps` AdamW steps (module doc)."""
    d = 0.0
    for _ in range(steps):
        d += lr / EPS * (noise + math.sqrt(n_params) * d)
    return d


def grad_noise(n_layer: int, n_embd: int, block_size: int, vocab_size: int, tokens: int, clip: int = 0) -> float:
    """2 u D: the float64 bound of a step's gradient entries (each <= 1); `clip`: the P
    squares of the gradient norm under --gradient_clipping, the longest sum then."""
    longest = max(4 * n_embd, block_size, vocab_size, tokens, clip)
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
    n_params = sum(p.numel() for p in model_a.parameters())
    noise = grad_noise(m["n_layer"], m["n_embd"], m["block_size"], m["vocab_size"], cfg["total_batch_size"],
                       n_params if cfg.get("gradient_clipping") else 0)
    lr = cfg["learning_rate"]
    d = param_bound(steps, lr, noise, n_params)
    b_params = dict(model_b.named_parameters())
    rows = []
    for name, pa in model_a.named_parameters():
        pb = b_params[name]
        gap = (pa.double() - pb.double()).abs()
        diff = gap.max().item() if torch.isfinite(gap).all() else math.inf  # NaN: a difference
        rows.append((name, diff, d + 2 * UNIT_ROUNDOFF["float64"] * pa.abs().max().item()))
    lines = [f"A = {a_path}, B = {b_path}: step {steps}, {len(rows)} parameters"]
    if not float64:
        worst = sorted(rows, key=lambda r: -r[1])[:5]
        lines.append("not both float64: no rounding bound after AdamW steps; the largest differences:")
        lines += [f"  {name:<40} {diff:.3e}" for name, diff, _ in worst]
        return "\n".join(lines), False
    parted = [r for r in rows if not r[1] <= r[2]]
    if parted:
        name, diff, bound = parted[0]
        lines.append(f"first divergence (model order): {name}, |A - B| = {diff:.3e} > bound {bound:.3e}; "
                     f"{len(parted)} of {len(rows)} parameters past their bound")
    elif d >= 2 * lr * steps:  # AdamW moves an entry by about lr a step at most
        lines.append(f"no verdict possible at this size: the bound after {steps} step(s), {d:.1e}, is past "
                     f"the {2 * lr * steps:.1e} two runs can differ by at all; {RECORD}")
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


SAME_RUN = ("model", "dataset", "block_size", "total_batch_size", "learning_rate", "seed", "gradient_clipping")
NEEDED = (*SAME_RUN, "dtype", "data_dir")


def compare_logs(run_a, run_b) -> tuple[str, bool]:
    for run in (run_a, run_b):
        if not Path(run).is_dir():
            raise UserError(f"{run}: no such directory; give a run directory (its --log_dir)")
    (cfg, losses_a), (cfg_b, losses_b) = _events(run_a), _events(run_b)
    for run, c in ((run_a, cfg), (run_b, cfg_b)):
        missing = [key for key in NEEDED if key not in c]
        if c and missing:
            raise UserError(f"{run}: its logged config lacks {', '.join(missing)}; log it with this train.py")
    differ = [key for key in SAME_RUN if cfg and cfg_b and cfg[key] != cfg_b[key]]
    if differ:
        raise UserError(f"{run_a} and {run_b} are not the same run: {differ[0]} {cfg[differ[0]]} vs "
                        f"{cfg_b[differ[0]]}; compare runs of the same flags but the layout's")
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
    noise = grad_noise(m.n_layer, m.n_embd, block, m.vocab_size, int(cfg["total_batch_size"]),
                       n_params if cfg["gradient_clipping"] == "True" else 0)
    checked = None
    for step, la, lb in common:  # TensorBoard keeps float32 scalars: their rounding too
        drift = math.sqrt(n_params) * param_bound(step, lr, noise, n_params)  # step: the updates before it
        bound = abs(la) * (noise + drift) + UNIT_ROUNDOFF["float32"] * (abs(la) + abs(lb))
        if not abs(la - lb) <= bound:
            lines.append(f"first divergence: step {step}, loss {la:.6f} vs {lb:.6f}, "
                         f"|A - B| = {abs(la - lb):.3e} > bound {bound:.3e}")
            return "\n".join(lines), True
        if bound >= max(abs(la), abs(lb)):  # it holds any two losses: nothing later is checked
            break
        checked = step
    if checked is None:
        lines.append(f"no verdict possible at this size: the bound at step {common[0][0]} is past the loss "
                     f"itself; {RECORD}")
    elif checked != common[-1][0]:
        lines.append(f"no divergence up to step {checked}; no verdict possible at this size after it (the "
                     f"bound passes the loss itself); {RECORD}")
    else:
        lines.append(f"no divergence: the losses agree within the bound at every step ({checked} last)")
    return "\n".join(lines), False
