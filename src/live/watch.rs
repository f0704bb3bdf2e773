//! WatchChanges: relays projection-change notices from the hub to one client, filtered by
//! projection. A watcher that falls behind the hub's buffer is told how many changes it missed
//! instead of holding anyone else up.

use tokio::sync::{broadcast::error::RecvError, mpsc};
use tonic::Status;

use super::context::LiveContext;
use crate::metrics::GaugeGuard;
use crate::proto::{self, watch_changes_response::Message};

type Tx = mpsc::Sender<Result<proto::WatchChangesResponse, Status>>;

/// Runs one watcher until the client leaves or the server stops. The caller spawns it.
pub async fn run(ctx: LiveContext, projections: Vec<String>, tx: Tx) {
    let metrics = ctx.hub.metrics.clone();
    let _watchers = GaugeGuard::new(&metrics, |m| &m.watchers);
    let _task = GaugeGuard::new(&metrics, |m| &m.stream_tasks);
    let mut rx = ctx.hub.subscribe_changes();
    let mut last_sent = tokio::time::Instant::now();
    loop {
        let msg = tokio::select! {
            r = rx.recv() => match r {
                Ok(change) => {
                    if !projections.is_empty() && !projections.contains(&change.projection) {
                        continue;
                    }
                    metrics.changes_relayed.inc();
                    Message::Change(proto::Change {
                        projection: change.projection,
                        key: change.key,
                        payload: change.payload,
                        sequence: change.sequence,
                    })
                }
                Err(RecvError::Lagged(missed)) => {
                    metrics.changes_lagged.inc_by(missed);
                    Message::Lagged(proto::Lagged { missed })
                }
                Err(RecvError::Closed) => return,
            },
            _ = tokio::time::sleep_until(last_sent + ctx.config.heartbeat) => {
                Message::Heartbeat(proto::Heartbeat { head: ctx.hub.head() })
            }
            _ = tx.closed() => return,
            _ = ctx.shutdown.cancelled() => {
                let _ = tx.try_send(Err(Status::unavailable("server is shutting down")));
                return;
            }
        };
        let item = Ok(proto::WatchChangesResponse { message: Some(msg) });
        tokio::select! {
            r = tx.send(item) => if r.is_err() { return },
            _ = ctx.shutdown.cancelled() => return,
        }
        last_sent = tokio::time::Instant::now();
    }
}
