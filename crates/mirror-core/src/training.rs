//! Training lookahead tokens on a frozen draft with the future n-gram loss of Speculative
//! Streaming (Bhendawade et al., arXiv 2402.11131): `-sum_j a_j * log p_j(y_{t+1+j})`, lookahead `j`
//! of the anchor at `t` predicting the token `j` places after the main row's.
//!
//! Only the lookahead parameters get gradients. The layers below the lookahead rows are frozen and cheap to
//! skip: [`freeze`] runs them once per training sequence and keeps the states entering layer
//! `N - lookahead_layers` ([`FrozenSequence`]). A step then runs the main rows through the top layers
//! (no gradient) and the lookahead rows of a random subset of anchors through the same layers and the LM
//! head with differentiable kernels. Anchors do not see each other's lookahead rows, so training on a
//! subset is exact, and it keeps the LM head (the largest matrix) affordable on a CPU.
//!
//! [`AdamW`] is candle-nn's update rule with its moments exposed, so a checkpoint resumes exactly.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Tensor, Var, D};
use candle_nn::{Optimizer, ParamsAdamW};
use rand::{rngs::StdRng, seq::index::sample, Rng, SeedableRng};

use crate::config::LookaheadConfig;
use crate::error::{Error, Result};
use crate::formats::checkpoint::{self, Checkpoint};
use crate::mask::AttentionInput;
use crate::models::layers::Kernels;
use crate::models::lookahead::{lookahead_attention, LookaheadHead};
use crate::models::transformer::Model;

/// AdamW with decoupled weight decay (Loshchilov & Hutter, arXiv 1711.05101), the update of
/// `candle_nn::AdamW`, with its step count and moments readable for checkpoints.
#[derive(Debug)]
pub struct AdamW {
    vars: Vec<Var>,
    first: Vec<Tensor>,
    second: Vec<Tensor>,
    step: usize,
    params: ParamsAdamW,
}

impl Optimizer for AdamW {
    type Config = ParamsAdamW;

    fn new(vars: Vec<Var>, params: ParamsAdamW) -> candle_core::Result<Self> {
        let vars: Vec<Var> = vars.into_iter().filter(|v| v.dtype().is_float()).collect();
        let first = vars
            .iter()
            .map(|v| v.zeros_like())
            .collect::<candle_core::Result<Vec<_>>>()?;
        let second = first.clone();
        Ok(Self {
            vars,
            first,
            second,
            step: 0,
            params,
        })
    }

    fn step(&mut self, grads: &candle_core::backprop::GradStore) -> candle_core::Result<()> {
        self.step += 1;
        let p = &self.params;
        let correction1 = 1.0 - p.beta1.powi(self.step as i32);
        let correction2 = 1.0 - p.beta2.powi(self.step as i32);
        for ((var, m), v) in self
            .vars
            .iter()
            .zip(self.first.iter_mut())
            .zip(self.second.iter_mut())
        {
            let Some(g) = grads.get(var) else { continue };
            *m = ((&*m * p.beta1)? + (g * (1.0 - p.beta1))?)?;
            *v = ((&*v * p.beta2)? + (g.sqr()? * (1.0 - p.beta2))?)?;
            let m_hat = (&*m / correction1)?;
            let v_hat = (&*v / correction2)?;
            let decayed = (var.as_tensor() * (1.0 - p.lr * p.weight_decay))?;
            let update = (m_hat / (v_hat.sqrt()? + p.eps)?)?;
            var.set(&(decayed - (update * p.lr)?)?)?;
        }
        Ok(())
    }

    fn learning_rate(&self) -> f64 {
        self.params.lr
    }

    fn set_learning_rate(&mut self, lr: f64) {
        self.params.lr = lr;
    }
}

/// A training sequence with the frozen layers already run.
#[derive(Debug, Clone)]
pub struct FrozenSequence {
    /// The tokens.
    pub tokens: Vec<u32>,
    /// States entering layer `N - lookahead_layers`, `(tokens, hidden)`.
    pub middle: Tensor,
}

