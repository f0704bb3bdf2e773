//! Live delivery: the one LISTEN connection per instance, the hub that fans its notifications out
//! (log heads through a `watch`, projection changes through a `broadcast`), subscriptions, consumer
//! groups and change watchers.

pub mod context;
pub mod groups;
pub mod listener;
pub mod locks;
pub mod subscribe;
pub mod tail;
pub mod watch;

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, watch as tokio_watch};

use crate::metrics::Metrics;

/// A projection-change notice as it travels through NOTIFY (JSON).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Change {
    /// The projection.
    pub projection: String,
    /// The key that changed.
    pub key: String,
    /// Optional payload.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub payload: String,
    /// The sequence it reflects (0 = unknown).
    #[serde(default)]
    pub sequence: u64,
}

/// The fan-out point of one instance.
pub struct Hub {
    /// The highest committed global sequence this instance knows of. Latest value wins: a
    /// subscriber that misses intermediate values still reads from its own position.
    head: tokio_watch::Sender<u64>,
    /// The same head, read without the watch's lock (subscribers read it on every wake-up).
    head_now: std::sync::atomic::AtomicU64,
    /// Projection changes; receivers that fall behind get `Lagged`.
    changes: broadcast::Sender<Change>,
    /// Bumped after every (re)connection of the listener, so every subscriber re-reads.
    epoch: tokio_watch::Sender<u64>,
    /// The instance's metrics.
    pub metrics: Arc<Metrics>,
    /// The most recent events, shared by live subscribers.
    pub tail: Arc<tail::Tail>,
    /// Wakes the tail reader when a subscriber arrives (it sleeps while there is none).
    pub subscriber_arrived: tokio::sync::Notify,
    /// Names of locks just released (here or, through NOTIFY, on another instance).
    lock_releases: broadcast::Sender<Arc<str>>,
}

/// A waiting Lock call's view of lock releases.
pub struct LockReleases {
    rx: broadcast::Receiver<Arc<str>>,
}

impl LockReleases {
    /// Completes when `name` is released, or when releases were missed (then the caller retries
    /// anyway).
    pub async fn wait_for(&mut self, name: &str) {
        loop {
            match self.rx.recv().await {
                Ok(n) if &*n == name => return,
                Ok(_) => {}
                Err(broadcast::error::RecvError::Lagged(_)) => return,
                Err(broadcast::error::RecvError::Closed) => std::future::pending().await,
            }
        }
    }
}

impl Hub {
    /// A hub; `change_capacity` bounds how far a watcher may fall behind, `tail_capacity` how
    /// many recent events are kept in memory for live subscribers.
    pub fn new(metrics: Arc<Metrics>, change_capacity: usize, tail_capacity: usize) -> Arc<Hub> {
        Arc::new(Hub {
            tail: tail::Tail::new(tail_capacity),
            subscriber_arrived: tokio::sync::Notify::new(),
            head: tokio_watch::channel(0).0,
            head_now: std::sync::atomic::AtomicU64::new(0),
            changes: broadcast::channel(change_capacity.max(1)).0,
            epoch: tokio_watch::channel(0).0,
            lock_releases: broadcast::channel(1024).0,
            metrics,
        })
    }

    /// Wakes the Lock calls waiting for `name`.
    pub fn lock_released(&self, name: &str) {
        let _ = self.lock_releases.send(Arc::from(name));
    }

    /// A receiver of lock releases.
    pub fn watch_lock_releases(&self) -> LockReleases {
        LockReleases {
            rx: self.lock_releases.subscribe(),
        }
    }

    /// Raises the known head (never lowers it); wakes subscribers when it moved.
    pub fn advance(&self, head: u64) {
        self.head.send_if_modified(|h| {
            if head > *h {
                *h = head;
                self.head_now
                    .store(head, std::sync::atomic::Ordering::Release);
                true
            } else {
                false
            }
        });
    }

    /// The known head.
    pub fn head(&self) -> u64 {
        self.head_now.load(std::sync::atomic::Ordering::Acquire)
    }

    /// A receiver woken whenever the head moves.
    pub fn watch_head(&self) -> tokio_watch::Receiver<u64> {
        self.head.subscribe()
    }

    /// A receiver that changes after every listener (re)connection. Whoever waits on the head
    /// or the tail is woken then too (see `set_connected`), so a subscriber checks it with
    /// `has_changed` instead of waiting on it as well.
    pub fn watch_epoch(&self) -> tokio_watch::Receiver<u64> {
        self.epoch.subscribe()
    }

    /// A receiver of projection changes.
    pub fn subscribe_changes(&self) -> broadcast::Receiver<Change> {
        self.changes.subscribe()
    }

    /// Relays a change to local watchers.
    pub fn publish_local(&self, change: Change) {
        let _ = self.changes.send(change);
    }

    /// Whether the listener is connected (kept in its metric, the one place that records it).
    pub fn is_connected(&self) -> bool {
        self.metrics.listener_connected.get() == 1
    }

    fn set_connected(&self, up: bool) {
        self.metrics.listener_connected.set(i64::from(up));
        if up {
            self.epoch.send_modify(|e| *e += 1);
            // Wake every waiter on the head or the tail, without changing either.
            self.head.send_modify(|_| {});
            self.tail.wake();
        }
    }
}
