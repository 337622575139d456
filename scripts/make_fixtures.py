#!/usr/bin/env python3
"""Write the reference fixtures that mirror-core's tests compare against.

The references come from Hugging Face transformers (PyTorch, CPU, f32), an implementation
independent of ours and of candle's, so a mistake copied from candle would still be caught.

    python3 -m venv .venv && .venv/bin/pip install torch transformers gguf
    .venv/bin/python scripts/make_fixtures.py

Writes, under tests/fixtures/:
- hf/<name>/: a tiny random checkpoint (config.json, safetensors; `llama` sharded with an index)
  and reference.safetensors with token sequences `tokens_<i>` and transformers' logits for every
  position `logits_<i>`. `qwen2` also gets a small byte-level BPE tokenizer with a chat template.
- tokenizers.json: token ids that transformers' tokenizers produce for a few texts, and the chat
  template renderings of apply_chat_template: for the tiny tokenizer always, and for the real GGUF
  models when they are present in models/ (transformers rebuilds their tokenizers from GGUF).
The committed fixtures stay well under 2 MB.
"""

import json
import os
import shutil

import torch
from safetensors.torch import save_file

import transformers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    MistralConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
)

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
FIXTURES = os.path.join(ROOT, "tests", "fixtures")
MODELS = os.path.join(ROOT, "models")

COMMON = dict(
    vocab_size=320,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
    bos_token_id=1,
    eos_token_id=2,
)

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] | trim + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "  What is 2 + 2?  "},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "And 3 + 3?"},
]

TEXTS = [
    "The capital of France is",
    "The",
    " hello world",
    "def f(x):\n    return x ** 2  # 12345",
    "Ünïcödé — 日本語 and emoji 🚀!",
    "<|im_start|>user\nhi<|im_end|>\n",
]


def variants():
    yield "llama", LlamaConfig(**COMMON, rope_theta=10000.0), dict(shards=2)
    yield "llama3_scaled", LlamaConfig(
        **COMMON,
        tie_word_embeddings=True,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 10000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    ), dict(classic_config=True)
    yield "qwen2", Qwen2Config(**COMMON, rope_theta=1000000.0), dict(tokenizer=True)
    yield "qwen3", Qwen3Config(**COMMON, head_dim=16, rope_theta=1000000.0), {}
    yield "mistral", MistralConfig(**COMMON, sliding_window=128, rope_theta=10000.0), dict(classic_config=True)


def randomize(model, generator):
    """Replace transformers' small init with values large enough to make logits sharp, and
    give norms and biases non-trivial values so that every parameter matters."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.2 * torch.randn(param.shape, generator=generator))
            elif name.endswith("bias"):
                param.copy_(0.2 * torch.randn(param.shape, generator=generator))
            else:
                fan_in = param.shape[-1]
                param.copy_(torch.randn(param.shape, generator=generator) * (1.5 / fan_in**0.5))


def to_classic(config_path):
    """Rewrite transformers 5's `rope_parameters` into the `rope_theta`/`rope_scaling` keys that
    most checkpoints on the hub carry, so both forms are exercised."""
    with open(config_path) as f:
        config = json.load(f)
    params = config.pop("rope_parameters")
    config["rope_theta"] = params.pop("rope_theta")
    if params.get("rope_type", "default") != "default":
        config["rope_scaling"] = params
    with open(config_path, "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)


def save_sharded(state, directory, shards):
    names = sorted(state)
    per = (len(names) + shards - 1) // shards
    weight_map = {}
    total = 0
    for s in range(shards):
        part = {n: state[n].contiguous() for n in names[s * per : (s + 1) * per]}
        file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        save_file(part, os.path.join(directory, file), metadata={"format": "pt"})
        for n, t in part.items():
            weight_map[n] = file
            total += t.numel() * t.element_size()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
        json.dump(index, f, indent=2, sort_keys=True)


def train_tiny_tokenizer(directory):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [
        "The capital of France is Paris. The quick brown fox jumps over the lazy dog.",
        "def f(x):\n    return x ** 2\nprint(f(12345))",
        "hello world, hello tokenizer, hello again",
    ] * 20
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<unk>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        unk_token="<unk>",
    )
    fast.chat_template = CHATML
    fast.save_pretrained(directory)
    return fast


def main():
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(1234)
    hf_dir = os.path.join(FIXTURES, "hf")
    shutil.rmtree(hf_dir, ignore_errors=True)
    os.makedirs(hf_dir)
    token_refs = {"transformers_version": transformers.__version__, "tokenizers": {}}

    for name, config, opts in variants():
        directory = os.path.join(hf_dir, name)
        os.makedirs(directory)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        randomize(model, generator)
        model.eval()
        config.save_pretrained(directory)
        state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
        if config.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        if opts.get("shards"):
            save_sharded(state, directory, opts["shards"])
        else:
            save_file(state, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
        if opts.get("classic_config"):
            to_classic(os.path.join(directory, "config.json"))

        reference = {}
        for i, length in enumerate([1, 6, 13]):
            tokens = torch.randint(0, config.vocab_size, (1, length), generator=generator)
            with torch.no_grad():
                out = model(tokens, output_hidden_states=True)
                # Early-exit tap after layer N/2: the intermediate state through the model's own
                # final norm and LM head (hidden_states[l] is the output of layer l, unnormed).
                exit_layer = config.num_hidden_layers // 2
                early = model.lm_head(model.model.norm(out.hidden_states[exit_layer]))[0]
            reference[f"tokens_{i}"] = tokens[0].to(torch.int64)
            reference[f"logits_{i}"] = out.logits[0].to(torch.float32).contiguous()
            reference[f"early_exit_logits_{i}"] = early.to(torch.float32).contiguous()
        save_file(reference, os.path.join(directory, "reference.safetensors"))

        if opts.get("tokenizer"):
            fast = train_tiny_tokenizer(directory)
            assert len(fast) <= config.vocab_size
            token_refs["tokenizers"]["hf/qwen2"] = reference_encodings(fast)
        print(f"wrote {directory}")

    for file in ["SmolLM2-135M-Instruct.Q4_1.gguf", "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"]:
        if os.path.exists(os.path.join(MODELS, file)):
            fast = AutoTokenizer.from_pretrained(MODELS, gguf_file=file)
            token_refs["tokenizers"][file] = reference_encodings(fast)
            print(f"tokenizer references for {file}")
        else:
            print(f"models/{file} absent: no tokenizer references for it")

    with open(os.path.join(FIXTURES, "tokenizers.json"), "w") as f:
        json.dump(token_refs, f, indent=1, ensure_ascii=False, sort_keys=True)


def reference_encodings(tokenizer):
    return {
        "encodings": {text: tokenizer.encode(text, add_special_tokens=False) for text in TEXTS},
        "messages": MESSAGES,
        "chat_with_generation_prompt": tokenizer.apply_chat_template(
            MESSAGES, tokenize=False, add_generation_prompt=True
        ),
        "chat_without_generation_prompt": tokenizer.apply_chat_template(
            MESSAGES, tokenize=False, add_generation_prompt=False
        ),
    }


if __name__ == "__main__":
    main()
