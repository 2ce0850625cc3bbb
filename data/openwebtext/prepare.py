"""OpenWebText (or any text dataset) as GPT-2 BPE tokens: train.bin / val.bin (uint16) and
meta.json. Each document is followed by <|endoftext|>. Needs `pip install datasets`.

    python data/openwebtext/prepare.py                      # from the Hugging Face Hub
    python data/openwebtext/prepare.py --input docs.jsonl   # local files, offline

The full OpenWebText takes ~55 GB in the Hub cache; train.bin is ~17 GB (~9B tokens).
"""
import argparse
import os
import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run without installing nanodist
from nanodist import cli
from nanodist.data.loader import check_split_sizes, prepare_out_dir, write_meta, writing
from nanodist.errors import UserError
from nanodist.data.tokenizer import EOT, get_gpt2_encoding

# local formats: a .txt file is one document; the others hold one document per record
FORMATS = {".txt": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


def load_documents(args):
    if args.input:  # local files need no network; datasets would still ping the Hub (read at import)
        os.environ["HF_DATASETS_OFFLINE"] = "1"
    try:
        from datasets import load_dataset  # an optional dependency: only this script needs it
    except ImportError as e:
        raise UserError("this script needs Hugging Face datasets: pip install 'nanodist[datasets]'") from e
    if not args.input:
        try:
            return load_dataset(args.dataset_name, split="train", num_proc=args.num_proc)
        except Exception as e:  # offline, unknown name, ...: what fails depends on the Hub
            raise UserError(f"could not load {args.dataset_name!r} from the Hugging Face Hub "
                            f"({type(e).__name__}: {e}); pass --input PATH to local files") from e
    path = Path(args.input)
    if not path.exists():
        raise UserError(f"--input {path} not found")
    files = sorted(p for p in path.rglob("*") if p.suffix in FORMATS) if path.is_dir() else [path]
    builders = {FORMATS.get(p.suffix) for p in files}
    if not files or len(builders) != 1 or None in builders:
        raise UserError(f"--input {path}: expected a file or directory of one format, "
                        f"{', '.join(FORMATS)}")
    if all(p.stat().st_size == 0 for p in files):
        raise UserError(f"--input {path} is empty: nothing to tokenize")
    builder = builders.pop()
    options = {"sample_by": "document"} if builder == "text" else {}
    try:
        documents = load_dataset(builder, data_files=[str(p) for p in files], split="train", **options)
    except Exception as e:  # noqa: BLE001 - datasets wraps what its builders raise: name the root
        root = e
        while root.__cause__:
            root = root.__cause__
        raise UserError(f"--input {path} could not be read as {builder} ({type(root).__name__}: "
                        f"{str(root).splitlines()[0] if str(root) else ''}); the files must be UTF-8 "
                        f"{builder}") from e
    if args.text_column not in documents.column_names:
        raise UserError(f"--input {path} has no column {args.text_column!r}; pass --text_column, "
                        f"one of {documents.column_names}")
    return documents


def count_tokens(dset) -> int:
    return int(np.sum(dset.with_format("numpy")["len"], dtype=np.uint64))


def write_bin(dset, filename, n_tokens):
    """Concatenate the tokens of all documents into one uint16 memmap, in sharded batches."""
    with writing(filename):
        tokens = np.memmap(filename, dtype=np.uint16, mode="w+", shape=(n_tokens,))
        n_batches = min(1024, len(dset))
        index = 0
        for batch_index in tqdm(range(n_batches), desc=f"writing {filename}"):
            batch = dset.shard(num_shards=n_batches, index=batch_index, contiguous=True).with_format("numpy")
            ids = np.concatenate(batch["ids"])
            tokens[index:index + len(ids)] = ids
            index += len(ids)
        tokens.flush()


def prepare(args):
    enc = get_gpt2_encoding(args.bpe_file)
    documents = load_documents(args)
    try:
        splits = documents.train_test_split(test_size=args.val_fraction, seed=args.seed, shuffle=True)
    except ValueError as e:  # too few documents for a non-empty train and val split
        raise UserError(f"cannot split {len(documents)} documents by --val_fraction "
                        f"{args.val_fraction}: {e}") from e
    splits["val"] = splits.pop("test")

    def tokenize(example):
        ids = enc.encode_ordinary(example[args.text_column]) + [EOT]
        return {"ids": ids, "len": len(ids)}

    tokenized = splits.map(tokenize, remove_columns=documents.column_names, desc="tokenizing",
                           num_proc=args.num_proc)
    sizes = {split: count_tokens(dset) for split, dset in tokenized.items()}
    check_split_sizes(f"--input {args.input}" if args.input else args.dataset_name, sizes)
    out_dir = prepare_out_dir(args.out_dir)
    for split, dset in tokenized.items():
        write_bin(dset, out_dir / f"{split}.bin", sizes[split])
    counts = {f"{split}_tokens": n for split, n in sizes.items()}
    for split, dset in tokenized.items():
        print(f"{split}: {len(dset):,} documents, {counts[f'{split}_tokens']:,} tokens")
    write_meta(out_dir, vocab_size=enc.n_vocab, tokenizer="gpt2", **counts)


def main(argv=None) -> int:
    parser = cli.OneLineParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset_name", default="openwebtext", help="a Hugging Face Hub dataset")
    parser.add_argument("--input", help="local .txt (one document per file), .json/.jsonl, .parquet or "
                                        ".csv (one document per record) file, or a directory of them")
    parser.add_argument("--text_column", default="text")
    parser.add_argument("--val_fraction", type=float, default=0.0005)
    parser.add_argument("--num_proc", type=int, default=max(1, (os.cpu_count() or 2) // 2))
    parser.add_argument("--bpe_file", help="GPT-2 ranks in tiktoken format, for offline machines")
    parser.add_argument("--out_dir", default=str(Path(__file__).resolve().parent))
    parser.add_argument("--seed", type=int, default=2357)

    def run(argv):
        args = parser.parse_args(argv)
        prepare(args)
        return 0
    return cli.run(run, argv)


if __name__ == "__main__":
    sys.exit(main())
