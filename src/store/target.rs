//! Where a PostgreSQL server is and how to reach it: the connection string as libpq takes it
//! (URL or key=value), TLS with libpq's `sslmode` semantics (rustls), keepalives and timeouts on
//! the socket, and the password from `PGPASSWORD` / `PGPASSFILE` when the string has none.
//!
//! tokio-postgres parses most of a libpq connection string but knows neither `verify-ca` /
//! `verify-full` nor `sslrootcert`, `sslcert` and `sslkey`: those are taken out of the string here
//! and turned into a rustls client configuration; the rest goes to tokio-postgres unchanged.
//!
//! | `sslmode` | encrypted | certificate checked | host name checked |
//! | --- | --- | --- | --- |
//! | `disable` | no | - | - |
//! | `prefer` (default) | if the server offers TLS | only with `sslrootcert` | no |
//! | `require` | yes | only with `sslrootcert` (as libpq) | no |
//! | `verify-ca` | yes | yes | no |
//! | `verify-full` | yes | yes | yes |
//!
//! `sslmode=allow`, `sslrootcert=system`, `sslcrl` and `sslpassword` (encrypted keys) are not
//! supported and are refused with a message that says so. TLS is never used on Unix sockets
//! (PostgreSQL does not offer it there).

use std::{
    collections::BTreeMap,
    fmt,
    path::{Path, PathBuf},
    str::FromStr,
    sync::Arc,
    time::Duration,
};

use rustls::{
    DigitallySignedStruct, RootCertStore, SignatureScheme,
    client::WebPkiServerVerifier,
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    crypto::CryptoProvider,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime, pem::PemObject};
use tokio_postgres::{
    Client, Connection, Socket,
    config::{Host, SslMode},
};
use tokio_postgres_rustls::MakeRustlsConnect;

/// A connection to drive (TLS or not, one type).
pub type PgConnection =
    Connection<Socket, <MakeRustlsConnect as tokio_postgres::tls::MakeTlsConnect<Socket>>::Stream>;

/// How strictly the server's certificate is checked (libpq's `sslmode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsMode {
    /// No TLS.
    Disable,
    /// TLS when the server offers it.
    Prefer,
    /// TLS or nothing.
    Require,
    /// TLS, and the certificate must chain to `sslrootcert`.
    VerifyCa,
    /// TLS, the certificate must chain to `sslrootcert` and name the host.
    VerifyFull,
}

impl FromStr for TlsMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "disable" => TlsMode::Disable,
            "prefer" => TlsMode::Prefer,
            "require" => TlsMode::Require,
            "verify-ca" => TlsMode::VerifyCa,
            "verify-full" => TlsMode::VerifyFull,
            "allow" => return Err("sslmode=allow is not supported: use prefer".into()),
            other => {
                return Err(format!(
                    "unknown sslmode {other:?} (disable, prefer, require, verify-ca, verify-full)"
                ));
            }
        })
    }
}

/// Socket-level settings applied to every connection unless the connection string sets them.
#[derive(Debug, Clone, Copy)]
pub struct SocketSettings {
    /// Bounds the TCP connect (and the startup handshake, see [`Target::connect`]).
    pub connect_timeout: Duration,
    /// A connection whose sent data stays unacknowledged this long is dropped by the kernel.
    pub tcp_user_timeout: Duration,
    /// Idle time before TCP keepalive probes start.
    pub keepalives_idle: Duration,
    /// PostgreSQL `statement_timeout` of every session (zero: the server's default).
    pub statement_timeout: Duration,
}

impl Default for SocketSettings {
    fn default() -> Self {
        SocketSettings {
            connect_timeout: Duration::from_secs(5),
            tcp_user_timeout: Duration::from_secs(30),
            keepalives_idle: Duration::from_secs(30),
            statement_timeout: Duration::from_secs(60),
        }
    }
}

/// A PostgreSQL server to connect to: the driver's configuration and the TLS to use with it.
#[derive(Clone)]
pub struct Target {
    /// The driver's configuration (everything but TLS verification).
    pub config: tokio_postgres::Config,
    /// `host:port` (or the socket directory), for messages.
    pub name: String,
    /// The sslmode asked for.
    pub mode: TlsMode,
    tls: MakeRustlsConnect,
}

