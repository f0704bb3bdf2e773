//! The shared tail of the log: the most recent events, read from PostgreSQL ONCE per instance and
//! kept in memory, so that live subscribers (however many) take new events from here instead of
//! each querying the database after every commit.
//!
//! The tail always covers a contiguous range of sequences `[start, end)`: every committed event in
//! that range is in it (a range, not a count: sequences of deleted streams are simply absent). It
//! is filled by one reader task with the same prefix-visible reads as everything else, so serving
//! from it keeps every ordering guarantee.

use std::{
    collections::VecDeque,
    sync::{Arc, RwLock},
    time::Duration,
};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::Hub;
use crate::store::{Store, db, read};
use crate::wire::EncodedEvent;

/// The in-memory tail.
pub struct Tail {
    inner: RwLock<Inner>,
    /// `end` of the covered range; bumped after every extension.
    covered: watch::Sender<u64>,
    /// Most events kept.
    capacity: usize,
}

struct Inner {
    start: u64,
    end: u64,
    events: VecDeque<EncodedEvent>,
}

impl Tail {
    /// An empty tail keeping at most `capacity` events.
    pub fn new(capacity: usize) -> Arc<Tail> {
        Arc::new(Tail {
            inner: RwLock::new(Inner {
                start: u64::MAX,
                end: u64::MAX,
                events: VecDeque::new(),
            }),
            covered: watch::channel(0).0,
            capacity: capacity.max(1),
        })
    }

    /// A receiver woken whenever the tail grows.
    pub fn watch(&self) -> watch::Receiver<u64> {
        self.covered.subscribe()
    }

    /// Calls `f` with up to `max` events from sequence `from` on, under one read lock (nothing is
    /// copied unless `f` copies it), and returns what it returned with the end of the range the
    /// events were taken from (everything in `[from, end)` not given does not exist) and whether
    /// the tail goes on beyond that end. `None` when the tail does not cover `from` (it is older
    /// than the tail, or the tail is not filled yet).
    pub fn with_slice<R>(
        &self,
        from: u64,
        max: usize,
        f: impl FnOnce(&mut dyn Iterator<Item = &EncodedEvent>) -> R,
    ) -> Option<(R, u64, bool)> {
        let inner = self.inner.read().expect("tail lock");
        if from < inner.start || inner.start == u64::MAX {
            return None;
        }
        if from >= inner.end {
            return Some((f(&mut std::iter::empty()), inner.end, false));
        }
        let first = inner.events.partition_point(|e| e.seq < from);
        let last = (first + max.max(1)).min(inner.events.len());
        let r = f(&mut inner.events.range(first..last));
        if last < inner.events.len() {
            // Stopped at `max`: the range ends just after the last event given.
            Some((r, inner.events[last - 1].seq + 1, true))
        } else {
            Some((r, inner.end, false))
        }
    }

    /// Up to `max` events from sequence `from` on (copies), and the end of the range they were
    /// taken from; see [`Tail::with_slice`].
    #[cfg(test)]
    fn slice_from(&self, from: u64, max: usize) -> Option<(Vec<EncodedEvent>, u64)> {
        self.with_slice(from, max, |events| events.cloned().collect())
            .map(|(events, end, _)| (events, end))
    }

    /// Forgets everything: the tail covers nothing until reset.
    fn clear(&self) {
        let mut inner = self.inner.write().expect("tail lock");
        inner.start = u64::MAX;
        inner.end = u64::MAX;
        inner.events.clear();
    }

    /// Starts the tail at `next` (nothing before it is kept).
    fn reset(&self, next: u64) {
        let mut inner = self.inner.write().expect("tail lock");
        inner.start = next;
        inner.end = next;
        inner.events.clear();
    }

    /// Appends events read from `end` up to `next_sequence`.
    fn extend(&self, events: Vec<EncodedEvent>, next_sequence: u64) {
        {
            let mut inner = self.inner.write().expect("tail lock");
            inner.events.extend(events);
            inner.end = inner.end.max(next_sequence);
            while inner.events.len() > self.capacity {
                if let Some(old) = inner.events.pop_front() {
                    inner.start = old.seq + 1;
                }
            }
        }
        let end = self.inner.read().expect("tail lock").end;
        self.covered.send_replace(end);
    }

