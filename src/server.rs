//! Wiring: the database (given or embedded), the store, the gRPC services (event store, health,
//! reflection) and graceful shutdown.

use std::{future::Future, sync::Arc, time::Duration};

use http::{HeaderValue, Response};
use tokio::net::TcpListener;
use tokio_stream::StreamExt as _;
use tokio_util::sync::CancellationToken;
use tonic::transport::server::TcpIncoming;
use tonic_health::ServingStatus;

use crate::config::Config;
use crate::embedded::Embedded;
use crate::error::{Error, Result};
use crate::grpc::EventStoreService;
use crate::live::{
    Hub,
    context::LiveContext,
    listener::{self, ListenerConfig},
};
use crate::metrics::Metrics;
use crate::proto::{self, event_store_server::EventStoreServer};
use crate::store::{Store, StoreConfig, target::Target};

/// The service name health reports for the event store.
pub const SERVICE_NAME: &str = "pgstore.v1.EventStore";
/// The health service name that reports whether the LISTEN connection is up.
pub const LISTENER_SERVICE: &str = "pgstore.listener";

/// Serves pgstore on `listener` until `shutdown` completes, then stops accepting calls, lets
/// in-flight calls finish (for at most the configured grace period), commits the appends already
/// queued, and returns.
///
/// The port answers at once: health reports NOT_SERVING and EventStore calls get UNAVAILABLE
/// (naming the database and the cause) until the database is reachable. A writer or listener
/// task that dies is fatal: health turns NOT_SERVING, the server shuts down and `run` returns an
/// error (the process exits non-zero, so that its supervisor restarts it).
pub async fn run(
    listener: TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<()> {
    let embedded = match &config.database_url {
        Some(_) => None,
        None => {
            let dir = config.data_dir.clone();
            Some(
                tokio::task::spawn_blocking(move || Embedded::start(&dir))
                    .await
                    .map_err(|e| Error::Internal(e.to_string()))??,
            )
        }
    };
    let result = serve(listener, &config, embedded.as_ref(), shutdown).await;
    if let Some(e) = embedded {
        tokio::task::spawn_blocking(move || e.stop()).await.ok();
    }
    result
}

async fn serve(
    listener: TcpListener,
    config: &Config,
    embedded: Option<&Embedded>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<()> {
    let primary = match (config.primary_target()?, embedded) {
        (Some(t), _) => t,
        (None, Some(e)) => {
            let mut t = Target::plain(e.cluster.config("postgres"));
            t.apply(&config.socket_settings());
            t
        }
        (None, None) => return Err(Error::Internal("no database".into())),
    };
    let metrics = Arc::new(Metrics::default());
    tokio::pin!(shutdown);

    // The port first: health answers (NOT_SERVING) while the database is still out of reach.
    let (health, health_service) = tonic_health::server::health_reporter();
    set_health(&health, ServingStatus::NotServing).await;
    let gate = Gate::<EventStoreServer<EventStoreService>>::new(format!(
        "connecting to the database at {}",
        primary.name
    ));
    let stop_serving = CancellationToken::new();
    let local = listener.local_addr().ok();
    let server = grpc_server(
        config,
        listener,
        health_service,
        gate.clone(),
        stop_serving.clone(),
        metrics.clone(),
    )?;
    let mut server = std::pin::pin!(server);
    tracing::info!(listen = ?local, database = %primary.name, "pgstore listening; opening the store");

    let writer_stop = CancellationToken::new();
    let store_config = StoreConfig {
        primary: primary.clone(),
        pool_size: config.database.pool_size,
        pool_wait: config.database.connect_timeout,
        events_channel: config.database.events_channel.clone(),
        writer: config.writer_config(),
        replicas: config.replica_targets()?,
        replica: config.replica_config(),
        migration_wait: config.database.migration_wait,
    };
    let opened = tokio::select! {
        r = open_store(
            store_config.clone(),
            config.database.startup_permanent_failures,
            metrics.clone(),
            writer_stop.clone(),
            &gate,
        ) => r,
        r = &mut server => {
            return r.map_err(|e| Error::Internal(format!("server: {e}")));
        }
        _ = &mut shutdown => return Ok(()),
    };
    let (store, mut writer) = match opened {
        Ok(pair) => pair,
        Err(e) => {
            stop_serving.cancel();
            let _ = tokio::time::timeout(Duration::from_secs(2), &mut server).await;
            return Err(e);
        }
    };
    let stop_background = CancellationToken::new();
    let mut background = tokio::task::JoinSet::new();

    // Live delivery: one LISTEN connection feeding the hub; this instance's own commits wake
    // local subscribers at once, without waiting for the notification's round trip.
    let hub = Hub::new(
        metrics.clone(),
        config.live.change_buffer,
        config.live.tail_events,
    );
    {
        let hub = hub.clone();
        background.spawn(
            store
                .router()
                .clone()
                .probe_loop(move || hub.head(), stop_background.clone()),
        );
    }
    if let Some(retention) = config
        .writer
        .idempotency_key_retention
        .filter(|d| !d.is_zero())
    {
        background.spawn(prune_idempotency_keys(
            store.clone(),
            retention,
            metrics.clone(),
            stop_background.clone(),
        ));
    }
    if !config.database.dead_row_retention.is_zero() {
        background.spawn(prune_dead_rows(
            store.clone(),
            config.database.dead_row_retention,
            stop_background.clone(),
        ));
    }
    background.spawn(finish_abandoned_deletes(
        store.clone(),
        config.database.delete_batch_size,
        stop_background.clone(),
    ));
    if !config.database.scavenge_interval.is_zero() {
        background.spawn(scavenge(
            store.clone(),
            config.database.scavenge_interval,
            config.database.delete_batch_size,
            metrics.clone(),
            stop_background.clone(),
        ));
    }
    background.spawn(crate::live::tail::run(
        store.clone(),
        hub.clone(),
        hub.tail.clone(),
        config.live.page_size,
        config.live.poll_interval,
        stop_background.clone(),
    ));
    let mut listener_task = tokio::spawn(listener::run(
        ListenerConfig {
            primary: store_config.primary.clone(),
            events_channel: config.database.events_channel.clone(),
            changes_channel: config.database.changes_channel.clone(),
            locks_channel: config.database.locks_channel.clone(),
        },
        hub.clone(),
        stop_background.clone(),
    ));
    {
        let mut committed = store.committed_head();
        let hub = hub.clone();
        let stop = stop_background.clone();
        background.spawn(async move {
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    r = committed.changed() => if r.is_err() { return },
                }
                let head = *committed.borrow_and_update();
                hub.advance(head);
            }
        });
    }
    if let Some(addr) = &config.metrics_listen {
        let listener = TcpListener::bind(addr.as_str())
            .await
            .map_err(|e| Error::invalid("metrics_listen", format!("cannot bind {addr}: {e}")))?;
        background.spawn(crate::metrics::serve(
            listener,
            metrics.clone(),
            stop_background.clone(),
        ));
    }
    let streams_stop = CancellationToken::new();
    let live = LiveContext {
        store: store.clone(),
        hub: hub.clone(),
        config: config.live_config(),
        shutdown: streams_stop.clone(),
        slots: Arc::new(tokio::sync::Semaphore::new(config.server.max_subscribers)),
        max_subscribers: config.server.max_subscribers,
    };
    background.spawn(watch_health(
        HealthProbe::new(primary.clone()),
        hub.clone(),
        health.clone(),
        config.server.health_interval,
        stop_background.clone(),
    ));

    let max_message = config.limits.max_append_bytes.saturating_mul(2);
    let service = EventStoreServer::new(EventStoreService::new(
        store.clone(),
        config.limits.clone(),
        live,
        config.database.changes_channel.clone(),
        config.database.delete_batch_size,
    ))
    .max_decoding_message_size(max_message)
    .max_encoding_message_size(usize::MAX);
    gate.open(service);
    // The store just opened on the primary: serving, until the health probe says otherwise.
    set_health(&health, ServingStatus::Serving).await;
    tracing::info!(listen = ?local, "pgstore serving");

    let fatal = tokio::select! {
        r = &mut server => {
            let _ = r.map_err(|e| tracing::error!(error = %e, "server stopped"));
            None
        }
        _ = &mut shutdown => None,
        r = &mut writer => Some(task_ended("writer", r)),
        r = &mut listener_task => Some(task_ended("listener", r)),
        Some(Err(e)) = background.join_next() => Some(task_ended("background", Err(e))),
    };
    if let Some(why) = &fatal {
        tracing::error!(error = %why, "a task pgstore cannot run without died; shutting down");
    }
    tracing::info!("shutting down: finishing in-flight calls");
    set_health(&health, ServingStatus::NotServing).await;
    // Streams never finish by themselves: end them (UNAVAILABLE) so the drain can.
    streams_stop.cancel();
    stop_serving.cancel();
    let grace = config.server.shutdown_grace;
    if tokio::time::timeout(grace, &mut server).await.is_err() {
        tracing::warn!("grace period over: cutting off remaining calls");
    }
    stop_background.cancel();
    writer_stop.cancel();
    // The writer commits what is queued; a frozen database must not hold shutdown: each batch is
    // bounded by writer.commit_timeout, and all of it by the grace period.
    let finish = async {
        if !writer.is_finished() {
            let _ = (&mut writer).await;
        }
        let _ = (&mut listener_task).await;
        while background.join_next().await.is_some() {}
    };
    if tokio::time::timeout(grace, finish).await.is_err() {
        tracing::warn!("background tasks did not stop within the grace period: aborting them");
        writer.abort();
        listener_task.abort();
        background.abort_all();
    }
    tracing::info!("pgstore stopped");
    match fatal {
        Some(why) => Err(Error::Internal(why)),
        None => Ok(()),
    }
}

