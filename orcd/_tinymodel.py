"""Build a tiny, random-weight GGUF model that llama.cpp can load and run.

The model exists so that tests can drive a real llama.cpp model on a CPU at
thousands of tokens per second without downloading weights.  It is a 2-layer
``llama`` architecture (n_embd 64, 4 heads, 2 KV heads, FFN 128, F32; about
0.5 MB on disk) written with :class:`gguf.GGUFWriter`.  All weights come from
``numpy.random.RandomState(seed)``, so a seed always gives the same bytes.

Vocabulary (SentencePiece-style, ``tokenizer.ggml.model = "llama"``)::

    0 <unk>   1 <s> (BOS)   2 </s> (EOS)
    3..258    "<0x00>".."<0xFF>"   (type BYTE: byte fallback)
    259       "\u2581" (the SentencePiece space)
    260..353  the printable ASCII characters "!".."~"

Any UTF-8 text tokenizes (each non-ASCII character becomes one byte token
per UTF-8 byte) and detokenizes back unchanged: ``add_space_prefix`` is off.

Shaping the output: hidden dimensions 0..3 are "class" dimensions.  Every
token embedding is one-hot over them (the class of the token just read),
the other 60 dimensions are small random values, and the class rows of the
residual-writing projections (``attn_output``, ``ffn_down``) are zero, so
the residual stream carries that one-hot exactly through both layers and,
after the final RMSNorm, the current class dimension is about +4.5.  Column
``c`` of ``output.weight`` is 0 for tokens allowed after class ``c`` and
-20 for all others, which puts disallowed tokens ~90 nats down.  The
classes form a bigram grammar that yields valid UTF-8:

    FREE  (ASCII, specials, other bytes) -> "\u2581", "!".."~", "\\n",
                                            lead bytes C2-DF, E1-EC
    LEAD2 (C2-DF)                        -> final continuation 81-BF
    LEAD3 (E1-EC)                        -> middle continuation 80
    MID   (80)                           -> final continuation 81-BF

<unk>, <s> and </s> are never allowed, so EOS is effectively never sampled
(greedy or at temperature 1) and generations run to the length limit.
Non-ASCII characters come out split over 2 or 3 byte tokens (3-byte ones
are U+n001-U+n03F for n = 1..C, e.g. U+2014 EM DASH).  Within the allowed
set the logits are random with a spread of a few nats, so sampling with
different seeds gives different text.  Only a prompt that ends in byte 80
(e.g. U+00C0) or mid-character makes the next token a stray continuation byte.
"""

from __future__ import annotations

import os
import pathlib

import gguf
import numpy as np

N_EMBD = 64
N_LAYER = 2
N_HEAD = 4
N_HEAD_KV = 2
N_FF = 128

UNK_ID, BOS_ID, EOS_ID = 0, 1, 2
BYTE0 = 3  # token id of "<0x00>"
FREE, LEAD2, LEAD3, MID = range(4)  # token classes, also their hidden dims
N_CLASS = 4
_PENALTY = -20.0  # output weight on a class dim for tokens not allowed next
_LEAD_BIAS = -0.3  # makes non-ASCII characters somewhat rarer than ASCII


def _vocab() -> tuple[list[str], list[float], list[int]]:
    """Return (tokens, scores, token types) of the byte-level vocabulary."""
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
    types += [gguf.TokenType.BYTE] * 256
    normal = ["\u2581"] + [chr(c) for c in range(0x21, 0x7F)]
    scores = [0.0] * len(tokens) + [-float(i) for i in range(len(normal))]
    tokens += normal
    types += [gguf.TokenType.NORMAL] * len(normal)
    return tokens, scores, [int(t) for t in types]


