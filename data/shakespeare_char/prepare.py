"""Tiny Shakespeare as characters: train.bin / val.bin (uint16) and meta.json with the
vocabulary (itos: token id -> character).

    python data/shakespeare_char/prepare.py [--input input.txt]
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run without installing nanodist
from nanodist import cli
from nanodist.data.loader import (SHAKESPEARE_URL, check_split_sizes, prepare_out_dir, read_text,
                           split_text, write_meta, write_split)


def prepare(input_path, out_dir):
    text = read_text(input_path, SHAKESPEARE_URL)
    itos = sorted(set(text))
    stoi = {ch: i for i, ch in enumerate(itos)}
    train, val = ([stoi[ch] for ch in part] for part in split_text(text))
    check_split_sizes(input_path or SHAKESPEARE_URL, {"train": len(train), "val": len(val)})
    out_dir = prepare_out_dir(out_dir)
    counts = {}
    for split, ids in (("train", train), ("val", val)):
        counts[f"{split}_tokens"] = write_split(out_dir, split, ids)
        print(f"{split}: {counts[f'{split}_tokens']:,} tokens")
    print(f"vocab: {len(itos)} characters")
    write_meta(out_dir, vocab_size=len(itos), tokenizer="char", itos=itos, **counts)


def main(argv=None) -> int:
    parser = cli.OneLineParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", help="local copy of the text (default: download it)")
    parser.add_argument("--out_dir", default=str(Path(__file__).resolve().parent))

    def run(argv):
        args = parser.parse_args(argv)
        prepare(args.input, args.out_dir)
        return 0
    return cli.run(run, argv)


if __name__ == "__main__":
    sys.exit(main())