impl fmt::Debug for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // tokio_postgres::Config's Debug redacts the password.
        f.debug_struct("Target")
            .field("name", &self.name)
            .field("mode", &self.mode)
            .field("config", &self.config)
            .finish()
    }
}

/// The TLS-related options of a connection string.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct TlsOptions {
    mode: Option<String>,
    root_cert: Option<PathBuf>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
}

impl Target {
    /// Parses a libpq URL (`postgres://user:pw@host:port/db?sslmode=verify-full&sslrootcert=ca.pem`)
    /// or key=value string (`host=db port=5432 sslmode=require`), reading the certificate files
    /// it names. Errors say what is wrong without repeating the string (it may hold a password).
    pub fn parse(url: &str) -> Result<Target, String> {
        let (rest, tls) = split_tls_options(url)?;
        let mut config = tokio_postgres::Config::from_str(&rest).map_err(|e| e.to_string())?;
        if config.get_user().is_none() {
            let user = std::env::var("PGUSER")
                .or_else(|_| std::env::var("USER"))
                .unwrap_or_else(|_| "postgres".into());
            config.user(&user);
        }
        if config.get_hosts().is_empty() {
            config.host("localhost");
        }
        if config.get_application_name().is_none() {
            config.application_name("pgstore");
        }
        if config.get_password().is_none()
            && let Some(pw) = password_from_environment(&config)
        {
            config.password(pw);
        }
        let only_sockets = config
            .get_hosts()
            .iter()
            .all(|h| !matches!(h, Host::Tcp(_)));
        let mode = match &tls.mode {
            Some(m) => m.parse()?,
            None => TlsMode::Prefer,
        };
        let root_cert = tls.root_cert.clone().or_else(|| {
            // libpq's default location, used when it exists.
            let home = std::env::var_os("HOME")?;
            let p = Path::new(&home).join(".postgresql/root.crt");
            p.is_file().then_some(p)
        });
        if matches!(mode, TlsMode::VerifyCa | TlsMode::VerifyFull) && root_cert.is_none() {
            return Err(format!(
                "sslmode={} needs sslrootcert=<CA file> (or ~/.postgresql/root.crt)",
                tls.mode.as_deref().unwrap_or_default()
            ));
        }
        let client = client_config(mode, root_cert.as_deref(), &tls)?;
        config.ssl_mode(match mode {
            _ if only_sockets => SslMode::Disable,
            TlsMode::Disable => SslMode::Disable,
            TlsMode::Prefer => SslMode::Prefer,
            _ => SslMode::Require,
        });
        Ok(Target {
            name: host_name(&config),
            config,
            mode,
            tls: MakeRustlsConnect::new(client),
        })
    }

    /// A target for an existing driver configuration, without TLS (the embedded cluster's Unix
    /// socket).
    pub fn plain(mut config: tokio_postgres::Config) -> Target {
        config.ssl_mode(SslMode::Disable);
        let client = client_config(TlsMode::Disable, None, &TlsOptions::default())
            .expect("a configuration without files");
        Target {
            name: host_name(&config),
            config,
            mode: TlsMode::Disable,
            tls: MakeRustlsConnect::new(client),
        }
    }

    /// Applies pgstore's socket settings where the connection string left them unset.
    pub fn apply(&mut self, s: &SocketSettings) {
        let c = &mut self.config;
        if c.get_connect_timeout().is_none() {
            c.connect_timeout(s.connect_timeout);
        }
        if c.get_tcp_user_timeout().is_none() && !s.tcp_user_timeout.is_zero() {
            c.tcp_user_timeout(s.tcp_user_timeout);
        }
        if c.get_keepalives() && c.get_keepalives_idle() == Duration::from_secs(2 * 60 * 60) {
            c.keepalives_idle(s.keepalives_idle);
            c.keepalives_interval((s.keepalives_idle / 3).max(Duration::from_secs(1)));
            c.keepalives_retries(3);
        }
        let mut opts = Vec::new();
        if !s.statement_timeout.is_zero() {
            opts.push(format!(
                "-c statement_timeout={}",
                s.statement_timeout.as_millis()
            ));
        }
        // pgstore's statements are short index scans: JIT compilation (PostgreSQL's default
        // above a cost threshold) would add tens of milliseconds to a read whose estimated cost
        // is high only because its LIMIT is a parameter. Kept when the URL's options set it.
        if !c.get_options().is_some_and(|o| o.contains("jit")) {
            opts.push("-c jit=off".into());
        }
        if !opts.is_empty() {
            let opt = opts.join(" ");
            let options = match c.get_options() {
                Some(o) if !o.is_empty() => format!("{o} {opt}"),
                _ => opt,
            };
            c.options(options);
        }
    }

