//! The radix tree as a plain structure, against brute force over the inserted sequences.
//!
//! A test row is the whole token prefix it stands for (`tokens[..=position]`), as a KV row
//! depends on every token up to its own: a lookup that lays the wrong rows end to end, or rows
//! of another sequence, cannot reproduce the prompt's prefixes.

use std::collections::HashSet;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::radix::{common_prefix, EdgeRows, RadixTree};
use crate::error::{Error, Result};

/// Bytes of one test row.
const ROW_BYTES: u64 = 7;

/// An edge's rows: each the token prefix it stands for.
#[derive(Debug, Clone)]
struct PrefixRows(Vec<Vec<u32>>);

impl EdgeRows for PrefixRows {
    fn between(&self, start: usize, end: usize) -> Result<Self> {
        self.0
            .get(start..end)
            .map(|rows| Self(rows.to_vec()))
            .ok_or_else(|| Error::InvalidConfig(format!("rows {start}..{end} of {}", self.0.len())))
    }

    fn bytes(&self) -> u64 {
        ROW_BYTES * self.0.len() as u64
    }
}

/// The rows a finished sequence's cache holds for `tokens[start..end]`.
fn rows_of(tokens: &[u32], start: usize, end: usize) -> PrefixRows {
    PrefixRows((start..end).map(|p| tokens[..=p].to_vec()).collect())
}

fn insert(tree: &mut RadixTree<PrefixRows>, tokens: &[u32]) {
    tree.insert(tokens, |start, end| Ok(Some(rows_of(tokens, start, end))))
        .unwrap();
}

/// The length of a lookup of `query`, whose copied rows (the path's, end to end) are checked
/// to be `query`'s own prefixes, as many as the match.
fn looked_up(tree: &mut RadixTree<PrefixRows>, query: &[u32], limit: usize) -> usize {
    let found = tree.longest(query, limit);
    let rows: Vec<&Vec<u32>> = found
        .pieces
        .iter()
        .flat_map(|(rows, take)| &rows.0[..*take])
        .collect();
    assert_eq!(rows.len(), found.len);
    for (position, row) in rows.iter().enumerate() {
        assert_eq!(
            row.as_slice(),
            &query[..=position],
            "row {position} of {query:?}"
        );
    }
    found.len
}

fn assert_lookup(tree: &mut RadixTree<PrefixRows>, query: &[u32], limit: usize, expected: usize) {
    let len = looked_up(tree, query, limit);
    assert_eq!(len, expected, "match length of {query:?} (limit {limit})");
}

/// Every distinct non-empty prefix of `sequences`: the rows a tree holding them keeps once each.
fn distinct_prefixes<'a>(sequences: impl IntoIterator<Item = &'a [u32]>) -> HashSet<Vec<u32>> {
    let mut out = HashSet::new();
    for sequence in sequences {
        for end in 1..=sequence.len() {
            out.insert(sequence[..end].to_vec());
        }
    }
    out
}

/// A random sequence over a small vocabulary, starting from one of a few shared stems so that
/// prefixes are shared, diverge inside edges and end inside them.
fn random_sequence(rng: &mut StdRng, stems: &[Vec<u32>]) -> Vec<u32> {
    let stem = &stems[rng.random_range(0..stems.len())];
    let mut tokens = stem[..rng.random_range(0..=stem.len())].to_vec();
    let tail = rng.random_range(0..12);
    tokens.extend((0..tail).map(|_| rng.random_range(0..4u32)));
    tokens
}

fn stems(rng: &mut StdRng) -> Vec<Vec<u32>> {
    (0..4)
        .map(|_| {
            (0..rng.random_range(5..40))
                .map(|_| rng.random_range(0..4u32))
                .collect()
        })
        .collect()
}

#[test]
fn lookups_match_brute_force_and_shared_prefixes_are_stored_once() {
    for seed in 0..20 {
        let mut rng = StdRng::seed_from_u64(seed);
        let stems = stems(&mut rng);
        let mut tree = RadixTree::default();
        let mut inserted: Vec<Vec<u32>> = Vec::new();
        for _ in 0..40 {
            let sequence = random_sequence(&mut rng, &stems);
            insert(&mut tree, &sequence);
            inserted.push(sequence);
            let distinct = distinct_prefixes(inserted.iter().map(Vec::as_slice));
            assert_eq!(
                tree.bytes(),
                distinct.len() as u64 * ROW_BYTES,
                "seed {seed}"
            );
            // Each insertion adds at most a split and a leaf.
            assert!(tree.len() <= 2 * inserted.len());
            for _ in 0..5 {
                let query = random_sequence(&mut rng, &stems);
                let limit = rng.random_range(0..=query.len() + 1);
                let capped = &query[..limit.min(query.len())];
                let expected = inserted
                    .iter()
                    .map(|s| common_prefix(s, capped))
                    .max()
                    .unwrap_or(0);
                assert_lookup(&mut tree, &query, limit, expected);
            }
        }
        for sequence in &inserted {
            assert_lookup(&mut tree, sequence, sequence.len(), sequence.len());
        }
    }
}

