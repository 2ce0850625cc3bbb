"""GPT-2's BPE tokenizer (tiktoken), from tiktoken's own download or from a local file.

Offline machines pass a gpt2.tiktoken file (GPT-2's ranks in tiktoken format, the same
file tiktoken downloads for its r50k_base encoding) with --bpe_file or NANODIST_GPT2_BPE.
"""
import os
from pathlib import Path

import tiktoken
from tiktoken.load import load_tiktoken_bpe
from tiktoken_ext.openai_public import r50k_pat_str  # GPT-2's split regex, as tiktoken's gpt2 uses

from nanodist.errors import UserError

EOT = 50256  # <|endoftext|>: GPT-2's one special token, after the 50256 BPE ranks
# sha256 of GPT-2's ranks file. tiktoken caches even local files, keyed by path; with a
# hash it never serves a stale copy, so a file fixed in place is read again.
GPT2_BPE_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"


def get_gpt2_encoding(bpe_file: str | None = None) -> tiktoken.Encoding:
    """GPT-2's encoding from `bpe_file`, else $NANODIST_GPT2_BPE, else tiktoken's download."""
    bpe_file = bpe_file or os.environ.get("NANODIST_GPT2_BPE")
    if bpe_file:
        return _load_local_gpt2(Path(bpe_file))
    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as e:  # what fails offline depends on the network: DNS, connection, proxy
        raise UserError(
            f"could not load tiktoken's gpt2 encoding (offline?): {type(e).__name__}; pass "
            "--bpe_file PATH or set NANODIST_GPT2_BPE to a gpt2.tiktoken file") from e


def _load_local_gpt2(path: Path) -> tiktoken.Encoding:
    expected = (f"expected GPT-2's BPE ranks in tiktoken format ({EOT} lines 'base64-token rank', "
                f"the r50k_base.tiktoken file, sha256 {GPT2_BPE_SHA256[:12]}...)")
    if not path.is_file():
        raise UserError(f"GPT-2 BPE file {path} not found; {expected}")
    try:
        ranks = load_tiktoken_bpe(str(path), expected_hash=GPT2_BPE_SHA256)
    except OSError as e:
        raise UserError(f"cannot read GPT-2 BPE file {path}: {e}") from e
    except ValueError as e:  # tiktoken checks the hash before it parses a line
        raise UserError(f"GPT-2 BPE file {path} is malformed (its sha256 differs); {expected}") from e
    return tiktoken.Encoding(name="gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": EOT}, explicit_n_vocab=EOT + 1)