/// The gRPC server: health, reflection and the event store (behind `gate`), with TLS, limits,
/// keepalives, authentication and the request deadline; it runs until `stop`.
fn grpc_server(
    config: &Config,
    listener: TcpListener,
    health_service: tonic_health::pb::health_server::HealthServer<
        impl tonic_health::pb::health_server::Health,
    >,
    gate: Gate<EventStoreServer<EventStoreService>>,
    stop: CancellationToken,
    metrics: Arc<Metrics>,
) -> Result<impl Future<Output = std::result::Result<(), tonic::transport::Error>>> {
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            // google.rpc error details, so grpcurl can print them.
            .register_encoded_file_descriptor_set(tonic_types::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1 = reflection()
        .build_v1()
        .map_err(|e| Error::Internal(format!("reflection: {e}")))?;
    let reflection_v1alpha = reflection()
        .build_v1alpha()
        .map_err(|e| Error::Internal(format!("reflection: {e}")))?;
    let s = &config.server;
    let incoming = TcpIncoming::from(listener)
        .with_nodelay(Some(true))
        .with_keepalive(Some(s.keepalive_interval))
        .with_keepalive_interval(Some(s.keepalive_interval))
        .with_keepalive_retries(Some(3));
    let tokens = crate::grpc::auth::Tokens::from_config(&config.auth);
    if tokens.is_some() {
        tracing::info!("bearer-token authentication on");
    }
    let builder = config.server_builder()?;
    if config.tls.cert_file.is_some() {
        tracing::info!(
            mutual = config.tls.client_ca_file.is_some(),
            "TLS on the gRPC port"
        );
    }
    let router = builder
        .max_concurrent_streams(s.max_concurrent_streams)
        .http2_keepalive_interval(Some(s.keepalive_interval))
        .http2_keepalive_timeout(Some(s.keepalive_timeout))
        .layer(crate::grpc::observe::ObserveLayer::new(metrics))
        .layer(tower::util::MapResponseLayer::new(
            too_large_is_resource_exhausted,
        ))
        .layer(crate::grpc::auth::AuthLayer(tokens))
        .layer(crate::grpc::deadline::DeadlineLayer::new(s.request_timeout))
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(gate);
    let served: futures_util::future::BoxFuture<
        'static,
        std::result::Result<(), tonic::transport::Error>,
    > = if s.coalesce_writes {
        let incoming = incoming.map(|conn| conn.map(crate::transport::Coalesced::new));
        Box::pin(router.serve_with_incoming_shutdown(incoming, stop.cancelled_owned()))
    } else {
        Box::pin(router.serve_with_incoming_shutdown(incoming, stop.cancelled_owned()))
    };
    Ok(served)
}

async fn set_health(health: &tonic_health::server::HealthReporter, status: ServingStatus) {
    health.set_service_status("", status).await;
    health.set_service_status(SERVICE_NAME, status).await;
}

/// What a task's end means when nothing asked it to stop.
fn task_ended(name: &str, r: std::result::Result<(), tokio::task::JoinError>) -> String {
    match r {
        Ok(()) => format!("the {name} task stopped unexpectedly"),
        Err(e) if e.is_panic() => {
            let p = e.into_panic();
            let msg = p
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| p.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a panic".into());
            format!("the {name} task panicked: {msg}")
        }
        Err(e) => format!("the {name} task was cancelled: {e}"),
    }
}

/// Opens the store, waiting for the database to come up (a sidecar often starts first). Every
/// failed attempt is logged with the server and the cause; a cause that waiting will not change
/// (authentication, a missing database, TLS verification) ends startup after `permanent_limit`
/// attempts in a row.
async fn open_store(
    config: StoreConfig,
    permanent_limit: u32,
    metrics: Arc<Metrics>,
    writer_stop: CancellationToken,
    gate: &Gate<EventStoreServer<EventStoreService>>,
) -> Result<(Store, tokio::task::JoinHandle<()>)> {
    let mut delay = Duration::from_millis(200);
    let mut permanent = 0;
    let mut attempt = 0u32;
    loop {
        attempt += 1;
        let why = match config.primary.connect().await {
            Err(e) => {
                if e.cause.is_permanent() {
                    permanent += 1;
                    if permanent >= permanent_limit {
                        tracing::error!(
                            server = %e.server, cause = ?e.cause, error = %e.detail, attempt,
                            "giving up: this will not change without a change of configuration"
                        );
                        return Err(Error::Unavailable(e.to_string()));
                    }
                } else {
                    permanent = 0;
                }
                tracing::warn!(
                    server = %e.server, cause = ?e.cause, error = %e.detail, attempt, retry_in = ?delay,
                    "database not reachable"
                );
                e.to_string()
            }
            Ok((client, connection)) => {
                drop(client);
                drop(connection);
                match Store::open(config.clone(), metrics.clone(), writer_stop.clone()).await {
                    Err(Error::Unavailable(why)) => {
                        tracing::warn!(
                            server = %config.primary.name, error = %why, attempt, retry_in = ?delay,
                            "opening the store failed"
                        );
                        why
                    }
                    other => return other,
                }
            }
        };
        gate.set_reason(format!("database not reachable yet: {why}"));
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(5));
    }
}