#[test]
fn an_edge_splits_where_a_sequence_diverges_and_not_where_one_ends() {
    let mut tree = RadixTree::default();
    insert(&mut tree, &[1, 2, 3, 4, 5]);
    assert_eq!((tree.len(), tree.bytes()), (1, 5 * ROW_BYTES));
    // Ends inside the edge: nothing new to store, no split.
    insert(&mut tree, &[1, 2, 3]);
    assert_eq!((tree.len(), tree.bytes()), (1, 5 * ROW_BYTES));
    // Diverges after three tokens: [1, 2, 3] above [4, 5] and [9, 9].
    insert(&mut tree, &[1, 2, 3, 9, 9]);
    assert_eq!((tree.len(), tree.bytes()), (3, 7 * ROW_BYTES));
    // A continuation of a stored path adds one leaf of its new tokens.
    insert(&mut tree, &[1, 2, 3, 4, 5, 6]);
    assert_eq!((tree.len(), tree.bytes()), (4, 8 * ROW_BYTES));
    // A lookup that ends inside the split-off edge, one beyond every path, one with nothing.
    assert_lookup(&mut tree, &[1, 2, 3, 4, 7], 5, 4);
    assert_lookup(&mut tree, &[1, 2, 3, 9, 9, 9], 6, 5);
    assert_lookup(&mut tree, &[1, 2, 3, 4, 5, 6], 3, 3);
    assert_lookup(&mut tree, &[8], 1, 0);
    assert_lookup(&mut tree, &[], 0, 0);
}

#[test]
fn eviction_takes_the_least_recently_used_leaf_and_a_shared_prefix_last() {
    let mut tree = RadixTree::default();
    insert(&mut tree, &[1, 2, 3, 4]);
    insert(&mut tree, &[1, 2, 5, 6]);
    insert(&mut tree, &[7, 8]);
    // [1, 2] is the parent of [3, 4] and [5, 6]; this lookup makes [1, 2] and [3, 4] the most
    // recent, leaving [5, 6] the coldest leaf, then [7, 8].
    assert_lookup(&mut tree, &[1, 2, 3, 9], 4, 3);
    let evicted = tree.evict_leaf().unwrap();
    assert_eq!(evicted.0, rows_of(&[1, 2, 5, 6], 2, 4).0);
    assert_lookup(&mut tree, &[1, 2, 5, 6], 4, 2);
    let evicted = tree.evict_leaf().unwrap();
    assert_eq!(evicted.0, rows_of(&[7, 8], 0, 2).0);
    // The lookup of [1, 2, 5, 6] touched only [1, 2]: [3, 4] is the older leaf, then [1, 2]
    // is one.
    assert_eq!(tree.evict_leaf().unwrap().0, rows_of(&[1, 2, 3, 4], 2, 4).0);
    assert_eq!(tree.evict_leaf().unwrap().0, rows_of(&[1, 2], 0, 2).0);
    assert!(tree.evict_leaf().is_none());
    assert_eq!((tree.len(), tree.bytes()), (0, 0));
}

#[test]
fn evicting_leaves_keeps_every_remaining_row_right_and_counted() {
    for seed in 100..115 {
        let mut rng = StdRng::seed_from_u64(seed);
        let stems = stems(&mut rng);
        let mut tree = RadixTree::default();
        let mut inserted: Vec<Vec<u32>> = Vec::new();
        for step in 0..120 {
            if rng.random_bool(0.3) {
                let before = (tree.bytes(), tree.len());
                let stored = stored_prefixes(&mut tree, &inserted);
                match tree.evict_leaf() {
                    None => assert_eq!(before, (0, 0)),
                    Some(rows) => {
                        assert_eq!(tree.bytes(), before.0 - rows.bytes());
                        assert_eq!(tree.len(), before.1 - 1);
                        // A leaf went: the rows that left were stored and had no stored
                        // continuation but each other.
                        let after = stored_prefixes(&mut tree, &inserted);
                        let gone: HashSet<&Vec<u32>> = stored.difference(&after).collect();
                        let left: HashSet<&Vec<u32>> = rows.0.iter().collect();
                        assert_eq!(gone, left, "seed {seed}, step {step}");
                        let deepest = rows.0.last().unwrap();
                        assert!(!after.iter().any(|p| p.starts_with(deepest)));
                    }
                }
            } else {
                let sequence = random_sequence(&mut rng, &stems);
                insert(&mut tree, &sequence);
                inserted.push(sequence);
            }
            let stored = stored_prefixes(&mut tree, &inserted);
            assert_eq!(
                tree.bytes(),
                stored.len() as u64 * ROW_BYTES,
                "seed {seed}, step {step}"
            );
        }
    }
}

/// The prefixes the tree still stores, found by looking up every inserted sequence (each lookup
/// checked row by row): every stored row belongs to some inserted sequence's path.
fn stored_prefixes(tree: &mut RadixTree<PrefixRows>, inserted: &[Vec<u32>]) -> HashSet<Vec<u32>> {
    let mut out = HashSet::new();
    for sequence in inserted {
        let len = looked_up(tree, sequence, sequence.len());
        out.extend(distinct_prefixes([&sequence[..len]]));
    }
    out
}

#[test]
fn rows_the_pool_cannot_hold_are_not_stored_and_a_failed_copy_changes_nothing() {
    let mut tree = RadixTree::default();
    insert(&mut tree, &[1, 2, 3, 4]);
    tree.insert(&[1, 2, 9, 9], |_, _| Ok(None)).unwrap();
    // The edge was split, but no leaf was added and no row was lost.
    assert_eq!(tree.bytes(), 4 * ROW_BYTES);
    assert_lookup(&mut tree, &[1, 2, 9, 9], 4, 2);
    assert_lookup(&mut tree, &[1, 2, 3, 4], 4, 4);
    let failed = tree.insert(&[5, 6], |_, _| {
        Err(Error::InvalidConfig("copy failed".into()))
    });
    assert!(failed.is_err());
    assert_eq!(tree.bytes(), 4 * ROW_BYTES);
    assert_lookup(&mut tree, &[5, 6], 2, 0);
}
