"""A Mixtral-8x7B-shaped GGUF with random weights, for llama-bench: the shapes of ``--synthetic mixtral-8x7b``.

Experts in Q2_K or Q3_K, everything else Q8_0 (norms and the router in float32), written with the gguf-py that
ships with the llama.cpp sources (PYTHONPATH=.llamacpp/gguf-py). Quantized blocks are random bytes with their
scale fields set to small finite float16 values, so every product is finite; speed does not depend on values.
Tensors are streamed to disk one at a time (the file is ~16-21 GB; memory stays at one tensor).

    PYTHONPATH=.llamacpp/gguf-py python3 benchmarks/vs_llamacpp/make_gguf.py OUT.gguf --experts q2_k [--layers 32]
"""

from __future__ import annotations

import argparse

import numpy as np

import gguf

Q = gguf.GGMLQuantizationType
# byte offsets of the float16 scale fields inside one block (ggml-common.h: block_q2_K, block_q3_K, block_q8_0)
SCALE_FIELDS = {Q.Q2_K: (80, 82), Q.Q3_K: (108,), Q.Q8_0: (0,)}


def random_blocks(rng: np.random.Generator, rows: int, cols: int, qtype: Q) -> np.ndarray:
    """uint8 [rows, bytes] of random blocks for a [rows, cols] matrix (cols along ggml's ne0)."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    n_blocks = cols // block
    data = np.frombuffer(rng.bytes(rows * n_blocks * size), dtype=np.uint8).reshape(rows, n_blocks, size).copy()
    scale = np.array([0.002], dtype=np.float16).view(np.uint8)
    for off in SCALE_FIELDS[qtype]:
        data[:, :, off : off + 2] = scale
    return data.reshape(rows, n_blocks * size)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--experts", choices=["q2_k", "q3_k"], default="q2_k")
    ap.add_argument("--layers", type=int, default=32)
    args = ap.parse_args()
    d, inter, n_exp, vocab, heads, kv_heads, head_dim = 4096, 14336, 8, 32000, 32, 8, 128
    expert_q = Q.Q2_K if args.experts == "q2_k" else Q.Q3_K
    rng = np.random.default_rng(0)

    w = gguf.GGUFWriter(args.out, "llama")
    w.add_name(f"synthetic-mixtral-8x7b-{args.experts}")
    w.add_block_count(args.layers)
    w.add_context_length(32768)
    w.add_embedding_length(d)
    w.add_feed_forward_length(inter)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(1e6)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_expert_count(n_exp)
    w.add_expert_used_count(2)
    w.add_vocab_size(vocab)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q2_K if expert_q == Q.Q2_K else gguf.LlamaFileType.MOSTLY_Q3_K_M)
    # A SentencePiece-style vocabulary: specials, the 256 byte tokens, then fillers.
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    tokens += [f"tok{i}" for i in range(vocab - len(tokens))]
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL] + [gguf.TokenType.BYTE] * 256
    types += [gguf.TokenType.NORMAL] * (vocab - len(types))
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * vocab)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)

    # (name, numpy shape in elements [rows..., ne0], quant type or None for float32)
    plan: list[tuple[str, tuple[int, ...], Q | None]] = [("token_embd.weight", (vocab, d), Q.Q8_0)]
    for i in range(args.layers):
        p = f"blk.{i}."
        plan += [
            (p + "attn_norm.weight", (d,), None), (p + "ffn_norm.weight", (d,), None),
            (p + "attn_q.weight", (heads * head_dim, d), Q.Q8_0), (p + "attn_k.weight", (kv_heads * head_dim, d), Q.Q8_0),
            (p + "attn_v.weight", (kv_heads * head_dim, d), Q.Q8_0), (p + "attn_output.weight", (d, heads * head_dim), Q.Q8_0),
            (p + "ffn_gate_inp.weight", (n_exp, d), None),
            (p + "ffn_gate_exps.weight", (n_exp, inter, d), expert_q), (p + "ffn_up_exps.weight", (n_exp, inter, d), expert_q),
            (p + "ffn_down_exps.weight", (n_exp, d, inter), expert_q),
        ]
    plan += [("output_norm.weight", (d,), None), ("output.weight", (vocab, d), Q.Q8_0)]

    def byte_shape(shape, qtype):
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        return (*shape[:-1], shape[-1] // block * size)

    for name, shape, qtype in plan:
        if qtype is None:
            w.add_tensor_info(name, shape, np.dtype(np.float32), int(np.prod(shape)) * 4)
        else:
            bshape = byte_shape(shape, qtype)
            w.add_tensor_info(name, bshape, np.dtype(np.uint8), int(np.prod(bshape)), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for name, shape, qtype in plan:
        if qtype is None:
            if name.endswith("ffn_gate_inp.weight"):  # router: random, so routing spreads over the experts
                data = rng.standard_normal(shape, dtype=np.float32) * 0.02
            else:
                data = np.ones(shape, dtype=np.float32)
        else:
            rows = int(np.prod(shape[:-1]))
            data = random_blocks(rng, rows, shape[-1], qtype).reshape(byte_shape(shape, qtype))
        w.write_tensor_data(data)
    w.close()


if __name__ == "__main__":
    main()
