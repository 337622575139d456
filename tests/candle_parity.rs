//! Parity with candle-transformers' `llama`, `qwen2` and `qwen3` on the same random weights:
//! last-position logits within 1e-4 (f32). Our side loads through real files (config.json and
//! safetensors), theirs from the same tensors in memory.

mod common;

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::{llama, qwen2, qwen3};
use mirror_core::{load_model_dir, DirFiles, LoadOptions, Model};
use rand::{rngs::StdRng, Rng, SeedableRng};

const VOCAB: usize = 384;
const HIDDEN: usize = 64;
const INTERMEDIATE: usize = 112;
const LAYERS: usize = 3;
const HEADS: usize = 8;
const KV_HEADS: usize = 2;

struct Spec {
    qkv_bias: bool,
    qk_norm: bool,
    head_dim: usize,
    tied: bool,
}

fn random(rng: &mut StdRng, shape: &[usize], scale: f32, offset: f32) -> Tensor {
    let n: usize = shape.iter().product();
    let data: Vec<f32> = (0..n)
        .map(|_| offset + scale * (rng.random::<f32>() * 2.0 - 1.0))
        .collect();
    Tensor::from_vec(data, shape, &Device::Cpu).unwrap()
}

fn random_weights(spec: &Spec, seed: u64) -> HashMap<String, Tensor> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut w = HashMap::new();
    let d = spec.head_dim;
    let lin = |rng: &mut StdRng, out: usize, inp: usize| {
        random(rng, &[out, inp], 1.7 / (inp as f32).sqrt(), 0.0)
    };
    w.insert(
        "model.embed_tokens.weight".to_string(),
        random(&mut rng, &[VOCAB, HIDDEN], 1.0, 0.0),
    );
    for l in 0..LAYERS {
        let p = format!("model.layers.{l}");
        w.insert(
            format!("{p}.input_layernorm.weight"),
            random(&mut rng, &[HIDDEN], 0.3, 1.0),
        );
        w.insert(
            format!("{p}.post_attention_layernorm.weight"),
            random(&mut rng, &[HIDDEN], 0.3, 1.0),
        );
        for (name, out) in [
            ("q_proj", HEADS * d),
            ("k_proj", KV_HEADS * d),
            ("v_proj", KV_HEADS * d),
        ] {
            w.insert(
                format!("{p}.self_attn.{name}.weight"),
                lin(&mut rng, out, HIDDEN),
            );
            if spec.qkv_bias {
                w.insert(
                    format!("{p}.self_attn.{name}.bias"),
                    random(&mut rng, &[out], 0.3, 0.0),
                );
            }
        }
        w.insert(
            format!("{p}.self_attn.o_proj.weight"),
            lin(&mut rng, HIDDEN, HEADS * d),
        );
        if spec.qk_norm {
            w.insert(
                format!("{p}.self_attn.q_norm.weight"),
                random(&mut rng, &[d], 0.3, 1.0),
            );
            w.insert(
                format!("{p}.self_attn.k_norm.weight"),
                random(&mut rng, &[d], 0.3, 1.0),
            );
        }
        w.insert(
            format!("{p}.mlp.gate_proj.weight"),
            lin(&mut rng, INTERMEDIATE, HIDDEN),
        );
        w.insert(
            format!("{p}.mlp.up_proj.weight"),
            lin(&mut rng, INTERMEDIATE, HIDDEN),
        );
        w.insert(
            format!("{p}.mlp.down_proj.weight"),
            lin(&mut rng, HIDDEN, INTERMEDIATE),
        );
    }
    w.insert(
        "model.norm.weight".to_string(),
        random(&mut rng, &[HIDDEN], 0.3, 1.0),
    );
    if !spec.tied {
        w.insert("lm_head.weight".to_string(), lin(&mut rng, VOCAB, HIDDEN));
    }
    w
}

/// Writes config.json and model.safetensors, loads them with our loader.
fn ours(
    dir: &std::path::Path,
    config: &serde_json::Value,
    weights: &HashMap<String, Tensor>,
) -> Model {
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    candle_core::safetensors::save(weights, dir.join("model.safetensors")).unwrap();
    load_model_dir(&DirFiles::local(dir).unwrap(), &LoadOptions::default()).unwrap()
}

fn last_logits(model: &Model, tokens: &[u32]) -> Tensor {
    let mut cache = model.new_cache(1, 64).unwrap();
    let logits = model.next_token_logits(tokens, &mut cache).unwrap();
    Tensor::new(logits, &Device::Cpu).unwrap()
}

const SEQUENCES: [&[u32]; 3] = [
    &[3],
    &[10, 200, 5, 77, 383, 0, 12],
    &[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17],
];

fn assert_close(ours: &Tensor, theirs: &Tensor, what: &str) {
    let theirs = theirs.flatten_all().unwrap();
    let diff = common::max_abs_diff(ours, &theirs);
    assert!(diff < 1e-4, "{what}: max |diff| {diff}");
}

