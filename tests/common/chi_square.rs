//! A Pearson chi-square test of sampled counts against exact probabilities, shared by the
//! distribution tests.

/// A Pearson chi-square test of observed counts against exact probabilities.
#[derive(Debug)]
pub struct ChiSquare {
    pub stat: f64,
    /// Critical value at alpha = 1e-4.
    pub critical: f64,
    /// Bins after pooling.
    pub bins: usize,
    /// Draws of outcomes whose probability is exactly 0: any is a rejection by itself.
    pub impossible: usize,
}

impl ChiSquare {
    pub fn rejects(&self) -> bool {
        self.impossible > 0 || self.stat >= self.critical
    }
}

/// Outcomes of probability exactly 0 are not pooled away: their draws are counted apart
/// (`impossible`). The others form bins; bins expecting fewer than 5 draws are pooled, and a
/// pool still under 5 joins the smallest bin.
pub fn chi_square(counts: &[usize], expected: &[f64]) -> ChiSquare {
    assert_eq!(counts.len(), expected.len());
    let n: usize = counts.iter().sum();
    let mut impossible = 0;
    let mut bins: Vec<(f64, f64)> = Vec::new(); // (observed, expected)
    let (mut pooled_obs, mut pooled_exp) = (0.0, 0.0);
    for (&c, &p) in counts.iter().zip(expected) {
        if p == 0.0 {
            impossible += c;
            continue;
        }
        let e = p * n as f64;
        if e < 5.0 {
            pooled_obs += c as f64;
            pooled_exp += e;
        } else {
            bins.push((c as f64, e));
        }
    }
    if pooled_exp >= 5.0 || bins.is_empty() {
        bins.push((pooled_obs, pooled_exp));
    } else if pooled_exp > 0.0 {
        let smallest = bins
            .iter_mut()
            .min_by(|a, b| a.1.total_cmp(&b.1))
            .expect("at least one bin");
        smallest.0 += pooled_obs;
        smallest.1 += pooled_exp;
    }
    assert!(
        bins.len() >= 3,
        "too few populated outcomes ({}) for a meaningful test",
        bins.len()
    );
    let stat = bins.iter().map(|(o, e)| (o - e).powi(2) / e).sum();
    let df = (bins.len() - 1) as f64;
    // Wilson-Hilferty approximation of the chi-square quantile; z for alpha = 1e-4.
    let z = 3.719;
    let critical = df * (1.0 - 2.0 / (9.0 * df) + z * (2.0 / (9.0 * df)).sqrt()).powi(3);
    ChiSquare {
        stat,
        critical,
        bins: bins.len(),
        impossible,
    }
}
