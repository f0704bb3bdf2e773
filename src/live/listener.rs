//! The one LISTEN connection of an instance: a dedicated connection to the primary (not from the
//! pool) listening on the events and changes channels. It reconnects with backoff after any loss;
//! after each (re)connection it reads the head from the database and bumps the hub's epoch, so
//! every subscriber re-reads from its own position (notifications sent during the gap are gone).

use std::{future::poll_fn, sync::Arc, time::Duration};

use tokio_postgres::AsyncMessage;
use tokio_util::sync::CancellationToken;

use super::{Change, Hub};

/// Where and what to listen to.
#[derive(Debug, Clone)]
pub struct ListenerConfig {
    /// The primary.
    pub primary: crate::store::target::Target,
    /// Channel carrying log heads.
    pub events_channel: String,
    /// Channel carrying projection changes.
    pub changes_channel: String,
    /// Channel carrying lock releases.
    pub locks_channel: String,
}

/// Runs the listener until `stop` is cancelled.
pub async fn run(mut config: ListenerConfig, hub: Arc<Hub>, stop: CancellationToken) {
    // Named so operators (and tests) can tell it apart in pg_stat_activity.
    config.primary.config.application_name("pgstore-listener");
    let mut delay = Duration::from_millis(100);
    let mut first = true;
    loop {
        let outcome = tokio::select! {
            _ = stop.cancelled() => break,
            r = listen_once(&config, &hub, &stop) => r,
        };
        hub.set_connected(false);
        match outcome {
            Ok(true) => delay = Duration::from_millis(100),
            Ok(false) => {}
            Err(e) => {
                if first {
                    tracing::warn!(error = %e, retry_in = ?delay, "LISTEN connection failed; retrying")
                } else {
                    tracing::warn!(error = %e, retry_in = ?delay, "LISTEN connection lost; reconnecting")
                }
            }
        }
        first = false;
        hub.metrics.listener_reconnects.inc();
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(Duration::from_secs(5));
    }
    hub.set_connected(false);
}

/// One connection's life. `Ok(true)` when it had been up (reset the backoff).
async fn listen_once(
    config: &ListenerConfig,
    hub: &Hub,
    stop: &CancellationToken,
) -> Result<bool, String> {
    let (client, mut connection) = config.primary.connect().await.map_err(|e| e.to_string())?;
    let setup = async {
        client
            .batch_execute(&format!(
                "LISTEN \"{}\"; LISTEN \"{}\"; LISTEN \"{}\"",
                config.events_channel, config.changes_channel, config.locks_channel
            ))
            .await?;
        let row = client
            .query_one("SELECT seq FROM pgstore.head", &[])
            .await?;
        Ok::<i64, tokio_postgres::Error>(row.get(0))
    };
    tokio::pin!(setup);
    // Drive the connection while the setup runs; notifications may already arrive.
    let head = loop {
        tokio::select! {
            r = &mut setup => break r.map_err(|e| crate::error::chain(&e))?,
            m = poll_fn(|cx| connection.poll_message(cx)) => match m {
                Some(Ok(msg)) => handle(config, hub, msg),
                Some(Err(e)) => return Err(crate::error::chain(&e)),
                None => return Ok(false),
            },
        }
    };
    hub.advance(head as u64);
    hub.set_connected(true);
    tracing::info!(head, "LISTEN connection up");
    loop {
        tokio::select! {
            _ = stop.cancelled() => return Ok(true),
            m = poll_fn(|cx| connection.poll_message(cx)) => match m {
                Some(Ok(msg)) => handle(config, hub, msg),
                Some(Err(e)) => return Err(crate::error::chain(&e)),
                None => {
                    tracing::warn!("LISTEN connection closed by the server");
                    return Ok(true);
                }
            },
        }
    }
}

fn handle(config: &ListenerConfig, hub: &Hub, msg: AsyncMessage) {
    let AsyncMessage::Notification(n) = msg else {
        return;
    };
    hub.metrics.notifications.inc();
    if n.channel() == config.events_channel {
        match n.payload().trim().parse::<u64>() {
            Ok(head) => hub.advance(head),
            Err(_) => tracing::debug!(payload = n.payload(), "ignoring a non-numeric head"),
        }
    } else if n.channel() == config.locks_channel {
        hub.lock_released(n.payload());
    } else if n.channel() == config.changes_channel {
        match serde_json::from_str::<Change>(n.payload()) {
            Ok(change) => hub.publish_local(change),
            Err(e) => tracing::debug!(error = %e, "ignoring a malformed change notice"),
        }
    }
}
