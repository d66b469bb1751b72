//! When an SVID is rotated: at half its life, plus jitter.
//!
//! Half life leaves the other half for retries before the SVID expires; the
//! jitter spreads rotations of SVIDs minted together (at daemon start, say)
//! so they do not all land on the CA at once. Pure arithmetic, so it is
//! tested without waiting.

use std::time::{Duration, SystemTime};

/// Largest jitter, as a fraction of the SVID's lifetime: rotation happens
/// between 50% and 60% of the lifetime.
pub const MAX_JITTER_FRACTION: f64 = 0.1;

/// When an SVID issued at `issued_at` and valid until `not_after` should be
/// replaced. `jitter` is a number in `[0, 1)`, drawn at random by the caller.
///
/// The lifetime counts from issuance, not from the backdated notBefore: with
/// a TTL of a few seconds the backdate would otherwise put the rotation time
/// in the past and rotate without pause.
pub fn rotation_time(issued_at: SystemTime, not_after: SystemTime, jitter: f64) -> SystemTime {
    let lifetime = not_after
        .duration_since(issued_at)
        .unwrap_or(Duration::ZERO);
    let jitter = jitter.clamp(0.0, 1.0) * MAX_JITTER_FRACTION;
    issued_at + lifetime.mul_f64(0.5 + jitter)
}

/// How long to wait from `now` until `at` (zero if it has passed).
pub fn delay_until(at: SystemTime, now: SystemTime) -> Duration {
    at.duration_since(now).unwrap_or(Duration::ZERO)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotation_falls_between_half_and_sixty_percent_of_the_lifetime() {
        let start = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000);
        let end = start + Duration::from_secs(100);
        assert_eq!(
            rotation_time(start, end, 0.0),
            start + Duration::from_secs(50)
        );
        let latest = rotation_time(start, end, 0.999_999);
        assert!(latest < start + Duration::from_secs(60));
        assert!(latest > start + Duration::from_secs(59));
    }

    #[test]
    fn an_out_of_range_jitter_is_clamped() {
        let start = SystemTime::UNIX_EPOCH;
        let end = start + Duration::from_secs(10);
        assert_eq!(
            rotation_time(start, end, 7.0),
            start + Duration::from_secs(6)
        );
        assert_eq!(
            rotation_time(start, end, -1.0),
            start + Duration::from_secs(5)
        );
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
