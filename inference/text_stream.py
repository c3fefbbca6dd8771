"""One completion's text as its tokens arrive: incremental decoding that never hands out half a
UTF-8 character, and stop strings matched on the decoded text (the engine stops at ids only).

Decoding the whole completion at every token would cost O(n^2); like vLLM's detokenizer we decode a
short window instead: the tokens since the last complete text plus the ones before them, and take
what the newest tokens add to the window's text. Both decodings start at the same token, so a
tokenizer that drops a leading space at the start of a text (SentencePiece) drops it from both, and
the pieces handed out concatenate to ``decode(all ids)`` -- what ``eval generate`` prints.
"""

from __future__ import annotations

from collections.abc import Sequence

from data.tokenizer import Tokenizer

REPLACEMENT = "\ufffd"  # what a decoder writes for an incomplete UTF-8 sequence


class TextStream:
    """Feed it tokens (``add``), then ``finish()``; ``take()`` hands out the text that is final:
    complete characters, and nothing that could still turn out to be the start of a stop string.
    When a stop string completes, the text ends just before it and ``stopped`` is set."""

    def __init__(self, tokenizer: Tokenizer, stops: Sequence[str] = ()):
        self.tokenizer, self.stops = tokenizer, tuple(s for s in stops if s)
        self.longest_stop = max(map(len, self.stops), default=0)
        self.ids: list[int] = []
        self.text = ""  # decoded so far (cut at a stop string)
        self.stopped = False
        self._given = 0  # characters of ``text`` handed out by ``take``
        self._window = 0  # decoding starts at this token
        self._read = 0  # tokens whose text is in ``text``
        self._done = False

    def add(self, token: int) -> None:
        """One more token; ignored once stopped or finished."""
        if self.stopped or self._done:
            return
        self.ids.append(int(token))
        self._decode(final=False)

    def finish(self) -> None:
        """No more tokens: whatever is held back for an incomplete character is decoded now."""
        if not (self.stopped or self._done):
            self._decode(final=True)
        self._done = True

    def take(self) -> str:
        """The text that became final since the last call."""
        end = len(self.text) if self.stopped or self._done else len(self.text) - self._held_back()
        piece = self.text[self._given:end]
        self._given = max(self._given, end)
        return piece

    def _decode(self, final: bool) -> None:
        before = self.tokenizer.decode(self.ids[self._window:self._read])
        after = self.tokenizer.decode(self.ids[self._window:])
        if not final and (after.endswith(REPLACEMENT) or len(after) <= len(before)):
            return  # an incomplete character (or nothing yet): wait for the next token
        start = len(self.text)
        self.text += after[len(before):]
        self._window, self._read = self._read, len(self.ids)
        self._match_stops(start)

    def _match_stops(self, start: int) -> None:
        """Cuts the text at the first stop string that ends in the characters from ``start`` on."""
        if not self.stops:
            return
        search_from = max(0, start - self.longest_stop + 1)
        found = [i for i in (self.text.find(s, search_from) for s in self.stops) if i >= 0]
        if found:
            self.text = self.text[:min(found)]
            self.stopped = True

    def _held_back(self) -> int:
        """The length of the longest end of the text that a stop string starts with."""
        for size in range(min(self.longest_stop - 1, len(self.text) - self._given), 0, -1):
            tail = self.text[-size:]
            if any(s.startswith(tail) for s in self.stops):
                return size
        return 0
