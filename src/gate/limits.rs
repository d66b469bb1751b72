//! What one client may hold of the gate, so no client can take it from the
//! others: TLS handshakes in progress per remote IP (before a certificate
//! says who it is), verified connections per caller (its instance, or its
//! SPIFFE ID when that names none), and request bodies buffered for
//! inspection, per connection and for the whole gate.
//!
//! Does not own: the totals of connections (`super::serve`) or the sizes
//! and timeouts of one request (`super`).

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, Mutex};

/// TLS handshakes one remote IP may have in progress.
pub const HANDSHAKES_PER_IP: usize = 16;
/// Verified connections one caller (instance) may hold.
pub const CONNECTIONS_PER_CALLER: usize = 64;
/// Request bodies one connection may have buffered for inspection at once
/// (an HTTP/2 connection's other streams wait their turn).
pub const INSPECTIONS_PER_CONNECTION: usize = 2;
/// Request bodies the whole gate may have buffered at once (each at most
/// `super::MAX_INSPECTED_BODY`): a bound on its memory for them.
pub const INSPECTIONS: usize = 64;

/// Counts per key, each up to a maximum.
#[derive(Debug)]
pub struct PerKey<K: Eq + Hash> {
    max: usize,
    open: Mutex<HashMap<K, usize>>,
}

/// One counted use of a key; given back on drop.
#[derive(Debug)]
pub struct Held<K: Eq + Hash + Clone> {
    key: K,
    owner: Arc<PerKey<K>>,
}

impl<K: Eq + Hash + Clone> PerKey<K> {
    /// At most `max` at once per key.
    pub fn new(max: usize) -> Arc<Self> {
        Arc::new(Self {
            max,
            open: Mutex::new(HashMap::new()),
        })
    }

    /// One more use of `key`, or `None` when it has `max` already.
    pub fn acquire(self: &Arc<Self>, key: K) -> Option<Held<K>> {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let count = open.entry(key.clone()).or_insert(0);
        if *count >= self.max {
            return None;
        }
        *count += 1;
        Some(Held {
            key,
            owner: self.clone(),
        })
    }
}

impl<K: Eq + Hash + Clone> Drop for Held<K> {
    fn drop(&mut self) {
        let mut open = self.owner.open.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(count) = open.get_mut(&self.key) {
            *count -= 1;
            if *count == 0 {
                open.remove(&self.key);
            }
        }
    }
}

/// The key a caller's connections are counted under: its instance when
/// its SPIFFE ID names one (all the tasks of an agent count together),
/// else the whole ID.
pub fn caller_key(id: &crate::ids::SpiffeId) -> String {
    let path: Vec<&str> = id.path().split('/').collect();
    path.windows(2)
        .find(|w| w[0] == "instance")
        .map_or_else(|| id.to_string(), |w| format!("instance/{}", w[1]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_key_gets_its_own_count_and_uses_are_given_back() {
        let caps = PerKey::new(2);
        let a1 = caps.acquire("a").unwrap();
        let _a2 = caps.acquire("a").unwrap();
        assert!(caps.acquire("a").is_none(), "a third of a");
        let _b = caps.acquire("b").expect("b is counted apart");
        drop(a1);
        assert!(caps.acquire("a").is_some(), "a use given back");
    }

    #[test]
    fn an_agents_tasks_count_as_its_instance() {
        let id = |s: &str| crate::ids::SpiffeId::new(s).unwrap();
        let task = caller_key(&id("spiffe://td/agent/bot/instance/abc/task/t1"));
        let instance = caller_key(&id("spiffe://td/agent/bot/instance/abc"));
        assert_eq!(task, instance);
        assert_eq!(caller_key(&id("spiffe://td/svc/x")), "spiffe://td/svc/x");
    }
}
