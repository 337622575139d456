//! The parsers fuzzed with mutated real files: GGUF (header, metadata, tokenizer, tensors),
//! safetensors, config.json, tokenizer.json, tokenizer_config.json and chat templates. Every
//! mutated input must load to a value or a typed error, never a panic and never a hang: each
//! case runs on its own thread under a time limit. A load that succeeds is used as well (a
//! forward pass, an encoding, a chat template rendering), since a parser that accepts a bad
//! file can leave the panic for later.
//!
//! The mutations are seeded and deterministic: bit flips, interesting bytes and integers
//! (0, 1, -1, 2^31, 2^32, 2^63, ...) written over the header, truncations, deleted and
//! duplicated chunks, and, for JSON, a random value replaced by an extreme one (a huge or
//! negative number, an empty string, another type) or removed.
//!
//! CI runs `CASES_PER_TARGET` cases per target; set `MIRROR_SD_FUZZ_CASES=N` for N per target,
//! `MIRROR_SD_FUZZ_TARGET=name` to run only the targets whose name contains it, and
//! `MIRROR_SD_FUZZ_VERBOSE=1` to print each input before it runs (an abort then names it).
//!
//! Found so far (and fixed): a config.json with `max_position_embeddings` of 2^40 aborted the
//! process allocating RoPE tables (now capped at 2^20 positions), `num_hidden_layers` was
//! used as an allocation size, and tokenizers 0.23 panics on two kinds of malformed
//! tokenizer.json (now a typed error at our boundary; see the regression test below).

mod common;

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use mirror_core::{
    load_dir, load_gguf, tokenizer::render_chat_template, ChatMessage, DirFiles, LoadOptions,
    Model, Tokenizer,
};
use rand::{rngs::StdRng, Rng, SeedableRng};

/// Cases per target in CI (7 targets).
const CASES_PER_TARGET: usize = 400;
/// Time limit of one case (the slowest legitimate case takes well under a second).
const CASE_LIMIT: Duration = Duration::from_secs(30);

