"""The tiny GGUF writer must produce files that real llama.cpp loads and tokenizes faithfully."""

from __future__ import annotations

from pathlib import Path

import llama_cpp
import numpy as np
import pytest
from tiny_gguf import BOS_ID, EOS_ID, IM_START_ID, N_VOCAB, write_tiny_llama


def _load(
    path: Path,
    *,
    embedding: bool = False,
    pooling_type: int = llama_cpp.LLAMA_POOLING_TYPE_UNSPECIFIED,
) -> llama_cpp.Llama:
    return llama_cpp.Llama(
        model_path=str(path),
        n_ctx=256,
        verbose=False,
        embedding=embedding,
        pooling_type=pooling_type,
    )


@pytest.fixture
def model_path(tmp_path: Path) -> Path:
    return write_tiny_llama(tmp_path / "tiny.gguf")


def test_returns_the_path_it_wrote(tmp_path: Path) -> None:
    target = tmp_path / "m.gguf"
    assert write_tiny_llama(target) == target
    assert target.read_bytes()[:4] == b"GGUF"


def test_loads_with_requested_shape(tmp_path: Path) -> None:
    path = write_tiny_llama(tmp_path / "m.gguf", n_layer=1, n_embd=32, n_head=2, n_ff=48, n_ctx=128)
    llm = _load(path)
    assert llm.n_vocab() == N_VOCAB
    assert llm.n_embd() == 32
    assert llm.metadata["llama.block_count"] == "1"
    assert llm.metadata["llama.context_length"] == "128"
    assert llm.metadata["general.name"] == "tiny"


def test_tokenize_with_bos_and_special(model_path: Path) -> None:
    llm = _load(model_path)
    tokens = llm.tokenize(b"hello \xc3\xa9", add_bos=True, special=True)
    # Byte-level vocab: token id is the byte value.
    assert tokens == [BOS_ID, *b"hello \xc3\xa9"]
    # Control tokens such as BOS are dropped unless special rendering is asked for.
    assert llm.detokenize(tokens) == b"hello \xc3\xa9"
    assert llm.detokenize(tokens, special=True) == b"<s>hello \xc3\xa9"


@pytest.mark.parametrize(
    "text",
    [
        "",
        "hello",
        "héllo wörld",
        "日本語のテキスト",
        "emoji 🎉 and ZWJ 👨\u200d👩\u200d👧",
        "combining e\u0301 and \U0001f1fa\U0001f1f8",
        "\x00\t\r\n\x7f control bytes",
        "  leading, trailing and  double spaces  ",
        "\u2581 SentencePiece space marker",
        "'s 're numbers 12345 punctuation!?",
        "<|im_end|> as plain text",
    ],
)
def test_utf8_round_trips_byte_for_byte(model_path: Path, text: str) -> None:
    llm = _load(model_path)
    data = text.encode()
    tokens = llm.tokenize(data, add_bos=False, special=False)
    assert tokens == list(data)
    assert llm.detokenize(tokens) == data


def test_single_token_pieces_are_raw_bytes(model_path: Path) -> None:
    # Streaming decoders see one token at a time, including half of a multi-byte character.
    llm = _load(model_path)
    assert [llm.detokenize([t]) for t in llm.tokenize("é".encode(), add_bos=False)] == [
        b"\xc3",
        b"\xa9",
    ]


def test_eos_eot_and_special_tokens(model_path: Path) -> None:
    llm = _load(model_path)
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    assert llm.token_bos() == BOS_ID
    assert llm.token_eos() == EOS_ID
    assert llama_cpp.llama_vocab_eot(vocab) == EOS_ID
    assert llama_cpp.llama_vocab_is_eog(vocab, EOS_ID)
    assert not llama_cpp.llama_vocab_is_eog(vocab, IM_START_ID)
    for token_id in (BOS_ID, EOS_ID, IM_START_ID):
        assert llama_cpp.llama_vocab_is_control(vocab, token_id)

    assert llm.tokenize(b"<|im_end|>", add_bos=False, special=True) == [EOS_ID]
    assert llm.tokenize(b"<|im_start|>user\nhi<|im_end|>", add_bos=False, special=True) == [
        IM_START_ID,
        *b"user\nhi",
        EOS_ID,
    ]
    assert llm.detokenize([IM_START_ID, EOS_ID], special=True) == b"<|im_start|><|im_end|>"


def test_eval_and_sample(model_path: Path) -> None:
    llm = _load(model_path)
    llm.eval(llm.tokenize(b"hello", add_bos=True))
    logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(N_VOCAB,))
    assert np.isfinite(logits).all()

    sampled = []
    for _ in range(4):
        token = llm.sample(temp=0.8, top_k=0, top_p=1.0)
        assert 0 <= token < N_VOCAB
        sampled.append(token)
        llm.eval([token])
    assert llm.n_tokens == 1 + len(b"hello") + len(sampled)


def test_greedy_decoding_is_reproducible(tmp_path: Path) -> None:
    # Tests built on these models may assert exact outputs, so two writes of one seed must decode
    # identically.
    def greedy(path: Path) -> list[int]:
        llm = _load(path)
        llm.eval(llm.tokenize(b"abc", add_bos=True))
        out = []
        for _ in range(3):
            out.append(int(llm.sample(temp=0.0)))
            llm.eval([out[-1]])
        return out

    a = greedy(write_tiny_llama(tmp_path / "a.gguf", seed=7))
    b = greedy(write_tiny_llama(tmp_path / "b.gguf", seed=7))
    assert a == b


def test_seed_controls_file_bytes(tmp_path: Path) -> None:
    a = write_tiny_llama(tmp_path / "a.gguf", seed=1).read_bytes()
    a_again = write_tiny_llama(tmp_path / "a2.gguf", seed=1).read_bytes()
    b = write_tiny_llama(tmp_path / "b.gguf", seed=2).read_bytes()
    assert a == a_again
    assert a != b


def test_chat_template_is_stored_only_when_given(tmp_path: Path) -> None:
    template = "{% for m in messages %}<|im_start|>{{ m.content }}<|im_end|>{% endfor %}"
    with_template = _load(write_tiny_llama(tmp_path / "t.gguf", chat_template=template))
    assert with_template.metadata["tokenizer.chat_template"] == template

    without = _load(write_tiny_llama(tmp_path / "n.gguf"))
    assert "tokenizer.chat_template" not in without.metadata


def test_embed_with_mean_pooling(model_path: Path) -> None:
    llm = _load(model_path, embedding=True, pooling_type=llama_cpp.LLAMA_POOLING_TYPE_MEAN)
    vectors = llm.embed(["a", "bc"])
    assert len(vectors) == 2
    assert all(len(v) == 64 for v in vectors)
    assert np.isfinite(np.asarray(vectors)).all()


def test_rejects_shapes_llama_cpp_cannot_run(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="multiple"):
        write_tiny_llama(tmp_path / "x.gguf", n_embd=30, n_head=4)
    # An odd head size would abort the interpreter inside ggml instead of raising.
    with pytest.raises(ValueError, match="even"):
        write_tiny_llama(tmp_path / "y.gguf", n_embd=12, n_head=4)
