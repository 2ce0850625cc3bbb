"""Export a checkpoint as a Hugging Face GPT-2 directory.

    python -m nanodist.export --out_dir runs/my-run [--step N] --to gpt2-mine
    then: transformers.GPT2LMHeadModel.from_pretrained("gpt2-mine")

Reads the layout-free checkpoint (any layout wrote it) on one process, without a process
group, into one model: the only copy of the weights held. Runs trained on GPT-2 BPE
also get the tokenizer (vocab.json, merges.txt) derived from the tiktoken ranks.
"""
import argparse
import json
import sys
from pathlib import Path

from safetensors.torch import save_file

from nanodist import checkpoint, compat
from nanodist.errors import UserError
from nanodist.hf import hf_config, to_hf
from nanodist.tokenizer import EOT, get_gpt2_encoding


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in for each byte (the alphabet of vocab.json and merges.txt)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in keep]
    return {**{b: chr(b) for b in keep}, **{b: chr(256 + i) for i, b in enumerate(extra)}}


def _merge_pair(token: bytes, ranks: dict[bytes, int]) -> tuple[bytes, bytes]:
    """The last merge that built `token`: byte-level BPE over the merges ranked below it."""
    parts, own = [bytes([b]) for b in token], ranks[token]
    while len(parts) > 2:  # merges ranked at or above `own` do not exist yet
        best = min(range(len(parts) - 1), key=lambda i: min(ranks.get(parts[i] + parts[i + 1], own), own))
        parts[best:best + 2] = [parts[best] + parts[best + 1]]
    return parts[0], parts[1]


def write_gpt2_tokenizer(to: Path, bpe_file: str | None):
    """vocab.json and merges.txt of GPT-2, from tiktoken's ranks (rank = merge order)."""
    ranks = compat.mergeable_ranks(get_gpt2_encoding(bpe_file))
    chars = _bytes_to_unicode()
    text = lambda b: "".join(chars[x] for x in b)  # noqa: E731
    vocab = {text(token): rank for token, rank in ranks.items()} | {"<|endoftext|>": EOT}
    merges = [" ".join(map(text, _merge_pair(token, ranks)))
              for token, _ in sorted(ranks.items(), key=lambda kv: kv[1]) if len(token) > 1]
    (to / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (to / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    (to / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "GPT2Tokenizer", "model_max_length": 1024, "bos_token": "<|endoftext|>",
         "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}))


def export(path: Path, to: Path, bpe_file: str | None = None) -> Path:
    model, info = checkpoint.load_model(path)
    if model.config.moe_experts:
        raise UserError(f"{path} is a mixture of experts ({model.config.moe_experts} experts per MoE "
                        f"block): GPT2LMHeadModel has no experts, there is nothing to export it to; "
                        f"sample from the checkpoint itself (sample.py --out_dir)")
    if not model.config.bias:
        raise UserError("GPT2LMHeadModel has biases; this model was trained without")
    tokenizer = info["tokenizer"]
    vocab = len(tokenizer["itos"]) if tokenizer["name"] == "char" else EOT + 1
    to.mkdir(parents=True, exist_ok=True)
    state = dict(to_hf(name, p.detach(), vocab) for name, p in model.named_parameters())
    save_file(state, to / "model.safetensors", metadata={"format": "pt"})
    (to / "config.json").write_text(json.dumps(hf_config(model.config, vocab), indent=1))
    if tokenizer["name"] == "gpt2":
        write_gpt2_tokenizer(to, bpe_file)
    return to


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out_dir", required=True, help="run directory")
    p.add_argument("--step", type=int, help="which checkpoint (default: the latest)")
    p.add_argument("--to", required=True, help="directory to write (from_pretrained reads it)")
    p.add_argument("--bpe_file", help="local gpt2.tiktoken (offline), for the tokenizer files")
    args = p.parse_args(argv)
    try:
        path = (checkpoint.find(args.out_dir, "latest") if args.step is None else
                checkpoint.find(None, str(Path(args.out_dir) / f"step_{args.step:07d}")))
        print(f"exported {path} to {export(path, Path(args.to), args.bpe_file)}")
        return 0
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
