//! Restart intensity: at most `max` restarts within a sliding window.

use std::collections::VecDeque;
use std::time::Duration;
use tokio::time::Instant;

/// Counts restarts in a sliding window.
#[derive(Debug, Clone)]
pub struct Intensity {
    max: u32,
    within: Duration,
    times: VecDeque<Instant>,
}

impl Intensity {
    /// At most `max` restarts within `within`.
    pub fn new(max: u32, within: Duration) -> Self {
        Intensity {
            max,
            within,
            times: VecDeque::new(),
        }
    }

    /// Records a restart now. `Err(n)` when that makes `n` restarts in the window, over `max`.
    pub fn record(&mut self) -> Result<(), u32> {
        let now = Instant::now();
        while self
            .times
            .front()
            .is_some_and(|t| now.duration_since(*t) > self.within)
        {
            self.times.pop_front();
        }
        self.times.push_back(now);
        let n = u32::try_from(self.times.len()).unwrap_or(u32::MAX);
        if n > self.max {
            Err(n)
        } else {
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn gives_up_past_the_limit_and_forgets_old_restarts() {
        let mut i = Intensity::new(2, Duration::from_secs(10));
        assert!(i.record().is_ok());
        assert!(i.record().is_ok());
        assert_eq!(i.record(), Err(3));
        tokio::time::advance(Duration::from_secs(11)).await;
        assert!(
            i.record().is_ok(),
            "restarts older than the window no longer count"
        );
    }
}
