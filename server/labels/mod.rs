//! The ImageNet-1k class names (torchvision's order) and what is computed from logits:
//! probabilities and labelled top-k.

use std::sync::LazyLock;

static LABELS: LazyLock<Vec<&'static str>> =
    LazyLock::new(|| include_str!("imagenet_classes.txt").lines().collect());

/// All 1000 class names, index-aligned with the logits.
pub fn labels() -> &'static [&'static str] {
    &LABELS
}

/// The name of class `index`, or `""` past the end.
pub fn label(index: usize) -> &'static str {
    LABELS.get(index).copied().unwrap_or("")
}

/// Numerically stable softmax.
pub fn softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let exp: Vec<f32> = logits.iter().map(|&v| (v - max).exp()).collect();
    let sum: f32 = exp.iter().sum();
    exp.into_iter().map(|e| e / sum).collect()
}

/// One ranked class.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Scored {
    pub index: usize,
    pub label: &'static str,
    pub score: f32,
}

/// The `k` best classes, best first; ties go to the lower index, as `torch.topk` on CPU.
/// A NaN score (from an input holding NaN, which KServe computes) ranks below every
/// number, so it is never called the best class while one is not NaN.
///
/// ```
/// use resnet_serve::labels::{softmax, top_k};
/// let mut logits = vec![0.0f32; 1000];
/// logits[281] = 5.0; // tabby
/// logits[285] = 4.0; // Egyptian cat
/// let top = top_k(&softmax(&logits), 2);
/// assert_eq!((top[0].index, top[0].label), (281, "tabby"));
/// assert_eq!(top[1].label, "Egyptian cat");
/// ```
pub fn top_k(scores: &[f32], k: usize) -> Vec<Scored> {
    let k = k.min(scores.len());
    if k == 0 {
        return Vec::new();
    }
    let best_first = |a: &usize, b: &usize| {
        let (x, y) = (scores[*a], scores[*b]);
        x.is_nan()
            .cmp(&y.is_nan())
            .then(y.total_cmp(&x))
            .then(a.cmp(b))
    };
    let mut order: Vec<usize> = (0..scores.len()).collect();
    // The k best found in linear time, then only they are sorted (a top-1 answer sorted
    // all 1000 classes before).
    if k < order.len() {
        order.select_nth_unstable_by(k - 1, best_first);
        order.truncate(k);
    }
    order.sort_by(best_first);
    order
        .into_iter()
        .map(|index| Scored {
            index,
            label: label(index),
            score: scores[index],
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thousand_labels_in_torchvision_order() {
        assert_eq!(labels().len(), 1000);
        assert_eq!(label(0), "tench");
        assert_eq!(label(281), "tabby");
        assert_eq!(label(999), "toilet tissue");
        assert_eq!(label(1000), "");
    }

    #[test]
    fn softmax_and_top_k() {
        let p = softmax(&[1.0, 3.0, 2.0, 3.0]);
        assert!((p.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        let top: Vec<usize> = top_k(&p, 3).iter().map(|s| s.index).collect();
        assert_eq!(top, vec![1, 3, 2]);
        // Large logits do not overflow.
        assert!(softmax(&[1000.0, 0.0]).iter().all(|v| v.is_finite()));
    }

    #[test]
    fn values_that_are_not_finite_rank_without_panicking() {
        let scores = [
            1.0,
            f32::NAN,
            f32::INFINITY,
            -f32::NAN,
            f32::NEG_INFINITY,
            2.0,
        ];
        let order: Vec<usize> = top_k(&scores, 6).iter().map(|s| s.index).collect();
        assert_eq!(order, vec![2, 5, 0, 4, 1, 3], "NaN of either sign last");
        assert_eq!(top_k(&scores, 2).len(), 2);
        let p = softmax(&scores);
        assert_eq!(p.len(), 6);
        assert!(top_k(&softmax(&[f32::NAN; 4]), 2)
            .iter()
            .all(|s| s.score.is_nan()));
    }

    #[test]
    fn top_k_is_the_head_of_the_full_ranking_ties_included() {
        // Many ties (values repeat every 37 classes), in no order.
        let scores: Vec<f32> = (0..1000).map(|i| ((i * 7919) % 37) as f32).collect();
        let mut full: Vec<usize> = (0..1000).collect();
        full.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
        for k in [0, 1, 2, 5, 37, 999, 1000, 1001] {
            let got: Vec<usize> = top_k(&scores, k).iter().map(|s| s.index).collect();
            assert_eq!(got, full[..k.min(1000)], "k = {k}");
        }
    }
}
