//! Attention masks and position ids: causal with an offset, token trees, and arbitrary per-row
//! visibility over the cache (what a draft needs to grow many branches in one pass).
//!
//! Masks are additive: `0.0` where a query may attend, `-inf` elsewhere, shaped
//! `(queries, keys)` for one row or `(batch, queries, keys)` for a batch.

use candle_core::{Device, Tensor};

use crate::error::{Error, Result};

/// Positions and mask of the tokens fed to one forward pass.
#[derive(Debug, Clone)]
pub struct AttentionInput {
    /// Position id of every new token, `(batch, tokens)`, `u32`.
    pub positions: Tensor,
    /// Additive mask over `cached + new` keys, or `None` when every new token may see every key
    /// (a single decoded token).
    pub mask: Option<Tensor>,
}

impl AttentionInput {
    /// Causal attention for `seq_len` new tokens after `offset` cached ones, for every row of a
    /// batch (rows are independent sequences of equal length).
    pub fn causal(batch: usize, seq_len: usize, offset: usize, device: &Device) -> Result<Self> {
        if seq_len == 0 {
            return Err(Error::invalid("a forward needs at least one token"));
        }
        let row: Vec<u32> = (offset..offset + seq_len).map(|p| p as u32).collect();
        let positions: Vec<u32> = (0..batch).flat_map(|_| row.iter().copied()).collect();
        let positions = Tensor::from_vec(positions, (batch, seq_len), device)?;
        let mask = if seq_len == 1 {
            None
        } else {
            let kv_len = offset + seq_len;
            let data: Vec<f32> = (0..seq_len)
                .flat_map(|i| (0..kv_len).map(move |j| visible(j <= offset + i)))
                .collect();
            Some(Tensor::from_vec(data, (seq_len, kv_len), device)?)
        };
        Ok(Self { positions, mask })
    }

    /// A token tree after `prefix_len` cached positions: node `i` sees the prefix, its ancestors
    /// and itself, never its siblings; its position is `prefix_len + depth`.
    pub fn tree(tree: &TokenTree, prefix_len: usize, device: &Device) -> Result<Self> {
        let rows: Vec<RowVisibility> = (0..tree.len())
            .map(|i| RowVisibility {
                position: prefix_len + tree.depth(i),
                prefix_len,
                extra: tree
                    .path_to(i)
                    .into_iter()
                    .map(|n| prefix_len + n)
                    .collect(),
            })
            .collect();
        Self::from_rows(&rows, prefix_len + tree.len(), device)
    }

    /// One row per new token, each with its own view of the keys (batch 1). `kv_len` is the
    /// number of keys after the new tokens are appended.
    pub fn from_rows(rows: &[RowVisibility], kv_len: usize, device: &Device) -> Result<Self> {
        if rows.is_empty() {
            return Err(Error::invalid("a forward needs at least one token"));
        }
        let mut data = vec![f32::NEG_INFINITY; rows.len() * kv_len];
        for (i, row) in rows.iter().enumerate() {
            let line = &mut data[i * kv_len..(i + 1) * kv_len];
            if row.prefix_len > kv_len || row.extra.iter().any(|&k| k >= kv_len) {
                return Err(Error::invalid(format!(
                    "row {i} sees keys beyond the {kv_len} that will be cached"
                )));
            }
            line[..row.prefix_len].fill(0.0);
            for &k in &row.extra {
                line[k] = 0.0;
            }
        }
        let positions: Vec<u32> = rows.iter().map(|r| r.position as u32).collect();
        Ok(Self {
            positions: Tensor::from_vec(positions, (1, rows.len()), device)?,
            mask: Some(Tensor::from_vec(data, (rows.len(), kv_len), device)?),
        })
    }

    /// Number of new tokens.
    pub fn seq_len(&self) -> Result<usize> {
        Ok(self.positions.dim(1)?)
    }
}

/// What one new token may attend to: the first `prefix_len` keys, plus the keys in `extra`
/// (absolute indices; include the token's own index).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RowVisibility {
    /// The token's position id.
    pub position: usize,
    /// Keys `[0, prefix_len)` are visible.
    pub prefix_len: usize,
    /// Further visible keys, absolute indices (ancestors and the token itself).
    pub extra: Vec<usize>,
}

fn visible(yes: bool) -> f32 {
    if yes {
        0.0
    } else {
        f32::NEG_INFINITY
    }
}

/// A tree of tokens in topological order: every node's parent comes before it; roots attach to
/// the end of the cached prefix.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TokenTree {
    tokens: Vec<u32>,
    parents: Vec<Option<usize>>,
    depths: Vec<usize>,
}

impl TokenTree {
    /// An empty tree.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a node and returns its index. `parent` must be an existing node.
    pub fn push(&mut self, token: u32, parent: Option<usize>) -> Result<usize> {
        let depth = match parent {
            None => 0,
            Some(p) if p < self.tokens.len() => self.depths[p] + 1,
            Some(p) => {
                return Err(Error::invalid(format!(
                    "parent {p} does not exist in a tree of {} nodes",
                    self.tokens.len()
                )))
            }
        };
        self.tokens.push(token);
        self.parents.push(parent);
        self.depths.push(depth);
        Ok(self.tokens.len() - 1)
    }

    /// Adds a chain of tokens under `parent`, returning the index of its last node.
    pub fn push_path(
        &mut self,
        tokens: &[u32],
        mut parent: Option<usize>,
    ) -> Result<Option<usize>> {
        for &t in tokens {
            parent = Some(self.push(t, parent)?);
        }
        Ok(parent)
    }

    /// Number of nodes.
    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    /// True for a tree without nodes.
    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    /// Node tokens in order.
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    /// Parent of a node.
    pub fn parent(&self, node: usize) -> Option<usize> {
        self.parents[node]
    }

    /// Depth of a node (roots are 0).
    pub fn depth(&self, node: usize) -> usize {
        self.depths[node]
    }

    /// Node indices from the root down to `node`, inclusive.
    pub fn path_to(&self, node: usize) -> Vec<usize> {
        let mut path = vec![node];
        let mut current = node;
        while let Some(p) = self.parents[current] {
            path.push(p);
            current = p;
        }
        path.reverse();
        path
    }

    /// Nodes without children.
    pub fn leaves(&self) -> Vec<usize> {
        let mut has_child = vec![false; self.len()];
        for p in self.parents.iter().flatten() {
            has_child[*p] = true;
        }
        (0..self.len()).filter(|&i| !has_child[i]).collect()
    }
}