    /// Wakes everyone watching the tail, without changing it.
    pub fn wake(&self) {
        self.covered.send_modify(|_| {});
    }

    /// The end of the covered range.
    pub fn end(&self) -> u64 {
        self.inner.read().expect("tail lock").end
    }
}

/// Keeps the tail filled: reads what is new whenever the hub's head moves (or after a listener
/// reconnection, or every `poll`).
pub async fn run(
    store: Store,
    hub: Arc<Hub>,
    tail: Arc<Tail>,
    page_size: u32,
    poll: Duration,
    stop: CancellationToken,
) {
    let mut head_rx = hub.watch_head();
    let mut epoch_rx = hub.watch_epoch();
    let mut started = false;
    let mut delay = Duration::from_millis(50);
    loop {
        head_rx.borrow_and_update();
        epoch_rx.borrow_and_update();
        // Nobody to serve: keep nothing and cost nothing (no read per commit).
        if hub.metrics.subscribers.get() == 0 {
            if started {
                tail.clear();
                started = false;
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = hub.subscriber_arrived.notified() => {}
                _ = tokio::time::sleep(poll) => {}
            }
            continue;
        }
        let before = tail.end();
        let result = async {
            if !started {
                let mut conn = db::get(store.pool()).await?;
                let head = read::latest_sequence(&mut conn).await?;
                tail.reset(head + 1);
                hub.advance(head);
                started = true;
            }
            loop {
                let q = read::ReadQuery {
                    from_sequence: tail.end(),
                    limit: page_size,
                    event_types: Vec::new(),
                    stream_prefix: String::new(),
                    partitions: None,
                    window: 0,
                    query: None,
                };
                let page = store.read_log(0, &q).await?;
                hub.advance(page.head);
                // Caught up once the page reaches the head (a short page may also end where
                // retention hid the rest of the window).
                let caught_up = page.next_sequence > page.head;
                tail.extend(page.events, page.next_sequence);
                if caught_up {
                    return Ok::<(), crate::Error>(());
                }
            }
        }
        .await;
        match result {
            Ok(()) => delay = Duration::from_millis(50),
            Err(e) => {
                tracing::debug!(error = %e, "tail read failed; retrying");
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(delay) => {}
                }
                delay = (delay * 2).min(Duration::from_secs(1));
                continue;
            }
        }
        if hub.head() >= tail.end() {
            // More is committed than we could read. If this read made progress, more arrived
            // meanwhile: read again at once. If not, a replica has not replayed it yet: give it a
            // moment.
            if tail.end() == before {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_millis(2)) => {}
                }
            }
            continue;
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = head_rx.changed() => {}
            _ = epoch_rx.changed() => {}
            _ = tokio::time::sleep(poll) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(seq: u64) -> EncodedEvent {
        EncodedEvent::from_message(&crate::proto::RecordedEvent {
            global_sequence: seq,
            ..Default::default()
        })
    }

    #[test]
    fn slices_cover_ranges_and_evict_oldest() {
        let t = Tail::new(3);
        assert!(t.slice_from(1, 10).is_none(), "not filled yet");
        t.reset(5);
        assert_eq!(t.slice_from(5, 10).unwrap().1, 5);
        assert!(t.slice_from(4, 10).is_none());
        // 7 was deleted: the range still covers it.
        t.extend(vec![ev(5), ev(6), ev(8)], 9);
        let (e, end) = t.slice_from(5, 10).unwrap();
        assert_eq!(e.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![5, 6, 8]);
        assert_eq!(end, 9);
        let (e, end) = t.slice_from(7, 10).unwrap();
        assert_eq!((e.len(), end), (1, 9));
        let (e, end) = t.slice_from(5, 2).unwrap();
        assert_eq!((e.len(), end), (2, 7), "stopped at max");
        t.extend(vec![ev(9)], 10);
        assert!(t.slice_from(5, 10).is_none(), "evicted");
        assert_eq!(t.slice_from(6, 10).unwrap().0.len(), 3);
    }
}
