//! MapReduce word count over the cluster: split the input into chunks, run a group of
//! `wordcount.map` jobs (each splits its counts into R partitions by key), shuffle the partial
//! counts by partition, and run `wordcount.reduce` jobs until each partition has one table.
//!
//! Every message stays under a size budget (NATS refuses payloads over 1 MB by default, and
//! workers dead-letter bodies over `--max-body-bytes`): a partition whose partials are too large
//! for one reduce job is reduced in several jobs, then their outputs again (a reduce tree).

use super::Group;
use crate::client::Client;
use crate::error::{Error, Result};
use crate::job::JobSpec;
use crate::result::JobResult;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::time::Duration;

/// Counts per word.
pub type Counts = BTreeMap<String, u64>;

/// The partition of `word` among `partitions`: FNV-1a of its UTF-8 bytes, so every worker, of any
/// build, puts a word in the same partition.
pub fn partition_of(word: &str, partitions: u32) -> u32 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in word.as_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    (h % u64::from(partitions.max(1))) as u32
}

/// Splits `text` into chunks of at most `max` bytes (more only for a single word longer than
/// that), cutting only between words, so that no word spans two chunks.
pub fn chunks(text: &str, max: usize) -> Vec<&str> {
    let max = max.max(1);
    let mut out = Vec::new();
    let mut rest = text;
    while !rest.is_empty() {
        if rest.len() <= max {
            out.push(rest);
            break;
        }
        let mut cut = max;
        while !rest.is_char_boundary(cut) {
            cut -= 1;
        }
        // Back up to just after a character that is not part of a word.
        let back = rest[..cut]
            .char_indices()
            .rev()
            .find(|(_, c)| !c.is_alphanumeric())
            .map(|(i, c)| i + c.len_utf8());
        let cut = match back {
            Some(i) if i > 0 => i,
            // One word longer than `max`: cut after it.
            _ => rest
                .char_indices()
                .find(|(_, c)| !c.is_alphanumeric())
                .map(|(i, c)| i + c.len_utf8())
                .unwrap_or(rest.len()),
        };
        out.push(&rest[..cut]);
        rest = &rest[cut..];
    }
    out
}

/// Settings of a run.
#[derive(Debug, Clone)]
pub struct Config {
    /// Bytes of text per map job.
    pub chunk_bytes: usize,
    /// Reduce partitions (R).
    pub partitions: u32,
    /// Largest job body the run creates.
    pub max_job_bytes: usize,
    /// How long each stage may take.
    pub stage_timeout: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            chunk_bytes: 256 * 1024,
            partitions: 4,
            max_job_bytes: 900 * 1024,
            stage_timeout: Duration::from_secs(600),
        }
    }
}

/// What a run did.
#[derive(Debug, Clone, Default)]
pub struct Outcome {
    /// The word counts.
    pub counts: Counts,
    /// Input bytes.
    pub bytes: u64,
    /// Map jobs run.
    pub map_jobs: usize,
    /// Reduce jobs run, over all rounds.
    pub reduce_jobs: usize,
    /// Reduce rounds.
    pub reduce_rounds: usize,
}

/// Runs a group and returns its members' outputs in order; any member that did not succeed
/// fails the stage.
async fn stage(
    client: &Client,
    specs: Vec<JobSpec>,
    what: &str,
    timeout: Duration,
) -> Result<Vec<Value>> {
    let mut handle = client.submit(Group::new(specs)).await?;
    let summary = handle.result(timeout).await?;
    if !summary.succeeded() {
        return Err(Error::Workflow(format!(
            "{what}: {}",
            summary.error.unwrap_or_default()
        )));
    }
    Ok(handle
        .members()
        .iter()
        .map(|r: &JobResult| r.output.clone())
        .collect())
}

fn parse_counts(v: Value, what: &str) -> Result<Counts> {
    serde_json::from_value(v).map_err(|e| Error::Workflow(format!("{what} output: {e}")))
}

