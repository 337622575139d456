//! A radix tree (compressed trie) over token ids whose nodes each keep the rows of their own
//! edge's tokens, and nothing else: a prefix that many sequences share is one path, stored once.
//!
//! The tree knows nothing of KV caches: a node's rows are any [`EdgeRows`] (the engine's are
//! one small KV cache per edge, the unit tests' plain values), so the structure is tested on its
//! own against a brute-force reference.
//!
//! Nodes live in a slot vector (`NodeId` indexes it; evicted slots are reused), each with its
//! parent and children, so that walking down, splitting an edge and removing a leaf touch only
//! the nodes involved. Every lookup and insertion stamps the nodes on its path with one clock
//! tick; a parent is stamped whenever a child is, so the least recently used node is always a
//! leaf, and evicting leaves one by one frees the coldest suffixes first and a shared prefix
//! last.

use crate::error::Result;

/// The rows a node keeps, one per token of its edge.
pub(crate) trait EdgeRows: Sized {
    /// Rows `[start, end)` as a value of their own (one half of a split edge). The two halves'
    /// bytes add up to the whole's.
    fn between(&self, start: usize, end: usize) -> Result<Self>;
    /// Bytes the rows take in the pool.
    fn bytes(&self) -> u64;
}

/// A node's index in the slot vector.
type NodeId = usize;

/// The root: no tokens, no rows, never evicted.
const ROOT: NodeId = 0;

struct Node<R> {
    /// The edge's tokens, the path's after the parent's (empty only at the root).
    tokens: Vec<u32>,
    /// Their rows (`None` only at the root).
    rows: Option<R>,
    parent: NodeId,
    /// No two start with the same token.
    children: Vec<NodeId>,
    /// The clock tick of the last lookup or insertion whose path went through this node.
    last_used: u64,
}

/// The tree: token paths from the root, each node's rows those of its edge.
pub(crate) struct RadixTree<R> {
    /// Slot `ROOT` is the root; `None` is a free slot.
    slots: Vec<Option<Node<R>>>,
    free: Vec<NodeId>,
    clock: u64,
    /// Nodes but the root.
    nodes: usize,
    bytes: u64,
}

/// What a lookup found: the rows along the matched path, each with how many of its leading
/// rows belong to the match (all of them, but possibly in the last node, where the match can end
/// inside the edge), in order from the root.
pub(crate) struct PathMatch<'a, R> {
    pub pieces: Vec<(&'a R, usize)>,
    /// Tokens matched: the pieces' rows together.
    pub len: usize,
}

/// Leading tokens `a` and `b` share.
pub(crate) fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

impl<R: EdgeRows> Default for RadixTree<R> {
    fn default() -> Self {
        let root = Node {
            tokens: Vec::new(),
            rows: None,
            parent: ROOT,
            children: Vec::new(),
            last_used: 0,
        };
        Self {
            slots: vec![Some(root)],
            free: Vec::new(),
            clock: 0,
            nodes: 0,
            bytes: 0,
        }
    }
}

impl<R: EdgeRows> RadixTree<R> {
    /// Nodes kept (the root not counted): one per stored edge.
    pub fn len(&self) -> usize {
        self.nodes
    }

