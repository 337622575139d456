#!/usr/bin/env python3
"""Write the GGUF fixtures that mirror-core's GGUF tests read, with llama.cpp's own Python
package (`gguf`): a writer and a dequantizer independent of candle and of our kernels.

    python3 -m venv .venv && .venv/bin/pip install gguf numpy
    .venv/bin/python scripts/make_gguf_fixtures.py

Writes, under tests/fixtures/gguf/:
- quant_types.gguf: one 3x512 matrix per GGML type the kernels read (Q4_0, Q4_1, Q5_0, Q5_1,
  Q8_0: quantized from random values by gguf's quantizer; Q4_K, Q5_K, Q6_K: random blocks with
  sane f16 scales, since gguf quantizes no K type), and quant_types_reference.npz with gguf's
  dequantization of each, as f32.
- <arch>-quantized.gguf for llama, qwen2, qwen3 and mistral (as llama.cpp exports it: arch
  `llama`, q/k rows permuted for interleaved RoPE): the tiny checkpoints of tests/fixtures/hf
  with their weight matrices quantized to block-32 types (their widths, 32 and 64, admit no K
  type), norms and biases in f32. qwen2's also carries the fixture's tokenizer (byte-level BPE,
  `tokenizer.ggml.pre = qwen2`) and chat template, so it loads whole through `load_gguf`.
The files total about 250 KB.
"""

import json
import os
import struct

import numpy as np

import gguf
from gguf import GGMLQuantizationType as T
from gguf import quants

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
HF = os.path.join(ROOT, "tests", "fixtures", "hf")
OUT = os.path.join(ROOT, "tests", "fixtures", "gguf")

BLOCK32 = [T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0]
KQUANTS = [T.Q4_K, T.Q5_K, T.Q6_K]


def f16_bytes(values):
    return np.asarray(values, dtype=np.float16).view(np.uint8)


def random_k_blocks(qtype, n_blocks, rng):
    """Random K-quant blocks: every quant and scale byte random, the f16 super-block scales set
    to sane positive values (random bytes there would give infinities and NaNs)."""
    block_len, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, size=(n_blocks, block_bytes), dtype=np.uint8)
    d = rng.uniform(0.001, 0.02, size=n_blocks)
    if qtype in (T.Q4_K, T.Q5_K):
        # d, dmin at the start of the block.
        blocks[:, 0:2] = f16_bytes(d).reshape(n_blocks, 2)
        blocks[:, 2:4] = f16_bytes(rng.uniform(0.0, 0.01, size=n_blocks)).reshape(n_blocks, 2)
    elif qtype == T.Q6_K:
        # ql[128], qh[64], scales[16] (int8), then d.
        blocks[:, 208:210] = f16_bytes(d).reshape(n_blocks, 2)
    return blocks


