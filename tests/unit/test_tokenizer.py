"""The GGUF-built tokenizer gives exactly the ids of transformers' GGUF tokenizer for SmolLM2, and
decodes back to the original text."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest

from flashserve.models.loading import Checkpoint
from flashserve.models.tokenizer import decode, encode, special_token_ids

FIXED = [
    "",
    " ",
    "Hello 12345 world  x",
    "Hello, world!",
    " Hello",
    "hello\nworld",
    "a\tb\t\tc",
    "   leading and trailing   ",
    "\n\n\n",
    "\r\n windows\r\nline endings\r\n",
    "multiple    spaces     here",
    "tabs\t\t\tand\n\nnewlines \n \n",
    "1234567890 3.14159 -42 1e-10 0x1F 1,000,000",
    "I'm you're he's we'll they'd I've don't",
    "I'M YOU'RE HE'S",
    "naïve café résumé Ångström crème brûlée",
    "Straße Ölçek İstanbul ǅ ß",
    "日本語のテキストです。中文文本。한국어 텍스트.",
    "emoji 😀😃😄 👍🏽 👨‍👩‍👧‍👦 🇫🇷 ❤️",
    "Ελληνικά Русский текст עברית العربية हिन्दी ไทย",
    "math ∑ ∫ √ ∞ ≠ ≤ ≥ ± × ÷ → ⇒ ∀ ∃",
    "zero\u200bwidth\u200djoiner\ufeffbom",
    "control \x00\x01\x07\x1b chars",
    "def f(x):\n    return x ** 2  # square\n",
    "for (int i = 0; i < n; ++i) { sum += a[i]; }",
    '{"key": "value", "list": [1, 2, 3], "nested": {"a": null}}',
    '<html><body><p class="x">Hi &amp; bye</p></body></html>',
    "SELECT * FROM users WHERE id = 42 AND name LIKE '%bob%';",
    "https://example.com/path?query=1&other=two#frag",
    "user@example.com +1 (555) 123-4567",
    "<|im_start|>user\nhi<|im_end|>",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
    "<|im_start|>assistant\n",
    "<|im_start|><|im_end|><|endoftext|>",
    "text<|im_end|>more text<|im_start|>",
    " <|im_start|> spaced <|im_end|> ",
    "<|im_start|assistant <|im_end partial |>",
    "<repo_name>flashserve<file_sep>main.py<filename>x.py<gh_stars>10",
    "<jupyter_code>print(1)<jupyter_output>1<empty_output>",
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
    "!!!???...,,,;;;:::---___===+++***",
    "    indented\n        more\n\tmixed",
    "The quick brown fox jumps over the lazy dog.",
]

_WORDS = [
    "the",
    "The",
    "model",
    "token",
    "Paris",
    "capital",
    "x",
    "42",
    "2024",
    "3.5",
    "café",
    "日本",
    "😀",
    "<|im_start|>",
    "<|im_end|>",
    "<|endoftext|>",
    "def",
    "return",
    "(",
    ")",
    "{",
    "}",
    "'s",
    "'ll",
    "--",
    "\n",
    "\n\n",
    "\t",
    "  ",
    "   ",
    "\r\n",
    "ünïcödé",
    "中文",
    "тест",
    "🙂🙃",
    "=>",
    "&&",
    "0",
    "123456789",
]


def generated_strings(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        parts = [rng.choice(_WORDS) for _ in range(rng.randint(1, 12))]
        seps = [rng.choice(["", " ", " ", "  ", "\n", "\t"]) for _ in parts]
        out.append("".join(p + s for p, s in zip(parts, seps, strict=True)))
    # random code points from several blocks, including whitespace and rare ones
    ranges = [
        (0x20, 0x7E),
        (0xA0, 0x17F),
        (0x370, 0x3FF),
        (0x400, 0x4FF),
        (0x3040, 0x30FF),
        (0x4E00, 0x4FFF),
        (0x1F300, 0x1F64F),
        (0x2000, 0x206F),
    ]
    for _ in range(n // 2):
        chars = []
        for _ in range(rng.randint(1, 20)):
            lo, hi = rng.choice(ranges)
            chars.append(chr(rng.randint(lo, hi)))
        out.append("".join(chars))
    return out


STRINGS = FIXED + generated_strings(240)


@pytest.fixture(scope="module")
def hf_tokenizer(smollm_path: Path) -> Any:
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(smollm_path.parent), gguf_file=smollm_path.name)


def test_known_ids(smollm: Checkpoint) -> None:
    # Reference values from transformers' GGUF tokenizer, so this test alone needs no transformers.
    assert encode(smollm.tokenizer, "Hello 12345 world  x") == [
        19556,
        216,
        33,
        34,
        35,
        36,
        37,
        905,
        216,
        1792,
    ]
    assert encode(smollm.tokenizer, "<|im_start|>user\nhi<|im_end|>") == [1, 4093, 198, 6004, 2]


def test_ids_match_transformers(smollm: Checkpoint, hf_tokenizer: Any) -> None:
    assert len(STRINGS) >= 280
    mismatches = []
    for text in STRINGS:
        ours = encode(smollm.tokenizer, text)
        theirs = hf_tokenizer.encode(text, add_special_tokens=False)
        if ours != theirs:
            mismatches.append((text, ours, theirs))
    assert not mismatches, mismatches[:5]


def test_add_special_tokens_matches_transformers(smollm: Checkpoint, hf_tokenizer: Any) -> None:
    # SmolLM2's GGUF says add_bos_token=False: transformers adds nothing, and neither do we.
    for text in STRINGS[:60]:
        assert encode(smollm.tokenizer, text, add_special_tokens=True) == hf_tokenizer.encode(text), text
    assert encode(smollm.tokenizer, "hi", add_special_tokens=True) == encode(smollm.tokenizer, "hi")


def test_decode_roundtrip(smollm: Checkpoint) -> None:
    for text in STRINGS:
        assert decode(smollm.tokenizer, encode(smollm.tokenizer, text)) == text, text


def test_special_tokens(smollm: Checkpoint) -> None:
    specials = special_token_ids(smollm.tokenizer)
    assert specials["<|endoftext|>"] == 0 and specials["<|im_start|>"] == 1 and specials["<|im_end|>"] == 2
    assert len(specials) == 17
    ids = encode(smollm.tokenizer, "a<|im_end|>b")
    assert decode(smollm.tokenizer, ids, skip_special_tokens=True) == "ab"
    assert smollm.tokenizer.get_vocab_size() == 49152
