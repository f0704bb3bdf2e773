//! What every live-delivery task shares: the settings of subscriptions, consumer groups and
//! locks, and the context (store, hub, shutdown signal, slots) each task is given.

use std::{sync::Arc, time::Duration};

use tokio_util::sync::CancellationToken;

use super::{Hub, groups::GroupConfig};
use crate::error::Error;
use crate::store::Store;

/// Live-delivery settings.
#[derive(Debug, Clone)]
pub struct LiveConfig {
    /// Events per catch-up read.
    pub page_size: u32,
    /// Messages buffered per subscriber.
    pub buffer: usize,
    /// Heartbeat after this much silence.
    pub heartbeat: Duration,
    /// Safety-net poll while live.
    pub poll_interval: Duration,
    /// Consumer group settings.
    pub groups: GroupConfig,
    /// Lock settings.
    pub locks: LockConfig,
    /// Bytes that may wait in one subscriber's queue.
    pub max_buffered_bytes: usize,
    /// How long a full queue may stay full before the subscriber is cut off.
    pub stall_timeout: Duration,
    /// A filtered catch-up page looks at most this many sequences (`limits.max_scan_window`).
    pub max_scan_window: u64,
}

/// Lock settings.
#[derive(Debug, Clone)]
pub struct LockConfig {
    /// A lease not renewed for this long expires.
    pub lease_timeout: Duration,
    /// How often a waiting acquirer retries without a wake-up.
    pub poll: Duration,
    /// The NOTIFY channel of releases.
    pub channel: String,
}

/// What a subscriber task needs.
#[derive(Clone)]
pub struct LiveContext {
    /// Where reads go.
    pub store: Store,
    /// The hub.
    pub hub: Arc<Hub>,
    /// Settings.
    pub config: LiveConfig,
    /// Cancelled at server shutdown: streams end with UNAVAILABLE.
    pub shutdown: CancellationToken,
    /// Slots for long-lived calls (Subscribe, WatchChanges, Lock): `server.max_subscribers`.
    pub slots: Arc<tokio::sync::Semaphore>,
    /// The number of slots, for messages.
    pub max_subscribers: usize,
}

impl LiveContext {
    /// A slot for one long-lived call, held until the returned permit is dropped; refused with
    /// RESOURCE_EXHAUSTED when every slot is taken.
    pub fn take_slot(&self) -> Result<tokio::sync::OwnedSemaphorePermit, Error> {
        self.slots.clone().try_acquire_owned().map_err(|_| {
            self.hub.metrics.limit_rejections.inc();
            Error::LimitReached {
                setting: "server.max_subscribers",
                limit: self.max_subscribers.to_string(),
                message: "too many open Subscribe, WatchChanges and Lock calls on this instance"
                    .into(),
            }
        })
    }
}
