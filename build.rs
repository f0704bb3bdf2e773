//! Generates the gRPC code from `proto/` with protox (pure Rust: no system `protoc` needed) and
//! writes the descriptor set that server reflection serves.
//!
//! Two passes over the same descriptors:
//! - messages and the client, as usual (`OUT_DIR/pgstore.v1.rs`);
//! - the server trait alone (`OUT_DIR/server/pgstore.v1.rs`), where the responses that carry
//!   events (`LoadResponse`, `ReadFromResponse`, `ReadResponse`, `SubscribeResponse`) are
//!   `crate::wire::Frame`:
//!   bytes encoded straight from PostgreSQL rows (and, for live events, once for every
//!   subscriber). On the wire they are the very same messages, so clients and reflection see the
//!   API as declared.

use std::{env, fs, path::PathBuf};

use prost::Message;

/// Responses the server sends pre-encoded.
const FRAMED: [&str; 4] = [
    "LoadResponse",
    "ReadFromResponse",
    "ReadResponse",
    "SubscribeResponse",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = ["proto/pgstore/v1/eventstore.proto"];
    for p in protos {
        println!("cargo:rerun-if-changed={p}");
    }
    let fds = protox::compile(protos, ["proto"])?;
    let out = PathBuf::from(env::var("OUT_DIR")?);
    fs::write(out.join("pgstore_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure()
        .bytes(".pgstore.v1")
        .build_server(false)
        .codec_path("crate::codec::SmallBufferCodec")
        .compile_fds(fds.clone())?;

    let server_out = out.join("server");
    fs::create_dir_all(&server_out)?;
    let mut server = tonic_prost_build::configure()
        .build_client(false)
        .out_dir(&server_out)
        .codec_path("crate::codec::SmallBufferCodec")
        .extern_path(".pgstore.v1", "crate::proto");
    for name in FRAMED {
        server = server.extern_path(format!(".pgstore.v1.{name}"), "crate::wire::Frame");
    }
    server.compile_fds(fds)?;
    Ok(())
}