def _grammar(n_vocab: int) -> tuple[np.ndarray, np.ndarray]:
    """Return each token's class and the (n_vocab, N_CLASS) output-head block."""
    lead2 = [BYTE0 + b for b in range(0xC2, 0xE0)]
    lead3 = [BYTE0 + b for b in range(0xE1, 0xED)]
    mid = [BYTE0 + 0x80]
    final = [BYTE0 + b for b in range(0x81, 0xC0)]
    text = [*range(BYTE0 + 256, n_vocab), BYTE0 + 0x0A]

    cls = np.full(n_vocab, FREE)
    cls[lead2], cls[lead3], cls[mid] = LEAD2, LEAD3, MID
    head = np.full((n_vocab, N_CLASS), _PENALTY, dtype=np.float32)
    head[text, FREE] = 0.0
    head[lead2 + lead3, FREE] = _LEAD_BIAS
    head[final, LEAD2] = 0.0
    head[mid, LEAD3] = 0.0
    head[final, MID] = 0.0
    return cls, head


def build_tiny_gguf(
    path: str | os.PathLike[str], *, n_ctx: int = 4096, seed: int = 0
) -> pathlib.Path:
    """Write the tiny model to ``path`` and return it as a :class:`~pathlib.Path`.

    ``n_ctx`` becomes ``llama.context_length`` (the training context);
    ``seed`` selects the random weights.  The output is deterministic.
    """
    out = pathlib.Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.RandomState(seed)
    tokens, scores, types = _vocab()
    n_vocab = len(tokens)
    head_dim = N_EMBD // N_HEAD
    cls, head_block = _grammar(n_vocab)

    def rand(*shape: int, std: float) -> np.ndarray:
        return (rng.standard_normal(shape) * std).astype(np.float32)

    def ones(n: int) -> np.ndarray:
        return np.ones(n, dtype=np.float32)

    # numpy shape (rows, cols) is ggml ne = [cols, rows]: weights are (n_out, n_in).
    embd = rand(n_vocab, N_EMBD, std=0.1)
    embd[:, :N_CLASS] = 0.0
    embd[np.arange(n_vocab), cls] = 1.0
    tensors: dict[str, np.ndarray] = {"token_embd.weight": embd}
    for i in range(N_LAYER):
        wo = rand(N_EMBD, N_EMBD, std=0.02)
        down = rand(N_EMBD, N_FF, std=0.02)
        wo[:N_CLASS, :] = 0.0  # never write to the class dims
        down[:N_CLASS, :] = 0.0
        tensors |= {
            f"blk.{i}.attn_norm.weight": ones(N_EMBD),
            f"blk.{i}.attn_q.weight": rand(N_EMBD, N_EMBD, std=0.1),
            f"blk.{i}.attn_k.weight": rand(N_HEAD_KV * head_dim, N_EMBD, std=0.1),
            f"blk.{i}.attn_v.weight": rand(N_HEAD_KV * head_dim, N_EMBD, std=0.1),
            f"blk.{i}.attn_output.weight": wo,
            f"blk.{i}.ffn_norm.weight": ones(N_EMBD),
            f"blk.{i}.ffn_gate.weight": rand(N_FF, N_EMBD, std=0.1),
            f"blk.{i}.ffn_up.weight": rand(N_FF, N_EMBD, std=0.1),
            f"blk.{i}.ffn_down.weight": down,
        }
    head = rand(n_vocab, N_EMBD, std=0.3)
    head[:, :N_CLASS] = head_block
    tensors["output_norm.weight"] = ones(N_EMBD)
    tensors["output.weight"] = head

    writer = gguf.GGUFWriter(str(out), arch="llama")
    writer.add_name(f"orcd-tiny-seed{seed}")
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_context_length(n_ctx)
    writer.add_embedding_length(N_EMBD)
    writer.add_block_count(N_LAYER)
    writer.add_feed_forward_length(N_FF)
    writer.add_head_count(N_HEAD)
    writer.add_head_count_kv(N_HEAD_KV)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(n_vocab)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_unk_token_id(UNK_ID)
    writer.add_bos_token_id(BOS_ID)
    writer.add_eos_token_id(EOS_ID)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_add_space_prefix(False)
    for name, data in tensors.items():
        writer.add_tensor(name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out
