"""Write tiny, random-weight GGUF models that real llama.cpp can load.

Tests need a model file that exercises the genuine llama.cpp code paths (load, tokenize, decode,
sample, embed) without shipping or downloading real weights. The models here are a few hundred KB,
write in milliseconds, and produce gibberish, which is all a test needs.

The vocabulary is byte-level GPT-2 BPE: one token per byte value, so any valid UTF-8 text tokenizes
and detokenizes losslessly, and token id == byte value for ids 0..255, which keeps expectations in
tests trivial to write. (Invalid UTF-8 input is not preserved: llama.cpp's pre-tokenizer replaces
each bad byte with U+FFFD before the vocab is consulted.)
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import numpy.typing as npt
from gguf import GGUFWriter, LlamaFileType, TokenType

BOS_TOKEN = "<s>"
EOS_TOKEN = "<|im_end|>"
IM_START_TOKEN = "<|im_start|>"

# Ids of the special tokens; they follow the 256 byte tokens.
N_BYTE_TOKENS = 256
BOS_ID = N_BYTE_TOKENS
EOS_ID = N_BYTE_TOKENS + 1
IM_START_ID = N_BYTE_TOKENS + 2
N_VOCAB = N_BYTE_TOKENS + 3

# Small enough that activations stay far from overflow through a few layers, so logits are finite.
_WEIGHT_STD = 0.02


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable-unicode map.

    llama.cpp's byte-level BPE stores each byte as the character this map gives it (e.g. space is
    "Ġ") and inverts the same map when detokenizing, so the token texts must use it exactly.
    """
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    mapping = {b: chr(b) for b in printable}
    shifted = 0
    for b in range(N_BYTE_TOKENS):
        if b not in mapping:
            mapping[b] = chr(N_BYTE_TOKENS + shifted)
            shifted += 1
    return mapping


def _vocab() -> tuple[list[str], list[int], list[str]]:
    byte_map = _bytes_to_unicode()
    tokens = [byte_map[b] for b in range(N_BYTE_TOKENS)] + [BOS_TOKEN, EOS_TOKEN, IM_START_TOKEN]
    types = [int(TokenType.NORMAL)] * N_BYTE_TOKENS + [int(TokenType.CONTROL)] * 3
    # llama.cpp refuses a BPE vocab without a merges array, and gguf silently drops empty arrays,
    # so one merge is required. It must never fire: when a merge yields text that is not in the
    # vocab, llama.cpp's fallback looks up the raw UTF-8 bytes of the mapped characters and silently
    # DROPS input (e.g. "ĠĠ" for two spaces vanishes). BPE symbols start as single characters, so
    # a pair of multi-character control-token texts can never be formed and the merge is inert.
    merges = [f"{BOS_TOKEN} {BOS_TOKEN}"]
    return tokens, types, merges


def write_tiny_llama(
    path: Path,
    *,
    seed: int = 0,
    n_layer: int = 2,
    n_embd: int = 64,
    n_head: int = 4,
    n_ff: int = 128,
    n_ctx: int = 512,
    chat_template: str | None = None,
    name: str = "tiny",
    adjust: Callable[[str, npt.NDArray[np.float32]], npt.NDArray[np.float32]] | None = None,
) -> Path:
    """Write a random-weight `llama`-architecture GGUF (f32) with a byte-level vocab to `path`.

    The same arguments always produce the same bytes; a different `seed` changes the weights.
    Raises ValueError for head shapes llama.cpp cannot run. `adjust(name, weights)` may
    change a tensor before it is written (a LoRA merged into the weights, see tiny_lora).
    """
    if n_embd % n_head != 0:
        raise ValueError(f"n_embd ({n_embd}) must be a multiple of n_head ({n_head})")
    head_dim = n_embd // n_head
    if head_dim % 2 != 0:
        # RoPE rotates pairs of dimensions; llama.cpp aborts the whole process (GGML_ASSERT) on the
        # first decode with an odd head size rather than failing the load.
        raise ValueError(f"head size n_embd // n_head ({head_dim}) must be even")
    path = Path(path)
    rng = np.random.default_rng(seed)

    def rand(*shape: int) -> npt.NDArray[np.float32]:
        return (rng.standard_normal(shape, dtype=np.float32) * _WEIGHT_STD).astype(np.float32)

    def ones(n: int) -> npt.NDArray[np.float32]:
        return np.ones(n, dtype=np.float32)

    with gguf_file(path, "llama") as writer:

        def add_tensor(tensor: str, data: npt.NDArray[np.float32]) -> None:
            writer.add_tensor(tensor, data if adjust is None else adjust(tensor, data))

        writer.add_name(name)
        writer.add_file_type(LlamaFileType.ALL_F32)
        writer.add_context_length(n_ctx)
        writer.add_embedding_length(n_embd)
        writer.add_block_count(n_layer)
        writer.add_feed_forward_length(n_ff)
        writer.add_head_count(n_head)
        writer.add_head_count_kv(n_head)
        writer.add_rope_dimension_count(head_dim)
        writer.add_layer_norm_rms_eps(1e-5)
        writer.add_vocab_size(N_VOCAB)

        tokens, types, merges = _vocab()
        writer.add_tokenizer_model("gpt2")
        # Without an explicit pre-tokenizer llama.cpp prints a loud "GENERATION QUALITY WILL BE
        # DEGRADED" warning; with byte tokens only, the split regex cannot change the result.
        writer.add_tokenizer_pre("default")
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        writer.add_token_merges(merges)
        writer.add_bos_token_id(BOS_ID)
        writer.add_eos_token_id(EOS_ID)
        # llama.cpp would also guess EOT from the "<|im_end|>" text; stating it avoids relying on
        # that heuristic.
        writer.add_eot_token_id(EOS_ID)
        writer.add_add_bos_token(True)
        writer.add_add_eos_token(False)
        if chat_template is not None:
            writer.add_chat_template(chat_template)

        # numpy shapes are (out_features, in_features); gguf reverses them into ggml order.
        add_tensor("token_embd.weight", rand(N_VOCAB, n_embd))
        for i in range(n_layer):
            blk = f"blk.{i}"
            add_tensor(f"{blk}.attn_norm.weight", ones(n_embd))
            add_tensor(f"{blk}.attn_q.weight", rand(n_embd, n_embd))
            add_tensor(f"{blk}.attn_k.weight", rand(n_embd, n_embd))
            add_tensor(f"{blk}.attn_v.weight", rand(n_embd, n_embd))
            add_tensor(f"{blk}.attn_output.weight", rand(n_embd, n_embd))
            add_tensor(f"{blk}.ffn_norm.weight", ones(n_embd))
            add_tensor(f"{blk}.ffn_gate.weight", rand(n_ff, n_embd))
            add_tensor(f"{blk}.ffn_up.weight", rand(n_ff, n_embd))
            add_tensor(f"{blk}.ffn_down.weight", rand(n_embd, n_ff))
        add_tensor("output_norm.weight", ones(n_embd))
        add_tensor("output.weight", rand(N_VOCAB, n_embd))
    return path


@contextmanager
def gguf_file(path: Path, arch: str) -> Iterator[GGUFWriter]:
    """A GGUFWriter for `path`: what is added inside the block is written out at its end,
    and the file is closed either way."""
    writer = GGUFWriter(path, arch)
    try:
        yield writer
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