fn base_config(model_type: &str, spec: &Spec) -> serde_json::Value {
    serde_json::json!({
        "model_type": model_type,
        "vocab_size": VOCAB,
        "hidden_size": HIDDEN,
        "intermediate_size": INTERMEDIATE,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "head_dim": spec.head_dim,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "max_position_embeddings": 512,
        "tie_word_embeddings": spec.tied,
    })
}

#[test]
fn llama_matches_candle_transformers() {
    for (tied, scaling) in [(false, false), (true, true)] {
        let spec = Spec {
            qkv_bias: false,
            qk_norm: false,
            head_dim: HIDDEN / HEADS,
            tied,
        };
        let weights = random_weights(&spec, 1);
        let mut config = base_config("llama", &spec);
        if scaling {
            config["rope_scaling"] = serde_json::json!({
                "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 64
            });
        }
        let dir = tempfile::tempdir().unwrap();
        let model = ours(dir.path(), &config, &weights);
        let their_config: llama::LlamaConfig = serde_json::from_value(config.clone()).unwrap();
        let their_config = their_config.into_config(false);
        let vb = VarBuilder::from_tensors(weights.clone(), DType::F32, &Device::Cpu);
        let theirs = llama::Llama::load(vb, &their_config).unwrap();
        for tokens in SEQUENCES {
            let mut cache =
                llama::Cache::new(true, DType::F32, &their_config, &Device::Cpu).unwrap();
            let input = Tensor::new(tokens, &Device::Cpu)
                .unwrap()
                .unsqueeze(0)
                .unwrap();
            let expected = theirs.forward(&input, 0, &mut cache).unwrap();
            assert_close(
                &last_logits(&model, tokens),
                &expected,
                &format!("llama tied={tied} scaling={scaling}"),
            );
        }
    }
}

#[test]
fn qwen2_matches_candle_transformers() {
    let spec = Spec {
        qkv_bias: true,
        qk_norm: false,
        head_dim: HIDDEN / HEADS,
        tied: false,
    };
    let weights = random_weights(&spec, 2);
    let dir = tempfile::tempdir().unwrap();
    let model = ours(dir.path(), &base_config("qwen2", &spec), &weights);
    let their_config = qwen2::Config {
        vocab_size: VOCAB,
        hidden_size: HIDDEN,
        intermediate_size: INTERMEDIATE,
        num_hidden_layers: LAYERS,
        num_attention_heads: HEADS,
        num_key_value_heads: KV_HEADS,
        max_position_embeddings: 512,
        sliding_window: 512,
        max_window_layers: LAYERS,
        tie_word_embeddings: false,
        rope_theta: 10000.0,
        rms_norm_eps: 1e-5,
        use_sliding_window: false,
        hidden_act: candle_nn::Activation::Silu,
    };
    for tokens in SEQUENCES {
        let vb = VarBuilder::from_tensors(weights.clone(), DType::F32, &Device::Cpu);
        let mut theirs = qwen2::ModelForCausalLM::new(&their_config, vb).unwrap();
        let input = Tensor::new(tokens, &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let expected = theirs.forward(&input, 0).unwrap();
        assert_close(&last_logits(&model, tokens), &expected, "qwen2");
    }
}

#[test]
fn qwen3_matches_candle_transformers() {
    // head_dim 16 != hidden / heads, as in real Qwen3 configs.
    let spec = Spec {
        qkv_bias: false,
        qk_norm: true,
        head_dim: 16,
        tied: true,
    };
    let weights = random_weights(&spec, 3);
    let dir = tempfile::tempdir().unwrap();
    let model = ours(dir.path(), &base_config("qwen3", &spec), &weights);
    let their_config = qwen3::Config {
        vocab_size: VOCAB,
        hidden_size: HIDDEN,
        intermediate_size: INTERMEDIATE,
        num_hidden_layers: LAYERS,
        num_attention_heads: HEADS,
        head_dim: 16,
        attention_bias: false,
        num_key_value_heads: KV_HEADS,
        max_position_embeddings: 512,
        sliding_window: None,
        max_window_layers: LAYERS,
        tie_word_embeddings: true,
        rope_theta: 10000.0,
        rms_norm_eps: 1e-5,
        use_sliding_window: false,
        hidden_act: candle_nn::Activation::Silu,
    };
    for tokens in SEQUENCES {
        let vb = VarBuilder::from_tensors(weights.clone(), DType::F32, &Device::Cpu);
        let mut theirs = qwen3::ModelForCausalLM::new(&their_config, vb).unwrap();
        let input = Tensor::new(tokens, &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let expected = theirs.forward(&input, 0).unwrap();
        assert_close(&last_logits(&model, tokens), &expected, "qwen3");
    }
}