/// Deletes idempotency keys older than `retention`, every tenth of it (at most hourly), in batches
/// of 10,000 so no transaction runs long.
/// Deletes the rows of group members and locks idle for longer than `after`, every quarter of it
/// (at most every 10 minutes).
async fn prune_dead_rows(store: Store, after: Duration, stop: CancellationToken) {
    let every = (after / 4).clamp(Duration::from_millis(100), Duration::from_secs(600));
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        let pruned = async {
            let mut conn = crate::store::db::get(store.pool()).await?;
            let members = crate::live::groups::prune_members(&mut conn, after).await?;
            let locks = crate::live::locks::prune(&mut conn, after).await?;
            Ok::<_, Error>((members, locks))
        };
        match pruned.await {
            Ok((0, 0)) => {}
            Ok((members, locks)) => {
                tracing::debug!(members, locks, "deleted idle group-member and lock rows")
            }
            Err(e) => tracing::warn!(error = %e, "pruning idle rows failed; retrying later"),
        }
    }
}

/// Every minute, finishes the deletes that an instance left cut short (a stream still
/// `deleting` five minutes after it was marked).
async fn finish_abandoned_deletes(store: Store, batch: u32, stop: CancellationToken) {
    const EVERY: Duration = Duration::from_secs(60);
    const ABANDONED_AFTER: Duration = Duration::from_secs(300);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(EVERY) => {}
        }
        let finished = async {
            let mut conn = crate::store::db::get(store.pool()).await?;
            crate::store::lifecycle::finish_abandoned_deletes(&mut conn, ABANDONED_AFTER, batch)
                .await
        };
        match finished.await {
            Ok(0) => {}
            Ok(n) => {
                store.forget_read_ahead();
                tracing::info!(streams = n, "finished deletes that were cut short");
            }
            Err(e) => {
                tracing::warn!(error = %e, "finishing cut-short deletes failed; retrying later")
            }
        }
    }
}

