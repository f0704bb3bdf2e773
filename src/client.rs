//! Connecting to a pgstore server as a client: the address, TLS (server CA, client certificate),
//! a bearer token and a timeout. Used by the `health` and `tail` commands.

use std::{path::PathBuf, time::Duration};

use tonic::{
    metadata::AsciiMetadataValue,
    service::interceptor::InterceptedService,
    transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity},
};

/// Where and how to reach a server.
#[derive(Debug, Clone, clap::Args)]
pub struct Connect {
    /// The server's address: host:port, http://host:port or https://host:port [default: the
    /// port of PGSTORE_LISTEN on the loopback interface, else 127.0.0.1:50051].
    #[arg(long, value_name = "ADDR")]
    pub addr: Option<String>,
    /// CA certificate (PEM) that the server's certificate must chain to; implies TLS.
    #[arg(long, value_name = "FILE")]
    pub ca_file: Option<PathBuf>,
    /// Client certificate (PEM), for servers that require mutual TLS.
    #[arg(long, value_name = "FILE", requires = "key_file")]
    pub cert_file: Option<PathBuf>,
    /// The client certificate's private key (PEM).
    #[arg(long, value_name = "FILE", requires = "cert_file")]
    pub key_file: Option<PathBuf>,
    /// The name the server's certificate must carry, when it is not the host of --addr.
    #[arg(long, value_name = "NAME")]
    pub tls_server_name: Option<String>,
    /// Bearer token sent as `authorization: Bearer <token>`.
    #[arg(long, value_name = "TOKEN", conflicts_with = "token_file")]
    pub token: Option<String>,
    /// A file whose first line is the bearer token.
    #[arg(long, value_name = "FILE")]
    pub token_file: Option<PathBuf>,
    /// How long to wait for the connection and, for `health`, the answer.
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
}

/// A channel that adds the bearer token, if any, to every call.
pub type AuthedChannel = InterceptedService<Channel, Token>;

/// Adds `authorization: Bearer <token>` to every request when a token is set.
#[derive(Clone)]
pub struct Token(Option<AsciiMetadataValue>);

impl tonic::service::Interceptor for Token {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

impl Connect {
    /// The URI dialled: `--addr` with a scheme, or the default derived from `PGSTORE_LISTEN`.
    pub fn uri(&self) -> String {
        let addr = match &self.addr {
            Some(a) => a.clone(),
            None => default_addr(std::env::var("PGSTORE_LISTEN").ok().as_deref()),
        };
        if addr.starts_with("http://") || addr.starts_with("https://") {
            addr
        } else if self.ca_file.is_some() {
            format!("https://{addr}")
        } else {
            format!("http://{addr}")
        }
    }

    /// Connects (bounded by the timeout) and returns a channel that carries the token.
    pub async fn channel(&self) -> Result<AuthedChannel, String> {
        let uri = self.uri();
        let mut endpoint = Endpoint::from_shared(uri.clone())
            .map_err(|e| format!("bad address {uri}: {e}"))?
            .connect_timeout(self.timeout);
        if uri.starts_with("https://") {
            let mut tls = ClientTlsConfig::new();
            match &self.ca_file {
                Some(path) => tls = tls.ca_certificate(Certificate::from_pem(read(path)?)),
                None => tls = tls.with_native_roots(),
            }
            if let (Some(cert), Some(key)) = (&self.cert_file, &self.key_file) {
                tls = tls.identity(Identity::from_pem(read(cert)?, read(key)?));
            }
            if let Some(name) = &self.tls_server_name {
                tls = tls.domain_name(name.clone());
            }
            endpoint = endpoint
                .tls_config(tls)
                .map_err(|e| format!("TLS settings: {e}"))?;
        }
        let channel = endpoint
            .connect()
            .await
            .map_err(|e| format!("cannot reach {uri}: {}", crate::error::chain(&e)))?;
        Ok(InterceptedService::new(channel, self.token()?))
    }

    fn token(&self) -> Result<Token, String> {
        let token = match (&self.token, &self.token_file) {
            (Some(t), _) => Some(t.clone()),
            (None, Some(path)) => Some(
                String::from_utf8_lossy(&read(path)?)
                    .lines()
                    .next()
                    .unwrap_or_default()
                    .trim()
                    .to_owned(),
            ),
            (None, None) => None,
        };
        token
            .map(|t| {
                AsciiMetadataValue::try_from(format!("Bearer {t}"))
                    .map_err(|_| "the token must be printable ASCII".to_owned())
            })
            .transpose()
            .map(Token)
    }
}

/// `listen` as a client reaches it from the same host: an unspecified host (`0.0.0.0`, `[::]`)
/// becomes the loopback address.
pub fn default_addr(listen: Option<&str>) -> String {
    let Some(listen) = listen.map(str::trim).filter(|l| !l.is_empty()) else {
        return "127.0.0.1:50051".to_owned();
    };
    match listen.rsplit_once(':') {
        Some(("0.0.0.0" | "", port)) => format!("127.0.0.1:{port}"),
        Some(("[::]", port)) => format!("[::1]:{port}"),
        _ => listen.to_owned(),
    }
}

fn read(path: &std::path::Path) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))
}

/// A gRPC status on one line: its code and message.
pub fn status_line(status: &tonic::Status) -> String {
    let message = status.message();
    if message.is_empty() {
        format!("{:?}", status.code())
    } else {
        format!("{:?}: {message}", status.code())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_address_follows_listen() {
        assert_eq!(default_addr(None), "127.0.0.1:50051");
        assert_eq!(default_addr(Some("0.0.0.0:6000")), "127.0.0.1:6000");
        assert_eq!(default_addr(Some("[::]:6000")), "[::1]:6000");
        assert_eq!(default_addr(Some("10.0.0.5:7000")), "10.0.0.5:7000");
    }
}
