"""Export a checkpoint as a Hugging Face GPT-2 directory.

    python -m nanodist.export --out_dir runs/my-run [--step N] --to gpt2-mine
    then: transformers.GPT2LMHeadModel.from_pretrained("gpt2-mine")

Reads the layout-free checkpoint (any layout wrote it) on one process, without a process
group, into one model: the only copy of the weights held. Runs trained on GPT-2 BPE
also get the tokenizer (vocab.json, merges.txt) derived from the tiktoken ranks.
"""
import argparse
import json
import os
import secrets
import shutil
import sys
from pathlib import Path

from safetensors.torch import save_file

from nanodist import checkpoint, cli, compat
from nanodist.checkpoint.integrity import TRUST_HELP
from nanodist.errors import UserError
from nanodist.model.hf import hf_config, to_hf
from nanodist.data.tokenizer import EOT, get_gpt2_encoding


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


def checkpoint_of(out_dir: str, step: int | None) -> Path:
    """The checkpoint of `step` in run directory `out_dir` (None: the latest)."""
    if step is None:
        return checkpoint.find(out_dir, "latest", "--out_dir")
    held = {checkpoint.step_of(p): p for p in checkpoint.checkpoints(out_dir)}
    if step not in held:
        raise UserError(f"--step {step}: {out_dir} has no checkpoint of that step (it holds "
                        f"{', '.join(map(str, held)) or 'none'}); omit --step for the latest")
    return held[step]


def write_hf(model, tokenizer: dict, to: Path, bpe_file: str | None):
    """The from_pretrained files of `model` in directory `to`."""
    vocab = len(tokenizer["itos"]) if tokenizer["name"] == "char" else EOT + 1
    state = dict(to_hf(name, p.detach(), vocab) for name, p in model.named_parameters())
    save_file(state, to / "model.safetensors", metadata={"format": "pt"})
    (to / "config.json").write_text(json.dumps(hf_config(model.config, vocab), indent=1))
    if tokenizer["name"] == "gpt2":
        write_gpt2_tokenizer(to, bpe_file)


EXPORT_FILES = {"config.json", "model.safetensors", "vocab.json", "merges.txt", "tokenizer_config.json"}


def export(path: Path, to: Path, bpe_file: str | None = None, force: bool = False,
           trust_unverified: bool = False) -> Path:
    """Checkpoint `path` as a Hugging Face directory `to`: new or empty, or (`force`) one
    holding an earlier export, which is replaced whole: written beside and renamed into
    place, so `to` holds one export or the other, never a mix."""
    if to.exists() and not to.is_dir():
        raise UserError(f"--to {to} is a file; pick a directory (new or empty)")
    held = sorted(p.name for p in to.iterdir()) if to.is_dir() else []
    foreign = [name for name in held if name not in EXPORT_FILES]
    if foreign:
        raise UserError(f"--to {to} holds what an export does not write ({', '.join(foreign[:3])}"
                        f"{', ...' if len(foreign) > 3 else ''}): pick a new or empty directory")
    if held and not force:
        raise UserError(f"--to {to} holds an export already: pick a new directory, or --force to replace it")
    model, info = checkpoint.load_model(path, trust_unverified)
    if model.config.moe_experts:
        raise UserError(f"{path} is a mixture of experts ({model.config.moe_experts} experts per MoE "
                        f"block): GPT2LMHeadModel has no experts, there is nothing to export it to; "
                        f"sample from the checkpoint itself (sample.py --out_dir)")
    if not model.config.bias:
        raise UserError("GPT2LMHeadModel has biases; this model was trained without")
    try:
        if to.is_dir() and not held:  # nothing to lose (and a mount point cannot be renamed)
            write_hf(model, info["tokenizer"], to, bpe_file)
        else:
            _replace_with(to, lambda new: write_hf(model, info["tokenizer"], new, bpe_file))
    except OSError as e:
        raise UserError(f"cannot write --to {to} ({e.strerror or e}): pick a writable directory") from e
    return to


def _replace_with(to: Path, write):
    """`write(new)` into a directory beside `to`, then renamed to `to` (the old one, if any,
    moved aside first and removed last; put back if the rename fails)."""
    to = to.absolute()
    token = secrets.token_hex(4)
    new, old = to.with_name(f".{to.name}.new-{token}"), to.with_name(f".{to.name}.old-{token}")
    try:
        new.mkdir(parents=True)
        write(new)
        if to.exists():
            os.replace(to, old)
        os.replace(new, to)
    except OSError:
        if old.exists() and not to.exists():
            os.replace(old, to)
        raise
    finally:
        shutil.rmtree(new, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def run(args) -> int:
    path = checkpoint_of(args.out_dir, args.step)
    to = export(path, Path(args.to), args.bpe_file, args.force, args.trust_unverified_checkpoint)
    print(f"exported {path} to {to}")
    return 0


def main(argv=None) -> int:
    p = cli.OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out_dir", required=True, help="run directory")
    p.add_argument("--step", type=int, help="which checkpoint (default: the latest)")
    p.add_argument("--to", required=True, help="directory to write, new or empty (from_pretrained reads it)")
    p.add_argument("--force", action="store_true", help="replace the earlier export --to holds")
    p.add_argument("--bpe_file", help="local gpt2.tiktoken (offline), for the tokenizer files")
    p.add_argument("--trust_unverified_checkpoint", action="store_true", help=TRUST_HELP)
    return cli.run(lambda argv: run(p.parse_args(argv)), argv)


if __name__ == "__main__":
    sys.exit(main())