/// Every `every`, deletes the events that stream retention rules expired.
async fn scavenge(
    store: Store,
    every: Duration,
    batch: u32,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        let pass = async {
            let mut conn = crate::store::db::get(store.pool()).await?;
            crate::store::retention::scavenge(&mut conn, batch).await
        };
        // A shutdown does not wait for a long pass: each batch is its own transaction.
        let result = tokio::select! {
            _ = stop.cancelled() => return,
            r = pass => r,
        };
        match result {
            Ok(0) => {}
            Ok(n) => {
                metrics.events_scavenged.inc_by(n);
                tracing::debug!(events = n, "scavenged expired events");
            }
            Err(e) => tracing::warn!(error = %e, "scavenging failed; retrying later"),
        }
    }
}

async fn prune_idempotency_keys(
    store: Store,
    retention: Duration,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
) {
    const BATCH: i64 = 10_000;
    let every = (retention / 10).min(Duration::from_secs(3600));
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        loop {
            match store.prune_idempotency_keys(retention, BATCH).await {
                Ok(n) => {
                    metrics.idempotency_keys_pruned.inc_by(n);
                    if n < BATCH as u64 || stop.is_cancelled() {
                        break;
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "pruning idempotency keys failed; retrying later");
                    break;
                }
            }
        }
    }
}

