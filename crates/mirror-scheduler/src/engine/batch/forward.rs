//! The batch's forward and settle phases: one ragged target forward over every offered row,
//! with the early-exit tap of the Mirror sequences halfway, then each sequence settles.

use std::time::Instant;

use mirror_core::{RaggedSequence, RowLogits};

use super::mirror::{tap_and_send, target_done, Tapped};
use super::sequence::{settle_all, Sequence};
use super::BatchCore;
use crate::error::Result;
use crate::seed::mix;

impl BatchCore {
    /// The ragged forward over every offered row (run to the early-exit layer first when Mirror
    /// sequences take part: their trees are drafted while the target runs the rest), then each
    /// sequence settles.
    pub(super) fn forward_and_settle(&mut self) -> Result<()> {
        let mut offered: Vec<&mut Sequence> = self
            .running
            .iter_mut()
            .filter(|s| !s.fed.is_empty())
            .collect();
        // Monitored decode rows also bring back a layer's hidden states (same forward).
        let capture: Vec<Option<usize>> = offered.iter().map(|s| s.hidden_layer()).collect();
        let decoding: Vec<bool> = offered.iter().map(|s| s.is_decoding()).collect();
        let mut inputs: Vec<RaggedSequence<'_>> = Vec::with_capacity(offered.len());
        let mut tapped: Vec<Tapped<'_>> = Vec::new();
        for (index, sequence) in offered.iter_mut().enumerate() {
            let Sequence {
                fed,
                cache,
                mirror,
                window,
                config,
                decode_steps,
                ..
            } = &mut **sequence;
            inputs.push(RaggedSequence {
                tokens: fed,
                logits: match decoding[index] {
                    true => RowLogits::Every,
                    false => RowLogits::Nothing,
                },
                cache: &mut cache.cache,
            });
            match mirror.as_mut() {
                Some(side) if decoding[index] && side.is_running() => tapped.push(Tapped {
                    index,
                    side,
                    window,
                    // As a Mirror sequence alone seeds its step's tree.
                    seed: mix(config.seed, *decode_steps),
                }),
                _ => {}
            }
        }
        let rows: usize = inputs.iter().map(|i| i.tokens.len()).sum();
        let started = Instant::now();
        let mut pass = self.target.begin_ragged(&mut inputs, &capture)?;
        if let Some(shared) = &self.mirror {
            tap_and_send(shared, &mut pass, &mut tapped)?;
        }
        let (logits, hidden) = pass.finish()?;
        target_done(&tapped);
        self.step_cost.record(rows, started.elapsed());
        drop(tapped);
        drop(inputs);
        settle_all(offered, logits, hidden);
        Ok(())
    }
}