    /// Connects; the caller drives the returned connection. The whole handshake (TCP, TLS,
    /// authentication) is bounded by the connect timeout: a server that accepts the TCP connection
    /// but never answers (frozen) does not hang the caller.
    pub async fn connect(&self) -> Result<(Client, PgConnection), ConnectError> {
        let limit = self
            .config
            .get_connect_timeout()
            .copied()
            .unwrap_or(Duration::from_secs(5));
        match tokio::time::timeout(limit, self.config.connect(self.tls.clone())).await {
            Ok(Ok(pair)) => Ok(pair),
            Ok(Err(e)) => Err(ConnectError::new(&self.name, e)),
            Err(_) => Err(ConnectError::timed_out(&self.name, limit)),
        }
    }
}

/// Why a connection could not be made, with the server's name and a cause an operator can act
/// on.
#[derive(Debug)]
pub struct ConnectError {
    /// `host:port`.
    pub server: String,
    /// What went wrong.
    pub cause: ConnectCause,
    /// The driver's error and its sources, on one line.
    pub detail: String,
    /// The driver's error, when there was one.
    pub source: Option<tokio_postgres::Error>,
}

/// The kind of a connection failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectCause {
    /// Nothing listens there (refused), or the host is unknown or unreachable.
    Refused,
    /// No answer within the connect timeout.
    Timeout,
    /// The TLS handshake or the certificate check failed.
    Tls,
    /// The server refused the login (password, role, pg_hba).
    Authentication,
    /// The database does not exist.
    NoDatabase,
    /// The server is starting up, shutting down or out of connections.
    NotReady,
    /// Anything else.
    Other,
}

impl ConnectCause {
    /// Whether retrying without a change of configuration can help.
    pub fn is_permanent(self) -> bool {
        matches!(
            self,
            ConnectCause::Authentication | ConnectCause::NoDatabase | ConnectCause::Tls
        )
    }

    fn label(self) -> &'static str {
        match self {
            ConnectCause::Refused => "connection refused or host unreachable",
            ConnectCause::Timeout => "timed out",
            ConnectCause::Tls => "TLS failed",
            ConnectCause::Authentication => "authentication failed",
            ConnectCause::NoDatabase => "database does not exist",
            ConnectCause::NotReady => "server not accepting connections",
            ConnectCause::Other => "connection failed",
        }
    }
}

impl ConnectError {
    fn new(server: &str, e: tokio_postgres::Error) -> ConnectError {
        let detail = crate::error::chain(&e);
        let cause = match e.code() {
            Some(c) if c.code().starts_with("28") => ConnectCause::Authentication,
            Some(c) if c.code() == "3D000" => ConnectCause::NoDatabase,
            Some(c) if c.code().starts_with("57P") || c.code() == "53300" => ConnectCause::NotReady,
            Some(_) => ConnectCause::Other,
            None => {
                let lower = detail.to_ascii_lowercase();
                if lower.contains("tls") || lower.contains("certificate") {
                    ConnectCause::Tls
                } else if lower.contains("timed out") {
                    ConnectCause::Timeout
                } else if lower.contains("refused")
                    || lower.contains("unreachable")
                    || lower.contains("no such host")
                    || lower.contains("failed to lookup")
                    || lower.contains("name or service not known")
                    || lower.contains("no such file")
                {
                    ConnectCause::Refused
                } else {
                    ConnectCause::Other
                }
            }
        };
        ConnectError {
            server: server.to_owned(),
            cause,
            detail,
            source: Some(e),
        }
    }