    /// Bytes all nodes' rows take.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    fn node(&self, id: NodeId) -> Option<&Node<R>> {
        self.slots.get(id).and_then(Option::as_ref)
    }

    fn node_mut(&mut self, id: NodeId) -> Option<&mut Node<R>> {
        self.slots.get_mut(id).and_then(Option::as_mut)
    }

    /// The child of `parent` whose edge starts with `token`.
    fn child_starting(&self, parent: NodeId, token: u32) -> Option<NodeId> {
        let children = &self.node(parent)?.children;
        children.iter().copied().find(|&child| {
            self.node(child)
                .is_some_and(|n| n.tokens.first() == Some(&token))
        })
    }

    /// Stamps `path` (a root-to-node path) as used now.
    fn touch(&mut self, path: &[NodeId]) {
        self.clock += 1;
        let now = self.clock;
        for &id in path {
            if let Some(node) = self.node_mut(id) {
                node.last_used = now;
            }
        }
    }

    /// The path matching the most leading tokens of `tokens`, as nodes and how many of each
    /// one's tokens match.
    fn walk(&self, tokens: &[u32]) -> Vec<(NodeId, usize)> {
        let mut path = Vec::new();
        let (mut parent, mut at) = (ROOT, 0);
        while let Some(&token) = tokens.get(at) {
            let Some(child) = self.child_starting(parent, token) else {
                break;
            };
            let Some(edge) = self.node(child).map(|n| n.tokens.as_slice()) else {
                break;
            };
            let matched = common_prefix(edge, &tokens[at..]);
            path.push((child, matched));
            if matched < edge.len() {
                break;
            }
            (parent, at) = (child, at + matched);
        }
        path
    }

    /// The stored path sharing the most leading tokens with `tokens` (at most `limit` of them);
    /// its nodes count as used now. The match may end inside an edge.
    pub fn longest(&mut self, tokens: &[u32], limit: usize) -> PathMatch<'_, R> {
        let path = self.walk(&tokens[..limit.min(tokens.len())]);
        let ids: Vec<NodeId> = path.iter().map(|&(id, _)| id).collect();
        self.touch(&ids);
        let pieces: Vec<(&R, usize)> = path
            .iter()
            .filter_map(|&(id, rows)| Some((self.node(id)?.rows.as_ref()?, rows)))
            .collect();
        let len = pieces.iter().map(|&(_, rows)| rows).sum();
        PathMatch { pieces, len }
    }

    /// Stores `tokens`: the path that already holds a prefix of them is kept (an edge where
    /// they diverge is split in two) and only the rest becomes a new leaf, whose rows
    /// `new_rows(start, end)` gives for `tokens[start..end]` (`None`: the pool cannot hold them,
    /// so the tokens are stored up to `start` only). The path counts as used now. An error
    /// (a failed copy) leaves the tree as it was before that step, every node whole.
    pub fn insert(
        &mut self,
        tokens: &[u32],
        mut new_rows: impl FnMut(usize, usize) -> Result<Option<R>>,
    ) -> Result<()> {
        let mut used = Vec::new();
        let (mut parent, mut at) = (ROOT, 0);
        let outcome = loop {
            let Some(&token) = tokens.get(at) else {
                break Ok(());
            };
            let Some(child) = self.child_starting(parent, token) else {
                match new_rows(at, tokens.len()) {
                    Ok(Some(rows)) => used.push(self.add(parent, tokens[at..].to_vec(), rows)),
                    Ok(None) => {}
                    Err(e) => break Err(e),
                }
                break Ok(());
            };
            let edge_len = self.node(child).map_or(0, |n| n.tokens.len());
            let matched = self
                .node(child)
                .map_or(0, |n| common_prefix(&n.tokens, &tokens[at..]));
            if matched == edge_len {
                used.push(child);
                (parent, at) = (child, at + matched);
            } else if at + matched == tokens.len() {
                // The tokens end inside the edge: their rows are stored already.
                used.push(child);
                break Ok(());
            } else {
                // They diverge inside the edge: its first `matched` tokens become a node of
                // their own, the parent of the rest and of the new leaf.
                match self.split(child, matched) {
                    Ok(upper) => {
                        used.push(upper);
                        (parent, at) = (upper, at + matched);
                    }
                    Err(e) => break Err(e),
                }
            }
        };
        self.touch(&used);
        outcome
    }

    /// A new leaf under `parent`.
    fn add(&mut self, parent: NodeId, tokens: Vec<u32>, rows: R) -> NodeId {
        self.bytes += rows.bytes();
        self.nodes += 1;
        let node = Node {
            tokens,
            rows: Some(rows),
            parent,
            children: Vec::new(),
            last_used: self.clock,
        };
        let id = match self.free.pop() {
            Some(id) => {
                self.slots[id] = Some(node);
                id
            }
            None => {
                self.slots.push(Some(node));
                self.slots.len() - 1
            }
        };
        if let Some(parent) = self.node_mut(parent) {
            parent.children.push(id);
        }
        id
    }

    /// Splits `id`'s edge after its first `at` tokens (`0 < at < len`): a new node with those
    /// tokens and rows takes `id`'s place under its parent, and `id` keeps the rest below it.
    /// Returns the new node. Both halves are copied before anything changes.
    fn split(&mut self, id: NodeId, at: usize) -> Result<NodeId> {
        let Some(node) = self.node(id) else {
            return Ok(id);
        };
        let Some(rows) = node.rows.as_ref() else {
            return Ok(id);
        };
        let len = node.tokens.len();
        let (upper_rows, lower_rows) = (rows.between(0, at)?, rows.between(at, len)?);
        let (parent, last_used) = (node.parent, node.last_used);
        let upper_tokens = node.tokens[..at].to_vec();
        let upper = self.add(parent, upper_tokens, upper_rows);
        if let Some(upper_node) = self.node_mut(upper) {
            upper_node.children.push(id);
            upper_node.last_used = last_used;
        }
        if let Some(parent) = self.node_mut(parent) {
            parent.children.retain(|&child| child != id);
        }
        let mut removed = 0;
        if let Some(node) = self.node_mut(id) {
            node.tokens.drain(..at);
            node.parent = upper;
            removed = node.rows.replace(lower_rows).map_or(0, |r| r.bytes());
        }
        // `add` counted the upper half; the lower half replaced the whole.
        self.bytes -= removed;
        self.bytes += self
            .node(id)
            .and_then(|n| n.rows.as_ref())
            .map_or(0, R::bytes);
        Ok(upper)
    }

    /// Removes the least recently used leaf and returns its rows; `None` when only the root is
    /// left.
    pub fn evict_leaf(&mut self) -> Option<R> {
        let leaf = self
            .slots
            .iter()
            .enumerate()
            .skip(1)
            .filter_map(|(id, slot)| slot.as_ref().map(|node| (id, node)))
            .filter(|(_, node)| node.children.is_empty())
            .min_by_key(|(id, node)| (node.last_used, *id))
            .map(|(id, _)| id)?;
        let node = self.slots.get_mut(leaf)?.take()?;
        self.free.push(leaf);
        self.nodes -= 1;
        if let Some(parent) = self.node_mut(node.parent) {
            parent.children.retain(|&child| child != leaf);
        }
        let rows = node.rows?;
        self.bytes -= rows.bytes();
        Some(rows)
    }
}
