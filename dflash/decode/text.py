"""Incremental detokenization: token ids in, only the new text out.

Decoding the whole reply again at every step costs O(n) per step and O(n^2) per reply, which a
long streamed reply notices. `IncrementalDetokenizer` does work per call that depends on the new
tokens only, and the pieces it returns join to exactly `tokenizer.decode(all_ids)`.

Fast tokenizers use the `tokenizers` library's own `DecodeStream` (it knows each decoder's rules
for spaces and byte fallback). Slow tokenizers, and tokenizers whose `decode` cleans up spaces
afterwards (a step DecodeStream does not apply), decode a short window of trailing tokens: the
text the new tokens add is decode(window + new) minus decode(window). Either way a token that
ends inside a multi-byte character yields no text until the character is complete.
"""

from __future__ import annotations

from typing import Any, Iterable

# Tokens of already-returned text kept as left context for the next piece: enough for a decoder's
# spacing rules (a leading space is dropped only at the very start) and for a multi-byte character.
CONTEXT_TOKENS = 6


class IncrementalDetokenizer:
    """Feed token ids with `add`, get the text they complete; `flush` at the end returns what an
    incomplete character held back (as the replacement characters a full decode would show)."""

    def __init__(self, tokenizer: Any, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._stream = None
        backend = getattr(tokenizer, "backend_tokenizer", None)
        try:
            from tokenizers import Tokenizer
            from tokenizers.decoders import DecodeStream
        except ImportError:  # pragma: no cover - transformers installs tokenizers
            Tokenizer = None
        if Tokenizer is not None and isinstance(backend, Tokenizer) \
                and not getattr(tokenizer, "clean_up_tokenization_spaces", False):
            self._backend = backend
            self._stream = DecodeStream(skip_special_tokens=skip_special_tokens)
        self._context: list[int] = []  # the last few tokens whose text was already returned
        self._pending: list[int] = []  # tokens whose text was not returned yet
        self.seen = 0  # tokens added so far: a caller holding the whole reply passes reply[seen:]
        # Tokens the last call passed to `tokenizer.decode` (the window path, and `flush`); bounded
        # by the window, never the reply. DecodeStream's own work is bounded the same way inside
        # tokenizers, which keeps only the tokens since the last complete piece.
        self.tokens_decoded = 0

    def add(self, tokens: Iterable[int]) -> str:
        """The text these tokens add ("" while a multi-byte character is incomplete)."""
        tokens = [int(t) for t in tokens]
        self.tokens_decoded = 0
        if not tokens:
            return ""
        self.seen += len(tokens)
        self._pending += tokens
        if self._stream is not None:
            text = self._stream.step(self._backend, tokens) or ""
        else:
            text = self._window_text()
            if text.endswith("\ufffd"):  # wait for the rest of the character
                text = ""
        if text:
            self._context = (self._context + self._pending)[-CONTEXT_TOKENS:]
            self._pending = []
        return text

    def flush(self) -> str:
        """Whatever text is still held back; call once the reply has ended."""
        self.tokens_decoded = 0
        if not self._pending:
            return ""
        text = self._window_text()
        self._context = (self._context + self._pending)[-CONTEXT_TOKENS:]
        self._pending = []
        if self._stream is not None:  # the stream still holds those tokens: start it afresh
            from tokenizers.decoders import DecodeStream

            self._stream = DecodeStream(skip_special_tokens=self.skip_special_tokens)
        return text

    def _window_text(self) -> str:
        """The text the pending tokens add after the context tokens."""
        decode = self.tokenizer.decode
        base = decode(self._context, skip_special_tokens=self.skip_special_tokens) if self._context else ""
        full = decode(self._context + self._pending, skip_special_tokens=self.skip_special_tokens)
        self.tokens_decoded = 2 * len(self._context) + len(self._pending)
        return full[len(base):]