/// Runs the layers below the lookahead rows over `tokens` once (the part of the draft that never
/// changes during training).
pub fn freeze(model: &Model, lookahead_layers: usize, tokens: &[u32]) -> Result<FrozenSequence> {
    if lookahead_layers == 0 || lookahead_layers > model.num_layers() {
        return Err(Error::invalid(format!(
            "lookahead_layers must be in 1..={}",
            model.num_layers()
        )));
    }
    let split = model.num_layers() - lookahead_layers;
    let mut cache = model.new_cache(1, tokens.len())?;
    let input = AttentionInput::causal(1, tokens.len(), 0, model.device())?;
    let hidden = model.embed(&[tokens])?;
    let middle = model.forward_layers(&hidden, 0..split, &input, &mut cache)?;
    Ok(FrozenSequence {
        tokens: tokens.to_vec(),
        middle: middle.squeeze(0)?,
    })
}

/// Hyper-parameters of lookahead training (a plain serde struct, stored in checkpoints).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TrainSettings {
    /// Peak learning rate.
    pub learning_rate: f64,
    /// Steps of linear warm-up.
    pub warmup_steps: usize,
    /// Decoupled weight decay.
    pub weight_decay: f64,
    /// Loss weight `a_j` of lookahead `j` (one per lookahead token); the main row is frozen, so `a_0`
    /// would only add a constant.
    #[serde(rename = "stream_weights")]
    pub lookahead_weights: Vec<f64>,
    /// Anchors drawn per step (shared by the sequences of a batch).
    pub anchors_per_step: usize,
    /// Seed of the initial parameters and of the anchor draws.
    pub seed: u64,
}

impl TrainSettings {
    /// Defaults for `lookahead_tokens` tokens: learning rate 2e-3, 20 warm-up steps, no decay,
    /// weights `0.8^(j-1)`, 32 anchors.
    pub fn new(lookahead_tokens: usize, seed: u64) -> Self {
        Self {
            learning_rate: 2e-3,
            warmup_steps: 20,
            weight_decay: 0.0,
            lookahead_weights: (0..lookahead_tokens)
                .map(|j| 0.8f64.powi(j as i32))
                .collect(),
            anchors_per_step: 32,
            seed,
        }
    }
}

/// The labels of one training step's rows.
struct Labels {
    labels: Vec<u32>,
    weights: Vec<f32>,
    /// Which lookahead token (0-based) a row trains, `None` past the sequence's end.
    lookahead_of_row: Vec<Option<usize>>,
}

/// Loss and top-1 accuracy of each lookahead token over some anchors.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LookaheadReport {
    /// Weighted n-gram loss (what the optimiser minimises).
    pub loss: f64,
    /// Mean negative log-likelihood of each lookahead token's label.
    pub lookahead_loss: Vec<f64>,
    /// Fraction of anchors where each lookahead token's argmax is its label.
    pub lookahead_accuracy: Vec<f64>,
    /// Labelled anchors per lookahead token.
    pub counts: Vec<usize>,
}

impl LookaheadReport {
    /// Sums over labelled anchors become means.
    fn normalise(&mut self) {
        for j in 0..self.counts.len() {
            let n = self.counts[j].max(1) as f64;
            self.lookahead_loss[j] /= n;
            self.lookahead_accuracy[j] /= n;
        }
    }
}

/// Trains a [`LookaheadHead`] on a frozen draft.
pub struct LookaheadTrainer<'m> {
    model: &'m Model,
    config: LookaheadConfig,
    settings: TrainSettings,
    vars: [Var; 3],
    optimizer: AdamW,
}

