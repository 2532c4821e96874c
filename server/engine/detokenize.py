"""Incremental detokenization that only ever emits valid UTF-8, and stop-string matching.

Byte-level tokenizers split multi-byte characters (Chinese, emoji) across tokens; decoding a prefix
then yields U+FFFD. Text is released only once the decoded tail no longer ends in a replacement
character. Text that could still turn into a stop string is held back until it cannot.
"""

from __future__ import annotations

_CONTEXT = 6  # tokens decoded before the new ones, for the spacing rules of the tokens around them


class Detokenizer:
    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0

    def push(self, token_id: int) -> str:
        """Append a token; return the text that became final with it (maybe '')."""
        self.ids.append(token_id)
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        full = self._decode(self.ids[self.prefix_offset :])
        if full.endswith("\ufffd"):  # an incomplete character: wait for the tokens that complete it
            return ""
        if len(full) > len(prefix):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return full[len(prefix) :]
        # No text (a skipped special token, an id the tokenizer does not know): nothing is pending, so
        # the window moves on; else every later push would decode an ever longer tail (quadratic).
        self.read_offset = len(self.ids)
        self.prefix_offset = max(self.prefix_offset, self.read_offset - _CONTEXT)
        return ""

    def flush(self) -> str:
        """At the end: the text still held back, less an incomplete character at its very end (which no
        later token will complete)."""
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        full = self._decode(self.ids[self.prefix_offset :]).rstrip("\ufffd")
        self.prefix_offset = self.read_offset = len(self.ids)
        return full[len(prefix) :]

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


class StopMatcher:
    """Tracks the generated text; says what may be released and whether a stop string was hit."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops = tuple(s for s in stops if s)
        self.text = ""  # everything decoded so far
        self.released = 0  # chars of `text` already handed out
        self.stopped = False

    def feed(self, piece: str) -> str:
        self.text += piece
        cut = self._first_stop()
        if cut is not None:
            self.stopped = True
            self.text = self.text[:cut]
            return self._release(len(self.text))
        return self._release(len(self.text) - self._held_back())

    def flush(self) -> str:
        return self._release(len(self.text))

    def _release(self, upto: int) -> str:
        upto = max(upto, self.released)
        out = self.text[self.released : upto]
        self.released = upto
        return out

    def _first_stop(self) -> int | None:
        # Search only where a new match can start: earlier text was already checked.
        start = max(0, self.released - max((len(s) for s in self.stops), default=0))
        hits = [i for i in (self.text.find(s, start) for s in self.stops) if i >= 0]
        return min(hits) if hits else None

    def _held_back(self) -> int:
        """Length of the longest tail of the text that is a proper prefix of a stop string."""
        longest = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(self.text)), 0, -1):
                if self.text.endswith(stop[:n]):
                    longest = max(longest, n)
                    break
        return longest