fn cases_per_target() -> usize {
    std::env::var("MIRROR_SD_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(CASES_PER_TARGET)
}

const INTERESTING_U64: [u64; 12] = [
    0,
    1,
    2,
    0x7f,
    0xff,
    0x7fff_ffff,
    0x8000_0000,
    0xffff_ffff,
    0x1_0000_0000,
    0x7fff_ffff_ffff_ffff,
    0x8000_0000_0000_0000,
    u64::MAX,
];

/// One seeded mutation of `bytes`; offsets fall in `hot` (a header) most of the time.
fn mutate_bytes(bytes: &[u8], hot: usize, rng: &mut StdRng) -> Vec<u8> {
    let mut out = bytes.to_vec();
    let offset = |rng: &mut StdRng, len: usize| {
        let range = if rng.random_bool(0.8) {
            hot.min(len).max(1)
        } else {
            len.max(1)
        };
        rng.random_range(0..range)
    };
    let rounds = rng.random_range(1..=3);
    for _ in 0..rounds {
        if out.is_empty() {
            break;
        }
        match rng.random_range(0..7) {
            0 => {
                let at = offset(rng, out.len());
                out[at] ^= 1 << rng.random_range(0..8);
            }
            1 => {
                let at = offset(rng, out.len());
                out[at] = [0x00, 0xff, 0x7f, 0x80, 0x01, b'"', b'{', b'}'][rng.random_range(0..8)];
            }
            2 | 3 => {
                let width = if rng.random_bool(0.5) { 4 } else { 8 };
                let at = offset(rng, out.len());
                let value = INTERESTING_U64[rng.random_range(0..INTERESTING_U64.len())];
                let value = if rng.random_bool(0.2) {
                    value.wrapping_add(rng.random_range(0..4))
                } else {
                    value
                };
                let le = value.to_le_bytes();
                for (i, b) in le.iter().take(width).enumerate() {
                    if at + i < out.len() {
                        out[at + i] = *b;
                    }
                }
            }
            4 => {
                let len = rng.random_range(0..out.len());
                out.truncate(len);
            }
            5 => {
                let at = offset(rng, out.len());
                let len = rng.random_range(1..=64).min(out.len() - at);
                out.drain(at..at + len);
            }
            _ => {
                let at = offset(rng, out.len());
                let len = rng.random_range(1..=64).min(out.len() - at);
                let chunk: Vec<u8> = out[at..at + len].to_vec();
                let to = offset(rng, out.len());
                out.splice(to..to, chunk);
            }
        }
    }
    out
}

/// A random leaf (or member) of a JSON value replaced by an extreme value, or removed.
fn mutate_json_value(value: &mut serde_json::Value, rng: &mut StdRng) {
    use serde_json::Value;
    let extreme = |rng: &mut StdRng| -> Value {
        match rng.random_range(0..12) {
            0 => Value::from(0),
            1 => Value::from(-1),
            2 => Value::from(u64::MAX),
            3 => Value::from(1u64 << 40),
            4 => serde_json::json!(1e308),
            5 => serde_json::json!(-1e308),
            6 => Value::from(0.5),
            7 => Value::from(""),
            8 => Value::from("\u{0}\u{ffff}"),
            9 => Value::Null,
            10 => serde_json::json!([]),
            _ => serde_json::json!({}),
        }
    };
    match value {
        Value::Object(map) if !map.is_empty() => {
            let keys: Vec<String> = map.keys().cloned().collect();
            let key = &keys[rng.random_range(0..keys.len())];
            match rng.random_range(0..4) {
                0 => {
                    map.remove(key);
                }
                1 => {
                    map.insert(key.clone(), extreme(rng));
                }
                _ => mutate_json_value(map.get_mut(key).expect("key exists"), rng),
            }
        }
        Value::Array(list) if !list.is_empty() => {
            let i = rng.random_range(0..list.len());
            match rng.random_range(0..4) {
                0 => {
                    list.remove(i);
                }
                1 => list[i] = extreme(rng),
                _ => mutate_json_value(&mut list[i], rng),
            }
        }
        leaf => *leaf = extreme(rng),
    }
}

/// Half structural JSON mutations (still JSON), half byte mutations.
fn mutate_json(bytes: &[u8], rng: &mut StdRng) -> Vec<u8> {
    if rng.random_bool(0.5) {
        if let Ok(mut value) = serde_json::from_slice::<serde_json::Value>(bytes) {
            for _ in 0..rng.random_range(1..=3) {
                mutate_json_value(&mut value, rng);
            }
            return serde_json::to_vec(&value).expect("serializable");
        }
    }
    mutate_bytes(bytes, bytes.len(), rng)
}

/// Jinja fragments spliced into a template: unbalanced tags, loops, deep indexing, filters.
const JINJA_SNIPPETS: [&str; 12] = [
    "{%",
    "}}",
    "{% for m in messages %}{% for n in messages %}{{ n }}{% endfor %}{% endfor %}",
    "{% for i in range(1000000000) %}x{% endfor %}",
    "{{ messages[1000] }}",
    "{{ messages[0]['content'] * 1000000000 }}",
    "{{ raise_exception('boom') }}",
    "{% set x = x %}",
    "{{ 1 / 0 }}",
    "{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}",
    "{{ '%s' % messages }}",
    "{% if %}",
];

fn mutate_template(bytes: &[u8], rng: &mut StdRng) -> Vec<u8> {
    if rng.random_bool(0.5) {
        let text = String::from_utf8_lossy(bytes).into_owned();
        let mut at = rng.random_range(0..=text.len());
        while !text.is_char_boundary(at) {
            at -= 1;
        }
        let snippet = JINJA_SNIPPETS[rng.random_range(0..JINJA_SNIPPETS.len())];
        return format!("{}{snippet}{}", &text[..at], &text[at..]).into_bytes();
    }
    mutate_bytes(bytes, bytes.len(), rng)
}

/// Uses a model that loaded: one short forward pass.
fn exercise_model(model: &Model) -> mirror_core::Result<()> {
    let mut cache = model.new_cache(1, 8)?;
    model.forward_causal(&[1, 2, 3], &mut cache)?;
    Ok(())
}

/// Uses a tokenizer that loaded: an encoding, a decoding and its chat template.
fn exercise_tokenizer(tokenizer: &Tokenizer) -> mirror_core::Result<()> {
    let ids = tokenizer.encode("The capital of France is Paris. def f(x): 12345", true)?;
    tokenizer.decode(&ids, false)?;
    if tokenizer.chat_template().is_some() {
        let messages = [
            ChatMessage::new("system", "terse"),
            ChatMessage::new("user", "hi"),
        ];
        tokenizer.apply_chat_template(&messages, true)?;
    }
    Ok(())
}

/// What a fuzz target loads from a directory holding the fixture files, one of them mutated.
type Load = fn(&Path) -> mirror_core::Result<()>;
/// How a target's file is mutated.
type Mutate = Box<dyn Fn(&[u8], &mut StdRng) -> Vec<u8>>;

struct Target {
    name: &'static str,
    /// Fixture directory the files come from.
    fixture: PathBuf,
    /// The file that is mutated.
    file: &'static str,
    mutate: Mutate,
    load: Load,
}

fn load_gguf_file(dir: &Path) -> mirror_core::Result<()> {
    let loaded = load_gguf(&dir.join("model.gguf"), &LoadOptions::default())?;
    exercise_model(&loaded.model)?;
    exercise_tokenizer(&loaded.tokenizer)
}

fn load_hf_dir(dir: &Path) -> mirror_core::Result<()> {
    let loaded = load_dir(&DirFiles::local(dir)?, &LoadOptions::default())?;
    exercise_model(&loaded.model)?;
    exercise_tokenizer(&loaded.tokenizer)
}

fn load_tokenizer(dir: &Path) -> mirror_core::Result<()> {
    let tokenizer = Tokenizer::from_files(
        &dir.join("tokenizer.json"),
        Some(&dir.join("tokenizer_config.json")),
    )?;
    exercise_tokenizer(&tokenizer)
}

fn render_template(dir: &Path) -> mirror_core::Result<()> {
    let template = std::fs::read(dir.join("chat_template.jinja"))
        .map_err(|e| mirror_core::Error::ChatTemplate(e.to_string()))?;
    let template = String::from_utf8_lossy(&template);
    let messages = [
        ChatMessage::new("system", "terse"),
        ChatMessage::new("user", "hi"),
    ];
    render_chat_template(&template, &messages, true, "<s>", "</s>")?;
    Ok(())
}

/// Where the GGUF header ends (mutations concentrate there): the tensor data offset.
fn gguf_header_len(path: &Path) -> usize {
    let mut file = std::fs::File::open(path).unwrap();
    let content = candle_core::quantized::gguf_file::Content::read(&mut file).unwrap();
    content.tensor_data_offset as usize
}

fn targets() -> Vec<(Target, Vec<u8>)> {
    let gguf_dir = common::repo_root().join("tests/fixtures/gguf");
    let qwen2 = common::fixture_dir("qwen2");
    // Most mutations go to the GGUF header (metadata, tokenizer, tensor infos).
    let header = gguf_header_len(&gguf_dir.join("qwen2-quantized.gguf"));
    let list = vec![
        Target {
            name: "gguf (qwen2 export with tokenizer)",
            fixture: gguf_dir.clone(),
            file: "qwen2-quantized.gguf",
            mutate: Box::new(move |b, rng| mutate_bytes(b, header, rng)),
            load: load_gguf_file,
        },
        Target {
            name: "safetensors",
            fixture: qwen2.clone(),
            file: "model.safetensors",
            mutate: Box::new(|b, rng| mutate_bytes(b, 2048, rng)),
            load: load_hf_dir,
        },
        Target {
            name: "config.json",
            fixture: qwen2.clone(),
            file: "config.json",
            mutate: Box::new(mutate_json),
            load: load_hf_dir,
        },
        Target {
            name: "tokenizer.json",
            fixture: qwen2.clone(),
            file: "tokenizer.json",
            mutate: Box::new(mutate_json),
            load: load_tokenizer,
        },
        Target {
            name: "tokenizer_config.json",
            fixture: qwen2.clone(),
            file: "tokenizer_config.json",
            mutate: Box::new(mutate_json),
            load: load_tokenizer,
        },
        Target {
            name: "chat_template.jinja",
            fixture: qwen2.clone(),
            file: "chat_template.jinja",
            mutate: Box::new(mutate_template),
            load: render_template,
        },
        Target {
            name: "sharded index",
            fixture: common::fixture_dir("llama"),
            file: "model.safetensors.index.json",
            mutate: Box::new(mutate_json),
            load: load_hf_dir_model_only,
        },
    ];
    list.into_iter()
        .map(|t| {
            let bytes = std::fs::read(t.fixture.join(t.file)).unwrap();
            (t, bytes)
        })
        .collect()
}

fn load_hf_dir_model_only(dir: &Path) -> mirror_core::Result<()> {
    let model = mirror_core::load_model_dir(&DirFiles::local(dir)?, &LoadOptions::default())?;
    exercise_model(&model)
}

/// A copy of the fixture directory (the GGUF one reduced to `model.gguf`).
fn workdir(target: &Target) -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    if target.file.ends_with(".gguf") {
        return (tmp, dir);
    }
    for entry in std::fs::read_dir(&target.fixture).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, dir.join(path.file_name().unwrap())).unwrap();
    }
    (tmp, dir)
}

