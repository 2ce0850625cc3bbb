"""Hugging Face GPT-2 directories, both ways: what `from_pretrained(DIR)` loads, and
what `train.py --init_from DIR` / `sample.py --init_from DIR` start from.

    DIR/config.json          GPT2Config: n_layer, n_head, n_embd, n_positions, vocab_size
    DIR/model.safetensors    GPT2LMHeadModel's tensors (or pytorch_model.bin); lm_head tied
                             to wte, so absent

Names are GPT-2's on both sides; Hugging Face keeps the four projection matrices as
Conv1D (in x out) where nanodist's nn.Linear keeps out x in (`CONV1D`). nanodist pads
the vocabulary to a multiple of 64; the directory holds the real vocabulary only. The
hub's own gpt2 files hold GPT2Model's keys (no "transformer." prefix): both are read.
"""
import json
from pathlib import Path

import torch

from nanodist.errors import UserError
from nanodist.model.gpt import GPT, GPTConfig

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def hf_key(name: str, keys) -> str | None:
    """The key of nanodist parameter `name` among a Hugging Face file's `keys`, or None."""
    for key in (name, name.removeprefix("transformer.")):
        if key in keys:
            return key
    return None


def from_hf(name: str, tensor: torch.Tensor) -> torch.Tensor:
    """A Hugging Face tensor in nanodist's orientation (the real vocabulary rows only)."""
    return tensor.t() if name.endswith(CONV1D) else tensor


def hf_config(model_cfg: GPTConfig, vocab_size: int) -> dict:
    """config.json of GPT2LMHeadModel for `model_cfg` with its real `vocab_size`."""
    return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
            "n_layer": model_cfg.n_layer, "n_head": model_cfg.n_head, "n_embd": model_cfg.n_embd,
            "n_positions": model_cfg.block_size, "n_ctx": model_cfg.block_size,
            "vocab_size": vocab_size, "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5,
            "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, "tie_word_embeddings": True,
            "bos_token_id": vocab_size - 1, "eos_token_id": vocab_size - 1}


def to_hf(name: str, tensor: torch.Tensor, vocab_size: int) -> tuple[str, torch.Tensor]:
    """One nanodist tensor as Hugging Face stores it (real vocabulary rows only)."""
    if name.endswith(CONV1D):
        tensor = tensor.t()
    if name == "transformer.wte.weight":
        tensor = tensor[:vocab_size]
    return name, tensor.contiguous()


def _open(directory: Path):
    """(config.json as a dict, name -> tensor reader) of a from_pretrained directory.
    Tensors are read one at a time (safetensors) or memory-mapped (torch, data only)."""
    config_file = directory / "config.json"
    weights = next((directory / f for f in WEIGHT_FILES if (directory / f).exists()), None)
    if not config_file.exists() or weights is None:
        raise UserError(f"--init_from {directory}: expected a Hugging Face GPT-2 directory with "
                        f"config.json and {' or '.join(WEIGHT_FILES)}")
    try:
        config = json.loads(config_file.read_text())
        if weights.suffix == ".safetensors":
            from safetensors import safe_open
            handle = safe_open(str(weights), framework="pt")
            return config, set(handle.keys()), handle.get_tensor
        state = torch.load(weights, map_location="cpu", weights_only=True, mmap=True)
        return config, set(state), state.__getitem__
    except Exception as e:  # noqa: BLE001 - damaged files raise all sorts of errors
        raise UserError(f"--init_from {directory}: cannot read it ({type(e).__name__}: {e})") from e


def pretrained_tensors(directory, model_cfg: GPTConfig, vocab_size: int):
    """name -> full tensor of `model_cfg` (nanodist orientation and padding) read from a
    from_pretrained directory; wpe cropped to model_cfg.block_size (as nanoGPT's crop).
    Padded vocabulary rows are zeros, the same for every layout."""
    directory = Path(directory)
    config, keys, read = _open(directory)
    want = {"n_layer": model_cfg.n_layer, "n_head": model_cfg.n_head, "n_embd": model_cfg.n_embd,
            "vocab_size": vocab_size}
    diff = [f"{k} {config.get(k)} there vs {v} here" for k, v in want.items() if config.get(k) != v]
    if diff:
        raise UserError(f"--init_from {directory} holds another model ({', '.join(diff)}); "
                        f"pick the matching --model and dataset")
    if config.get("n_positions", 0) < model_cfg.block_size:
        raise UserError(f"--init_from {directory} has {config.get('n_positions')} positions: "
                        f"--block_size must be at most that")

    def full_of(name: str) -> torch.Tensor:
        key = hf_key(name, keys)
        if key is None:
            raise UserError(f"--init_from {directory}: no tensor {name!r}")
        tensor = from_hf(name, read(key))
        if name == "transformer.wpe.weight":
            tensor = tensor[:model_cfg.block_size]
        if name == "transformer.wte.weight":
            tensor = torch.cat([tensor, tensor.new_zeros(model_cfg.vocab_size - vocab_size, tensor.shape[1])])
        return tensor.float().contiguous()
    return full_of


@torch.no_grad()
def load_hf_state_dict(model: GPT, hf_state_dict: dict) -> GPT:
    """Copy a Hugging Face GPT2LMHeadModel (or GPT2Model) state dict into `model` (vocab
    rows beyond the checkpoint's stay as initialised; the padding tokens are never targets)."""
    ours = model.state_dict()
    for name, target in ours.items():
        if name == "lm_head.weight":
            continue  # tied to wte
        key = hf_key(name, hf_state_dict)
        if key is None:
            raise KeyError(f"no {name!r} in the GPT-2 state dict")
        tensor = from_hf(name, hf_state_dict[key])
        if name == "transformer.wte.weight":
            target = target[: tensor.shape[0]]
        if target.shape != tensor.shape:
            raise ValueError(f"{name}: checkpoint shape {tuple(tensor.shape)} vs model "
                             f"{tuple(target.shape)}; build the model with the checkpoint's preset")
        target.copy_(tensor)
    return model
