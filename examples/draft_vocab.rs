//! Ranks a model's tokens by how often its tokenizer produces them over a corpus of text files,
//! most frequent first, one id per line: the ranking `--draft-vocab-ranking` reads, so that
//! `--draft-vocab N` gives the draft an LM head over the N tokens of that corpus that matter
//! most (FR-Spec, see `mirror_core::Model::with_head_tokens`). Use text like what the server
//! will generate; tokens the corpus never shows follow in id order.
//!
//! ```text
//! cargo run --release --example draft_vocab -- --out draft_vocab.txt ~/src /usr/lib/python3.11
//! cargo run --release --example batched_bench -- --methods ar,sd --draft-vocab 16384 --draft-vocab-ranking draft_vocab.txt
//! ```

#[path = "common/mod.rs"]
mod common;

use std::io::Write;
use std::path::{Path, PathBuf};

use clap::Parser;

#[derive(Parser, Debug)]
#[command(about = "Rank a model's tokens by their frequency over a corpus (for --draft-vocab)")]
struct Args {
    /// The model whose tokenizer counts: a model directory, a .gguf file, or a hub id.
    #[arg(long, default_value = common::DEFAULT_DRAFT)]
    model: String,
    /// Where to write the ranking.
    #[arg(long)]
    out: PathBuf,
    /// Read at most this many bytes of text.
    #[arg(long, default_value_t = 64 << 20)]
    max_bytes: usize,
    /// Text files, or directories searched for files with the extensions of --extensions.
    #[arg(required = true)]
    paths: Vec<PathBuf>,
    /// File extensions taken from directories.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "md,txt,py,rs,js,ts,c,h,cpp,java,go,json,toml,html"
    )]
    extensions: Vec<String>,
}

/// Files under `path` (itself when a file) with one of `extensions`, in name order.
fn files(path: &Path, extensions: &[String], out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    if path.is_file() {
        out.push(path.to_path_buf());
        return Ok(());
    }
    let mut entries: Vec<PathBuf> = std::fs::read_dir(path)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    entries.sort();
    for entry in entries {
        if entry.is_dir() {
            files(&entry, extensions, out)?;
        } else if (entry.extension().and_then(|e| e.to_str()))
            .is_some_and(|e| extensions.iter().any(|x| x == e))
        {
            out.push(entry);
        }
    }
    Ok(())
}

fn main() -> Result<(), String> {
    let args = Args::parse();
    let source = common::resolve_source(&args.model)?;
    let options = common::load_options(
        "as-stored",
        common::KvDtypeArg::F32,
        &mirror_sd::mirror_core::Device::Cpu,
        None,
        None,
    )?;
    let loaded = common::load_with_spinner("model", &source, &options)?;
    let mut list = Vec::new();
    for path in &args.paths {
        files(path, &args.extensions, &mut list).map_err(|e| format!("{}: {e}", path.display()))?;
    }
    let mut counts = vec![0u64; loaded.model.vocab_size()];
    let (mut bytes, mut tokens, mut used) = (0usize, 0u64, 0usize);
    for file in &list {
        if bytes >= args.max_bytes {
            break;
        }
        // Files that are not UTF-8 text are skipped.
        let Ok(text) = std::fs::read_to_string(file) else {
            continue;
        };
        bytes += text.len();
        used += 1;
        let ids = (loaded.tokenizer.encode(&text, false))
            .map_err(|e| format!("{}: {e}", file.display()))?;
        for id in ids {
            if let Some(count) = counts.get_mut(id as usize) {
                *count += 1;
                tokens += 1;
            }
        }
    }
    let mut ranking: Vec<u32> = (0..counts.len() as u32).collect();
    ranking.sort_by(|a, b| counts[*b as usize].cmp(&counts[*a as usize]).then(a.cmp(b)));
    let mut out = std::io::BufWriter::new(
        std::fs::File::create(&args.out).map_err(|e| format!("{}: {e}", args.out.display()))?,
    );
    for id in &ranking {
        writeln!(out, "{id}").map_err(|e| e.to_string())?;
    }
    out.flush().map_err(|e| e.to_string())?;
    let seen = counts.iter().filter(|&&c| c > 0).count();
    eprintln!(
        "{used} files, {bytes} bytes, {tokens} tokens, {seen} distinct; ranking of {} tokens in {}",
        ranking.len(),
        args.out.display()
    );
    Ok(())
}
