//! The batch's draft phase, before the target's step: every sequence that drafts with the draft
//! model advances in the same ragged draft forwards. The first forward feeds each sequence's
//! prompt chunk (prefill) or the committed tokens its draft cache lacks (catch-up) and proposes
//! the first token of each window; every further forward feeds one token per window still
//! growing, until each window holds its tokens or ends at a stop token.
//!
//! A window is what [`crate::SpeculativeDecoding`] with fixed windows would draft alone (no
//! lookahead tokens): the same context, the same draft logits (rows are batch-invariant), the
//! same seeds ([`choose_draft_token`]). Under adaptive windows a sequence drafts one token more
//! than the batch's allocation kept of its last window, so that the draft's work follows what
//! the target's step can use, and no deeper than the depth priced with the draft's own measured
//! forwards ([`plan_draft_depth`]); verification is exact whatever the length.

use std::sync::Arc;
use std::time::{Duration, Instant};

use mirror_core::sampling::SamplingParams;
use mirror_core::{Model, RaggedSequence, RowLogits};

use super::sequence::{Phase, Sequence};
use crate::adaptive::batch::{drafting_could_pay, plan_draft_depth, DraftPlanOffer, StepCost};
use crate::adaptive::{TokenAcceptance, WindowPolicy};
use crate::draft::choose_draft_token;
use crate::error::{Error, Result};
use crate::generation::GenerationConfig;
use crate::run::window_room;
use crate::seed::mix;
use crate::stats::DraftCounters;
use crate::window::DraftWindow;

use super::request::Speculation;

/// Windows a drafting sequence drafts against the planner's price before the planner may stop
/// its drafting: until then it drafts at least one token a step, to learn its acceptance (a
/// pessimistic prior would otherwise keep a sequence that drafts well from ever drafting). They
/// are counted as drafted, not as verified, so that a step that trims them ends the exploring.
const EXPLORE_WINDOWS: usize = 3;

/// An acceptance rate few drafts exceed on open text: where drafting would not pay even at
/// this rate (a full batch on a CPU whose rows are dear), exploring windows are pure cost (at 4
/// sequences on a Zen 4 host, 5% of a 64-token decode), so none are drafted.
const OPTIMISTIC_RATE: f64 = 0.9;

/// Judged tokens of pooled evidence from which a new drafting sequence starts from the
/// engine's measured acceptance instead of exploring (see [`seed_acceptance`]).
const POOLED_EVIDENCE: f64 = 6.0;

/// Judged tokens the pooled rate weighs in a new sequence's estimate: its own windows soon
/// outweigh it.
const SEED_WEIGHT: f64 = 4.0;

/// A new drafting sequence starts from the acceptance earlier sequences measured with the
/// engine's draft, once there is enough of it, and then needs no exploring windows: the planner
/// prices it from that rate until its own windows take over.
pub(super) fn seed_acceptance(sequence: &mut Sequence, pooled: &TokenAcceptance) {
    if !sequence.speculation.uses_draft_model() || pooled.judged() < POOLED_EVIDENCE {
        return;
    }
    if let Some(side) = sequence.draft.as_mut() {
        side.explored = EXPLORE_WINDOWS;
        sequence.acceptance = TokenAcceptance::seeded_from(pooled, SEED_WEIGHT);
    }
}

/// What one sequence feeds the next draft forward.
struct Feed {
    /// Index into the running sequences.
    index: usize,
    tokens: Vec<u32>,
    /// Whether the forward's last row proposes a window token (else a prompt chunk).
    proposes: bool,
}

/// A window growing during the draft phase.
struct Growing {
    index: usize,
    count: usize,
    seed: u64,
    params: SamplingParams,
}

/// The draft sampling a sequence uses: a point mass when it is greedy or asks for greedy drafts.
fn draft_params(config: &GenerationConfig, speculation: Speculation) -> SamplingParams {
    match speculation {
        Speculation::Draft {
            greedy_draft: true, ..
        } => SamplingParams::greedy(),
        _ => config.sampling,
    }
}

/// What the draft phase works with: the draft, how windows are sized, and the measured cost
/// lines of the target's steps and of the draft's forwards (the latter recorded here).
pub(super) struct DraftPhase<'a> {
    pub draft: &'a Model,
    pub policy: WindowPolicy,
    pub prefill_chunk: usize,
    pub target_cost: &'a StepCost,
    pub draft_cost: &'a mut StepCost,
}