    fn timed_out(server: &str, limit: Duration) -> ConnectError {
        ConnectError {
            server: server.to_owned(),
            cause: ConnectCause::Timeout,
            detail: format!("no answer within {limit:?} (database.connect_timeout)"),
            source: None,
        }
    }
}

impl fmt::Display for ConnectError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "cannot connect to {}: {}: {}",
            self.server,
            self.cause.label(),
            self.detail
        )
    }
}

impl std::error::Error for ConnectError {}

fn host_name(config: &tokio_postgres::Config) -> String {
    let port = config.get_ports().first().copied().unwrap_or(5432);
    match config.get_hosts().first() {
        Some(Host::Tcp(h)) => format!("{h}:{port}"),
        #[cfg(unix)]
        Some(Host::Unix(p)) => format!("{}:{port}", p.display()),
        None => format!("localhost:{port}"),
    }
}

/// The password for `config` from `PGPASSWORD`, else from the password file (`PGPASSFILE`,
/// default `~/.pgpass`), as libpq finds them.
fn password_from_environment(config: &tokio_postgres::Config) -> Option<String> {
    if let Ok(pw) = std::env::var("PGPASSWORD") {
        return Some(pw);
    }
    let file = match std::env::var_os("PGPASSFILE") {
        Some(f) => PathBuf::from(f),
        None => Path::new(&std::env::var_os("HOME")?).join(".pgpass"),
    };
    let text = std::fs::read_to_string(file).ok()?;
    let host = match config.get_hosts().first() {
        Some(Host::Tcp(h)) => h.clone(),
        #[cfg(unix)]
        Some(Host::Unix(_)) => "localhost".into(),
        None => "localhost".into(),
    };
    let port = config
        .get_ports()
        .first()
        .copied()
        .unwrap_or(5432)
        .to_string();
    let db = config
        .get_dbname()
        .or(config.get_user())
        .unwrap_or_default()
        .to_owned();
    let user = config.get_user().unwrap_or_default().to_owned();
    passfile_lookup(&text, &[&host, &port, &db, &user])
}

/// The password of the first `.pgpass` line whose four fields match (`*` matches anything;
/// `\:` and `\\` escape).
pub fn passfile_lookup(text: &str, want: &[&str; 4]) -> Option<String> {
    for line in text.lines() {
        if line.trim_start().starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let mut fields = Vec::new();
        let mut cur = String::new();
        let mut chars = line.chars();
        while let Some(c) = chars.next() {
            match c {
                '\\' => {
                    if let Some(n) = chars.next() {
                        cur.push(n);
                    }
                }
                ':' if fields.len() < 4 => fields.push(std::mem::take(&mut cur)),
                c => cur.push(c),
            }
        }
        fields.push(cur);
        if fields.len() != 5 {
            continue;
        }
        if fields[..4]
            .iter()
            .zip(want)
            .all(|(f, w)| f == "*" || f == w)
        {
            return fields.pop();
        }
    }
    None
}

/// Splits the TLS options out of a URL or key=value string; returns the rest as the same form.
fn split_tls_options(s: &str) -> Result<(String, TlsOptions), String> {
    let mut tls = TlsOptions::default();
    let mut take = |key: &str, value: String| -> Result<bool, String> {
        match key {
            "sslmode" => tls.mode = Some(value),
            "sslrootcert" => {
                if value == "system" {
                    return Err("sslrootcert=system is not supported: name a CA file".into());
                }
                tls.root_cert = Some(value.into())
            }
            "sslcert" => tls.cert = Some(value.into()),
            "sslkey" => tls.key = Some(value.into()),
            "sslcrl"
            | "sslcrldir"
            | "sslpassword"
            | "sslcompression"
            | "sslsni"
            | "ssl_min_protocol_version"
            | "ssl_max_protocol_version" => {
                return Err(format!("{key} is not supported"));
            }
            _ => return Ok(false),
        }
        Ok(true)
    };
    if s.starts_with("postgres://") || s.starts_with("postgresql://") {
        let Some((base, query)) = s.split_once('?') else {
            return Ok((s.to_owned(), tls));
        };
        let mut kept = Vec::new();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            if !take(&percent_decode(k)?, percent_decode(v)?)? {
                kept.push(pair);
            }
        }
        let rest = if kept.is_empty() {
            base.to_owned()
        } else {
            format!("{base}?{}", kept.join("&"))
        };
        Ok((rest, tls))
    } else {
        let mut kept = Vec::new();
        for (k, v) in parse_key_values(s)? {
            if !take(&k, v.clone())? {
                kept.push(format!("{k}={}", quote_value(&v)));
            }
        }
        Ok((kept.join(" "), tls))
    }
}

