//! Failed logins per client address. Past `proxy.failed_login_limit`
//! failures within [`WINDOW`], an address's next attempts are refused at
//! once until the window ends, so that guessing keys or passwords costs
//! the guesser, not control, the engines or other tenants.

use std::net::IpAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::metrics::FAILED_LOGIN_REFUSALS;

/// How long failures are remembered, counted from an address's first one.
pub(crate) const WINDOW: Duration = Duration::from_secs(10);

pub(crate) struct FailedLogins {
    counts: moka::sync::Cache<IpAddr, Arc<AtomicU32>>,
    limit: u32,
}

impl FailedLogins {
    /// `limit` failures per address and window; 0 turns the throttle off.
    pub(crate) fn new(limit: u32) -> FailedLogins {
        FailedLogins {
            counts: moka::sync::Cache::builder()
                .max_capacity(100_000)
                .time_to_live(WINDOW)
                .build(),
            limit,
        }
    }

    /// `Err(wait)` while `ip` is over its limit.
    pub(crate) fn check(&self, ip: IpAddr) -> Result<(), Duration> {
        let over = self.limit > 0
            && self
                .counts
                .get(&ip)
                .is_some_and(|n| n.load(Ordering::Relaxed) >= self.limit);
        if over {
            FAILED_LOGIN_REFUSALS.counter([]).increment(1);
            Err(WINDOW)
        } else {
            Ok(())
        }
    }

    pub(crate) fn record(&self, ip: IpAddr) {
        self.counts
            .get_with(ip, || Arc::new(AtomicU32::new(0)))
            .fetch_add(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_address_over_its_limit_waits_and_others_do_not() {
        let throttle = FailedLogins::new(3);
        let (guesser, other) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        for _ in 0..3 {
            assert_eq!(throttle.check(guesser), Ok(()));
            throttle.record(guesser);
        }
        assert_eq!(throttle.check(guesser), Err(WINDOW));
        assert_eq!(throttle.check(other), Ok(()));
        let off = FailedLogins::new(0);
        for _ in 0..10 {
            off.record(guesser);
        }
        assert_eq!(off.check(guesser), Ok(()));
    }
}