/// What the planner allows this step.
#[derive(Clone, Copy)]
struct Plan {
    /// The depth every drafting sequence drafts to ([`plan_draft_depth`]).
    depth: usize,
    /// Whether drafting would pay at [`OPTIMISTIC_RATE`]: when not, no sequence explores,
    /// since no acceptance it could measure would make its drafts pay.
    worth_exploring: bool,
    /// Whether drafting would not pay at [`OPTIMISTIC_RATE`] even with every prompt now
    /// prefilling decoding beside the others, its draft ready: then those prompts' draft rows
    /// wait (see `DraftSide::deferred`).
    defer_prefill: bool,
}

/// The plan for this step, priced with both cost lines ([`plan_draft_depth`]); `None` (no limit)
/// under fixed windows or before both lines have a measured step.
fn step_plan(phase: &DraftPhase<'_>, running: &[Sequence]) -> Option<Plan> {
    if phase.policy != WindowPolicy::Adaptive {
        return None;
    }
    let (target, draft) = (phase.target_cost, &*phase.draft_cost);
    target.seconds(1)?;
    draft.seconds(1)?;
    let decoding: Vec<&Sequence> = running
        .iter()
        .filter(|s| s.is_decoding() && !s.done())
        .collect();
    let offers: Vec<DraftPlanOffer> = decoding
        .iter()
        .filter_map(|s| {
            let Speculation::Draft { gamma, .. } = s.speculation else {
                return None;
            };
            let side = s.draft.as_ref()?;
            let common = side.common_prefix(&s.seq);
            // A draft that fell behind while not drafting catches up once, not every step:
            // priced as a step's catch-up at most (the last token and an accepted window), so
            // that a pause in drafting does not make resuming look ever dearer. A deferred
            // prompt prefill is priced whole: resuming pays for every row of it.
            let behind = s.seq.len() - common.min(s.seq.len().saturating_sub(1));
            Some(DraftPlanOffer {
                rate: s.acceptance.rate(),
                tokens: gamma.min(window_room(&s.cache.cache)),
                catch_up: match side.deferred {
                    true => behind,
                    false => behind.min(gamma + 1),
                },
            })
        })
        .collect();
    let rows = decoding.len();
    let target_seconds = |r| target.seconds(r).unwrap_or(f64::EPSILON);
    let draft_seconds = |r| draft.seconds(r).unwrap_or(f64::EPSILON);
    let depth = plan_draft_depth(rows, rows as f64, &offers, target_seconds, draft_seconds);
    let could_pay = |offers: &[DraftPlanOffer]| {
        let rows = offers.len().max(rows);
        let (target, draft) = (target_seconds, draft_seconds);
        drafting_could_pay(rows, rows as f64, offers, OPTIMISTIC_RATE, target, draft)
    };
    let worth_exploring = depth > 0 || could_pay(&offers);
    // The prompts prefilling now, as if decoding with their drafts ready; priced only when
    // there are any (the planner's search is exhaustive).
    let prefilling: Vec<DraftPlanOffer> = running
        .iter()
        .filter_map(|s| match s.speculation {
            Speculation::Draft { gamma, .. } if matches!(s.phase, Phase::Prefill) && !s.done() => {
                Some(DraftPlanOffer {
                    rate: s.acceptance.rate(),
                    tokens: gamma,
                    catch_up: 1,
                })
            }
            _ => None,
        })
        .collect();
    let defer_prefill = !prefilling.is_empty() && !could_pay(&[offers, prefilling].concat());
    Some(Plan {
        depth,
        worth_exploring,
        defer_prefill,
    })
}

