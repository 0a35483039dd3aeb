"""Turning a stream of token bytes into text that is safe to show.

Tokens can split a UTF-8 character, and a stop sequence can straddle tokens, so
text is released only once it can no longer change: incomplete characters wait for
their remaining bytes, and a tail that might begin a stop sequence waits for the
next token.
"""

from __future__ import annotations

import codecs


class TextAssembler:
    def __init__(self, stop: tuple[str, ...] = ()) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._stop = tuple(s for s in stop if s)
        self._hold = max((len(s) for s in self._stop), default=1) - 1
        self._text = ""  # everything decoded so far (up to a stop sequence)
        self._released = 0  # how much of _text has been handed out
        self.stopped = False

    @property
    def text(self) -> str:
        return self._text

    @property
    def released(self) -> int:
        """How much of `text` has been handed out (and can no longer change)."""
        return self._released

    def feed(self, data: bytes) -> str:
        """Add a token's bytes; return the newly releasable text."""
        if self.stopped:
            return ""
        self._text += self._decoder.decode(data)
        for s in self._stop:
            at = self._text.find(s, max(0, self._released - len(s)))
            if at != -1:
                self._text = self._text[:at]
                self.stopped = True
                return self._release(len(self._text))
        return self._release(len(self._text) - self._hold)

    def finish(self) -> str:
        """End of generation: release whatever is held back."""
        if not self.stopped:
            self._text += self._decoder.decode(b"", final=True)
        return self._release(len(self._text))

    def _release(self, upto: int) -> str:
        if upto <= self._released:
            return ""
        out = self._text[self._released : upto]
        self._released = upto
        return out
