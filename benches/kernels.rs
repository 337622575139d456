//! Quantized matmul of m activation rows (m = 1, 2, 4, 8, 16, 32) against real tensors of the
//! default pair, mirror-core's kernels beside candle's `QMatMul` on the same bytes, in one run.
//! Both use all cores of the machine (rayon's global pool and candle's own pool).
//!
//! `python3 scripts/fetch_models.py qwen && cargo bench --bench kernels`
//! (`MIRROR_SD_KERNEL=avx2|portable` times the other code paths; `-- q4k` filters.)

use std::path::PathBuf;
use std::time::Duration;

use candle_core::quantized::{gguf_file, QMatMul};
use candle_core::{Device, Module, Tensor};
use criterion::{criterion_group, criterion_main, Criterion};
use mirror_sd::mirror_core::kernels::{matmul, KernelPath, PackedMatrix, WeightType};

fn model(name: &str) -> Option<PathBuf> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("models")
        .join(name);
    path.is_file().then_some(path)
}

/// The tensors: (label, file, GGUF name).
const TENSORS: [(&str, &str, &str); 6] = [
    ("1.5b_q4k_attn_q_1536x1536", TARGET, "blk.0.attn_q.weight"),
    ("1.5b_q4k_ffn_up_8960x1536", TARGET, "blk.0.ffn_up.weight"),
    (
        "1.5b_q6k_ffn_down_1536x8960",
        TARGET,
        "blk.0.ffn_down.weight",
    ),
    ("1.5b_q6k_head_151936x1536", TARGET, "output.weight"),
    ("0.5b_q5_0_ffn_up_4864x896", DRAFT, "blk.0.ffn_up.weight"),
    ("0.5b_q8_0_head_151936x896", DRAFT, "output.weight"),
];
const TARGET: &str = "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf";
const DRAFT: &str = "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf";

fn bench(c: &mut Criterion) {
    let path = KernelPath::selected();
    eprintln!("mirror-core kernel path: {path:?}");
    for (label, file, name) in TENSORS {
        let Some(file_path) = model(file) else {
            eprintln!("skipping {label}: run `python3 scripts/fetch_models.py qwen` first");
            continue;
        };
        let mut reader = std::fs::File::open(&file_path).unwrap();
        let content = gguf_file::Content::read(&mut reader).unwrap();
        let info = &content.tensor_infos[name];
        let qtensor = info
            .read(&mut reader, content.tensor_data_offset, &Device::Cpu)
            .unwrap();
        let (rows, cols) = qtensor.shape().dims2().unwrap();
        let ty = WeightType::from_ggml(qtensor.dtype()).unwrap();
        let packed =
            PackedMatrix::from_ggml_bytes(ty, &qtensor.data().unwrap(), rows, cols).unwrap();
        let candle = QMatMul::from_qtensor(qtensor).unwrap();

        let mut group = c.benchmark_group(label);
        group
            .sample_size(20)
            .measurement_time(Duration::from_secs(2))
            .warm_up_time(Duration::from_millis(500));
        for m in [1usize, 2, 4, 8, 16, 32] {
            let x: Vec<f32> = (0..m * cols)
                .map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0)
                .collect();
            let mut out = vec![0f32; m * rows];
            group.bench_function(format!("mirror_core/m_{m}"), |b| {
                b.iter(|| matmul(path, &[&packed], &x, m, &mut out).unwrap())
            });
            let xt = Tensor::from_vec(x.clone(), (m, cols), &Device::Cpu).unwrap();
            group.bench_function(format!("candle_qmatmul/m_{m}"), |b| {
                b.iter(|| candle.forward(&xt).unwrap())
            });
        }
        group.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
