"""Tokenizers for checkpoints: built from GGUF metadata, or read from a Hugging Face `tokenizer.json`.

A GGUF file carries no `tokenizer.json`, only llama.cpp's description of one (vocabulary, merges,
token types, flags). This module rebuilds a `tokenizers.Tokenizer` from that description so that it
gives exactly the ids `transformers` gives for the same file
(`AutoTokenizer.from_pretrained(dir, gguf_file=name)`): the prompt the engine sees must be the one
the model was trained on, and the tests hold us to that reference.

Conventions the engine relies on:
- `encode(tokenizer, text)` never adds BOS/EOS: the engine encodes a rendered chat prompt, and the
  chat template writes every special token itself. `add_special_tokens=True` reproduces what
  `transformers` does for plain text (for SmolLM2: nothing, its GGUF says `add_bos_token = False`).
- Special tokens (`<|im_start|>`, ...) are matched whole anywhere in the text, as in `transformers`
  and llama.cpp, so a rendered template tokenizes to the ids the model expects.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, pre_tokenizers, processors
from tokenizers.models import BPE

logger = logging.getLogger(__name__)

# llama.cpp's `tokenizer.ggml.token_type` values (llama_token_type).
TOKEN_TYPE_NORMAL = 1
TOKEN_TYPE_CONTROL = 3
TOKEN_TYPE_USER_DEFINED = 4

# Split patterns for GGUF `tokenizer.ggml.pre` values whose merges were learned on a different split
# than GPT-2's. The same table as transformers' GGUF integration, restricted to the common families.
# Any other value (including SmolLM2's "smollm") uses ByteLevel's built-in GPT-2 regex, which is also
# what transformers falls back to.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_PRE_TOKENIZER_SPLITS: dict[str, str] = {
    "llama3": _LLAMA3_SPLIT,
    "llama-v3": _LLAMA3_SPLIT,
    "llama-bpe": _LLAMA3_SPLIT,
    "smaug-bpe": _LLAMA3_SPLIT,
    "qwen2": _QWEN2_SPLIT,
    "deepseek-r1-qwen": _QWEN2_SPLIT,
}
# `pre` values known to mean "plain GPT-2 byte-level regex": no warning for these.
_GPT2_REGEX_PRES = frozenset({"default", "gpt2", "gpt-2", "smollm", "starcoder", "refact"})


@lru_cache(maxsize=1)
def _byte_alphabet() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (the alphabet byte-level BPE tokens use)."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("\u00a1"), ord("\u00ac") + 1))
        + list(range(ord("\u00ae"), ord("\u00ff") + 1))
    )
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return {byte: chr(char) for byte, char in zip(printable, chars, strict=True)}


def _byte_level_spelling(token: str, alphabet: frozenset[str]) -> str:
    """The token as byte-level BPE spells it.

    Nearly every GGUF token is already written in the byte alphabet; a few converters store some as
    raw text instead. transformers re-spells those through their UTF-8 bytes, and so do we, so that
    the vocabulary and the merges agree.
    """
    if set(token) <= alphabet:
        return token
    spelling = _byte_alphabet()
    return "".join(spelling[b] for b in token.encode("utf-8"))


def tokenizer_from_gguf(metadata: Mapping[str, Any]) -> Tokenizer:
    """Build the tokenizer a GGUF file describes (byte-level BPE, `tokenizer.ggml.model == "gpt2"`).

    `metadata` is the file's key/value metadata with `tokenizer.ggml.tokens`, `.merges` and
    `.token_type` read in full (lists).
    """
    model = metadata.get("tokenizer.ggml.model")
    if model != "gpt2":
        raise ValueError(
            f"GGUF tokenizer model {model!r} is not supported; flashserve builds byte-level BPE ('gpt2') "
            "tokenizers only. Use the Hugging Face folder (with tokenizer.json) of this model instead."
        )
    tokens: Sequence[str] = metadata["tokenizer.ggml.tokens"]
    merges_raw: Sequence[str] = metadata.get("tokenizer.ggml.merges") or ()
    if not merges_raw:
        raise ValueError("GGUF byte-level BPE tokenizer has no tokenizer.ggml.merges")
    token_types: Sequence[int] = (
        metadata.get("tokenizer.ggml.token_type") or [TOKEN_TYPE_NORMAL] * len(tokens)
    )

    alphabet = frozenset(_byte_alphabet().values())
    vocab: dict[str, int] = {}
    for index, token in enumerate(tokens):
        # Should two entries spell the same (a converter quirk), the later id wins, as in transformers.
        vocab[_byte_level_spelling(token, alphabet)] = index
    merges = [tuple(m.split(" ", 1)) for m in merges_raw]

    tokenizer = Tokenizer(
        BPE(
            vocab=vocab,
            merges=merges,
            dropout=None,
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
        )
    )
    tokenizer.pre_tokenizer = _gguf_pre_tokenizer(metadata.get("tokenizer.ggml.pre"))
    tokenizer.decoder = decoders.ByteLevel()

    # Control tokens (<|im_start|>, <|endoftext|>, ...) are special: matched whole in the text and
    # skippable on decode. A control token spelled outside the byte alphabet is a llama.cpp mislabel;
    # transformers skips it (adding it would grow the vocabulary), so we do too.
    control = [
        AddedToken(token, normalized=False, special=True)
        for token, kind in zip(tokens, token_types, strict=True)
        if kind == TOKEN_TYPE_CONTROL and set(token) <= alphabet
    ]
    if control:
        tokenizer.add_special_tokens(control)
    # User-defined tokens (e.g. <think>) are matched whole too, but are ordinary text on decode.
    user_defined = [
        AddedToken(token, normalized=False, special=False)
        for token, kind in zip(tokens, token_types, strict=True)
        if kind == TOKEN_TYPE_USER_DEFINED and token in vocab
    ]
    if user_defined:
        tokenizer.add_tokens(user_defined)

    add_bos = bool(metadata.get("tokenizer.ggml.add_bos_token"))
    add_eos = bool(metadata.get("tokenizer.ggml.add_eos_token"))
    tokenizer.post_processor = _post_processor(
        tokens,
        bos_id=metadata.get("tokenizer.ggml.bos_token_id") if add_bos else None,
        eos_id=metadata.get("tokenizer.ggml.eos_token_id") if add_eos else None,
    )
    return tokenizer


def _gguf_pre_tokenizer(pre: str | None) -> pre_tokenizers.PreTokenizer:
    split = _PRE_TOKENIZER_SPLITS.get(pre or "")
    if split is not None:
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(split), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    if pre not in _GPT2_REGEX_PRES and pre is not None:
        logger.warning(
            "GGUF pre-tokenizer %r is not known; using the GPT-2 split (as transformers does)", pre
        )
    # transformers' GPT2Tokenizer: no prefix space, GPT-2 regex inside ByteLevel.
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


def _post_processor(
    tokens: Sequence[str], bos_id: int | None, eos_id: int | None
) -> processors.TemplateProcessing:
    """What `add_special_tokens=True` adds: BOS/EOS exactly when the GGUF's add_bos/add_eos flags say so."""
    single, pair, specials = ["$A:0"], ["$A:0", "$B:1"], []
    if bos_id is not None:
        single, pair = [tokens[bos_id], *single], [tokens[bos_id], *pair]
        specials.append((tokens[bos_id], bos_id))
    if eos_id is not None:
        single, pair = [*single, tokens[eos_id]], [*pair, tokens[eos_id]]
        specials.append((tokens[eos_id], eos_id))
    return processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials)


