//! ROUGE-1, ROUGE-2 and ROUGE-L F-measures of generated text against
//! references, as Google's `rouge-score` package computes them (the scorer
//! behind HF `evaluate`'s "rouge", which the NxD fine-tuning tutorial
//! reports), without stemming.
//!
//! Text is lower-cased, every run of characters other than `a-z0-9`
//! becomes a space, and the rest split on spaces. ROUGE-N counts the
//! n-grams both share (each as often as the rarer side has it): precision
//! over the prediction's n-grams, recall over the reference's. ROUGE-L uses
//! the longest common subsequence of the tokens instead. The F-measure is
//! `2PR / (P + R)` (0 when both are 0).

use std::collections::HashMap;

/// Precision, recall and F-measure of one score.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Score {
    pub precision: f64,
    pub recall: f64,
    pub fmeasure: f64,
}

impl Score {
    fn of(precision: f64, recall: f64) -> Self {
        let fmeasure = if precision + recall > 0.0 {
            2.0 * precision * recall / (precision + recall)
        } else {
            0.0
        };
        Self {
            precision,
            recall,
            fmeasure,
        }
    }
}

/// The three scores of one prediction.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Rouge {
    pub rouge1: Score,
    pub rouge2: Score,
    pub rouge_l: Score,
}

/// `rouge-score`'s tokens of `text` (no stemming).
pub fn tokens(text: &str) -> Vec<String> {
    let lower: String = text
        .to_lowercase()
        .chars()
        .map(|c| {
            if c.is_ascii_lowercase() || c.is_ascii_digit() {
                c
            } else {
                ' '
            }
        })
        .collect();
    lower.split_whitespace().map(str::to_string).collect()
}

fn ngrams(tokens: &[String], n: usize) -> HashMap<&[String], usize> {
    let mut m = HashMap::new();
    if tokens.len() >= n {
        for w in tokens.windows(n) {
            *m.entry(w).or_insert(0) += 1;
        }
    }
    m
}

fn rouge_n(reference: &[String], prediction: &[String], n: usize) -> Score {
    let r = ngrams(reference, n);
    let p = ngrams(prediction, n);
    let overlap: usize = r
        .iter()
        .map(|(g, &c)| c.min(p.get(g).copied().unwrap_or(0)))
        .sum();
    let total = |m: &HashMap<&[String], usize>| m.values().sum::<usize>().max(1) as f64;
    Score::of(overlap as f64 / total(&p), overlap as f64 / total(&r))
}

/// The length of the longest common subsequence (one row of the table at a time).
fn lcs(a: &[String], b: &[String]) -> usize {
    let mut prev = vec![0usize; b.len() + 1];
    let mut row = vec![0usize; b.len() + 1];
    for x in a {
        for (j, y) in b.iter().enumerate() {
            row[j + 1] = if x == y {
                prev[j] + 1
            } else {
                row[j].max(prev[j + 1])
            };
        }
        std::mem::swap(&mut prev, &mut row);
    }
    prev[b.len()]
}

fn rouge_l(reference: &[String], prediction: &[String]) -> Score {
    if reference.is_empty() || prediction.is_empty() {
        return Score::of(0.0, 0.0);
    }
    let l = lcs(reference, prediction) as f64;
    Score::of(l / prediction.len() as f64, l / reference.len() as f64)
}

/// The scores of `prediction` against `reference`.
pub fn score(reference: &str, prediction: &str) -> Rouge {
    let (r, p) = (tokens(reference), tokens(prediction));
    Rouge {
        rouge1: rouge_n(&r, &p, 1),
        rouge2: rouge_n(&r, &p, 2),
        rouge_l: rouge_l(&r, &p),
    }
}

/// The mean F-measures (ROUGE-1, ROUGE-2, ROUGE-L) over `pairs` of
/// (reference, prediction); zeros when there are none.
pub fn mean_f(pairs: &[(String, String)]) -> [f64; 3] {
    if pairs.is_empty() {
        return [0.0; 3];
    }
    let mut sum = [0.0; 3];
    for (r, p) in pairs {
        let s = score(r, p);
        sum[0] += s.rouge1.fmeasure;
        sum[1] += s.rouge2.fmeasure;
        sum[2] += s.rouge_l.fmeasure;
    }
    sum.map(|x| x / pairs.len() as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scores_as_rouge_score_prints_them() {
        // rouge_scorer.RougeScorer(['rouge1','rouge2','rougeL']).score(
        //     'the cat sat on the mat', 'the cat was on a mat!'):
        // rouge1 2/3, rouge2 0.2, rougeL 2/3.
        let s = score("the cat sat on the mat", "the cat was on a mat!");
        assert!((s.rouge1.fmeasure - 2.0 / 3.0).abs() < 1e-12, "{s:?}");
        assert!((s.rouge2.fmeasure - 0.2).abs() < 1e-12, "{s:?}");
        assert!((s.rouge_l.fmeasure - 2.0 / 3.0).abs() < 1e-12, "{s:?}");
        let empty = score("", "a b");
        assert_eq!(empty.rouge1.fmeasure, 0.0);
        assert_eq!(empty.rouge_l.fmeasure, 0.0);
        assert_eq!(tokens("Hello, WORLD-42 é!"), vec!["hello", "world", "42"]);
        assert_eq!(mean_f(&[]), [0.0; 3]);
    }
}
