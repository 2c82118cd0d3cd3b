"""Incremental detokenization: streamed pieces join to the full decode, and the work per step
does not grow with the reply."""

from pathlib import Path

import pytest

from dflash.decode.text import CONTEXT_TOKENS, IncrementalDetokenizer

README = Path(__file__).resolve().parents[2] / "README.md"


class CountingTokenizer:
    """Passes `decode` to a real tokenizer and records how many tokens each call decodes.
    `fast=False` hides the backend tokenizer, so the window path is taken."""

    def __init__(self, tokenizer, fast: bool) -> None:
        self._tokenizer = tokenizer
        if fast:
            self.backend_tokenizer = tokenizer.backend_tokenizer
        self.clean_up_tokenization_spaces = False
        self.calls: list[int] = []

    def decode(self, ids, skip_special_tokens=False):
        self.calls.append(len(ids))
        return self._tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)


def long_reply(tokenizer, n: int = 2000) -> list[int]:
    """n tokens of real text, with multi-byte characters and a special token inside."""
    text = README.read_text(encoding="utf-8")
    ids = tokenizer.encode("Déjà vu: 你好, 🎉 über naïve", add_special_tokens=False)
    ids += tokenizer.convert_tokens_to_ids(["<|im_end|>"])
    ids += tokenizer.encode(text, add_special_tokens=False)
    assert len(ids) >= n
    return ids[:n]


def steps(ids: list[int]):
    """The reply cut as DFlash steps cut it: 1 to 4 tokens at a time."""
    i, k = 0, 0
    while i < len(ids):
        size = 1 + (k * 7) % 4
        yield ids[i:i + size]
        i, k = i + size, k + 1


@pytest.mark.parametrize("fast", [True, False], ids=["decode-stream", "window"])
def test_streamed_text_is_the_full_decode(tokenizer, fast):
    ids = long_reply(tokenizer)
    counting = CountingTokenizer(tokenizer, fast)
    detokenizer = IncrementalDetokenizer(counting)
    assert (detokenizer._stream is not None) == fast
    pieces, per_call = [], []
    for new in steps(ids):
        counting.calls.clear()
        pieces.append(detokenizer.add(new))
        per_call.append(sum(counting.calls))
    pieces.append(detokenizer.flush())
    assert detokenizer.seen == len(ids)
    assert "".join(pieces) == tokenizer.decode(ids, skip_special_tokens=True)
    if fast:  # the tokenizers library does the work: no whole-reply decode from Python
        assert max(per_call) == 0
    else:  # the window, never the reply: as many tokens decoded late in the reply as early on
        assert max(per_call) <= 2 * CONTEXT_TOKENS + 8
        assert max(per_call[-100:]) <= max(per_call[:100])


@pytest.mark.parametrize("fast", [True, False], ids=["decode-stream", "window"])
def test_incomplete_character_waits_and_flushes(tokenizer, fast):
    ids = tokenizer.encode(" 你好", add_special_tokens=False)
    cut = next(i for i in range(1, len(ids)) if tokenizer.decode(ids[:i]).endswith("\ufffd"))
    detokenizer = IncrementalDetokenizer(CountingTokenizer(tokenizer, fast))
    shown = detokenizer.add(ids[:cut])
    assert "\ufffd" not in shown
    # a reply that ends mid-character shows what a full decode shows
    assert shown + detokenizer.flush() == tokenizer.decode(ids[:cut])
    whole = IncrementalDetokenizer(CountingTokenizer(tokenizer, fast))
    assert whole.add(ids[:cut]) + whole.add(ids[cut:]) + whole.flush() == " 你好"
