//! Bearer-token authentication for the EventStore service, as a tower layer in front of every
//! service: it sees the method path and the `authorization` header before any request is decoded.
//!
//! With no tokens configured every call is let through. Otherwise each call to
//! `pgstore.v1.EventStore` must carry `authorization: Bearer <token>`: a missing or unknown token
//! gets UNAUTHENTICATED; a read-only token (`auth.read_tokens`) gets PERMISSION_DENIED on a method
//! that writes. Health checks and server reflection stay open, so that orchestrators can probe
//! and `grpcurl` can list the API without a token.

use std::{
    sync::Arc,
    task::{Context, Poll},
};

use futures_util::future::{Either, Ready, ready};
use http::{HeaderMap, Request, Response};
use tonic::Status;
use tower::{Layer, Service};

use crate::config::AuthSection;

/// The service whose calls need a token.
const GUARDED_SERVICE: &str = "/pgstore.v1.EventStore/";

/// Methods a read-only token may call: they change nothing (Subscribe with a consumer group is
/// refused by the handler, see [`ReadOnly`]).
const READ_METHODS: &[&str] = &[
    "Load",
    "ReadFrom",
    "Read",
    "LatestSequence",
    "Subscribe",
    "LoadCheckpoint",
    "LoadSnapshot",
    "GetStream",
    "WatchChanges",
];

/// Marks a call made with a read-only token (a request extension), for the handlers whose
/// permission depends on the request's content (Subscribe with a consumer group).
#[derive(Debug, Clone, Copy)]
pub struct ReadOnly;

/// Whether the call was made with a read-only token.
pub fn is_read_only(extensions: &http::Extensions) -> bool {
    extensions.get::<ReadOnly>().is_some()
}

/// What a token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Every method.
    Full,
    /// Methods that read (and Subscribe without a group).
    Read,
}

/// The configured tokens.
#[derive(Debug)]
pub struct Tokens {
    full: Vec<Vec<u8>>,
    read: Vec<Vec<u8>>,
}

impl Tokens {
    /// `None` when no token is configured (authentication off).
    pub fn from_config(auth: &AuthSection) -> Option<Arc<Tokens>> {
        if auth.tokens.is_empty() && auth.read_tokens.is_empty() {
            return None;
        }
        let bytes = |v: &[String]| v.iter().map(|t| t.as_bytes().to_vec()).collect();
        Some(Arc::new(Tokens {
            full: bytes(&auth.tokens),
            read: bytes(&auth.read_tokens),
        }))
    }

    /// Whether a call to `path` with these headers may proceed, and with which access.
    pub fn check(&self, path: &str, headers: &HeaderMap) -> Result<Access, Status> {
        let Some(method) = path.strip_prefix(GUARDED_SERVICE) else {
            return Ok(Access::Full);
        };
        let token = headers
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
            .ok_or_else(|| {
                Status::unauthenticated(
                    "missing bearer token: send the metadata `authorization: Bearer <token>`",
                )
            })?;
        if any_equal(&self.full, token.as_bytes()) {
            return Ok(Access::Full);
        }
        if any_equal(&self.read, token.as_bytes()) {
            return if READ_METHODS.contains(&method) {
                Ok(Access::Read)
            } else {
                Err(Status::permission_denied(format!(
                    "this token may only read; {method} writes"
                )))
            };
        }
        Err(Status::unauthenticated("unknown bearer token"))
    }
}