def quant_types(rng):
    rows, cols = 3, 512
    writer = gguf.GGUFWriter(os.path.join(OUT, "quant_types.gguf"), arch="llama")
    reference = {}
    for qtype in BLOCK32 + KQUANTS:
        name = qtype.name.lower()
        if qtype in BLOCK32:
            values = (rng.standard_normal((rows, cols)) * rng.uniform(0.1, 3.0, (rows, 1))).astype(np.float32)
            data = quants.quantize(values, qtype)
        else:
            block_len, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
            per_row = cols // block_len
            data = random_k_blocks(qtype, rows * per_row, rng).reshape(rows, per_row * block_bytes)
        reference[name] = quants.dequantize(data, qtype).astype(np.float32)
        assert reference[name].shape == (rows, cols)
        assert np.isfinite(reference[name]).all()
        writer.add_tensor(name, data, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    np.savez(os.path.join(OUT, "quant_types_reference.npz"), **reference)


def read_safetensors(path):
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        data = f.read()
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        assert info["dtype"] == "F32", (name, info["dtype"])
        start, end = info["data_offsets"]
        out[name] = np.frombuffer(data[start:end], dtype=np.float32).reshape(info["shape"])
    return out


def fixture_weights(name):
    directory = os.path.join(HF, name)
    weights = {}
    for file in sorted(os.listdir(directory)):
        if file.endswith(".safetensors") and file != "reference.safetensors":
            weights.update(read_safetensors(os.path.join(directory, file)))
    with open(os.path.join(directory, "config.json")) as f:
        config = json.load(f)
    return config, weights


def gguf_name(hf):
    direct = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    if hf in direct:
        return direct[hf]
    rest = hf[len("model.layers."):]
    layer, field = rest.split(".", 1)
    module, kind = field.rsplit(".", 1)
    module = {
        "input_layernorm": "attn_norm",
        "post_attention_layernorm": "ffn_norm",
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "self_attn.q_norm": "attn_q_norm",
        "self_attn.k_norm": "attn_k_norm",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
    }[module]
    return f"blk.{layer}.{module}.{kind}"


def permute(w, heads):
    """llama.cpp's convert_hf_to_gguf LlamaModel.permute: half-split RoPE pairs to adjacent."""
    rows = w.shape[0]
    return w.reshape(heads, 2, rows // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# Weight type per kind of matrix, per architecture: every block-32 type appears.
TYPES = {
    "llama": {"attn": T.Q8_0, "ffn": T.Q4_0, "embd": T.Q8_0, "output": T.Q5_1},
    "qwen2": {"attn": T.Q5_0, "ffn": T.Q4_1, "embd": T.Q8_0, "output": T.Q8_0},
    "qwen3": {"attn": T.Q8_0, "ffn": T.Q5_1, "embd": T.Q4_1, "output": T.Q8_0},
    "mistral": {"attn": T.Q4_0, "ffn": T.Q8_0, "embd": T.Q5_0, "output": T.Q8_0},
}


def kind_of(gname):
    if gname.startswith("token_embd"):
        return "embd"
    if gname.startswith("output."):
        return "output"
    return "attn" if ".attn_" in gname else "ffn"


def add_tokenizer(writer, directory):
    with open(os.path.join(directory, "tokenizer.json")) as f:
        tok = json.load(f)
    vocab = tok["model"]["vocab"]
    tokens = [None] * len(vocab)
    for token, i in vocab.items():
        tokens[i] = token
    special = {t["id"] for t in tok["added_tokens"] if t.get("special")}
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if i in special else 1 for i in range(len(tokens))])
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    writer.add_token_merges(merges)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    with open(os.path.join(directory, "chat_template.jinja")) as f:
        writer.add_chat_template(f.read())


def model(name):
    config, weights = fixture_weights(name)
    # llama.cpp exports Mistral checkpoints as `llama`.
    arch = "llama" if name == "mistral" else name
    path = os.path.join(OUT, f"{name}-quantized.gguf")
    writer = gguf.GGUFWriter(path, arch=arch)
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    theta = config.get("rope_theta") or config["rope_parameters"]["rope_theta"]
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_rope_freq_base(theta)
    writer.add_rope_dimension_count(head_dim)
    if name == "qwen2":
        add_tokenizer(writer, os.path.join(HF, name))
    for hf in sorted(weights):
        w = weights[hf]
        if arch == "llama" and hf.endswith("q_proj.weight"):
            w = permute(w, heads)
        elif arch == "llama" and hf.endswith("k_proj.weight"):
            w = permute(w, kv_heads)
        gname = gguf_name(hf)
        if w.ndim == 2:
            qtype = TYPES[name][kind_of(gname)]
            writer.add_tensor(gname, quants.quantize(np.ascontiguousarray(w), qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(gname, np.ascontiguousarray(w))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def main():
    os.makedirs(OUT, exist_ok=True)
    rng = np.random.default_rng(1234)
    quant_types(rng)
    for name in ["llama", "qwen2", "qwen3", "mistral"]:
        model(name)
    total = sum(os.path.getsize(os.path.join(OUT, f)) for f in os.listdir(OUT))
    print(f"wrote {OUT}: {total} bytes")


if __name__ == "__main__":
    main()
