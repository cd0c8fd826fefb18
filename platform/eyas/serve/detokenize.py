"""Incremental detokenization with stop-string hold-back, for streaming token ids as text.

Decoding one token at a time is wrong for SentencePiece/byte-level tokenizers (a leading
space is dropped, a multi-byte character is split across tokens). Each step decodes a small
window of ids twice, with and without the new ones, and appends the difference; a window
ending in U+FFFD (an incomplete UTF-8 sequence) waits for the next token. The concatenated
text equals ``tokenizer.decode(all_ids, skip_special_tokens=True)``.

Stop strings: text is released only up to where a stop string might begin, so a client never
sees part of a stop string; the engine ends the request at the token completing one, and
``finish`` cuts the text there.
"""

from __future__ import annotations

from typing import Any

_INCOMPLETE = "\ufffd"


class IncrementalDetokenizer:
    """Token ids in, safe-to-send text out; one instance per request."""

    def __init__(self, tokenizer: Any, stops: list[str] | None = None) -> None:
        self._tok = tokenizer
        self._stops = list(stops or [])
        self._ids: list[int] = []
        self._prefix = 0  # window start: ids before it are already in ``text``
        self._read = 0  # ids before it are decoded into ``text``
        self.text = ""  # everything decoded so far
        self._sent = 0  # characters of ``text`` already released

    def _decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)

    def add(self, ids: list[int]) -> str:
        """Append new token ids; return the newly releasable text (maybe empty)."""
        self._ids.extend(ids)
        before = self._decode(self._ids[self._prefix:self._read])
        after = self._decode(self._ids[self._prefix:])
        if len(after) > len(before) and not after.endswith(_INCOMPLETE):
            self.text += after[len(before):]
            self._prefix, self._read = self._read, len(self._ids)
        return self._release(len(self.text) - self._held_back())

    def finish(self, stop_string: str | None = None) -> str:
        """The rest of the text when the request ends; cut before ``stop_string`` if it ended
        on one (the engine keeps the token completing it)."""
        end = len(self.text)
        if stop_string:
            at = self.text.find(stop_string)
            end = at if at >= 0 else end
        return self._release(end)

    def _held_back(self) -> int:
        """Length of the longest tail of ``text`` that is (the start of) a stop string."""
        longest = 0
        for stop in self._stops:
            for n in range(min(len(stop), len(self.text)), longest, -1):
                if self.text.endswith(stop[:n]):
                    longest = n
                    break
        return longest

    def _release(self, end: int) -> str:
        end = max(end, self._sent)
        out = self.text[self._sent:end]
        self._sent = end
        return out