fn percent_decode(s: &str) -> Result<String, String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or("invalid percent-encoding in the connection URL")?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| "the connection URL is not UTF-8".to_string())
}

/// Parses libpq's `key=value key='quoted \' value'` form.
fn parse_key_values(s: &str) -> Result<Vec<(String, String)>, String> {
    let mut out = BTreeMap::new();
    let mut order = Vec::new();
    let mut chars = s.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        if chars.peek().is_none() {
            break;
        }
        let mut key = String::new();
        while let Some(&c) = chars.peek() {
            if c == '=' || c.is_whitespace() {
                break;
            }
            key.push(c);
            chars.next();
        }
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        if chars.next() != Some('=') {
            return Err(format!(
                "missing \"=\" after {key:?} in the connection string"
            ));
        }
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        let mut value = String::new();
        if chars.peek() == Some(&'\'') {
            chars.next();
            loop {
                match chars.next() {
                    Some('\\') => value.push(chars.next().ok_or("unterminated quoted value")?),
                    Some('\'') => break,
                    Some(c) => value.push(c),
                    None => return Err("unterminated quoted value in the connection string".into()),
                }
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c.is_whitespace() {
                    break;
                }
                if c == '\\' {
                    chars.next();
                    value.push(chars.next().ok_or("dangling backslash")?);
                    continue;
                }
                value.push(c);
                chars.next();
            }
        }
        if !out.contains_key(&key) {
            order.push(key.clone());
        }
        out.insert(key, value);
    }
    Ok(order
        .into_iter()
        .map(|k| {
            let v = out.remove(&k).unwrap_or_default();
            (k, v)
        })
        .collect())
}

fn quote_value(v: &str) -> String {
    let mut out = String::from("'");
    for c in v.chars() {
        if c == '\'' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('\'');
    out
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The rustls client configuration for a mode.
fn client_config(
    mode: TlsMode,
    root_cert: Option<&Path>,
    opts: &TlsOptions,
) -> Result<rustls::ClientConfig, String> {
    let provider = provider();
    let roots = match root_cert {
        Some(path) if mode != TlsMode::Disable => {
            let mut roots = RootCertStore::empty();
            let certs = CertificateDer::pem_file_iter(path)
                .map_err(|e| format!("sslrootcert {}: {e}", path.display()))?
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| format!("sslrootcert {}: {e}", path.display()))?;
            if certs.is_empty() {
                return Err(format!(
                    "sslrootcert {}: no certificate in the file",
                    path.display()
                ));
            }
            for c in certs {
                roots
                    .add(c)
                    .map_err(|e| format!("sslrootcert {}: {e}", path.display()))?;
            }
            Some(Arc::new(roots))
        }
        _ => None,
    };
    let verifier: Arc<dyn ServerCertVerifier> = match roots {
        None => Arc::new(NoVerification(provider.clone())),
        Some(roots) => {
            let webpki = WebPkiServerVerifier::builder_with_provider(roots, provider.clone())
                .build()
                .map_err(|e| format!("sslrootcert: {e}"))?;
            if mode == TlsMode::VerifyFull {
                webpki
            } else {
                Arc::new(ChainOnly(webpki))
            }
        }
    };
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    match (&opts.cert, &opts.key) {
        (None, None) => Ok(builder.with_no_client_auth()),
        (Some(cert), Some(key)) => {
            let chain = CertificateDer::pem_file_iter(cert)
                .map_err(|e| format!("sslcert {}: {e}", cert.display()))?
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| format!("sslcert {}: {e}", cert.display()))?;
            let key_der = PrivateKeyDer::from_pem_file(key)
                .map_err(|e| format!("sslkey {}: {e}", key.display()))?;
            builder
                .with_client_auth_cert(chain, key_der)
                .map_err(|e| format!("sslcert/sslkey: {e}"))
        }
        _ => Err("sslcert and sslkey go together".into()),
    }
}

