"""Generate text from a trained checkpoint, or from published GPT-2 weights.

    python sample.py --out_dir runs/my-run                        the latest checkpoint there
    python sample.py --checkpoint runs/my-run/step_0000100
    python sample.py --init_from gpt2-dir                        a from_pretrained directory
    python sample.py --init_from gpt2-hf-state-dict pytorch_model.bin   a bare GPT-2 state dict
"""
import argparse
import codecs
import itertools
import json
import sys
from pathlib import Path

import torch

from nanodist import checkpoint, cli
from nanodist.checkpoint.integrity import TRUST_HELP
from nanodist.run.config import check_ranges
from nanodist.errors import UserError
from nanodist.model.hf import load_hf_state_dict, pretrained_tensors
from nanodist.model.gpt import GPT, PRESETS, model_config
from nanodist.data.tokenizer import get_gpt2_encoding

MAX_NEW_TOKENS = 100_000  # a short novel; the text streams, so a reader can stop it sooner


def load_hf_file(path: str, preset: str) -> GPT:
    """A GPT2LMHeadModel state dict saved by torch (.bin/.pt) or safetensors."""
    if not Path(path).exists():
        raise UserError(f"--init_from: {path} not found")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file
            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)  # data, never code
    except Exception as e:  # noqa: BLE001 - damaged files raise all sorts of errors
        raise UserError(f"--init_from {path} is not a torch or safetensors file ({type(e).__name__}); "
                        f"pass a GPT2LMHeadModel state dict") from e
    tensors = isinstance(state, dict) and all(isinstance(v, torch.Tensor) for v in state.values())
    wpe = state.get("transformer.wpe.weight", state.get("wpe.weight")) if tensors else None
    if wpe is None or wpe.dim() != 2:
        raise UserError(f"--init_from {path}: no 2-D wpe.weight, not a GPT-2 state dict")
    try:
        return load_hf_state_dict(GPT(model_config(preset, wpe.shape[0], 50257)), state)
    except (KeyError, ValueError, RuntimeError) as e:
        raise UserError(f"--init_from {path}: {e}") from e


def load_pretrained_dir(directory: str) -> tuple[GPT, dict, int]:
    """(model, tokenizer, vocabulary size) of a from_pretrained directory; a vocabulary
    other than GPT-2's is a char run exported by nanodist.export (itos not included)."""
    config = Path(directory) / "config.json"
    try:
        hf = json.loads(config.read_text())
        preset = next(name for name, shape in PRESETS.items()
                      if all(hf[k] == v for k, v in shape.items()))
        vocab, block = hf["vocab_size"], hf["n_positions"]
    except (OSError, ValueError, KeyError, StopIteration) as e:
        raise UserError(f"--init_from {directory}: no config.json of a GPT-2 preset ({e!r})") from e
    if vocab != 50257:
        raise UserError(f"--init_from {directory}: vocabulary of {vocab}, not GPT-2's: sample "
                        f"from the nanodist checkpoint it was exported from")
    model = GPT(model_config(preset, block, vocab), seed=None)
    full_of = pretrained_tensors(directory, model.config, vocab)
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(full_of(name))
    return model, {"name": "gpt2"}, vocab


def codec(tokenizer: dict, bpe_file: str | None):
    """(encode, to_bytes) of the tokenizer a checkpoint was trained with: text -> ids, and
    ids -> their UTF-8 bytes (a GPT-2 token may hold part of a character)."""
    if tokenizer["name"] == "char":
        itos = tokenizer["itos"]
        stoi = {ch: i for i, ch in enumerate(itos)}

        def encode(text):
            unknown = sorted(set(text) - set(stoi))
            if unknown:
                known = "".join(itos)
                raise UserError(f"--start holds {len(unknown)} character(s) this character-level model "
                                f"never saw: {''.join(unknown)!r}; use only these: "
                                f"{known[:100]!r}{' ...' if len(known) > 100 else ''}")
            return [stoi[c] for c in text]
        return encode, lambda ids: "".join(itos[i] for i in ids).encode()
    enc = get_gpt2_encoding(bpe_file)
    return (lambda s: enc.encode(s, allowed_special={"<|endoftext|>"})), enc.decode_bytes


SAMPLING_RANGES = ((("num_samples",), lambda v: v >= 1, ">= 1"),
                   (("max_new_tokens",), lambda v: 1 <= v <= MAX_NEW_TOKENS,
                    f"in [1, {MAX_NEW_TOKENS:,}] (the text streams as it comes: Ctrl-C stops it)"),
                   (("temperature",), lambda v: v >= 0, ">= 0 (0: greedy)"),
                   (("top_k",), lambda v: v >= 0, ">= 0 (0: no cut)"))