impl<'m> LookaheadTrainer<'m> {
    /// A trainer with fresh parameters: `down` ~ N(0, 1/hidden), `up` = 0 (lookahead rows start as
    /// copies of their anchors, as in LoRA), embeddings ~ N(0, 0.02^2); seeded by the settings.
    pub fn new(model: &'m Model, config: LookaheadConfig, settings: TrainSettings) -> Result<Self> {
        let hidden = model.hidden_size();
        let mut rng = StdRng::seed_from_u64(settings.seed);
        // Box-Muller, so the draw depends on nothing but the seed.
        let mut normal = |n: usize, std: f64| -> Vec<f32> {
            (0..n)
                .map(|_| {
                    let u1: f64 = 1.0 - rng.random::<f64>();
                    let u2: f64 = rng.random();
                    let z = (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos();
                    (z * std) as f32
                })
                .collect()
        };
        let down = normal(config.rank * hidden, 1.0 / (hidden as f64).sqrt());
        let embeddings = normal(config.tokens * hidden, 0.02);
        let device = model.device();
        let down = Tensor::from_vec(down, (config.rank, hidden), device)?;
        let up = Tensor::zeros((hidden, config.rank), DType::F32, device)?;
        let embeddings = Tensor::from_vec(embeddings, (config.tokens, hidden), device)?;
        Self::from_parts(model, config, settings, [down, up, embeddings], None, 0)
    }

    fn from_parts(
        model: &'m Model,
        config: LookaheadConfig,
        settings: TrainSettings,
        params: [Tensor; 3],
        moments: Option<(Vec<Tensor>, Vec<Tensor>)>,
        step: usize,
    ) -> Result<Self> {
        if model.dtype() != DType::F32 {
            return Err(Error::invalid("lookahead training needs the draft in f32"));
        }
        if settings.lookahead_weights.len() != config.tokens {
            return Err(Error::invalid(format!(
                "{} lookahead weights for {} lookahead tokens",
                settings.lookahead_weights.len(),
                config.tokens
            )));
        }
        // Validates the shapes against the model before any step.
        let [down, up, embeddings] = params;
        LookaheadHead::from_tensors(config.clone(), down.clone(), up.clone(), embeddings.clone())?
            .check_fits(model.hidden_size(), model.num_layers())?;
        let vars = [
            Var::from_tensor(&down)?,
            Var::from_tensor(&up)?,
            Var::from_tensor(&embeddings)?,
        ];
        let mut optimizer = AdamW::new(
            vars.to_vec(),
            ParamsAdamW {
                lr: settings.learning_rate,
                weight_decay: settings.weight_decay,
                ..ParamsAdamW::default()
            },
        )?;
        if let Some((first, second)) = moments {
            optimizer.first = first;
            optimizer.second = second;
        }
        optimizer.step = step;
        Ok(Self {
            model,
            config,
            settings,
            vars,
            optimizer,
        })
    }

    /// Steps taken so far.
    pub fn step_count(&self) -> usize {
        self.optimizer.step
    }

    /// The lookahead config being trained.
    pub fn config(&self) -> &LookaheadConfig {
        &self.config
    }

    /// The current parameters as a head (a detached copy).
    pub fn head(&self) -> Result<LookaheadHead> {
        self.head_from(|t| Ok(t.detach().copy()?))
    }

    /// The parameters as a head whose tensors are the trainable variables themselves.
    fn trainable_head(&self) -> Result<LookaheadHead> {
        self.head_from(|t| Ok(t.clone()))
    }

    fn head_from(&self, take: impl Fn(&Tensor) -> Result<Tensor>) -> Result<LookaheadHead> {
        let [down, up, embeddings] = &self.vars;
        LookaheadHead::from_tensors(
            self.config.clone(),
            take(down.as_tensor())?,
            take(up.as_tensor())?,
            take(embeddings.as_tensor())?,
        )
    }

    /// Anchors with at least lookahead token 1 labelled, for sequences of `len` tokens.
    fn anchor_range(&self, len: usize) -> Result<usize> {
        if len < 3 {
            return Err(Error::invalid("training sequences need at least 3 tokens"));
        }
        Ok(len - 2)
    }

    /// The weighted loss (a scalar tensor with gradients to the lookahead parameters) and the
    /// report, over `anchors` of every sequence in `batch` (all of one length).
    fn loss(
        &self,
        batch: &[&FrozenSequence],
        anchors: &[usize],
    ) -> Result<(Tensor, LookaheadReport)> {
        let model = self.model;
        let device = model.device();
        let first = batch
            .first()
            .ok_or_else(|| Error::invalid("an empty training batch"))?;
        let len = first.tokens.len();
        if batch.iter().any(|s| s.tokens.len() != len) {
            return Err(Error::invalid(
                "a training batch needs sequences of one length",
            ));
        }
        let count = self.config.tokens;
        let split = model.num_layers() - self.config.layers;
        let middles: Vec<&Tensor> = batch.iter().map(|s| &s.middle).collect();
        let middle = Tensor::stack(&middles, 0)?;
        // Main rows through the top layers: no parameter of theirs trains, so no gradient.
        let mut cache = model.new_cache(batch.len(), len)?;
        let causal = AttentionInput::causal(1, len, 0, device)?;
        model.forward_layers(&middle, split..model.num_layers(), &causal, &mut cache)?;
        let index: Vec<u32> = anchors.iter().map(|&a| a as u32).collect();
        let index = Tensor::from_vec(index.clone(), anchors.len(), device)?;
        let anchor_states = middle.index_select(&index, 1)?;
        let mask: Vec<f32> = anchors
            .iter()
            .flat_map(|&a| (0..len).map(move |k| if k <= a { 0.0 } else { f32::NEG_INFINITY }))
            .collect();
        let mask = Tensor::from_vec(mask, (anchors.len(), len), device)?;
        let positions: Vec<u32> = anchors.iter().map(|&a| a as u32).collect();
        let input = lookahead_attention(&positions, Some(&mask), len, count, device)?;
        let head = self.trainable_head()?;
        let states =
            model.lookahead_hidden(&head, &anchor_states, &input, &cache, Kernels::Autograd)?;
        let logits = model.logits_with(&states, Kernels::Autograd)?;
        let rows = batch.len() * anchors.len() * count;
        let logits = logits.reshape((rows, model.vocab_size()))?;
        let Labels {
            labels,
            weights,
            lookahead_of_row,
        } = self.labels(batch, anchors);
        let total_weight: f32 = weights.iter().sum();
        if total_weight <= 0.0 {
            return Err(Error::invalid("no anchor has a label"));
        }
        let log_probs = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
        let label_tensor = Tensor::from_vec(labels.clone(), (rows, 1), device)?;
        let picked = log_probs.gather(&label_tensor, 1)?.squeeze(1)?;
        let weight_tensor = Tensor::from_vec(weights, rows, device)?;
        let loss = ((picked * weight_tensor)?.sum_all()? * (-1.0 / total_weight as f64))?;
        // The report, from host copies.
        let nll = log_probs
            .gather(&label_tensor, 1)?
            .squeeze(1)?
            .to_vec1::<f32>()?;
        let best = logits.argmax(D::Minus1)?.to_vec1::<u32>()?;
        let mut report = LookaheadReport {
            loss: loss.to_scalar::<f32>()? as f64,
            lookahead_loss: vec![0.0; count],
            lookahead_accuracy: vec![0.0; count],
            counts: vec![0; count],
        };
        for (row, token) in lookahead_of_row.iter().enumerate() {
            if let Some(j) = *token {
                report.counts[j] += 1;
                report.lookahead_loss[j] -= nll[row] as f64;
                if best[row] == labels[row] {
                    report.lookahead_accuracy[j] += 1.0;
                }
            }
        }
        report.normalise();
        Ok((loss, report))
    }

    /// Labels and loss weights, row-major over (sequence, anchor, lookahead token): token `j`
    /// of the anchor at `a` is labelled with the token at `a + 1 + j` (weight 0 past the end).
    fn labels(&self, batch: &[&FrozenSequence], anchors: &[usize]) -> Labels {
        let count = self.config.tokens;
        let rows = batch.len() * anchors.len() * count;
        let mut out = Labels {
            labels: Vec::with_capacity(rows),
            weights: Vec::with_capacity(rows),
            lookahead_of_row: Vec::with_capacity(rows),
        };
        for sequence in batch {
            let len = sequence.tokens.len();
            for &a in anchors {
                for j in 1..=count {
                    let target = a + 1 + j;
                    let valid = target < len;
                    out.labels
                        .push(if valid { sequence.tokens[target] } else { 0 });
                    out.weights.push(if valid {
                        self.settings.lookahead_weights[j - 1] as f32
                    } else {
                        0.0
                    });
                    out.lookahead_of_row.push(valid.then_some(j - 1));
                }
            }
        }
        out
    }

    /// One optimiser step on `batch` over freshly drawn anchors; returns the report before the
    /// update.
    pub fn step(&mut self, batch: &[&FrozenSequence]) -> Result<LookaheadReport> {
        let len = batch.first().map_or(0, |s| s.tokens.len());
        let range = self.anchor_range(len)?;
        let count = self.settings.anchors_per_step.min(range).max(1);
        // Anchors depend only on (seed, step), so a resumed run draws what an unbroken one would.
        let mut rng = StdRng::seed_from_u64(
            self.settings.seed
                ^ (self.optimizer.step as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15),
        );
        let mut anchors = sample(&mut rng, range, count).into_vec();
        anchors.sort_unstable();
        // Linear warm-up, then constant.
        let warmup = self.settings.warmup_steps.max(1) as f64;
        let scale = ((self.optimizer.step + 1) as f64 / warmup).min(1.0);
        self.optimizer
            .set_learning_rate(self.settings.learning_rate * scale);
        let (loss, report) = self.loss(batch, &anchors)?;
        self.optimizer.backward_step(&loss)?;
        Ok(report)
    }

    /// Loss and accuracy over every anchor of `sequences` (no update).
    pub fn evaluate(&self, sequences: &[FrozenSequence]) -> Result<LookaheadReport> {
        let mut total = LookaheadReport {
            lookahead_loss: vec![0.0; self.config.tokens],
            lookahead_accuracy: vec![0.0; self.config.tokens],
            counts: vec![0; self.config.tokens],
            ..LookaheadReport::default()
        };
        let mut weight = 0.0;
        for sequence in sequences {
            let range = self.anchor_range(sequence.tokens.len())?;
            let anchors: Vec<usize> = (0..range).collect();
            for chunk in anchors.chunks(self.settings.anchors_per_step.max(1)) {
                let (_, report) = self.loss(&[sequence], chunk)?;
                let n = report.counts.iter().sum::<usize>() as f64;
                total.loss += report.loss * n;
                weight += n;
                for j in 0..self.config.tokens {
                    let c = report.counts[j] as f64;
                    total.lookahead_loss[j] += report.lookahead_loss[j] * c;
                    total.lookahead_accuracy[j] += report.lookahead_accuracy[j] * c;
                    total.counts[j] += report.counts[j];
                }
            }
        }
        total.loss /= weight.max(1.0);
        for j in 0..self.config.tokens {
            let c = total.counts[j].max(1) as f64;
            total.lookahead_loss[j] /= c;
            total.lookahead_accuracy[j] /= c;
        }
        Ok(total)
    }

    /// Writes everything needed to resume (parameters, AdamW moments, step, settings).
    pub fn save_state(&self, path: &Path) -> Result<()> {
        let mut tensors: Vec<(String, Tensor)> = Vec::new();
        for (i, var) in self.vars.iter().enumerate() {
            tensors.push((format!("param.{i}"), var.as_tensor().detach()));
            tensors.push((format!("adam.first.{i}"), self.optimizer.first[i].clone()));
            tensors.push((format!("adam.second.{i}"), self.optimizer.second[i].clone()));
        }
        let metadata = HashMap::from([
            ("step".to_string(), checkpoint::json(&self.optimizer.step)?),
            ("config".to_string(), checkpoint::json(&self.config)?),
            ("settings".to_string(), checkpoint::json(&self.settings)?),
        ]);
        checkpoint::write(path, tensors, metadata)
    }

    /// Resumes from [`LookaheadTrainer::save_state`]. The checkpoint's config and settings win.
    pub fn resume(model: &'m Model, path: &Path) -> Result<Self> {
        let checkpoint = Checkpoint::read(path, model.device(), "lookahead training state")?;
        let step: usize = checkpoint.meta("step")?;
        let config: LookaheadConfig = checkpoint.meta("config")?;
        let settings: TrainSettings = checkpoint.meta("settings")?;
        let get = |kind: &str| -> Result<Vec<Tensor>> {
            (0..3)
                .map(|i| checkpoint.tensor(&format!("{kind}.{i}")))
                .collect()
        };
        let [down, up, embeddings]: [Tensor; 3] = get("param")?
            .try_into()
            .map_err(|_| Error::invalid("three lookahead parameters expected"))?;
        Self::from_parts(
            model,
            config,
            settings,
            [down, up, embeddings],
            Some((get("adam.first")?, get("adam.second")?)),
            step,
        )
    }
}
