//! Distributions over a vocabulary, dense or sparse.

/// A probability distribution over a vocabulary of [`Probs::len`] tokens, stored densely or, when
/// few tokens have mass, as `(token, probability)` entries in ascending token order.
#[derive(Debug, Clone, PartialEq)]
pub struct Probs {
    len: usize,
    repr: Repr,
}

#[derive(Debug, Clone, PartialEq)]
enum Repr {
    Dense(Vec<f32>),
    /// Ascending token order; tokens absent have probability 0.
    Sparse(Vec<(u32, f32)>),
}

impl From<Vec<f32>> for Probs {
    fn from(values: Vec<f32>) -> Self {
        Self::dense(values)
    }
}

impl Probs {
    /// A dense distribution.
    pub fn dense(values: Vec<f32>) -> Self {
        Self {
            len: values.len(),
            repr: Repr::Dense(values),
        }
    }

    /// A sparse distribution over `len` tokens: the given entries, every other token 0. Entries
    /// are sorted by token; `None` if a token is out of range or repeated.
    pub fn sparse(len: usize, mut entries: Vec<(u32, f32)>) -> Option<Self> {
        entries.sort_by_key(|e| e.0);
        let in_range = entries.last().is_none_or(|e| (e.0 as usize) < len);
        let distinct = entries.windows(2).all(|w| w[0].0 < w[1].0);
        (in_range && distinct).then_some(Self {
            len,
            repr: Repr::Sparse(entries),
        })
    }

    /// The point mass on `token` over `len` tokens.
    pub fn point(len: usize, token: u32) -> Self {
        let entries = if (token as usize) < len {
            vec![(token, 1.0)]
        } else {
            Vec::new()
        };
        Self {
            len,
            repr: Repr::Sparse(entries),
        }
    }

    /// Size of the vocabulary.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True for a distribution over no tokens.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether the entries are stored sparsely.
    pub fn is_sparse(&self) -> bool {
        matches!(self.repr, Repr::Sparse(_))
    }

    /// Number of stored values (the vocabulary size when dense).
    pub fn stored(&self) -> usize {
        match &self.repr {
            Repr::Dense(v) => v.len(),
            Repr::Sparse(e) => e.len(),
        }
    }

    /// Probability of `token` (0 outside the vocabulary).
    pub fn get(&self, token: u32) -> f32 {
        match &self.repr {
            Repr::Dense(v) => v.get(token as usize).copied().unwrap_or(0.0),
            Repr::Sparse(e) => e
                .binary_search_by_key(&token, |x| x.0)
                .map_or(0.0, |i| e[i].1),
        }
    }

    /// The tokens of positive probability with their probabilities, in ascending token order.
    pub fn nonzero(&self) -> Box<dyn Iterator<Item = (u32, f32)> + '_> {
        match &self.repr {
            Repr::Dense(v) => Box::new(
                v.iter()
                    .enumerate()
                    .filter(|(_, &p)| p > 0.0)
                    .map(|(i, &p)| (i as u32, p)),
            ),
            Repr::Sparse(e) => Box::new(e.iter().copied().filter(|&(_, p)| p > 0.0)),
        }
    }

    /// The distribution as a vocabulary-sized vector.
    pub fn to_dense(&self) -> Vec<f32> {
        match &self.repr {
            Repr::Dense(v) => v.clone(),
            Repr::Sparse(e) => {
                let mut out = vec![0.0; self.len];
                for &(t, p) in e {
                    out[t as usize] = p;
                }
                out
            }
        }
    }

    /// Draws a token with a uniform number `u` in `[0, 1)`: the inverse CDF in token order, as
    /// [`sample`] does on the dense vector.
    pub fn sample(&self, u: f64) -> u32 {
        match &self.repr {
            Repr::Dense(v) => sample(v, u),
            Repr::Sparse(e) => {
                let total: f64 = e.iter().map(|&(_, p)| p as f64).sum();
                let target = u * total;
                let mut cumulative = 0.0;
                let mut last_positive = 0;
                for &(t, p) in e {
                    if p > 0.0 {
                        cumulative += p as f64;
                        last_positive = t;
                        if target < cumulative {
                            return t;
                        }
                    }
                }
                last_positive
            }
        }
    }

    /// The same distribution with every value divided by `total` (entries of value 0 dropped
    /// from a sparse form).
    pub(super) fn scaled(len: usize, entries: Vec<(u32, f64)>, total: f64, dense: bool) -> Self {
        if dense {
            let mut out = vec![0.0f32; len];
            for (t, w) in entries {
                out[t as usize] = (w / total) as f32;
            }
            Self::dense(out)
        } else {
            Self {
                len,
                repr: Repr::Sparse(
                    entries
                        .into_iter()
                        .filter(|&(_, w)| w > 0.0)
                        .map(|(t, w)| (t, (w / total) as f32))
                        .collect(),
                ),
            }
        }
    }
}

/// Draws from `probs` with a uniform number `u` in `[0, 1)` (inverse CDF, in index order).
pub fn sample(probs: &[f32], u: f64) -> u32 {
    let total: f64 = probs.iter().map(|&p| p as f64).sum();
    let target = u * total;
    let mut cumulative = 0.0;
    let mut last_positive = 0;
    for (i, &p) in probs.iter().enumerate() {
        if p > 0.0 {
            cumulative += p as f64;
            last_positive = i;
            if target < cumulative {
                return i as u32;
            }
        }
    }
    last_positive as u32
}
