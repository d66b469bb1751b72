//! The registry of live instances: who is live, and create-or-join.
//!
//! One rule lives here: for each instance id at most one caller starts the
//! instance (mints and records its SVIDs); every other caller of the same
//! process waits for that start and joins the result, so all of a
//! process's streams see the same SVIDs and a burst of streams costs one
//! mint. The map's lock is held only to look up or change a slot, never
//! across attestation, signing or store work.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::{mpsc, watch};

use super::instance::Command;
use super::{InstanceState, InstanceSummary};
use crate::ids::InstanceId;

/// A live instance: how to watch it and how to talk to its actor.
#[derive(Clone)]
pub(crate) struct Handle {
    pub(crate) state: watch::Receiver<InstanceState>,
    pub(crate) commands: mpsc::Sender<Command>,
    pub(crate) pid: u32,
    pub(crate) start_time: u64,
}

enum Slot {
    /// Someone is starting it; the receiver wakes when they are done
    /// (their [`Starting`] guard dropped, in success or failure).
    Starting {
        done: watch::Receiver<()>,
    },
    Live(Handle),
}

/// What a caller gets from [`Registry::join`].
pub(crate) enum Join {
    /// The instance is live (its state may say it is ending).
    Live(Handle),
    /// Another caller is starting it: wait on this, then join again.
    Wait(watch::Receiver<()>),
    /// This caller starts it, and must finish with [`Registry::complete`]
    /// (dropping the guard gives the slot back to the next caller).
    Start(Starting),
}

/// The right and the duty to start one instance.
pub(crate) struct Starting {
    registry: Arc<Registry>,
    id: InstanceId,
    _done: watch::Sender<()>,
    completed: bool,
}

impl Drop for Starting {
    fn drop(&mut self) {
        if !self.completed {
            let mut slots = self.registry.lock();
            if matches!(slots.get(&self.id), Some(Slot::Starting { .. })) {
                slots.remove(&self.id);
            }
        }
        // `_done` drops after this: the waiters wake and join again.
    }
}

/// The live instances, by id.
#[derive(Default)]
pub(crate) struct Registry {
    slots: Mutex<HashMap<InstanceId, Slot>>,
}

impl Registry {
    fn lock(&self) -> MutexGuard<'_, HashMap<InstanceId, Slot>> {
        // Slots are only inserted, replaced or removed whole, so a poisoned
        // lock still guards a consistent map.
        self.slots.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Joins the instance `id`, or takes the right to
    /// start it.
    pub(crate) fn join(self: &Arc<Self>, id: &InstanceId) -> Join {
        let mut slots = self.lock();
        match slots.get(id) {
            Some(Slot::Live(handle)) => Join::Live(handle.clone()),
            Some(Slot::Starting { done, .. }) => Join::Wait(done.clone()),
            None => {
                let (tx, rx) = watch::channel(());
                slots.insert(id.clone(), Slot::Starting { done: rx });
                Join::Start(Starting {
                    registry: self.clone(),
                    id: id.clone(),
                    _done: tx,
                    completed: false,
                })
            }
        }
    }

    /// Makes a started instance live; its waiters wake and join it.
    pub(crate) fn complete(&self, mut starting: Starting, handle: Handle) {
        self.lock().insert(starting.id.clone(), Slot::Live(handle));
        starting.completed = true;
    }

    /// The live instance `id`, if any.
    pub(crate) fn get(&self, id: &InstanceId) -> Option<Handle> {
        match self.lock().get(id) {
            Some(Slot::Live(handle)) => Some(handle.clone()),
            _ => None,
        }
    }

    /// Forgets an instance, if the registry still holds this very process.
    pub(crate) fn remove(&self, id: &InstanceId, start_time: u64) {
        let mut slots = self.lock();
        if matches!(slots.get(id), Some(Slot::Live(h)) if h.start_time == start_time) {
            slots.remove(id);
        }
    }

    /// The actors of live instances of `pid` other than `except`: the
    /// programs this process ran before an exec.
    pub(crate) fn earlier_programs(
        &self,
        pid: u32,
        except: &InstanceId,
    ) -> Vec<mpsc::Sender<Command>> {
        self.lock()
            .iter()
            .filter_map(|(id, slot)| match slot {
                Slot::Live(h) if h.pid == pid && id != except => Some(h.commands.clone()),
                _ => None,
            })
            .collect()
    }

