//! How fast an agent may begin tasks: a token bucket per entry and uid.
//!
//! Every task begun writes a task row, an SVID row and audit rows, and every
//! task ended puts a serial on the CRL until it expires. Without a rate, one
//! agent looping Begin/End fills the disk and grows the CRL pushed to every
//! verifier. The bucket holds `burst` tokens and refills one every `every`;
//! a Begin takes one. Pure arithmetic over an `Instant` the caller passes
//! in, so it is tested without waiting. Does not know who the caller is or
//! hold the buckets: the identity manager keeps one per entry and uid, so
//! every process of that uid under the entry shares it.

use std::time::{Duration, Instant};

/// Default for `tasks.begin_burst`: Begins allowed at once.
pub const DEFAULT_BEGIN_BURST: u32 = 20;
/// Default for `tasks.begin_per_second`: one Begin per second once the
/// burst is spent (so at most ~300 ended-task serials on the CRL with the
/// default 5-minute task SVIDs).
pub const DEFAULT_BEGIN_EVERY: Duration = Duration::from_secs(1); // 1 per second
/// Largest `tasks.begin_burst` accepted.
pub const MAX_BEGIN_BURST: u32 = 1000;
/// Smallest `tasks.begin_per_second` accepted (one Begin per 1000 s).
pub const MIN_BEGINS_PER_SECOND: f64 = 0.001;
/// Largest `tasks.begin_per_second` accepted.
pub const MAX_BEGINS_PER_SECOND: f64 = 1000.0;

/// The `tasks.begin_burst` / `tasks.begin_per_second` pair of an entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BeginRate {
    /// Begins allowed at once, from a full bucket (at least 1).
    pub burst: u32,
    /// One token comes back every this long (1 / `begin_per_second`).
    pub every: Duration,
}

impl Default for BeginRate {
    fn default() -> Self {
        Self {
            burst: DEFAULT_BEGIN_BURST,
            every: DEFAULT_BEGIN_EVERY,
        }
    }
}

/// Why a `begin_burst` / `begin_per_second` value is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RateError {
    /// The burst is 0 or too large.
    #[error("{0} is out of range: between 1 and {MAX_BEGIN_BURST}")]
    Burst(u32),
    /// The rate is not a number in range.
    #[error(
        "{0} is out of range: a number of Begins per second between {MIN_BEGINS_PER_SECOND} and {MAX_BEGINS_PER_SECOND}"
    )]
    PerSecond(String),
}

impl BeginRate {
    /// Builds a rate from the config's two numbers.
    ///
    /// # Errors
    /// [`RateError`] when either is out of range (or not a number).
    pub fn new(burst: u32, per_second: f64) -> Result<Self, RateError> {
        if !(1..=MAX_BEGIN_BURST).contains(&burst) {
            return Err(RateError::Burst(burst));
        }
        if !(MIN_BEGINS_PER_SECOND..=MAX_BEGINS_PER_SECOND).contains(&per_second) {
            return Err(RateError::PerSecond(per_second.to_string()));
        }
        Ok(Self {
            burst,
            every: Duration::from_secs_f64(1.0 / per_second),
        })
    }
}

/// One instance's bucket. Kept as the moment it will be full again (the
/// "theoretical arrival time" of GCRA), which is a token bucket in exact
/// integer arithmetic: no float drift, no refill timer.
#[derive(Clone, Debug, Default)]
pub struct TokenBucket {
    full_at: Option<Instant>,
}

impl TokenBucket {
    /// Whether the bucket is full at `now` (it can then be forgotten: a
    /// new one starts full).
    pub fn is_full(&self, now: Instant) -> bool {
        self.full_at.is_none_or(|t| t <= now)
    }

    /// Takes one token at `now` if there is one.
    ///
    /// # Errors
    /// How long until a token is back, when the bucket is empty (nothing is
    /// taken then: a refused Begin costs the caller nothing more).
    pub fn try_take(&mut self, rate: BeginRate, now: Instant) -> Result<(), Duration> {
        let full_at = self.full_at.filter(|t| *t > now).unwrap_or(now);
        let after = full_at + rate.every;
        let window = rate.every.saturating_mul(rate.burst);
        match after.checked_sub(window) {
            Some(earliest) if earliest > now => Err(earliest - now),
            _ => {
                self.full_at = Some(after);
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rate(burst: u32, per_second: f64) -> BeginRate {
        BeginRate::new(burst, per_second).unwrap()
    }

    #[test]
    fn a_full_bucket_allows_the_burst_then_refuses_with_the_wait() {
        let t0 = Instant::now();
        let mut bucket = TokenBucket::default();
        let r = rate(3, 2.0);
        for _ in 0..3 {
            assert_eq!(bucket.try_take(r, t0), Ok(()));
        }
        assert_eq!(bucket.try_take(r, t0), Err(Duration::from_millis(500)));
        // A refusal takes nothing: the wait does not grow.
        assert_eq!(bucket.try_take(r, t0), Err(Duration::from_millis(500)));
        let later = t0 + Duration::from_millis(200);
        assert_eq!(bucket.try_take(r, later), Err(Duration::from_millis(300)));
    }

    #[test]
    fn tokens_come_back_at_the_rate_and_never_beyond_the_burst() {
        let t0 = Instant::now();
        let mut bucket = TokenBucket::default();
        let r = rate(2, 1.0);
        assert!(bucket.try_take(r, t0).is_ok());
        assert!(bucket.try_take(r, t0).is_ok());
        assert!(bucket.try_take(r, t0).is_err());
        let t1 = t0 + Duration::from_secs(1);
        assert!(bucket.try_take(r, t1).is_ok());
        assert!(bucket.try_take(r, t1).is_err());
        // A long idle refills to the burst, not more.
        let t2 = t1 + Duration::from_secs(3600);
        assert!(bucket.try_take(r, t2).is_ok());
        assert!(bucket.try_take(r, t2).is_ok());
        assert_eq!(bucket.try_take(r, t2), Err(Duration::from_secs(1)));
    }

    #[test]
    fn a_steady_caller_at_the_rate_is_never_refused() {
        let t0 = Instant::now();
        let mut bucket = TokenBucket::default();
        let r = rate(1, 10.0);
        for i in 0..100 {
            let now = t0 + Duration::from_millis(100) * i;
            assert_eq!(bucket.try_take(r, now), Ok(()), "at step {i}");
        }
    }

    #[test]
    fn rates_out_of_range_are_refused_with_the_range() {
        assert_eq!(BeginRate::new(0, 1.0), Err(RateError::Burst(0)));
        assert!(BeginRate::new(MAX_BEGIN_BURST + 1, 1.0).is_err());
        for bad in [0.0, -1.0, f64::NAN, f64::INFINITY, 1e-9, 1e9] {
            let err = BeginRate::new(1, bad).unwrap_err();
            assert!(err.to_string().contains("between"), "{err}");
        }
        assert_eq!(rate(5, 4.0).every, Duration::from_millis(250));
        assert_eq!(
            BeginRate::default(),
            BeginRate {
                burst: DEFAULT_BEGIN_BURST,
                every: DEFAULT_BEGIN_EVERY
            }
        );
    }
}
