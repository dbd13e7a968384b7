//! The built-in job kinds of `conveyor-worker` (the contract in the README):
//! `echo`, `sleep`, `hash`, `fail`, `crash`, `wordcount.map`, `wordcount.reduce`.

use super::registry::{handler_fn, JobContext, Registry};
use crate::job::JobError;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::time::Duration;

/// Largest `rounds` a `hash` job may ask for.
pub const MAX_HASH_ROUNDS: u64 = 100_000_000;
/// Longest `sleep` a job may ask for (one day).
pub const MAX_SLEEP_MS: u64 = 86_400_000;

/// A registry with every built-in kind.
pub fn registry() -> Registry {
    let mut r = Registry::new();
    r.register("echo", handler_fn(echo))
        .register("sleep", handler_fn(sleep))
        .register("hash", handler_fn(hash))
        .register("fail", handler_fn(fail))
        .register("crash", handler_fn(crash))
        .register("wordcount.map", handler_fn(wordcount_map))
        .register("wordcount.reduce", handler_fn(wordcount_reduce));
    r
}

async fn echo(input: Value, _: JobContext) -> Result<Value, JobError> {
    Ok(input)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SleepIn {
    ms: u64,
}

#[derive(Serialize)]
struct SleepOut {
    slept_ms: u64,
}

async fn sleep(input: SleepIn, ctx: JobContext) -> Result<SleepOut, JobError> {
    if input.ms > MAX_SLEEP_MS {
        return Err(JobError::permanent(format!(
            "sleep ms {} exceeds the maximum {MAX_SLEEP_MS}",
            input.ms
        )));
    }
    tokio::select! {
        _ = tokio::time::sleep(Duration::from_millis(input.ms)) => Ok(SleepOut { slept_ms: input.ms }),
        _ = ctx.cancel.cancelled() => Err(JobError::Cancelled),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HashIn {
    data: String,
    rounds: u64,
}

#[derive(Serialize)]
struct HashOut {
    sha256: String,
}

/// h_1 = sha256(data), h_(i+1) = sha256(h_i).
pub fn hash_rounds(data: &[u8], rounds: u64) -> [u8; 32] {
    let mut h: [u8; 32] = Sha256::digest(data).into();
    for _ in 1..rounds {
        h = Sha256::digest(h).into();
    }
    h
}

async fn hash(input: HashIn, ctx: JobContext) -> Result<HashOut, JobError> {
    if input.rounds == 0 || input.rounds > MAX_HASH_ROUNDS {
        return Err(JobError::permanent(format!(
            "hash rounds must be 1..={MAX_HASH_ROUNDS}, got {}",
            input.rounds
        )));
    }
    // CPU work runs on the blocking pool; it checks for cancellation every 64k rounds.
    let cancel = ctx.cancel.clone();
    let task = tokio::task::spawn_blocking(move || {
        let mut h: [u8; 32] = Sha256::digest(input.data.as_bytes()).into();
        for i in 1..input.rounds {
            if i % 65_536 == 0 && cancel.is_cancelled() {
                return None;
            }
            h = Sha256::digest(h).into();
        }
        Some(h)
    });
    match task.await {
        Ok(Some(h)) => Ok(HashOut {
            sha256: hex::encode(h),
        }),
        Ok(None) => Err(JobError::Cancelled),
        Err(e) => Err(JobError::retry(format!("hash task failed: {e}"))),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FailIn {
    times: i64,
}

#[derive(Serialize)]
struct FailOut {
    attempts: u32,
}

async fn fail(input: FailIn, ctx: JobContext) -> Result<FailOut, JobError> {
    let attempt = ctx.meta.attempt;
    if input.times < 0 || i64::from(attempt) <= input.times {
        return Err(JobError::retry(format!(
            "fail: attempt {attempt} fails as asked (times={})",
            input.times
        )));
    }
    Ok(FailOut { attempts: attempt })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CrashIn {}

async fn crash(_: CrashIn, ctx: JobContext) -> Result<Value, JobError> {
    tracing::error!(job = %ctx.meta.id, "crash job: aborting the worker process as asked");
    std::process::abort()
}

/// Counts words: maximal runs of alphanumeric characters, lower-cased.
pub fn count_words(text: &str, counts: &mut BTreeMap<String, u64>) {
    for word in text
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
    {
        let lower = word.to_lowercase();
        *counts.entry(lower).or_insert(0) += 1;
    }
}

#[derive(Deserialize)]
#[serde(untagged)]
enum MapIn {
    Text(String),
    Chunk {
        text: String,
        #[serde(default)]
        partitions: Option<u32>,
    },
}

/// Most partitions a map job may split its counts into.
pub const MAX_PARTITIONS: u32 = 1024;

/// Counts the words of a chunk. With `partitions: R` the output is R objects, word `w` in
/// object [`crate::workflow::mapreduce::partition_of`]`(w, R)` (the shuffle's key partitioning).
async fn wordcount_map(input: MapIn, _: JobContext) -> Result<Value, JobError> {
    let (text, partitions) = match input {
        MapIn::Text(t) => (t, None),
        MapIn::Chunk { text, partitions } => (text, partitions),
    };
    if partitions.is_some_and(|r| r == 0 || r > MAX_PARTITIONS) {
        return Err(JobError::permanent(format!(
            "partitions must be 1 to {MAX_PARTITIONS}"
        )));
    }
    tokio::task::spawn_blocking(move || {
        let mut counts = BTreeMap::new();
        count_words(&text, &mut counts);
        match partitions {
            None => serde_json::to_value(counts),
            Some(r) => {
                let mut parts: Vec<BTreeMap<String, u64>> = vec![BTreeMap::new(); r as usize];
                for (word, n) in counts {
                    let p = crate::workflow::mapreduce::partition_of(&word, r) as usize;
                    parts[p].insert(word, n);
                }
                serde_json::to_value(parts)
            }
        }
    })
    .await
    .map_err(|e| JobError::retry(format!("map task failed: {e}")))?
    .map_err(|e| JobError::permanent(format!("map output: {e}")))
}

#[derive(Deserialize)]
#[serde(untagged)]
enum ReduceIn {
    Many(Vec<BTreeMap<String, u64>>),
    Wrapped {
        partials: Vec<BTreeMap<String, u64>>,
    },
}

async fn wordcount_reduce(
    input: ReduceIn,
    _: JobContext,
) -> Result<BTreeMap<String, u64>, JobError> {
    let parts = match input {
        ReduceIn::Many(p) | ReduceIn::Wrapped { partials: p } => p,
    };
    let mut total: BTreeMap<String, u64> = BTreeMap::new();
    for part in parts {
        for (w, n) in part {
            let slot = total.entry(w).or_insert(0);
            *slot = slot.saturating_add(n);
        }
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_matches_known_vectors() {
        // sha256("abc")
        assert_eq!(
            hex::encode(hash_rounds(b"abc", 1)),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        // sha256 of the 32 bytes of sha256("abc")
        assert_eq!(
            hex::encode(hash_rounds(b"abc", 2)),
            "4f8b42c22dd3729b519ba6f68d2da7cc5b2d606d05daed5ad5128cc03e6c6358"
        );
    }

    #[test]
    fn words_are_alphanumeric_runs_lower_cased() {
        let mut c = BTreeMap::new();
        count_words("Hello, hello world! Über-straße x2 x2", &mut c);
        assert_eq!(c.get("hello"), Some(&2));
        assert_eq!(c.get("über"), Some(&1));
        assert_eq!(c.get("straße"), Some(&1));
        assert_eq!(c.get("x2"), Some(&2));
        assert_eq!(c.len(), 5);
    }
}
