//! Wiring: the database (given or embedded), the store, the gRPC services (event store, health,
//! reflection) and graceful shutdown.

use std::{future::Future, sync::Arc, time::Duration};

use http::{HeaderValue, Response};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::transport::server::TcpIncoming;
use tonic_health::ServingStatus;

use crate::config::{Config, parse_database_url};
use crate::embedded::Embedded;
use crate::error::{Error, Result};
use crate::grpc::EventStoreService;
use crate::live::{
    Hub,
    listener::{self, ListenerConfig},
    subscribe::LiveContext,
};
use crate::metrics::Metrics;
use crate::proto::{self, event_store_server::EventStoreServer};
use crate::store::{Store, StoreConfig};

/// The service name health reports for the event store.
pub const SERVICE_NAME: &str = "pgstore.v1.EventStore";
/// The health service name that reports whether the LISTEN connection is up.
pub const LISTENER_SERVICE: &str = "pgstore.listener";

/// Serves pgstore on `listener` until `shutdown` completes, then stops accepting calls, lets
/// in-flight calls finish (for at most the configured grace period), commits the appends already
/// queued, and returns.
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
    let mut primary = match (&config.database_url, embedded) {
        (Some(url), _) => parse_database_url(url).map_err(|e| Error::invalid("database_url", e))?,
        (None, Some(e)) => e.cluster.config("postgres"),
        (None, None) => return Err(Error::Internal("no database".into())),
    };
    primary.connect_timeout(config.database.connect_timeout);

    let writer_stop = CancellationToken::new();
    let store_config = StoreConfig {
        primary,
        pool_size: config.database.pool_size,
        pool_wait: config.database.connect_timeout,
        events_channel: config.database.events_channel.clone(),
        writer: config.writer_config(),
        replicas: config.replica_configs()?,
        replica: config.replica_config(),
    };
    let metrics = Arc::new(Metrics::default());
    tokio::pin!(shutdown);
    let (store, writer) = tokio::select! {
        r = open_store(store_config.clone(), metrics.clone(), writer_stop.clone()) => r?,
        _ = &mut shutdown => return Ok(()),
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
    if let Some(retention) = config.writer.idempotency_key_retention {
        background.spawn(prune_idempotency_keys(
            store.clone(),
            retention,
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
    background.spawn(listener::run(
        ListenerConfig {
            primary: store_config.primary.clone(),
            events_channel: config.database.events_channel.clone(),
            changes_channel: config.database.changes_channel.clone(),
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
    };

    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_service_status("", ServingStatus::Serving).await;
    health
        .set_serving::<EventStoreServer<EventStoreService>>()
        .await;
    background.spawn(watch_health(
        store.clone(),
        hub.clone(),
        health.clone(),
        config.server.health_interval,
        stop_background.clone(),
    ));

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

    let max_message = config.limits.max_append_bytes.saturating_mul(2);
    let service = EventStoreServer::new(EventStoreService::new(
        store.clone(),
        config.limits.clone(),
        live,
        config.database.changes_channel.clone(),
    ))
    .max_decoding_message_size(max_message)
    .max_encoding_message_size(usize::MAX);

    let local = listener.local_addr().ok();
    let incoming = tokio_stream::StreamExt::map(
        TcpIncoming::from(listener).with_nodelay(Some(true)),
        |conn| conn.map(crate::transport::Coalesced::new),
    );
    let stop_serving = CancellationToken::new();
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
    let server = builder
        .layer(tower::util::MapResponseLayer::new(
            too_large_is_resource_exhausted,
        ))
        .layer(crate::grpc::auth::AuthLayer(tokens))
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(service)
        .serve_with_incoming_shutdown(incoming, stop_serving.clone().cancelled_owned());
    tracing::info!(listen = ?local, "pgstore serving");
    tokio::pin!(server);
    let served = tokio::select! {
        r = &mut server => r,
        _ = &mut shutdown => {
            tracing::info!("shutting down: finishing in-flight calls");
            health.set_service_status("", ServingStatus::NotServing).await;
            health.set_not_serving::<EventStoreServer<EventStoreService>>().await;
            // Streams never finish by themselves: end them (UNAVAILABLE) so the drain can.
            streams_stop.cancel();
            stop_serving.cancel();
            match tokio::time::timeout(config.server.shutdown_grace, &mut server).await {
                Ok(r) => r,
                Err(_) => {
                    tracing::warn!("grace period over: cutting off remaining calls");
                    Ok(())
                }
            }
        }
    };
    streams_stop.cancel();
    stop_background.cancel();
    writer_stop.cancel();
    let _ = writer.await;
    while background.join_next().await.is_some() {}
    tracing::info!("pgstore stopped");
    served.map_err(|e| Error::Internal(format!("server: {e}")))
}

/// Opens the store, waiting for the database to come up (a sidecar often starts first).
async fn open_store(
    config: StoreConfig,
    metrics: Arc<Metrics>,
    writer_stop: CancellationToken,
) -> Result<(Store, tokio::task::JoinHandle<()>)> {
    let mut delay = Duration::from_millis(200);
    loop {
        match Store::open(config.clone(), metrics.clone(), writer_stop.clone()).await {
            Err(Error::Unavailable(why)) => {
                tracing::warn!(error = %why, retry_in = ?delay, "database not reachable yet");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
            other => return other,
        }
    }
}

/// Deletes idempotency keys older than `retention`, every tenth of it (at most hourly), in batches
/// of 10,000 so no transaction runs long.
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
                    metrics
                        .idempotency_keys_pruned
                        .fetch_add(n, std::sync::atomic::Ordering::Relaxed);
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

/// Probes the primary and reports SERVING / NOT_SERVING for the server and the event store;
/// reports the LISTEN connection's state as the service `pgstore.listener`.
async fn watch_health(
    store: Store,
    hub: Arc<Hub>,
    health: tonic_health::server::HealthReporter,
    every: Duration,
    stop: CancellationToken,
) {
    let mut serving = true;
    let mut listener_up = None;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
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
        let ok = tokio::time::timeout(every.max(Duration::from_secs(1)), store.ping())
            .await
            .is_ok_and(|r| r.is_ok());
        if ok != serving {
            serving = ok;
            let status = if ok {
                tracing::info!("primary reachable again: SERVING");
                ServingStatus::Serving
            } else {
                tracing::warn!("primary unreachable: NOT_SERVING");
                ServingStatus::NotServing
            };
            health.set_service_status("", status).await;
            health.set_service_status(SERVICE_NAME, status).await;
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