/// Counts the words of `texts` on the cluster's workers.
pub async fn wordcount(client: &Client, texts: &[&str], cfg: &Config) -> Result<Outcome> {
    if cfg.partitions == 0 || cfg.partitions > crate::worker::builtin::MAX_PARTITIONS {
        return Err(Error::Config(format!(
            "--partitions must be 1 to {}",
            crate::worker::builtin::MAX_PARTITIONS
        )));
    }
    // A chunk grows a little as a JSON string; keep it well inside the job budget.
    if cfg.chunk_bytes == 0 || cfg.chunk_bytes > cfg.max_job_bytes * 3 / 4 {
        return Err(Error::Config(format!(
            "--chunk-bytes must be 1 to {}",
            cfg.max_job_bytes * 3 / 4
        )));
    }
    let mut outcome = Outcome {
        bytes: texts.iter().map(|t| t.len() as u64).sum(),
        ..Outcome::default()
    };
    let maps: Vec<JobSpec> = texts
        .iter()
        .flat_map(|t| chunks(t, cfg.chunk_bytes))
        .map(|c| {
            JobSpec::new(
                "wordcount.map",
                json!({"text": c, "partitions": cfg.partitions}),
            )
        })
        .collect();
    if maps.is_empty() {
        return Ok(outcome);
    }
    outcome.map_jobs = maps.len();
    let mapped = stage(client, maps, "map", cfg.stage_timeout).await?;
    // Shuffle: partition r gets every map's r-th table.
    let mut pending: Vec<Vec<Counts>> = vec![Vec::new(); cfg.partitions as usize];
    for out in mapped {
        let parts: Vec<Counts> =
            serde_json::from_value(out).map_err(|e| Error::Workflow(format!("map output: {e}")))?;
        for (r, part) in parts.into_iter().enumerate() {
            if let (Some(slot), false) = (pending.get_mut(r), part.is_empty()) {
                slot.push(part);
            }
        }
    }
    let mut done: Vec<Option<Counts>> = vec![None; cfg.partitions as usize];
    loop {
        // Pack each unfinished partition's partials into reduce jobs within the budget.
        let mut jobs: Vec<(usize, Vec<Counts>)> = Vec::new();
        for (r, partials) in pending.iter_mut().enumerate() {
            if done[r].is_some() {
                continue;
            }
            let mut batch: Vec<Counts> = Vec::new();
            let mut size = 0;
            for p in std::mem::take(partials) {
                let len = serde_json::to_vec(&p).map(|v| v.len()).unwrap_or(0) + 1;
                if len > cfg.max_job_bytes {
                    return Err(Error::Workflow(format!(
                        "partition {r} holds a table of {len} bytes, over the {} byte job budget: use more --partitions",
                        cfg.max_job_bytes
                    )));
                }
                if size + len > cfg.max_job_bytes && !batch.is_empty() {
                    jobs.push((r, std::mem::take(&mut batch)));
                    size = 0;
                }
                size += len;
                batch.push(p);
            }
            jobs.push((r, batch));
        }
        if jobs.is_empty() {
            break;
        }
        outcome.reduce_rounds += 1;
        outcome.reduce_jobs += jobs.len();
        let mut per_partition = vec![0usize; cfg.partitions as usize];
        for (r, _) in &jobs {
            per_partition[*r] += 1;
        }
        let owners: Vec<usize> = jobs.iter().map(|(r, _)| *r).collect();
        let specs = jobs
            .into_iter()
            .map(|(_, b)| JobSpec::new("wordcount.reduce", json!(b)))
            .collect();
        let reduced = stage(client, specs, "reduce", cfg.stage_timeout).await?;
        for (r, out) in owners.into_iter().zip(reduced) {
            let counts = parse_counts(out, "reduce")?;
            if per_partition[r] == 1 {
                done[r] = Some(counts);
            } else {
                pending[r].push(counts);
            }
        }
    }
    for counts in done.into_iter().flatten() {
        for (w, n) in counts {
            *outcome.counts.entry(w).or_insert(0) += n;
        }
    }
    Ok(outcome)
}

/// Counts the words of `texts` in this process (the baseline the cluster's counts must equal).
pub fn wordcount_local(texts: &[&str]) -> Counts {
    let mut counts = Counts::new();
    for t in texts {
        crate::worker::builtin::count_words(t, &mut counts);
    }
    counts
}

/// The `n` most frequent words, most frequent first (ties in word order).
pub fn top(counts: &Counts, n: usize) -> Vec<(&str, u64)> {
    let mut all: Vec<(&str, u64)> = counts.iter().map(|(w, c)| (w.as_str(), *c)).collect();
    all.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
    all.truncate(n);
    all
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_never_split_a_word_and_lose_nothing() {
        let text = "alpha beta, gamma—delta straße épée x1 y2 z3 ".repeat(50);
        for max in [1, 5, 7, 16, 100, 10_000] {
            let parts = chunks(&text, max);
            assert_eq!(parts.concat(), text, "max {max}");
            let split: usize = parts
                .iter()
                .map(|p| wordcount_local(&[p]).values().sum::<u64>() as usize)
                .sum();
            let whole = wordcount_local(&[&text]).values().sum::<u64>() as usize;
            assert_eq!(split, whole, "max {max}: a word was split");
            if max >= 16 {
                assert!(parts.iter().all(|p| p.len() <= max), "max {max}");
            }
        }
        assert!(chunks("", 10).is_empty());
    }

    #[test]
    fn partitions_are_stable_and_in_range() {
        assert_eq!(partition_of("hello", 1), 0);
        for w in ["a", "straße", "x2", ""] {
            assert!(partition_of(w, 7) < 7);
            assert_eq!(partition_of(w, 7), partition_of(w, 7));
        }
        // FNV-1a("a") = 0xaf63dc4c8601ec8c.
        assert_eq!(
            partition_of("a", 1000),
            (0xaf63_dc4c_8601_ec8c_u64 % 1000) as u32
        );
    }

    #[test]
    fn top_orders_by_count_then_word() {
        let c: Counts = [("b", 2), ("a", 2), ("c", 5), ("d", 1)]
            .into_iter()
            .map(|(w, n)| (w.to_string(), n))
            .collect();
        assert_eq!(top(&c, 3), vec![("c", 5), ("a", 2), ("b", 2)]);
    }
}