enum Outcome {
    Loaded,
    Refused,
    Panicked(String),
    Hung,
}

/// Runs `load` on its own thread; a panic or a run past the time limit is a failure.
fn run_case(load: Load, dir: PathBuf) -> Outcome {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let outcome = std::panic::catch_unwind(|| load(&dir));
        let _ = tx.send(match outcome {
            Ok(Ok(())) => Outcome::Loaded,
            Ok(Err(_)) => Outcome::Refused,
            Err(panic) => Outcome::Panicked(mirror_core::panic_message(&*panic)),
        });
    });
    rx.recv_timeout(CASE_LIMIT).unwrap_or(Outcome::Hung)
}

#[test]
fn mutated_files_load_or_fail_with_typed_errors() {
    common::tiny_model_threads();
    let cases = cases_per_target();
    let started = Instant::now();
    let mut failures = Vec::new();
    let mut total = 0;
    let only = std::env::var("MIRROR_SD_FUZZ_TARGET").unwrap_or_default();
    for (index, (target, original)) in targets().into_iter().enumerate() {
        if !target.name.contains(only.as_str()) {
            continue;
        }
        let (_tmp, dir) = workdir(&target);
        let path = dir.join(if target.file.ends_with(".gguf") {
            "model.gguf"
        } else {
            target.file
        });
        let (mut loaded, mut refused) = (0, 0);
        for case in 0..cases {
            let mut rng = StdRng::seed_from_u64(((index as u64) << 32) | case as u64);
            let mutated = (target.mutate)(&original, &mut rng);
            std::fs::write(&path, &mutated).unwrap();
            if std::env::var_os("MIRROR_SD_FUZZ_VERBOSE").is_some() {
                // Before the case runs: an abort (allocation failure) leaves this as the last line.
                eprintln!(
                    "{} case {case}: {}",
                    target.name,
                    String::from_utf8_lossy(&mutated[..mutated.len().min(2000)])
                );
            }
            total += 1;
            match run_case(target.load, dir.clone()) {
                Outcome::Loaded => loaded += 1,
                Outcome::Refused => refused += 1,
                Outcome::Panicked(message) => {
                    let kept = dir.with_extension(format!("case-{index}-{case}"));
                    failures.push(format!(
                        "{} case {case}: panicked: {message} (input kept at {})",
                        target.name,
                        kept.display()
                    ));
                    let _ = std::fs::write(&kept, &mutated);
                }
                Outcome::Hung => {
                    failures.push(format!(
                        "{} case {case}: no result within {CASE_LIMIT:?}",
                        target.name
                    ));
                    // The thread cannot be stopped; leave the directory to it.
                    break;
                }
            }
        }
        eprintln!(
            "{}: {cases} mutated inputs, {loaded} loaded, {refused} refused with a typed error",
            target.name
        );
    }
    eprintln!(
        "fuzzing: {total} inputs in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// The tokenizers library's panics found by the fuzzer, as regression cases: each is a typed
/// [`mirror_core::Error::Tokenizer`] now.
#[test]
fn tokenizer_library_panics_are_typed_errors() {
    let fixture = common::fixture_dir("qwen2");
    let original = std::fs::read_to_string(fixture.join("tokenizer.json")).unwrap();
    // A JSON syntax error inside the `decoder` object: tokenizers' decoder deserializer calls
    // `expect` on it.
    let at = original.find("\"decoder\":").expect("a decoder") + "\"decoder\":".len();
    let brace = at + original[at..].find('{').expect("an object") + 1;
    let broken_decoder = format!("{}\"type\" 1,{}", &original[..brace], &original[brace..]);
    // A continuing-subword prefix longer than the merged parts: a slice out of range in BPE's
    // builder.
    let mut value: serde_json::Value = serde_json::from_str(&original).unwrap();
    value["model"]["continuing_subword_prefix"] = "\u{0}\u{ffff}".into();
    let long_prefix = value.to_string();
    for (what, text) in [("decoder", broken_decoder), ("prefix", long_prefix)] {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("tokenizer.json");
        std::fs::write(&path, text).unwrap();
        let err = Tokenizer::from_files(&path, None).unwrap_err();
        assert!(
            matches!(&err, mirror_core::Error::Tokenizer { reason, .. } if reason.contains("panicked")),
            "{what}: {err}"
        );
    }
}