    /// Every live instance's id and command channel.
    pub(crate) fn handles(&self) -> Vec<(InstanceId, mpsc::Sender<Command>)> {
        self.lock()
            .iter()
            .filter_map(|(id, slot)| match slot {
                Slot::Live(h) => Some((id.clone(), h.commands.clone())),
                Slot::Starting { .. } => None,
            })
            .collect()
    }

    /// Every live instance with its state channel.
    pub(crate) fn live(&self) -> Vec<(InstanceId, Handle)> {
        self.lock()
            .iter()
            .filter_map(|(id, slot)| match slot {
                Slot::Live(h) => Some((id.clone(), h.clone())),
                Slot::Starting { .. } => None,
            })
            .collect()
    }

    /// Every live instance, by pid.
    pub(crate) fn list(&self) -> Vec<InstanceSummary> {
        let mut list: Vec<_> = self
            .lock()
            .iter()
            .filter_map(|(id, slot)| match slot {
                Slot::Live(h) => Some(InstanceSummary {
                    instance_id: id.clone(),
                    pid: h.pid,
                }),
                Slot::Starting { .. } => None,
            })
            .collect();
        list.sort_by_key(|s| s.pid);
        list
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u8) -> InstanceId {
        InstanceId::derive(
            "boot",
            u32::from(n),
            1,
            crate::attest::ExeId {
                dev: 1,
                ino: 2,
                path_hash: 3,
            },
        )
    }

    fn handle(pid: u32, start_time: u64) -> (Handle, mpsc::Receiver<Command>) {
        let (_tx, state) = watch::channel(InstanceState::Ended(crate::store::EndReason::Exited));
        let (commands, rx) = mpsc::channel(1);
        let handle = Handle {
            state,
            commands,
            pid,
            start_time,
        };
        (handle, rx)
    }

    #[test]
    fn the_first_caller_starts_and_the_second_waits_for_it() {
        let registry = Arc::new(Registry::default());
        let Join::Start(starting) = registry.join(&id(1)) else {
            panic!("the first caller must start the instance");
        };
        let Join::Wait(done) = registry.join(&id(1)) else {
            panic!("a second caller must wait for the start");
        };
        assert!(registry.get(&id(1)).is_none(), "not live while starting");
        let (h, _rx) = handle(1, 7);
        registry.complete(starting, h);
        assert!(
            done.has_changed().is_err(),
            "the waiter is woken when the start completes"
        );
        assert!(matches!(registry.join(&id(1)), Join::Live(_)));
        assert_eq!(registry.list().len(), 1);
    }

    #[test]
    fn a_failed_start_gives_the_slot_to_the_next_caller() {
        let registry = Arc::new(Registry::default());
        let Join::Start(starting) = registry.join(&id(1)) else {
            panic!("start");
        };
        let Join::Wait(done) = registry.join(&id(1)) else {
            panic!("wait");
        };
        drop(starting);
        assert!(done.has_changed().is_err(), "the waiter is woken");
        assert!(
            matches!(registry.join(&id(1)), Join::Start(_)),
            "and may start it itself"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn many_concurrent_callers_start_an_instance_once() {
        let registry = Arc::new(Registry::default());
        let starts = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let mut callers = Vec::new();
        for _ in 0..50 {
            let registry = registry.clone();
            let starts = starts.clone();
            callers.push(tokio::spawn(async move {
                loop {
                    match registry.join(&id(1)) {
                        Join::Live(h) => return h.start_time,
                        Join::Wait(mut done) => {
                            let _ = done.changed().await;
                        }
                        Join::Start(starting) => {
                            starts.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                            let (h, rx) = handle(1, 42);
                            std::mem::forget(rx);
                            registry.complete(starting, h);
                        }
                    }
                }
            }));
        }
        for caller in callers {
            assert_eq!(caller.await.unwrap(), 42);
        }
        assert_eq!(starts.load(std::sync::atomic::Ordering::SeqCst), 1);
    }

    #[test]
    fn removal_spares_a_newer_process_under_the_same_id() {
        let registry = Arc::new(Registry::default());
        let Join::Start(starting) = registry.join(&id(1)) else {
            panic!("start");
        };
        let (h, _rx) = handle(1, 7);
        registry.complete(starting, h);
        registry.remove(&id(1), 8);
        assert!(registry.get(&id(1)).is_some());
        registry.remove(&id(1), 7);
        assert!(registry.get(&id(1)).is_none());
    }
}
