"""A row's text as its tokens arrive, at a cost per token that does not grow with the row.

Decoding every token so far at each step costs O(n) per token, O(n²) per row: at a thousand new
tokens that is most of a step. Here each new token decodes a short window instead: the tokens
since the last read point, against the same window without the new token (so a tokenizer that
strips a leading space or merges across tokens strips and merges alike in both), and only the
difference is new text. A window whose text ends in an unfinished character (U+FFFD), or does
not extend what it read before, is held until it does. What it has read is always a prefix of
the whole decode; a row's final text still comes from one decode of all its tokens.
"""
from __future__ import annotations

from collections.abc import Callable

UNFINISHED = "\ufffd"


class IncrementalText:
    """Reads a growing token list it does not own (a row's): call `read` after each new token."""

    def __init__(self, decode: Callable[[list[int]], str]) -> None:
        self._decode = decode
        self.text = ""
        self._prefix = 0  # start of the window: the window's text before `_read` is already in `text`
        self._read = 0  # tokens up to here are in `text`

    def read(self, tokens: list[int]) -> str:
        """The text of `tokens` read so far, `tokens` being the last call's list and one token more."""
        before = self._decode(tokens[self._prefix:self._read])
        after = self._decode(tokens[self._prefix:])
        if len(after) > len(before) and after.startswith(before) and not after.endswith(UNFINISHED):
            self.text += after[len(before):]
            self._prefix, self._read = self._read, len(tokens)
        return self.text
