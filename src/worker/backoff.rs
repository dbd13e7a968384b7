//! Retry delays: exponential backoff with jitter.

use rand::Rng;
use std::time::Duration;

/// Exponential backoff: `base * 2^(attempt-1)`, capped at `max`, then scaled by a random factor
/// in [0.5, 1.0] so that retries of many jobs failing together spread out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// Delay after the first failed attempt (before jitter).
    pub base: Duration,
    /// Largest delay.
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            base: Duration::from_millis(200),
            max: Duration::from_secs(60),
        }
    }
}

impl Backoff {
    /// The delay before the attempt after `failed_attempt` (from 1), without jitter.
    pub fn ceiling(&self, failed_attempt: u32) -> Duration {
        let exp = failed_attempt.saturating_sub(1).min(31);
        self.base.saturating_mul(1u32 << exp).min(self.max)
    }

    /// The delay with jitter.
    pub fn delay(&self, failed_attempt: u32) -> Duration {
        let ceiling = self.ceiling(failed_attempt);
        let factor: f64 = rand::rng().random_range(0.5..=1.0);
        ceiling.mul_f64(factor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_then_caps() {
        let b = Backoff {
            base: Duration::from_millis(100),
            max: Duration::from_secs(1),
        };
        assert_eq!(b.ceiling(1), Duration::from_millis(100));
        assert_eq!(b.ceiling(3), Duration::from_millis(400));
        assert_eq!(b.ceiling(10), Duration::from_secs(1));
        assert_eq!(b.ceiling(u32::MAX), Duration::from_secs(1));
        for a in 1..8 {
            let d = b.delay(a);
            assert!(d <= b.ceiling(a) && d >= b.ceiling(a) / 2, "{a}: {d:?}");
        }
    }
}