/// Runs the draft phase over `running` (see the module docs). Sequences whose draft forward
/// fails are marked failed; the others go on.
pub(super) fn draft_phase(phase: DraftPhase<'_>, running: &mut [Sequence]) {
    let plan = step_plan(&phase, running);
    let DraftPhase {
        draft,
        policy,
        prefill_chunk,
        draft_cost,
        ..
    } = phase;
    let mut feeds = Vec::new();
    let mut growing = Vec::new();
    for (index, sequence) in running.iter_mut().enumerate() {
        if sequence.done() {
            continue;
        }
        let limits = Limits {
            policy,
            prefill_chunk,
            plan,
        };
        if let Some(feed) = first_feed(index, sequence, draft, limits, &mut growing) {
            feeds.push(feed);
        }
    }
    let mut first = true;
    while !feeds.is_empty() {
        let started = Instant::now();
        let logits = match forward(draft, running, &feeds) {
            Ok(logits) => logits,
            Err(e) => {
                let shared = Arc::new(e);
                for feed in &feeds {
                    running[feed.index].failed = Some(Error::StepFailed {
                        source: Arc::clone(&shared),
                    });
                }
                return;
            }
        };
        let busy = started.elapsed();
        // Prompt chunks price prefill, not drafting: only forwards that propose are timed.
        if feeds.iter().all(|f| f.proposes) {
            draft_cost.record(feeds.iter().map(|f| f.tokens.len()).sum(), busy);
        }
        let proposing = feeds.iter().filter(|f| f.proposes).count().max(1);
        let mut next = Vec::new();
        for (feed, rows_logits) in feeds.iter().zip(logits) {
            let sequence = &mut running[feed.index];
            if let Some(side) = sequence.draft.as_mut() {
                side.tokens.extend_from_slice(&feed.tokens);
            }
            if !feed.proposes {
                // A prompt chunk: the sequence may decode from the next step on.
                sequence.decode_once_prefilled();
                continue;
            }
            let Some(grow) = growing.iter().find(|g| g.index == feed.index) else {
                continue;
            };
            let Some(last) = rows_logits.last() else {
                continue;
            };
            record(sequence, feed.tokens.len(), busy / proposing as u32, first);
            if let Some(token) = propose(sequence, grow, last) {
                next.push(Feed {
                    index: feed.index,
                    tokens: vec![token],
                    proposes: true,
                });
            }
        }
        feeds = next;
        first = false;
    }
}

/// The first feed of `sequence`: its next prompt chunk while its draft cache prefills, or, in
/// decode, the committed tokens its draft cache lacks (at least the last one, whose logits start
/// the window), with its window registered in `growing`.
/// How far a sequence's first feed may go: its prompt chunk, and its window under the policy
/// and the planned depth.
#[derive(Clone, Copy)]
struct Limits {
    policy: WindowPolicy,
    prefill_chunk: usize,
    plan: Option<Plan>,
}

fn first_feed(
    index: usize,
    sequence: &mut Sequence,
    draft: &Model,
    limits: Limits,
    growing: &mut Vec<Growing>,
) -> Option<Feed> {
    let Limits {
        policy,
        prefill_chunk,
        plan,
    } = limits;
    let depth = plan.map(|p| p.depth);
    let Speculation::Draft { gamma, .. } = sequence.speculation else {
        return None;
    };
    let params = draft_params(&sequence.config, sequence.speculation);
    let seq_len = sequence.seq.len();
    let room = window_room(&sequence.cache.cache);
    let seed = mix(sequence.config.seed, sequence.decode_steps);
    let target_ready = sequence.cache.cache.len() + 1 >= seq_len;
    let side = sequence.draft.as_mut()?;
    side.drafted = DraftWindow::default();
    side.exploring = false;
    if matches!(sequence.phase, Phase::Prefill) {
        // No acceptance could make drafting pay this step even with this prompt decoding (a
        // full batch where rows are dear): its draft rows would be pure cost, so they wait; the
        // sequence may decode once the target has its prompt. Decided again each step while
        // the prompt prefills.
        side.deferred = plan.is_some_and(|p| p.defer_prefill);
        if side.deferred {
            sequence.decode_once_prefilled();
            return None;
        }
        let cached = side.tokens.len();
        let end = (seq_len - 1).min(cached + prefill_chunk);
        if !target_ready || end < seq_len - 1 {
            return (cached < end).then(|| Feed {
                index,
                tokens: sequence.seq[cached..end].to_vec(),
                proposes: false,
            });
        }
        // The target's rows came from the prefix cache and this chunk ends the draft's
        // prefill: the sequence decodes from this step on, as it would alone, with its first
        // window drafted by this very forward (the chunk's last row proposes).
        sequence.enter_decode();
    }
    let side = sequence.draft.as_mut()?;
    match sequence.phase {
        Phase::Prefill => None,
        Phase::Decode => {
            // Drafted tokens stay where the target can verify them and the draft can see them.
            let position_limit = sequence.cache.cache.capacity().min(draft.context_limit());
            let mut count = gamma.min(room).min(position_limit.saturating_sub(seq_len));
            if policy == WindowPolicy::Adaptive {
                if let Some(kept) = side.last_kept {
                    count = count.min(kept + 1);
                }
                // Where the draft's forwards cost more than their tokens save, none run; but a
                // sequence with too few windows to know its acceptance drafts one token, so that
                // the planner prices it by evidence and not by its prior alone, unless no
                // acceptance could make drafting pay.
                let exploring = side.explored < EXPLORE_WINDOWS
                    && plan.is_some_and(|p| p.depth == 0 && p.worth_exploring);
                count = count.min(depth.unwrap_or(count).max(usize::from(exploring)));
                side.exploring = exploring && count > 0;
                side.explored += usize::from(side.exploring);
            }
            if count == 0 {
                return None;
            }
            let mut common = side.common_prefix(&sequence.seq);
            if common == seq_len {
                // Everything is cached but the logits after it: feed the last token again.
                common -= 1;
            }
            side.truncate(common);
            if seq_len - common > prefill_chunk + 1 {
                // A draft far behind (its prompt prefill was deferred) catches up in prompt-sized
                // chunks first, as a prefill would; it drafts once the rest fits one forward.
                if side.exploring {
                    side.exploring = false;
                    side.explored -= 1;
                }
                return Some(Feed {
                    index,
                    tokens: sequence.seq[common..common + prefill_chunk].to_vec(),
                    proposes: false,
                });
            }
            growing.push(Growing {
                index,
                count,
                seed,
                params,
            });
            Some(Feed {
                index,
                tokens: sequence.seq[common..].to_vec(),
                proposes: true,
            })
        }
    }
}