/// The health check's own connection to the primary (not from the request pool: a saturated
/// pool must not read as a dead database).
pub struct HealthProbe {
    target: Target,
    conn: Option<tokio_postgres::Client>,
}

impl HealthProbe {
    /// A probe of `target`; it connects on first use.
    pub fn new(target: Target) -> HealthProbe {
        let mut target = target;
        target.config.application_name("pgstore-health");
        HealthProbe { target, conn: None }
    }

    /// Whether the primary answers `SELECT 1` within `limit` (connecting first if needed). A
    /// failed or late probe drops the connection.
    pub async fn check(&mut self, limit: Duration) -> std::result::Result<(), String> {
        let probe = async {
            if self.conn.as_ref().is_none_or(|c| c.is_closed()) {
                let (client, connection) =
                    self.target.connect().await.map_err(|e| e.to_string())?;
                tokio::spawn(async move {
                    let _ = connection.await;
                });
                self.conn = Some(client);
            }
            let client = self.conn.as_ref().expect("connected above");
            client
                .simple_query("SELECT 1")
                .await
                .map(|_| ())
                .map_err(|e| crate::error::chain(&e))
        };
        let r = match tokio::time::timeout(limit, probe).await {
            Ok(r) => r,
            Err(_) => Err(format!(
                "{} did not answer within {limit:?}",
                self.target.name
            )),
        };
        if r.is_err() {
            self.conn = None;
        }
        r
    }
}

