//! Quantized matmul of m activation rows (m = 1, 2, 4, 8, 16, 32) against real tensors of the
//! default pair, mirror-core's kernels beside candle's `QMatMul` on the same bytes, in one run.
//! Both use all cores of the machine (a rayon pool of every core, ours timed on one of its
//! workers, and candle's own pool).
//!
//! `python3 scripts/fetch_models.py qwen && cargo bench --bench kernels`
//! (`-- ggml_types` alone times every GGML type on one matrix, candle beside ours.)
//! (`MIRROR_SD_KERNEL=avx2|portable` times the other code paths; `-- q4k` filters.)

use std::path::PathBuf;
use std::time::{Duration, Instant};

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
    let pool = rayon::ThreadPoolBuilder::new().build().unwrap();
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
            // Timed on a worker of the pool, as a model's forward calls the kernels: from
            // criterion's own thread, outside any pool, 2-thread calls of 16 rows read about a
            // third slower (BENCHMARKS.md, 2026-12-08, later).
            group.bench_function(format!("mirror_core/m_{m}"), |b| {
                b.iter_custom(|iters| {
                    pool.install(|| {
                        let started = Instant::now();
                        for _ in 0..iters {
                            matmul(path, &[&packed], &x, m, &mut out).unwrap();
                        }
                        started.elapsed()
                    })
                })
            });
            let xt = Tensor::from_vec(x.clone(), (m, cols), &Device::Cpu).unwrap();
            group.bench_function(format!("candle_qmatmul/m_{m}"), |b| {
                b.iter(|| candle.forward(&xt).unwrap())
            });
        }
        group.finish();
    }
}

/// Which GGML types have a fast kernel: every type on one 8192 x 4096 matrix (larger than the
/// L3 cache, so each call streams it from memory) at m = 1, candle's `QMatMul` beside ours. A
/// type ours does not read (Q2_K, Q3_K) is timed as the Q8_0 it is requantized to at load.
fn bench_types(c: &mut Criterion) {
    use candle_core::quantized::{GgmlDType, QTensor};
    let (rows, cols) = (8192usize, 4096usize);
    let weights: Vec<f32> = (0..rows * cols)
        .map(|i| ((i as u64 * 2_654_435_761) % 2000) as f32 / 1000.0 - 1.0)
        .collect();
    let tensor = Tensor::from_vec(weights, (rows, cols), &Device::Cpu).unwrap();
    let x: Vec<f32> = (0..cols).map(|i| (i % 17) as f32 / 8.0 - 1.0).collect();
    let xt = Tensor::from_vec(x.clone(), (1, cols), &Device::Cpu).unwrap();
    let mut group = c.benchmark_group("ggml_types_8192x4096_m_1");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(2))
        .warm_up_time(Duration::from_millis(500));
    for dtype in [
        GgmlDType::Q4_0,
        GgmlDType::Q4_1,
        GgmlDType::Q5_0,
        GgmlDType::Q5_1,
        GgmlDType::Q8_0,
        GgmlDType::Q2K,
        GgmlDType::Q3K,
        GgmlDType::Q4K,
        GgmlDType::Q5K,
        GgmlDType::Q6K,
    ] {
        let q = QTensor::quantize(&tensor, dtype).unwrap();
        let ours_type = WeightType::from_ggml(dtype).unwrap_or(WeightType::Q8_0);
        let packed = if ours_type.ggml() == dtype {
            PackedMatrix::from_ggml_bytes(ours_type, &q.data().unwrap(), rows, cols).unwrap()
        } else {
            let dequantized = q.dequantize(&Device::Cpu).unwrap();
            let values = dequantized.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            PackedMatrix::quantize(ours_type, &values, rows, cols).unwrap()
        };
        let candle = QMatMul::from_qtensor(q).unwrap();
        let name = format!("{dtype:?}");
        group.bench_function(format!("candle_qmatmul/{name}"), |b| {
            b.iter(|| candle.forward(&xt).unwrap())
        });
        let mut out = vec![0f32; rows];
        group.bench_function(format!("mirror_core/{name}_as_{ours_type:?}"), |b| {
            b.iter(|| matmul(KernelPath::selected(), &[&packed], &x, 1, &mut out).unwrap())
        });
    }
    group.finish();
}

criterion_group!(benches, bench, bench_types);
criterion_main!(benches);
