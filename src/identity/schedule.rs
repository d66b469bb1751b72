//! When an SVID is rotated: between 45% and 80% of its life.
//!
//! The last 20% leaves room for retries before the SVID expires (and a
//! client sees the new SVID well before the old one expires, even with a
//! TTL of seconds). The window is wide so that SVIDs minted together (a
//! burst of processes starting, a daemon restart) do not come back in
//! waves: the first round of a burst that starts in the same instant is
//! 0.625 / 0.35 = 1.8 times as dense as the steady state (the old
//! [50%, 60%] gave 5.5; [50%, 80%] 2.2 in theory and 2.27 measured). The
//! jitter is not drawn at random: consecutive SVIDs take consecutive points
//! of the golden-ratio sequence, which fills `[0, 1)` evenly however many
//! are taken, so N SVIDs minted in the same second rotate spread evenly over
//! the jitter window (random draws would bunch). Pure arithmetic, so it is
//! tested without waiting.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

/// Earliest rotation, as a fraction of the SVID's lifetime.
pub const EARLIEST_FRACTION: f64 = 0.45;
/// Width of the rotation window, as a fraction of the lifetime: rotation
/// happens between 45% and 80% of it.
pub const MAX_JITTER_FRACTION: f64 = 0.35;

/// The fractional part of the golden ratio: the step of the sequence.
const GOLDEN_STEP: f64 = 0.618_033_988_749_894_8;

/// The daemon's jitters: consecutive points of the golden-ratio sequence.
#[derive(Debug, Default)]
pub struct Jitter {
    drawn: AtomicU64,
}

impl Jitter {
    /// The next jitter in `[0, 1)`.
    pub fn next(&self) -> f64 {
        nth_jitter(self.drawn.fetch_add(1, Ordering::Relaxed))
    }
}

/// The `n`-th point of the golden-ratio sequence, in `[0, 1)`.
pub fn nth_jitter(n: u64) -> f64 {
    // Exact for any n a daemon reaches (f64 holds integers to 2^53).
    #[allow(clippy::cast_precision_loss, reason = "n stays far below 2^53")]
    let x = (n as f64) * GOLDEN_STEP;
    x.fract()
}

/// When an SVID issued at `issued_at` and valid until `not_after` should be
/// replaced. `jitter` is a number in `[0, 1)`, from [`jitter`].
///
/// The lifetime counts from issuance, not from the backdated notBefore: with
/// a TTL of a few seconds the backdate would otherwise put the rotation time
/// in the past and rotate without pause.
pub fn rotation_time(issued_at: SystemTime, not_after: SystemTime, jitter: f64) -> SystemTime {
    let lifetime = not_after
        .duration_since(issued_at)
        .unwrap_or(Duration::ZERO);
    let jitter = jitter.clamp(0.0, 1.0) * MAX_JITTER_FRACTION;
    issued_at + lifetime.mul_f64(EARLIEST_FRACTION + jitter)
}

/// How long to wait from `now` until `at` (zero if it has passed).
pub fn delay_until(at: SystemTime, now: SystemTime) -> Duration {
    at.duration_since(now).unwrap_or(Duration::ZERO)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotation_falls_between_45_and_80_percent_of_the_lifetime() {
        let start = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000);
        let end = start + Duration::from_secs(100);
        assert_eq!(
            rotation_time(start, end, 0.0),
            start + Duration::from_secs(45)
        );
        let latest = rotation_time(start, end, 0.999_999);
        assert!(latest < start + Duration::from_secs(80));
        assert!(latest > start + Duration::from_secs(79));
    }

    #[test]
    fn an_out_of_range_jitter_is_clamped() {
        let start = SystemTime::UNIX_EPOCH;
        let end = start + Duration::from_secs(10);
        assert_eq!(
            rotation_time(start, end, 7.0),
            start + Duration::from_secs(8)
        );
        assert_eq!(
            rotation_time(start, end, -1.0),
            start + Duration::from_millis(4_500)
        );
    }

    /// 1,000 SVIDs minted in the same instant with a 60 s lifetime rotate
    /// over a 21 s window; no second of it gets more than 2x the mean.
    #[test]
    fn svids_minted_together_rotate_evenly_spread() {
        let start = SystemTime::UNIX_EPOCH;
        let end = start + Duration::from_secs(60);
        let mut per_second = std::collections::BTreeMap::<u64, u32>::new();
        for n in 0..1_000 {
            let at = rotation_time(start, end, nth_jitter(n));
            let second = at.duration_since(start).unwrap().as_secs();
            *per_second.entry(second).or_default() += 1;
        }
        let seconds = 21.0;
        let mean = 1_000.0 / seconds;
        let max = f64::from(*per_second.values().max().unwrap());
        assert!(
            max <= 2.0 * mean,
            "max {max} per second against a mean of {mean}"
        );
        assert!(per_second.len() >= 21, "every second of the window is used");
    }

    #[test]
    fn jitters_stay_in_the_unit_interval() {
        for n in [0, 1, 2, 1_000, u64::from(u32::MAX)] {
            let j = nth_jitter(n);
            assert!((0.0..1.0).contains(&j), "{j}");
        }
    }

    #[test]
    fn a_past_rotation_time_means_now() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(5);
        assert_eq!(delay_until(SystemTime::UNIX_EPOCH, now), Duration::ZERO);
        assert_eq!(
            delay_until(now + Duration::from_secs(2), now),
            Duration::from_secs(2)
        );
    }
}
