//! The request deadline: every call must produce its response (for a stream, its first message
//! headers) within `server.request_timeout`, or the client's own `grpc-timeout` when that is
//! shorter; past it the call is answered DEADLINE_EXCEEDED with a message naming the limit, and
//! the handler is dropped (its database work with it).

use std::{
    task::{Context, Poll},
    time::Duration,
};

use futures_util::future::BoxFuture;
use http::{HeaderMap, Request, Response};
use tonic::Status;
use tower::{Layer, Service};

/// The layer.
#[derive(Clone, Copy)]
pub struct DeadlineLayer {
    limit: Duration,
}

impl DeadlineLayer {
    /// Calls get at most `limit`.
    pub fn new(limit: Duration) -> Self {
        DeadlineLayer { limit }
    }
}

impl<S> Layer<S> for DeadlineLayer {
    type Service = Deadline<S>;

    fn layer(&self, inner: S) -> Deadline<S> {
        Deadline {
            inner,
            limit: self.limit,
        }
    }
}

/// The service the layer makes.
#[derive(Clone)]
pub struct Deadline<S> {
    inner: S,
    limit: Duration,
}

/// The client's `grpc-timeout` header (`<up to 8 digits><H|M|S|m|u|n>`), if valid.
pub fn grpc_timeout(headers: &HeaderMap) -> Option<Duration> {
    let v = headers.get("grpc-timeout")?.to_str().ok()?;
    if v.len() < 2 || v.len() > 9 {
        return None;
    }
    let (digits, unit) = v.split_at(v.len() - 1);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

impl<S, B, RB> Service<Request<B>> for Deadline<S>
where
    S: Service<Request<B>, Response = Response<RB>>,
    S::Future: Send + 'static,
    RB: Default + Send + 'static,
{
    type Response = Response<RB>;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Response<RB>, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let (limit, message) = match grpc_timeout(req.headers()) {
            Some(client) if client < self.limit => (
                client,
                format!("the call's deadline (grpc-timeout {client:?}) passed"),
            ),
            _ => (
                self.limit,
                format!(
                    "the call took longer than server.request_timeout ({:?})",
                    self.limit
                ),
            ),
        };
        let fut = self.inner.call(req);
        Box::pin(async move {
            match tokio::time::timeout(limit, fut).await {
                Ok(r) => r,
                Err(_) => Ok(Status::deadline_exceeded(message).into_http()),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeout_units() {
        let h = |v: &str| {
            let mut m = HeaderMap::new();
            m.insert("grpc-timeout", v.parse().unwrap());
            grpc_timeout(&m)
        };
        assert_eq!(h("5S"), Some(Duration::from_secs(5)));
        assert_eq!(h("250m"), Some(Duration::from_millis(250)));
        assert_eq!(h("2M"), Some(Duration::from_secs(120)));
        assert_eq!(h("7u"), Some(Duration::from_micros(7)));
        assert_eq!(h("S"), None);
        assert_eq!(h("123456789S"), None);
        assert_eq!(h("5x"), None);
        assert_eq!(grpc_timeout(&HeaderMap::new()), None);
    }
}