def load_tokenizer_file(path: str | Path) -> Tokenizer:
    """A Hugging Face `tokenizer.json` (it already carries its pre-tokenizer, added tokens and BOS rule)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer file not found: {path}")
    return Tokenizer.from_file(str(path))


def encode(tokenizer: Tokenizer, text: str, *, add_special_tokens: bool = False) -> list[int]:
    """Token ids of `text`.

    The default (no BOS/EOS added) is what the engine uses on a rendered chat prompt, whose template
    already wrote the special tokens. `add_special_tokens=True` matches
    `transformers`' `tokenizer.encode(text)` for the same checkpoint.
    """
    return tokenizer.encode(text, add_special_tokens=add_special_tokens).ids


def decode(tokenizer: Tokenizer, ids: Sequence[int], *, skip_special_tokens: bool = False) -> str:
    """Text of `ids`; byte-level BPE round-trips exactly: `decode(encode(s)) == s`."""
    return tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)


def special_token_ids(tokenizer: Tokenizer) -> dict[str, int]:
    """The tokenizer's special added tokens (content -> id), e.g. `{"<|im_end|>": 2, ...}`."""
    return {tok.content: idx for idx, tok in tokenizer.get_added_tokens_decoder().items() if tok.special}


def token_bytes(tokenizer: Tokenizer, token_id: int) -> bytes:
    """The raw bytes a token stands for (a byte-level token may hold part of a UTF-8 character): what
    OpenAI's logprobs carry in `bytes`. Byte-level BPE spells bytes in GPT-2's alphabet; a byte-fallback
    token is `<0xHH>`; anything else is its decoded text."""
    piece = tokenizer.id_to_token(token_id)
    if piece is None:
        return b""
    if isinstance(tokenizer.decoder, decoders.ByteLevel):
        by_char = _byte_from_char()
        if all(c in by_char for c in piece):
            return bytes(by_char[c] for c in piece)
    if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
        try:
            return bytes([int(piece[3:5], 16)])
        except ValueError:
            pass
    return tokenizer.decode([token_id], skip_special_tokens=False).encode("utf-8")


@lru_cache(maxsize=1)
def _byte_from_char() -> dict[str, int]:
    return {char: byte for byte, char in _byte_alphabet().items()}