/// Probes the primary and reports SERVING / NOT_SERVING for the server and the event store;
/// reports the LISTEN connection's state as the service `pgstore.listener`.
async fn watch_health(
    mut probe: HealthProbe,
    hub: Arc<Hub>,
    health: tonic_health::server::HealthReporter,
    every: Duration,
    stop: CancellationToken,
) {
    let mut serving = None;
    let mut listener_up = None;
    let limit = every.max(Duration::from_secs(1));
    loop {
        let up = hub.is_connected();
        if listener_up != Some(up) {
            listener_up = Some(up);
            let status = if up {
                ServingStatus::Serving
            } else {
                ServingStatus::NotServing
            };
            health.set_service_status(LISTENER_SERVICE, status).await;
        }
        let checked = tokio::select! {
            _ = stop.cancelled() => return,
            r = probe.check(limit) => r,
        };
        let ok = checked.is_ok();
        if serving != Some(ok) {
            if ok {
                if serving.is_some() {
                    tracing::info!("primary reachable again: SERVING");
                }
                set_health(&health, ServingStatus::Serving).await;
            } else {
                tracing::warn!(error = %checked.unwrap_err(), "primary unreachable: NOT_SERVING");
                set_health(&health, ServingStatus::NotServing).await;
            }
            serving = Some(ok);
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
    }
}

/// The event store behind a gate: until the store is open, calls are answered UNAVAILABLE with
/// the reason (health and reflection, served beside it, answer from the start).
pub struct Gate<S> {
    inner: Arc<std::sync::OnceLock<S>>,
    reason: Arc<std::sync::Mutex<String>>,
}

impl<S> Clone for Gate<S> {
    fn clone(&self) -> Self {
        Gate {
            inner: self.inner.clone(),
            reason: self.reason.clone(),
        }
    }
}

impl<S> Gate<S> {
    /// A closed gate; calls get UNAVAILABLE with `reason`.
    pub fn new(reason: String) -> Gate<S> {
        Gate {
            inner: Arc::new(std::sync::OnceLock::new()),
            reason: Arc::new(std::sync::Mutex::new(reason)),
        }
    }

    /// Why calls are refused now.
    pub fn set_reason(&self, reason: String) {
        *self.reason.lock().expect("gate reason") = reason;
    }

    /// Lets calls through to `service` from now on.
    pub fn open(&self, service: S) {
        let _ = self.inner.set(service);
    }
}

impl<S: tonic::server::NamedService> tonic::server::NamedService for Gate<S> {
    const NAME: &'static str = S::NAME;
}

impl<S, B> tower::Service<http::Request<B>> for Gate<S>
where
    S: tower::Service<
            http::Request<B>,
            Response = http::Response<tonic::body::Body>,
            Error = std::convert::Infallible,
        > + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future =
        futures_util::future::BoxFuture<'static, std::result::Result<Self::Response, Self::Error>>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::result::Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        match self.inner.get() {
            Some(s) => Box::pin(tower::ServiceExt::oneshot(s.clone(), req)),
            None => {
                let why = self.reason.lock().expect("gate reason").clone();
                Box::pin(std::future::ready(Ok(
                    tonic::Status::unavailable(why).into_http()
                )))
            }
        }
    }
}

/// tonic answers a request larger than the decoding limit with OUT_OF_RANGE; gRPC's convention
/// (and pgstore's documented contract) is RESOURCE_EXHAUSTED.
fn too_large_is_resource_exhausted<B>(mut resp: Response<B>) -> Response<B> {
    let headers = resp.headers_mut();
    let too_large = headers.get("grpc-status").is_some_and(|s| s == "11")
        && headers.get("grpc-message").is_some_and(|m| {
            let m = String::from_utf8_lossy(m.as_bytes());
            m.contains("length%20too%20large") || m.contains("length too large")
        });
    if too_large {
        headers.insert("grpc-status", HeaderValue::from_static("8"));
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_dead_task_is_reported_with_its_panic() {
        let panicked = tokio::spawn(async { panic!("writer exploded") });
        let why = task_ended("writer", panicked.await);
        assert!(
            why.contains("writer task panicked: writer exploded"),
            "{why}"
        );
        let ended = tokio::spawn(async {});
        assert!(task_ended("listener", ended.await).contains("stopped unexpectedly"));
    }

    #[tokio::test]
    async fn a_closed_gate_answers_unavailable_with_the_reason() {
        use tower::ServiceExt;
        let gate = Gate::<
            tower::util::BoxCloneSyncService<
                http::Request<()>,
                http::Response<tonic::body::Body>,
                std::convert::Infallible,
            >,
        >::new("connecting to the database at db:5432".into());
        let resp = gate.clone().oneshot(http::Request::new(())).await.unwrap();
        let status = tonic::Status::from_header_map(resp.headers()).unwrap();
        assert_eq!(status.code(), tonic::Code::Unavailable);
        assert!(status.message().contains("db:5432"));
        gate.set_reason("database not reachable yet: refused".into());
        let resp = gate.oneshot(http::Request::new(())).await.unwrap();
        let status = tonic::Status::from_header_map(resp.headers()).unwrap();
        assert!(status.message().contains("refused"));
    }
}
