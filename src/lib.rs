//! pgstore: a gRPC event store server in front of PostgreSQL.
//!
//! # Layout
//! - [`client`], [`cli`]: connecting to a server as a client, and the `health` and `tail`
//!   commands built on it.
//! - [`codec`]: the gRPC codec (prost with small stream buffers).
//! - [`domain`]: streams, versions and events, independent of PostgreSQL and gRPC.
//! - [`config`]: layered configuration (defaults < TOML file < `PGSTORE_*` env < flags), validated.
//! - [`server`]: wiring of the gRPC services, health, reflection and graceful shutdown.
//! - [`grpc`]: the `pgstore.v1.EventStore` service: request validation, proto <-> domain, status codes.
//! - [`store`]: everything that talks to PostgreSQL: migrations, the group-commit writer, reads,
//!   stream lifecycle, snapshots and checkpoints.
//! - [`live`]: the LISTEN connection, subscriptions, consumer groups and change watchers.
//! - [`metrics`]: per-instance counters and gauges, served on `/metrics`.
//! - [`embedded`]: a local PostgreSQL cluster managed by pgstore when no database URL is given.
//! - [`transport`]: client connections whose writes are coalesced.
//! - [`wire`]: events encoded to protobuf straight from rows, and the pre-encoded responses.
//! - [`error`]: the error type shared by every layer (its gRPC mapping is in `grpc::status`).

pub mod cli;
pub mod client;
pub mod codec;
pub mod config;
pub mod domain;
pub mod embedded;
pub mod error;
pub mod grpc;
pub mod live;
pub mod metrics;
pub mod server;
pub mod store;
pub mod transport;
pub mod wire;

/// Code generated from `proto/pgstore/v1/*.proto`.
pub mod proto {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("pgstore.v1");

    /// The encoded descriptor set of the API, served by reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/pgstore_descriptor.bin"));

    /// The server side of `pgstore.v1.EventStore`, generated with the event-carrying responses as
    /// [`crate::wire::Frame`] (see `build.rs`).
    pub mod server {
        #![allow(clippy::all, missing_docs)]
        include!(concat!(env!("OUT_DIR"), "/server/pgstore.v1.rs"));
    }
    pub use server::event_store_server;
}

pub use error::{Error, Result};