/// Compares against every token without stopping early, so timing tells nothing about them.
fn any_equal(tokens: &[Vec<u8>], given: &[u8]) -> bool {
    tokens
        .iter()
        .fold(false, |found, t| found | constant_time_eq(t, given))
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The layer; a no-op without tokens.
#[derive(Clone)]
pub struct AuthLayer(pub Option<Arc<Tokens>>);

impl<S> Layer<S> for AuthLayer {
    type Service = AuthService<S>;

    fn layer(&self, inner: S) -> AuthService<S> {
        AuthService {
            inner,
            tokens: self.0.clone(),
        }
    }
}

#[derive(Clone)]
pub struct AuthService<S> {
    inner: S,
    tokens: Option<Arc<Tokens>>,
}

impl<S, B, RB> Service<Request<B>> for AuthService<S>
where
    S: Service<Request<B>, Response = Response<RB>>,
    RB: Default,
{
    type Response = Response<RB>;
    type Error = S::Error;
    type Future = Either<Ready<Result<Response<RB>, S::Error>>, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        if let Some(tokens) = &self.tokens {
            match tokens.check(req.uri().path(), req.headers()) {
                Err(status) => return Either::Left(ready(Ok(status.into_http()))),
                Ok(Access::Read) => {
                    req.extensions_mut().insert(ReadOnly);
                }
                Ok(Access::Full) => {}
            }
        }
        Either::Right(self.inner.call(req))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokens() -> Tokens {
        Tokens {
            full: vec![b"writer-secret".to_vec()],
            read: vec![b"reader-secret".to_vec()],
        }
    }

    fn headers(auth: Option<&str>) -> HeaderMap {
        let mut h = HeaderMap::new();
        if let Some(a) = auth {
            h.insert(http::header::AUTHORIZATION, a.parse().unwrap());
        }
        h
    }

    #[test]
    fn tokens_decide_by_method() {
        let t = tokens();
        let append = "/pgstore.v1.EventStore/Append";
        let load = "/pgstore.v1.EventStore/Load";
        let code = |r: Result<Access, Status>| r.err().map(|s| s.code());
        assert_eq!(
            t.check(load, &headers(Some("Bearer reader-secret")))
                .unwrap(),
            Access::Read
        );
        assert_eq!(
            t.check(load, &headers(Some("Bearer writer-secret")))
                .unwrap(),
            Access::Full
        );
        assert_eq!(
            code(t.check(append, &headers(Some("Bearer writer-secret")))),
            None
        );
        assert_eq!(
            code(t.check(load, &headers(Some("Bearer reader-secret")))),
            None
        );
        assert_eq!(
            code(t.check(append, &headers(Some("Bearer reader-secret")))),
            Some(tonic::Code::PermissionDenied)
        );
        for bad in [
            None,
            Some("Bearer nope"),
            Some("writer-secret"),
            Some("Basic d3JpdGVy"),
        ] {
            assert_eq!(
                code(t.check(load, &headers(bad))),
                Some(tonic::Code::Unauthenticated),
                "{bad:?}"
            );
        }
        // Health and reflection stay open.
        assert_eq!(
            code(t.check("/grpc.health.v1.Health/Check", &headers(None))),
            None
        );
        assert_eq!(
            code(t.check(
                "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
                &headers(None)
            )),
            None
        );
    }

    /// Every RPC is classified on purpose: a new one must be added to [`READ_METHODS`] or here.
    const WRITE_METHODS: &[&str] = &[
        "Append",
        "MultiStreamAppend",
        "SaveCheckpoint",
        "SaveSnapshot",
        "InvalidateSnapshot",
        "TombstoneStream",
        "ArchiveStream",
        "RestoreStream",
        "DeleteStream",
        "SetStreamMetadata",
        "PublishChange",
        "Lock",
    ];

    #[test]
    fn every_method_of_the_api_is_classified_as_read_or_write() {
        let api = include_str!("../../proto/pgstore/v1/eventstore.proto");
        let rpcs: Vec<&str> = api
            .lines()
            .filter_map(|l| l.trim().strip_prefix("rpc "))
            .map(|l| l.split('(').next().unwrap_or_default())
            .collect();
        assert!(rpcs.len() > 10, "{rpcs:?}");
        for m in &rpcs {
            assert!(
                READ_METHODS.contains(m) != WRITE_METHODS.contains(m),
                "{m} must be in exactly one of READ_METHODS and WRITE_METHODS"
            );
        }
        for m in READ_METHODS.iter().chain(WRITE_METHODS) {
            assert!(rpcs.contains(m), "{m} is not an RPC");
        }
        let t = tokens();
        let reader = headers(Some("Bearer reader-secret"));
        assert_eq!(
            t.check("/pgstore.v1.EventStore/Read", &reader).unwrap(),
            Access::Read
        );
        assert_eq!(
            t.check("/pgstore.v1.EventStore/MultiStreamAppend", &reader)
                .err()
                .map(|s| s.code()),
            Some(tonic::Code::PermissionDenied)
        );
    }
}