/// One ragged draft forward over `feeds`; each proposing feed gets its rows' logits.
fn forward(draft: &Model, running: &mut [Sequence], feeds: &[Feed]) -> Result<Vec<Vec<Vec<f32>>>> {
    // Each feed names a distinct sequence; take their draft caches in the feeds' order.
    let mut caches: Vec<Option<&mut mirror_core::KvCache>> = running
        .iter_mut()
        .map(|s| s.draft.as_mut().map(|d| &mut d.cache.cache))
        .collect();
    let mut inputs = Vec::with_capacity(feeds.len());
    for feed in feeds {
        let cache = caches[feed.index]
            .take()
            .ok_or_else(|| Error::InvalidConfig("a drafting sequence has no draft cache".into()))?;
        inputs.push(RaggedSequence {
            tokens: &feed.tokens,
            // Only a proposing feed's last row starts (or grows) a window; catch-up rows
            // before it need no logits.
            logits: match feed.proposes {
                true => RowLogits::Last,
                false => RowLogits::Nothing,
            },
            cache,
        });
    }
    Ok(draft.forward_ragged(&mut inputs)?)
}

/// Proposes the window's next token from `logits`; returns it when the window grows on. Under
/// penalties the draft proposes from its own logits penalized as the target's row there will be
/// (the committed tokens and the window so far), so that its proposals stay likely under the
/// penalized target (verification is exact either way: it sees the distribution each token was
/// drawn from).
fn propose(sequence: &mut Sequence, grow: &Growing, logits: &[f32]) -> Option<u32> {
    let stop = sequence.output.stop();
    let penalized = (!sequence.config.penalties.is_neutral()).then(|| {
        let (prompt, output) = sequence.seq.split_at(sequence.prompt_len());
        let drafted = sequence
            .draft
            .as_ref()
            .map_or(&[][..], |d| &d.drafted.tokens[..]);
        (sequence.config.penalties).penalized_next(logits, prompt, output, drafted)
    });
    let logits = penalized.as_deref().unwrap_or(logits);
    let side = sequence.draft.as_mut()?;
    let window = &mut side.drafted;
    let (token, choice) = choose_draft_token(logits, &grow.params, grow.seed, window.len());
    window.tokens.push(token);
    window.choices.push(choice);
    (window.len() < grow.count && !stop.contains(token)).then_some(token)
}

/// Counts one draft step of `sequence` (its share of the forward's time).
fn record(sequence: &mut Sequence, rows: usize, busy: Duration, first: bool) {
    let counters = DraftCounters {
        forwards: 1,
        busy,
        steps: 1,
        tokens: 1,
        step_forwards: usize::from(!first || rows <= 2),
        step_busy: if !first || rows <= 2 {
            busy
        } else {
            Duration::ZERO
        },
        typical_step: None,
    };
    sequence.stats.record_draft(counters);
}
