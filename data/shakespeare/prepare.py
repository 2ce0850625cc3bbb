"""Tiny Shakespeare as GPT-2 BPE tokens: train.bin / val.bin (uint16) and meta.json.

    python data/shakespeare/prepare.py [--input input.txt] [--bpe_file gpt2.tiktoken]
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run without installing nanodist
from nanodist import cli
from nanodist.data.loader import (SHAKESPEARE_URL, check_split_sizes, prepare_out_dir, read_text,
                           split_text, write_meta, write_split)
from nanodist.data.tokenizer import get_gpt2_encoding


def prepare(input_path, out_dir, bpe_file):
    enc = get_gpt2_encoding(bpe_file)  # first: offline, it fails before the download would
    text = read_text(input_path, SHAKESPEARE_URL)
    train, val = (enc.encode_ordinary(part) for part in split_text(text))
    check_split_sizes(input_path or SHAKESPEARE_URL, {"train": len(train), "val": len(val)})
    out_dir = prepare_out_dir(out_dir)
    counts = {}
    for split, ids in (("train", train), ("val", val)):
        counts[f"{split}_tokens"] = write_split(out_dir, split, ids)
        print(f"{split}: {counts[f'{split}_tokens']:,} tokens")
    write_meta(out_dir, vocab_size=enc.n_vocab, tokenizer="gpt2", **counts)


def main(argv=None) -> int:
    parser = cli.OneLineParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", help="local copy of the text (default: download it)")
    parser.add_argument("--out_dir", default=str(Path(__file__).resolve().parent))
    parser.add_argument("--bpe_file", help="GPT-2 ranks in tiktoken format, for offline machines")

    def run(argv):
        args = parser.parse_args(argv)
        prepare(args.input, args.out_dir, args.bpe_file)
        return 0
    return cli.run(run, argv)


if __name__ == "__main__":
    sys.exit(main())
