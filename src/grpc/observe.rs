//! Per-call metrics: every call's service, method, status code and time to its response
//! headers, recorded by a tower layer around all gRPC services (so calls refused by
//! authentication, the deadline or the startup gate count too).
//!
//! The status code is the `grpc-status` of the response headers (errors are answered
//! trailers-only); a response that starts without one is a call that succeeded so far (`OK`).
//! Paths that name no known method are counted under `unknown`, so that a client cannot grow
//! the number of series.

use std::{
    collections::HashMap,
    sync::{Arc, OnceLock},
    task::{Context, Poll},
    time::Instant,
};

use futures_util::future::BoxFuture;
use http::{Request, Response};
use prost::Message;
use tower::{Layer, Service};

use crate::metrics::Metrics;

/// One method's series, resolved once per status code on first use: recording a call costs a
/// path lookup, a counter increment and a histogram observation, no allocation.
struct MethodSeries {
    service: String,
    method: String,
    by_code: [OnceLock<(Counter, Histogram)>; 17],
}

type Counter = prometheus_client::metrics::counter::Counter;
type Histogram = prometheus_client::metrics::histogram::Histogram;

impl MethodSeries {
    fn new(service: &str, method: &str) -> Arc<Self> {
        Arc::new(MethodSeries {
            service: service.to_owned(),
            method: method.to_owned(),
            by_code: Default::default(),
        })
    }

    fn record(&self, metrics: &Metrics, code: tonic::Code, seconds: f64) {
        let slot = &self.by_code[(code as usize).min(16)];
        let (count, duration) =
            slot.get_or_init(|| metrics.rpc_series(&self.service, &self.method, code));
        count.inc();
        duration.observe(seconds);
    }
}

/// The layer.
#[derive(Clone)]
pub struct ObserveLayer {
    metrics: Arc<Metrics>,
    known: Arc<HashMap<String, Arc<MethodSeries>>>,
    unknown: Arc<MethodSeries>,
}

impl ObserveLayer {
    /// Records into `metrics`; the methods of the API, health and reflection are known.
    pub fn new(metrics: Arc<Metrics>) -> Self {
        let mut known = HashMap::new();
        for set in [
            crate::proto::FILE_DESCRIPTOR_SET,
            tonic_health::pb::FILE_DESCRIPTOR_SET,
        ] {
            let set = prost_types::FileDescriptorSet::decode(set).expect("a valid descriptor set");
            for file in set.file {
                for service in &file.service {
                    let full = format!("{}.{}", file.package(), service.name());
                    for method in &service.method {
                        known.insert(
                            format!("/{full}/{}", method.name()),
                            MethodSeries::new(&full, method.name()),
                        );
                    }
                }
            }
        }
        for version in ["v1", "v1alpha"] {
            let service = format!("grpc.reflection.{version}.ServerReflection");
            known.insert(
                format!("/{service}/ServerReflectionInfo"),
                MethodSeries::new(&service, "ServerReflectionInfo"),
            );
        }
        ObserveLayer {
            metrics,
            known: Arc::new(known),
            unknown: MethodSeries::new("unknown", "unknown"),
        }
    }
}

impl<S> Layer<S> for ObserveLayer {
    type Service = Observe<S>;

    fn layer(&self, inner: S) -> Observe<S> {
        Observe {
            inner,
            layer: self.clone(),
        }
    }
}

/// The service the layer makes.
#[derive(Clone)]
pub struct Observe<S> {
    inner: S,
    layer: ObserveLayer,
}

impl<S, B, RB> Service<Request<B>> for Observe<S>
where
    S: Service<Request<B>, Response = Response<RB>>,
    S::Future: Send + 'static,
{
    type Response = Response<RB>;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Response<RB>, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let series = self
            .layer
            .known
            .get(req.uri().path())
            .unwrap_or(&self.layer.unknown)
            .clone();
        let metrics = self.layer.metrics.clone();
        let started = Instant::now();
        let call = self.inner.call(req);
        Box::pin(async move {
            let response = call.await?;
            let code = response
                .headers()
                .get("grpc-status")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<i32>().ok())
                .map_or(tonic::Code::Ok, tonic::Code::from_i32);
            series.record(&metrics, code, started.elapsed().as_secs_f64());
            Ok(response)
        })
    }
}
