//! Health of something we depend on over the network (an upstream replica,
//! the shared cache's Redis): failures in a row, when to try again, and why
//! it last failed. The pause doubles from 1 s to at most 30 s.

use std::time::{Duration, Instant};

const MAX_PAUSE: Duration = Duration::from_secs(30);

#[derive(Debug, Default)]
pub struct Backoff {
    failures: u32,
    retry_at: Option<Instant>,
    last_error: Option<String>,
}

impl Backoff {
    /// Whether the last try succeeded (or none failed yet).
    pub fn healthy(&self) -> bool {
        self.failures == 0
    }

    /// Whether it may be tried at `now`.
    pub fn due(&self, now: Instant) -> bool {
        self.retry_at.is_none_or(|at| at <= now)
    }

    pub fn retry_at(&self) -> Option<Instant> {
        self.retry_at
    }

    pub fn last_error(&self) -> Option<&str> {
        self.last_error.as_deref()
    }

    /// Records a success; answers whether it had been failing.
    pub fn succeeded(&mut self) -> bool {
        let recovered = self.failures > 0;
        *self = Self::default();
        recovered
    }

    /// Records a failure and pauses; answers whether it is the first in a row.
    pub fn failed(&mut self, error: &str) -> bool {
        self.failures += 1;
        let pause = Duration::from_millis(500u64 << self.failures.min(6)).min(MAX_PAUSE);
        self.retry_at = Some(Instant::now() + pause);
        self.last_error = Some(error.to_owned());
        self.failures == 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pauses_double_up_to_the_limit_and_a_success_clears_them() {
        let mut b = Backoff::default();
        assert!(b.healthy() && b.due(Instant::now()));
        assert!(b.failed("refused"));
        assert!(!b.failed("refused"));
        let pause = b.retry_at().unwrap() - Instant::now();
        assert!(pause > Duration::from_millis(1900) && pause <= Duration::from_secs(2));
        for _ in 0..10 {
            b.failed("refused");
        }
        assert!(b.retry_at().unwrap() - Instant::now() <= MAX_PAUSE);
        assert!(!b.due(Instant::now()));
        assert_eq!(b.last_error(), Some("refused"));
        assert!(b.succeeded());
        assert!(b.healthy() && b.last_error().is_none());
    }
}
