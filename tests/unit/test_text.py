from __future__ import annotations

from sidecar.worker.text import TextAssembler


def test_split_utf8_character_is_held_until_complete() -> None:
    t = TextAssembler()
    e = "é".encode()
    assert t.feed(b"caf") == "caf"
    assert t.feed(e[:1]) == ""
    assert t.feed(e[1:]) == "é"
    assert t.finish() == ""
    assert t.text == "café"


def test_stop_sequence_across_tokens_is_cut_and_never_emitted() -> None:
    t = TextAssembler(("\n\nUser:",))
    out = t.feed(b"Hello") + t.feed(b"\n\nUs") + t.feed(b"er: more")
    assert t.stopped
    assert out + t.finish() == "Hello"
    assert t.text == "Hello"


def test_text_that_only_looks_like_a_stop_prefix_is_released_later() -> None:
    t = TextAssembler(("END",))
    out = t.feed(b"the EN")
    assert "EN" not in out
    out += t.feed(b"d of it")
    assert not t.stopped
    assert out + t.finish() == "the ENd of it"


def test_invalid_bytes_become_replacement_characters() -> None:
    t = TextAssembler()
    t.feed(b"a\xffb")
    t.finish()
    assert t.text == "a\ufffdb"