@torch.no_grad()
def generate(model: GPT, idx: torch.Tensor, max_new_tokens: int, temperature: float,
             top_k: int | None, vocab_size: int):
    """The new token ids after the prompt `idx` (1, t), one at a time as they are drawn."""
    for _ in range(max_new_tokens):
        logits = model(idx[:, -model.config.block_size:])[:, -1, :vocab_size]
        if temperature == 0:  # the limit of a falling temperature: the likeliest token
            next_id = logits.argmax(-1, keepdim=True)
        else:
            logits = logits / temperature
            if top_k:
                kth = torch.topk(logits, min(top_k, vocab_size)).values[:, -1:]
                logits[logits < kth] = -float("inf")
            next_id = torch.multinomial(torch.softmax(logits, -1), 1)
        idx = torch.cat([idx, next_id], dim=1)
        yield next_id.item()


def stream(ids, to_bytes):
    """Prints the text of `ids` as they come (an incremental decoder holds a character's
    first bytes until its last arrives)."""
    text = codecs.getincrementaldecoder("utf-8")(errors="replace")
    for i in ids:
        print(text.decode(to_bytes([i])), end="", flush=True)
    print(text.decode(b"", final=True), end="")


def sample(args) -> int:
    check_ranges(args, SAMPLING_RANGES)
    if args.init_from and len(args.init_from) == 1:
        model, tokenizer, vocab = load_pretrained_dir(args.init_from[0])
    elif args.init_from:
        if args.init_from[0] != "gpt2-hf-state-dict" or len(args.init_from) != 2:
            raise UserError("--init_from takes: DIR, or gpt2-hf-state-dict PATH")
        model, tokenizer, vocab = load_hf_file(args.init_from[1], args.preset), {"name": "gpt2"}, 50257
    else:
        if args.checkpoint:
            path = checkpoint.find(None, args.checkpoint, "--checkpoint")
        elif args.out_dir:
            path = checkpoint.find(args.out_dir, "latest", "--out_dir")
        else:
            raise UserError("say what to sample from: --out_dir DIR, --checkpoint DIR or --init_from")
        model, info = checkpoint.load_model(path, args.trust_unverified_checkpoint)
        tokenizer = info["tokenizer"]
        vocab = len(tokenizer["itos"]) if tokenizer["name"] == "char" else 50257
    encode, to_bytes = codec(tokenizer, args.bpe_file)
    if args.start is None:  # the default: a newline, or token 0 for a vocabulary without one
        args.start = "\n" if tokenizer["name"] == "gpt2" or "\n" in tokenizer["itos"] else ""
    torch.manual_seed(args.seed)
    prompt = encode(args.start) or [0]
    for _ in range(args.num_samples):
        new = generate(model.eval(), torch.tensor([prompt]), args.max_new_tokens, args.temperature,
                       args.top_k, vocab)
        stream(itertools.chain(prompt, new), to_bytes)
        print("\n---------------", flush=True)
    return 0


def main(argv=None) -> int:
    p = cli.OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out_dir", help="run directory: sample from its latest checkpoint")
    p.add_argument("--checkpoint", help="a step_N checkpoint directory")
    p.add_argument("--init_from", nargs="+", metavar="DIR",
                   help="Hugging Face GPT-2 weights: a from_pretrained directory (as nanodist.export "
                        "writes), or gpt2-hf-state-dict PATH with --preset")
    p.add_argument("--preset", default="gpt2", choices=sorted(PRESETS),
                   help="model preset of --init_from weights")
    p.add_argument("--start", help="prompt text (default: a newline)")
    p.add_argument("--num_samples", type=int, default=2)
    p.add_argument("--max_new_tokens", type=int, default=200, help=f"at most {MAX_NEW_TOKENS:,}")
    p.add_argument("--temperature", type=float, default=0.8, help="0: greedy (the likeliest token)")
    p.add_argument("--top_k", type=int, default=200, help="sample among the k likeliest (0: all)")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--bpe_file", help="local gpt2.tiktoken (offline)")
    p.add_argument("--trust_unverified_checkpoint", action="store_true", help=TRUST_HELP)
    return cli.run(lambda argv: sample(p.parse_args(argv)), argv)


if __name__ == "__main__":
    sys.exit(main())
