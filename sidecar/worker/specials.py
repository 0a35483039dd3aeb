"""Tokenizing text that may spell special tokens, in time linear in its length.

A raw prompt (and a rendered chat template) is tokenized with special tokens parsed, as
llama.cpp's own server does, so `<|im_end|>` in a prompt is the control token. llama.cpp
finds those strings by splitting the text at every occurrence and copying the rest each
time: quadratic in the number of occurrences (20,000 copies of `<|im_end|>` took 2-6 s
here, 100,000 took minutes inside one native call, long enough for the supervisor to
kill the worker as hung). One caller must not be able to do that with a 1 MB prompt.

So the worker finds the occurrences itself with RE2 (linear, one pass for every special
token of the vocabulary at once), and when there are many it hands llama.cpp the pieces:
each special token by id, each stretch of text tokenized with `special=False`. That is what
llama.cpp does after its own split (every text fragment is tokenized on its own, with the
SPM space prefix after a special token), so the tokens are the same; text with few
special tokens still goes to llama.cpp whole, exactly as before.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

import re2

# Below this many occurrences llama.cpp's own split is fast (about 1 ms at 100 here) and
# remains the reference behaviour; above it, the worker splits.
WHOLE_BELOW = 256
_RE2_MAX_MEM = 64 << 20  # Gemma 3's 6,400 special strings compile in ~20 ms, well inside this

Tokenize = Callable[[bytes, bool, bool], list[int]]  # (text, add_bos, special) -> tokens


class SpecialTokens:
    def __init__(self, specials: Mapping[str, int], bos: int = -1) -> None:
        self.ids = dict(specials)
        self.bos = bos
        self._pattern: Any = None
        if self.ids:
            options = re2.Options()
            options.max_mem = _RE2_MAX_MEM
            options.log_errors = False
            # Longest first: where two special strings start at one place, the longer wins,
            # as in llama.cpp (which tries its special tokens longest first).
            alternation = "|".join(re2.escape(s) for s in sorted(self.ids, key=len, reverse=True))
            self._pattern = re2.compile(alternation, options)

    @classmethod
    def of_model(cls, llm: Any) -> SpecialTokens:
        """The strings llama.cpp parses as special tokens (control, user-defined, unknown)."""
        import llama_cpp

        vocab = llama_cpp.llama_model_get_vocab(llm._model.model)
        mask = (
            llama_cpp.LLAMA_TOKEN_ATTR_CONTROL
            | llama_cpp.LLAMA_TOKEN_ATTR_USER_DEFINED
            | llama_cpp.LLAMA_TOKEN_ATTR_UNKNOWN
        )
        found: dict[str, int] = {}
        for token in range(llama_cpp.llama_vocab_n_tokens(vocab)):
            if llama_cpp.llama_vocab_get_attr(vocab, token) & mask:
                text = llama_cpp.llama_vocab_get_text(vocab, token).decode("utf-8", "replace")
                if text:
                    found.setdefault(text, token)
        return cls(found, llama_cpp.llama_vocab_bos(vocab))

    def spans(self, text: str) -> Iterator[tuple[int, int, int]]:
        """(start, end, token id) of each special string in `text`, left to right."""
        if self._pattern is None:
            return
        for m in self._pattern.finditer(text):
            yield m.start(), m.end(), self.ids[m.group()]

    def tokenize(self, text: str, tokenize: Tokenize, *, add_bos: bool) -> list[int]:
        """`text` tokenized with special tokens parsed; `tokenize` is llama.cpp's own."""
        for seen, _ in enumerate(self.spans(text), 1):
            if seen > WHOLE_BELOW:
                return self.pieces(text, tokenize, add_bos=add_bos)
        return tokenize(text.encode("utf-8"), add_bos, True)

    def pieces(self, text: str, tokenize: Tokenize, *, add_bos: bool) -> list[int]:
        """The same tokens, llama.cpp tokenizing only the stretches between special strings."""
        # llama.cpp's add_special puts BOS first and (for the few vocabularies that want it)
        # EOS last; an empty text shows which this model adds.
        frame = tokenize(b"", True, False) if add_bos else []
        n = 1 if frame[:1] == [self.bos] else 0
        head, tail = frame[:n], frame[n:]
        out = list(head)
        pos = 0
        for start, end, token in self.spans(text):
            if start > pos:
                out.extend(tokenize(text[pos:start].encode("utf-8"), False, False))
            out.append(token)
            pos = end
        if pos < len(text):
            out.extend(tokenize(text[pos:].encode("utf-8"), False, False))
        out.extend(tail)
        return out
