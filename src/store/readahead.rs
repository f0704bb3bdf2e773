//! Read-ahead for clients paging through the global log with ReadFrom.
//!
//! A client catching up asks for a page, decodes it, asks for the next. Done naively the database
//! idles while the client decodes and the client idles while the database reads. When a ReadFrom
//! page comes back full, the next page (same filters, same size) is read in the background, so it
//! is ready (or under way) when the client asks for it.
//!
//! Only a FULL page read ahead is ever served. Its events all lie below the head of the snapshot
//! it was read in, and the log only grows at its end, so any later read of the same page returns
//! the same events: serving it later is indistinguishable from reading it now. (A short page ends
//! at the head of its snapshot; it could miss a commit made since, so it is thrown away.) The one
//! way a page can change is DeleteStream, which clears the read-ahead of its instance; pages read
//! ahead are also dropped after [`TTL`]. A request whose read-your-writes fence is above the head
//! the page was read at is served by a fresh read.

use std::{
    collections::VecDeque,
    sync::Mutex,
    time::{Duration, Instant},
};

use tokio::sync::oneshot;

use super::{
    Store,
    read::{LogPage, ReadQuery},
};
use crate::error::Result;

/// How long a page read ahead may wait for its client.
pub const TTL: Duration = Duration::from_secs(1);

/// Pages read ahead and not yet asked for, oldest first.
pub struct ReadAhead {
    pending: Mutex<VecDeque<Pending>>,
    capacity: usize,
}

struct Pending {
    query: ReadQuery,
    started: Instant,
    page: oneshot::Receiver<Result<LogPage>>,
}

fn same(a: &ReadQuery, b: &ReadQuery) -> bool {
    a.from_sequence == b.from_sequence
        && a.limit == b.limit
        && a.event_types == b.event_types
        && a.stream_prefix == b.stream_prefix
        && a.query == b.query
        && a.partitions.is_none()
        && b.partitions.is_none()
}

impl ReadAhead {
    /// Keeps at most `capacity` pages (and reads) in flight.
    pub fn new(capacity: usize) -> ReadAhead {
        ReadAhead {
            pending: Mutex::new(VecDeque::new()),
            capacity,
        }
    }

    /// Forgets every page read ahead (their reads finish unobserved).
    pub fn clear(&self) {
        self.pending.lock().expect("read-ahead lock").clear();
    }

    /// Reads a page of the log, from the read-ahead when it holds this very page, and reads the
    /// following page ahead when this one is full.
    pub async fn read(&self, store: &Store, min_sequence: u64, q: &ReadQuery) -> Result<LogPage> {
        let ahead = {
            let mut pending = self.pending.lock().expect("read-ahead lock");
            pending.retain(|p| p.started.elapsed() < TTL);
            pending
                .iter()
                .position(|p| same(&p.query, q))
                .and_then(|i| pending.remove(i))
        };
        let mut page = None;
        if let Some(p) = ahead
            && let Ok(Ok(read)) = p.page.await
            && read.events.len() >= q.limit as usize
            && read.head >= min_sequence
            && p.started.elapsed() < TTL
        {
            page = Some(read);
        }
        let page = match page {
            Some(page) => page,
            None => store.read_log(min_sequence, q).await?,
        };
        if q.limit > 0 && page.events.len() >= q.limit as usize {
            self.start(
                store,
                ReadQuery {
                    from_sequence: page.next_sequence,
                    ..q.clone()
                },
            );
        }
        Ok(page)
    }

    fn start(&self, store: &Store, query: ReadQuery) {
        let mut pending = self.pending.lock().expect("read-ahead lock");
        if pending.len() >= self.capacity || pending.iter().any(|p| same(&p.query, &query)) {
            return;
        }
        let (tx, rx) = oneshot::channel();
        let (store, q) = (store.clone(), query.clone());
        tokio::spawn(async move {
            let _ = tx.send(store.read_log(0, &q).await);
        });
        pending.push_back(Pending {
            query,
            started: Instant::now(),
            page: rx,
        });
    }
}