/// `prefer` / `require` without a root certificate: encrypted, the server not authenticated (as
/// libpq). Handshake signatures are still checked, so the session key belongs to the certificate.
#[derive(Debug)]
struct NoVerification(Arc<CryptoProvider>);

impl ServerCertVerifier for NoVerification {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// `verify-ca`: the chain must lead to the root certificate; the host name is not checked.
#[derive(Debug)]
struct ChainOnly(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
        {
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::NotValidForName
                | rustls::CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_options_leave_urls_and_key_values() {
        let (rest, tls) = split_tls_options(
            "postgres://u:p@db:5433/app?sslmode=verify-full&application_name=x&sslrootcert=%2Fca.pem",
        )
        .unwrap();
        assert_eq!(rest, "postgres://u:p@db:5433/app?application_name=x");
        assert_eq!(tls.mode.as_deref(), Some("verify-full"));
        assert_eq!(tls.root_cert, Some(PathBuf::from("/ca.pem")));

        let (rest, tls) =
            split_tls_options("host=db port=5433 sslmode=require password='a b\\'c' sslkey=/k")
                .unwrap();
        assert_eq!(rest, "host='db' port='5433' password='a b\\'c'");
        assert_eq!(tls.mode.as_deref(), Some("require"));
        assert_eq!(tls.key, Some(PathBuf::from("/k")));
        let c = tokio_postgres::Config::from_str(&rest).unwrap();
        assert_eq!(c.get_password(), Some(&b"a b'c"[..]));

        assert!(split_tls_options("host=db sslcrl=/x").is_err());
        assert!(split_tls_options("postgres://db/?sslrootcert=system").is_err());
    }

    #[test]
    fn modes_follow_libpq() {
        for (s, m) in [
            ("disable", TlsMode::Disable),
            ("prefer", TlsMode::Prefer),
            ("require", TlsMode::Require),
            ("verify-ca", TlsMode::VerifyCa),
            ("verify-full", TlsMode::VerifyFull),
        ] {
            assert_eq!(s.parse::<TlsMode>(), Ok(m));
        }
        assert!("allow".parse::<TlsMode>().is_err());
        assert!("bogus".parse::<TlsMode>().is_err());
        let e = Target::parse("postgres://db/app?sslmode=verify-full")
            .err()
            .unwrap_or_default();
        // Only when no ~/.postgresql/root.crt exists does verify-full without a CA fail.
        if !Path::new(&std::env::var("HOME").unwrap_or_default())
            .join(".postgresql/root.crt")
            .exists()
        {
            assert!(e.contains("sslrootcert"), "{e}");
        }
        let t = Target::parse("postgres://db/app?sslmode=require").unwrap();
        assert_eq!(t.config.get_ssl_mode(), SslMode::Require);
        let t = Target::parse("host=/run/pg sslmode=require").unwrap();
        assert_eq!(
            t.config.get_ssl_mode(),
            SslMode::Disable,
            "no TLS on sockets"
        );
    }

    #[test]
    fn passfile_lines_match_field_by_field() {
        let text = "# comment\nother:5432:*:*:nope\ndb:5432:app:alice:s3cr\\:et\n*:*:*:bob:pw2\n";
        assert_eq!(
            passfile_lookup(text, &["db", "5432", "app", "alice"]).as_deref(),
            Some("s3cr:et")
        );
        assert_eq!(
            passfile_lookup(text, &["x", "1", "y", "bob"]).as_deref(),
            Some("pw2")
        );
        assert_eq!(passfile_lookup(text, &["x", "1", "y", "carol"]), None);
    }

    #[test]
    fn socket_settings_fill_what_the_string_left_unset() {
        let mut t = Target::parse("postgres://db/app?tcp_user_timeout=7").unwrap();
        t.apply(&SocketSettings::default());
        assert_eq!(
            t.config.get_tcp_user_timeout(),
            Some(&Duration::from_secs(7))
        );
        assert_eq!(t.config.get_keepalives_idle(), Duration::from_secs(30));
        assert!(
            t.config
                .get_options()
                .unwrap()
                .contains("statement_timeout=60000")
        );
    }
}
