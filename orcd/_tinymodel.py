"""Build a tiny, random-weight GGUF model that llama.cpp can load and run.

The model exists so that tests can drive a real ``llama_cpp.Llama`` on a CPU
in milliseconds, without downloading weights.  It is a 2-layer ``llama``
architecture (n_embd 64, 4 heads, 2 KV heads, FFN 128, F32 tensors; roughly
0.5 MB on disk), written with :class:`gguf.GGUFWriter`.  All weights come
from ``numpy.random.RandomState(seed)``, so one seed always gives the same
bytes.

Vocabulary (SentencePiece-style, ``tokenizer.ggml.model = "llama"``)::

    0 <unk>   1 <s> (BOS)   2 </s> (EOS)
    3..258    "<0x00>".."<0xFF>"   (type BYTE: byte fallback)
    259       "\u2581" (the SentencePiece space)
    260..     the printable ASCII characters "!".."~"

Any UTF-8 text therefore tokenizes, with every non-ASCII character falling
back to one byte token per UTF-8 byte, and detokenizes back unchanged
(``add_space_prefix`` is off, so no leading space is invented).

Keeping EOS (and <unk>/<s>) out of generations: hidden dimension ``d0`` of
every token embedding holds a constant 1.0, and the ``d0`` rows of every
residual-writing projection (``attn_output``, ``ffn_down``) are zero, so the
residual stream carries exactly 1.0 in ``d0`` at every position and layer.
The other dimensions stay small, so after the final RMSNorm ``h[d0]`` is a
large positive number (about 5).  ``output.weight[t, d0]`` is -20 for the
special tokens and 0 elsewhere, which pushes their logits about 100 nats
below the rest: EOS is effectively never sampled, greedily or at
temperature 1, and generations of thousands of tokens run to the length
limit.  The remaining logits are random with a spread of a few nats, so
sampling with different seeds gives different text.
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
D0 = 0  # the hidden dimension that carries the constant "not special" signal

UNK_ID, BOS_ID, EOS_ID = 0, 1, 2
_SPECIAL_PENALTY = -20.0


def _vocab() -> tuple[list[str], list[float], list[int]]:
    """Return (tokens, scores, token types) of the byte-level vocabulary."""
    tokens = ["<unk>", "<s>", "</s>"]
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    types += [gguf.TokenType.BYTE] * 256
    scores = [0.0] * len(tokens)
    normal = ["\u2581"] + [chr(c) for c in range(0x21, 0x7F)]
    tokens += normal
    types += [gguf.TokenType.NORMAL] * len(normal)
    scores += [-float(i) for i in range(len(normal))]
    return tokens, scores, [int(t) for t in types]


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

    def rand(*shape: int, std: float) -> np.ndarray:
        return (rng.standard_normal(shape) * std).astype(np.float32)

    # numpy shape (rows, cols) is ggml ne = [cols, rows]: weights are (n_out, n_in).
    tensors: dict[str, np.ndarray] = {}
    embd = rand(n_vocab, N_EMBD, std=0.1)
    embd[:, D0] = 1.0
    tensors["token_embd.weight"] = embd
    for i in range(N_LAYER):
        p = f"blk.{i}."
        tensors[p + "attn_norm.weight"] = np.ones(N_EMBD, dtype=np.float32)
        tensors[p + "attn_q.weight"] = rand(N_EMBD, N_EMBD, std=0.1)
        tensors[p + "attn_k.weight"] = rand(N_HEAD_KV * head_dim, N_EMBD, std=0.1)
        tensors[p + "attn_v.weight"] = rand(N_HEAD_KV * head_dim, N_EMBD, std=0.1)
        wo = rand(N_EMBD, N_EMBD, std=0.02)
        wo[D0, :] = 0.0
        tensors[p + "attn_output.weight"] = wo
        tensors[p + "ffn_norm.weight"] = np.ones(N_EMBD, dtype=np.float32)
        tensors[p + "ffn_gate.weight"] = rand(N_FF, N_EMBD, std=0.1)
        tensors[p + "ffn_up.weight"] = rand(N_FF, N_EMBD, std=0.1)
        down = rand(N_EMBD, N_FF, std=0.02)
        down[D0, :] = 0.0
        tensors[p + "ffn_down.weight"] = down
    tensors["output_norm.weight"] = np.ones(N_EMBD, dtype=np.float32)
    head = rand(n_vocab, N_EMBD, std=0.3)
    head[:, D0] = 0.0
    head[[UNK_ID, BOS_ID, EOS_ID], D0] = _SPECIAL_PENALTY
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
