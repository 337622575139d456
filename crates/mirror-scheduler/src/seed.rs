//! Seeds: every rollout and every branch of a hypothesis tree draws from its own random
//! sequence, so sampled output does not depend on how many branches were drafted in time.

/// Mixes seeds into one (splitmix64 finaliser).
pub(crate) fn mix(a: u64, b: u64) -> u64 {
    let mut z = a ^ b
        .wrapping_add(0x9E37_79B9_7F4A_7C15)
        .wrapping_add(a << 6)
        .wrapping_add(a >> 2);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Seed of the branch after window row `row` rooted at `token`; a fresh rollout of the same
/// outcome uses it too, so a sampled window is the same whether it was drafted in the tree or
/// afterwards.
pub(crate) fn branch_seed(step_seed: u64, row: usize, token: u32) -> u64 {
    mix(step_seed, ((row as u64) << 32) | token as u64)
}
