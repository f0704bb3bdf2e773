//! Configuration, layered: built-in defaults < TOML file < `PGSTORE_*` environment < command-line
//! flags. Unknown keys are refused, and everything is validated before the port is bound.
//!
//! Nested keys from the environment use `__`: `PGSTORE_DATABASE__POOL_SIZE=32` sets
//! `[database] pool_size = 32`.

use std::{net::SocketAddr, path::PathBuf, str::FromStr, time::Duration};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The whole configuration.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Address the gRPC server listens on.
    pub listen: String,
    /// The primary's connection string (libpq URL or key=value). When absent, pgstore runs a local
    /// PostgreSQL cluster in `data_dir`.
    pub database_url: Option<String>,
    /// Read replicas' connection strings.
    pub replica_urls: Vec<String>,
    /// Where the embedded PostgreSQL cluster lives (only used without `database_url`).
    pub data_dir: PathBuf,
    /// Address of the Prometheus metrics endpoint (`/metrics`); off when absent.
    pub metrics_listen: Option<String>,
    /// Logging.
    pub log: LogConfig,
    /// Database connections and notification channels.
    pub database: DatabaseConfig,
    /// Group commit.
    pub writer: WriterSection,
    /// Input limits.
    pub limits: Limits,
    /// Server behaviour.
    pub server: ServerSection,
    /// Subscriptions and change watchers.
    pub live: LiveSection,
    /// Consumer groups.
    pub groups: GroupsSection,
    /// Per-stream locks.
    pub locks: LocksSection,
    /// Read replicas.
    pub replicas: ReplicasSection,
    /// Bearer tokens; authentication is off when none is set.
    pub auth: AuthSection,
    /// TLS for the gRPC port; plaintext when no certificate is set.
    pub tls: TlsSection,
}

/// TLS on the gRPC port (PEM files, read at startup).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsSection {
    /// The server's certificate chain.
    pub cert_file: Option<PathBuf>,
    /// The server's private key.
    pub key_file: Option<PathBuf>,
    /// CA certificates that client certificates must chain to: mutual TLS, every client must
    /// present one.
    pub client_ca_file: Option<PathBuf>,
}

/// Bearer-token authentication of the EventStore service (health and reflection stay open).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthSection {
    /// Tokens that may call every method.
    pub tokens: Vec<String>,
    /// Tokens that may only call methods that read.
    pub read_tokens: Vec<String>,
}

/// Read replicas.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReplicasSection {
    /// Connections per replica pool.
    pub pool_size: u32,
    /// How often each replica's replayed head is probed.
    #[serde(with = "humantime_serde")]
    pub probe_interval: Duration,
    /// A replica further behind the primary than this many sequences is out of rotation.
    pub max_lag: u64,
    /// How long a read with `min_sequence` waits for a replica to reach it before reading the
    /// primary.
    #[serde(with = "humantime_serde")]
    pub fence_wait: Duration,
}

impl Default for ReplicasSection {
    fn default() -> Self {
        ReplicasSection {
            pool_size: 16,
            probe_interval: Duration::from_millis(500),
            max_lag: 100_000,
            fence_wait: Duration::from_millis(100),
        }
    }
}

/// Per-stream locks.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LocksSection {
    /// A held lock's lease; renewed every third of it while the Lock call is open. After the
    /// holder's instance dies, the lock is free again after at most this long.
    #[serde(with = "humantime_serde")]
    pub lease_timeout: Duration,
    /// How often a waiting Lock call retries.
    #[serde(with = "humantime_serde")]
    pub poll_interval: Duration,
}

impl Default for LocksSection {
    fn default() -> Self {
        LocksSection {
            lease_timeout: Duration::from_secs(10),
            poll_interval: Duration::from_millis(100),
        }
    }
}

/// Subscriptions and change watchers.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LiveSection {
    /// Messages buffered per Subscribe / WatchChanges stream (memory per slow client is bounded
    /// by this).
    pub buffer: usize,
    /// Events read per catch-up page.
    pub page_size: u32,
    /// A heartbeat is sent after this much silence.
    #[serde(with = "humantime_serde")]
    pub heartbeat_interval: Duration,
    /// Live subscribers also poll this often, in case a notification was missed.
    #[serde(with = "humantime_serde")]
    pub poll_interval: Duration,
    /// Changes a watcher may fall behind before it is told it lagged.
    pub change_buffer: usize,
    /// Recent events kept in memory, shared by live subscribers (read once per instance instead
    /// of once per subscriber).
    pub tail_events: usize,
}

/// Consumer groups.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GroupsSection {
    /// Partitions of a new group (fixed at the group's first use).
    pub partitions: u32,
    /// A partition lease not renewed for this long is free for other members.
    #[serde(with = "humantime_serde")]
    pub lease_timeout: Duration,
    /// How often members renew leases and rebalance.
    #[serde(with = "humantime_serde")]
    pub renew_interval: Duration,
}

impl Default for LiveSection {
    fn default() -> Self {
        LiveSection {
            buffer: 256,
            page_size: 1000,
            heartbeat_interval: Duration::from_secs(5),
            poll_interval: Duration::from_secs(5),
            change_buffer: 1024,
            tail_events: 10_000,
        }
    }
}

impl Default for GroupsSection {
    fn default() -> Self {
        GroupsSection {
            partitions: 8,
            lease_timeout: Duration::from_secs(30),
            renew_interval: Duration::from_secs(10),
        }
    }
}

/// Logging.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// `human` or `json`.
    pub format: String,
    /// A tracing filter, e.g. `info` or `pgstore=debug,info`. `RUST_LOG` overrides it.
    pub level: String,
}

/// Database connections and notification channels.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DatabaseConfig {
    /// Connections in the primary pool (reads and small writes; the writer has its own).
    pub pool_size: u32,
    /// How long to wait for a connection (or a busy pool) before answering UNAVAILABLE.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// NOTIFY channel carrying the log head after each commit.
    pub events_channel: String,
    /// NOTIFY channel carrying projection-change notices.
    pub changes_channel: String,
}

/// Most batches the writer may have in flight.
const MAX_PIPELINE_DEPTH: usize = 16;

/// Group commit.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WriterSection {
    /// Appends that may queue for the writer before callers wait.
    pub queue_depth: usize,
    /// Most appends committed in one transaction.
    pub max_batch_appends: usize,
    /// Most events committed in one transaction.
    pub max_batch_events: usize,
    /// Most batches in flight at once on the writer's connection: the next is sent while the
    /// one before it commits, so PostgreSQL does not wait for the writer between batches.
    pub pipeline_depth: usize,
    /// How long an idempotency key is remembered; forever when absent. Older keys are deleted in
    /// the background, and a retry with one is a new append.
    #[serde(with = "humantime_serde")]
    pub idempotency_key_retention: Option<Duration>,
}

/// Input limits. Violations are refused with INVALID_ARGUMENT or RESOURCE_EXHAUSTED and change
/// nothing.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Longest stream id (and consumer id, idempotency key), in bytes.
    pub max_stream_id_bytes: usize,
    /// Longest event type, in bytes.
    pub max_event_type_bytes: usize,
    /// Largest payload of one event, in bytes.
    pub max_event_bytes: usize,
    /// Largest metadata of one event (as JSON), in bytes.
    pub max_metadata_bytes: usize,
    /// Most events in one append.
    pub max_events_per_append: usize,
    /// Largest sum of payloads and metadata in one append, in bytes. gRPC messages larger than
    /// twice this are refused before they are decoded.
    pub max_append_bytes: usize,
    /// Default page size of Load and ReadFrom.
    pub default_page_size: u32,
    /// Largest page size of Load and ReadFrom (larger requests are capped).
    pub max_page_size: u32,
}

/// Server behaviour.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerSection {
    /// How often the health check probes the primary.
    #[serde(with = "humantime_serde")]
    pub health_interval: Duration,
    /// How long shutdown waits for in-flight requests before cutting them off.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: "127.0.0.1:50051".into(),
            database_url: None,
            replica_urls: Vec::new(),
            data_dir: PathBuf::from("pgstore-data"),
            metrics_listen: None,
            log: LogConfig::default(),
            database: DatabaseConfig::default(),
            writer: WriterSection::default(),
            limits: Limits::default(),
            server: ServerSection::default(),
            live: LiveSection::default(),
            groups: GroupsSection::default(),
            locks: LocksSection::default(),
            replicas: ReplicasSection::default(),
            auth: AuthSection::default(),
            tls: TlsSection::default(),
        }
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: "human".into(),
            level: "info".into(),
        }
    }
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        DatabaseConfig {
            pool_size: 16,
            connect_timeout: Duration::from_secs(5),
            events_channel: "eskit_events".into(),
            changes_channel: "eskit_changes".into(),
        }
    }
}

impl Default for WriterSection {
    fn default() -> Self {
        let w = crate::store::writer::WriterConfig::default();
        WriterSection {
            queue_depth: w.queue_depth,
            max_batch_appends: w.max_batch_appends,
            max_batch_events: w.max_batch_events,
            pipeline_depth: w.pipeline_depth,
            idempotency_key_retention: None,
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_stream_id_bytes: 256,
            max_event_type_bytes: 256,
            max_event_bytes: 1024 * 1024,
            max_metadata_bytes: 16 * 1024,
            max_events_per_append: 10_000,
            max_append_bytes: 16 * 1024 * 1024,
            default_page_size: 1000,
            max_page_size: 10_000,
        }
    }
}

impl Default for ServerSection {
    fn default() -> Self {
        ServerSection {
            health_interval: Duration::from_secs(1),
            shutdown_grace: Duration::from_secs(10),
        }
    }
}

/// Values given on the command line; they override everything else.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    /// `--listen`.
    pub listen: Option<String>,
    /// `--database-url`.
    pub database_url: Option<String>,
    /// `--replica-url` (repeatable).
    pub replica_urls: Vec<String>,
    /// `--data-dir`.
    pub data_dir: Option<PathBuf>,
    /// `--metrics-listen`.
    pub metrics_listen: Option<String>,
}

impl Config {
    /// Loads defaults < `file` < `PGSTORE_*` environment < `overrides`, then validates.
    pub fn load(file: Option<&std::path::Path>, overrides: Overrides) -> Result<Config> {
        let bad = |e: config::ConfigError| Error::invalid("configuration", e.to_string());
        let defaults = config::Config::try_from(&Config::default()).map_err(bad)?;
        let mut builder = config::Config::builder().add_source(defaults);
        if let Some(path) = file {
            builder = builder.add_source(
                config::File::from(path)
                    .format(config::FileFormat::Toml)
                    .required(true),
            );
        }
        builder = builder.add_source(
            config::Environment::with_prefix("PGSTORE")
                .prefix_separator("_")
                .separator("__")
                .list_separator(",")
                .with_list_parse_key("replica_urls")
                .with_list_parse_key("auth.tokens")
                .with_list_parse_key("auth.read_tokens")
                .try_parsing(true),
        );
        let mut config: Config = builder
            .build()
            .map_err(bad)?
            .try_deserialize()
            .map_err(bad)?;
        if let Some(v) = overrides.listen {
            config.listen = v;
        }
        if let Some(v) = overrides.database_url {
            config.database_url = Some(v);
        }
        if !overrides.replica_urls.is_empty() {
            config.replica_urls = overrides.replica_urls;
        }
        if let Some(v) = overrides.data_dir {
            config.data_dir = v;
        }
        if let Some(v) = overrides.metrics_listen {
            config.metrics_listen = Some(v);
        }
        config.validate()?;
        Ok(config)
    }

    /// Checks every value; the error names the key.
    pub fn validate(&self) -> Result<()> {
        let bad = |key: &str, why: String| Err::<(), _>(Error::invalid(key, why));
        self.listen_addr()?;
        if let Some(m) = &self.metrics_listen {
            SocketAddr::from_str(m).map_err(|e| Error::invalid("metrics_listen", e.to_string()))?;
        }
        if let Some(url) = &self.database_url {
            parse_database_url(url).map_err(|e| Error::invalid("database_url", e.to_string()))?;
        }
        for url in &self.replica_urls {
            parse_database_url(url).map_err(|e| Error::invalid("replica_urls", e.to_string()))?;
        }
        if !matches!(self.log.format.as_str(), "human" | "json") {
            return bad("log.format", "must be \"human\" or \"json\"".into());
        }
        for (key, name) in [
            ("database.events_channel", &self.database.events_channel),
            ("database.changes_channel", &self.database.changes_channel),
        ] {
            if let Err(why) = check_identifier(name) {
                return bad(key, why);
            }
        }
        if self.database.events_channel == self.database.changes_channel {
            return bad(
                "database.changes_channel",
                "must differ from database.events_channel".into(),
            );
        }
        for (key, tokens) in [
            ("auth.tokens", &self.auth.tokens),
            ("auth.read_tokens", &self.auth.read_tokens),
        ] {
            if tokens
                .iter()
                .any(|t| t.len() < 16 || !t.bytes().all(|b| b.is_ascii_graphic()))
            {
                return bad(
                    key,
                    "tokens must be at least 16 visible ASCII characters (no spaces)".into(),
                );
            }
        }
        if self
            .auth
            .read_tokens
            .iter()
            .any(|t| self.auth.tokens.contains(t))
        {
            return bad(
                "auth.read_tokens",
                "a token cannot be both read-only and full".into(),
            );
        }
        let tls = &self.tls;
        if tls.cert_file.is_some() != tls.key_file.is_some() {
            return bad("tls", "tls.cert_file and tls.key_file go together".into());
        }
        if tls.client_ca_file.is_some() && tls.cert_file.is_none() {
            return bad(
                "tls.client_ca_file",
                "needs tls.cert_file and tls.key_file".into(),
            );
        }
        // Read and parse the PEM files now, so a bad one stops startup before the port is bound.
        self.server_builder()?;
        if self.database.pool_size == 0 {
            return bad("database.pool_size", "must be at least 1".into());
        }
        let w = &self.writer;
        if w.queue_depth == 0 || w.max_batch_appends == 0 || w.max_batch_events == 0 {
            return bad(
                "writer",
                "queue_depth and batch limits must be at least 1".into(),
            );
        }
        if !(1..=MAX_PIPELINE_DEPTH).contains(&w.pipeline_depth) {
            return bad(
                "writer.pipeline_depth",
                format!("must be between 1 and {MAX_PIPELINE_DEPTH}"),
            );
        }
        if w.idempotency_key_retention
            .is_some_and(|d| d < Duration::from_secs(1))
        {
            return bad(
                "writer.idempotency_key_retention",
                "must be at least 1s (or absent: keep keys forever)".into(),
            );
        }
        let l = &self.limits;
        if l.max_stream_id_bytes == 0
            || l.max_event_type_bytes == 0
            || l.max_event_bytes == 0
            || l.max_events_per_append == 0
            || l.max_page_size == 0
        {
            return bad("limits", "limits must be at least 1".into());
        }
        if l.default_page_size == 0 || l.default_page_size > l.max_page_size {
            return bad(
                "limits.default_page_size",
                "must be between 1 and limits.max_page_size".into(),
            );
        }
        if l.max_append_bytes < l.max_event_bytes {
            return bad(
                "limits.max_append_bytes",
                "must be at least limits.max_event_bytes".into(),
            );
        }
        let live = &self.live;
        if live.buffer == 0
            || live.page_size == 0
            || live.change_buffer == 0
            || live.tail_events == 0
        {
            return bad(
                "live",
                "buffer, page_size and change_buffer must be at least 1".into(),
            );
        }
        if live.heartbeat_interval.is_zero() || live.poll_interval.is_zero() {
            return bad("live", "intervals must be positive".into());
        }
        let g = &self.groups;
        if g.partitions == 0 || g.partitions > 4096 {
            return bad("groups.partitions", "must be between 1 and 4096".into());
        }
        if g.renew_interval.is_zero() || g.lease_timeout <= g.renew_interval {
            return bad(
                "groups.lease_timeout",
                "must be longer than groups.renew_interval (which must be positive)".into(),
            );
        }
        if self.replicas.pool_size == 0 || self.replicas.probe_interval.is_zero() {
            return bad(
                "replicas",
                "pool_size and probe_interval must be positive".into(),
            );
        }
        if self.locks.lease_timeout < Duration::from_millis(300)
            || self.locks.poll_interval.is_zero()
        {
            return bad(
                "locks",
                "lease_timeout must be at least 300ms and poll_interval positive".into(),
            );
        }
        Ok(())
    }

    /// The replicas: a `host:port` name and a connection config each.
    pub fn replica_configs(&self) -> Result<Vec<(String, tokio_postgres::Config)>> {
        self.replica_urls
            .iter()
            .map(|url| {
                let mut c =
                    parse_database_url(url).map_err(|e| Error::invalid("replica_urls", e))?;
                c.connect_timeout(self.database.connect_timeout);
                let host = match c.get_hosts().first() {
                    Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
                    #[cfg(unix)]
                    Some(tokio_postgres::config::Host::Unix(p)) => p.display().to_string(),
                    None => "localhost".into(),
                };
                let port = c.get_ports().first().copied().unwrap_or(5432);
                Ok((format!("{host}:{port}"), c))
            })
            .collect()
    }

    /// Replica routing settings.
    pub fn replica_config(&self) -> crate::store::router::ReplicaConfig {
        crate::store::router::ReplicaConfig {
            pool_size: self.replicas.pool_size,
            probe_interval: self.replicas.probe_interval,
            max_lag: self.replicas.max_lag,
            fence_wait: self.replicas.fence_wait,
        }
    }

    /// Live-delivery settings.
    pub fn live_config(&self) -> crate::live::subscribe::LiveConfig {
        crate::live::subscribe::LiveConfig {
            page_size: self.live.page_size,
            buffer: self.live.buffer,
            heartbeat: self.live.heartbeat_interval,
            poll_interval: self.live.poll_interval,
            groups: crate::live::groups::GroupConfig {
                partitions: self.groups.partitions,
                lease_timeout: self.groups.lease_timeout,
                renew_interval: self.groups.renew_interval,
            },
            locks: crate::live::locks::LockConfig {
                lease_timeout: self.locks.lease_timeout,
                poll: self.locks.poll_interval,
            },
        }
    }

    /// The gRPC listen address.
    pub fn listen_addr(&self) -> Result<SocketAddr> {
        SocketAddr::from_str(&self.listen).map_err(|e| Error::invalid("listen", e.to_string()))
    }

    /// The gRPC server builder, with TLS when it is on (the PEM files read and parsed). Errors
    /// name the key.
    pub fn server_builder(&self) -> Result<tonic::transport::Server> {
        let builder = tonic::transport::Server::builder();
        let (Some(cert), Some(key)) = (&self.tls.cert_file, &self.tls.key_file) else {
            return Ok(builder);
        };
        let read = |key: &str, path: &PathBuf| {
            std::fs::read(path).map_err(|e| Error::invalid(key, format!("{}: {e}", path.display())))
        };
        let identity = tonic::transport::Identity::from_pem(
            read("tls.cert_file", cert)?,
            read("tls.key_file", key)?,
        );
        let mut tls = tonic::transport::ServerTlsConfig::new().identity(identity);
        if let Some(ca) = &self.tls.client_ca_file {
            tls = tls.client_ca_root(tonic::transport::Certificate::from_pem(read(
                "tls.client_ca_file",
                ca,
            )?));
        }
        builder
            .tls_config(tls)
            .map_err(|e| Error::invalid("tls", error_chain(&e)))
    }

    /// The writer settings.
    pub fn writer_config(&self) -> crate::store::writer::WriterConfig {
        crate::store::writer::WriterConfig {
            queue_depth: self.writer.queue_depth,
            max_batch_appends: self.writer.max_batch_appends,
            max_batch_events: self.writer.max_batch_events,
            pipeline_depth: self.writer.pipeline_depth,
            connect_timeout: self.database.connect_timeout,
        }
    }
}

/// An error and its sources, on one line.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

/// Parses a libpq-style URL or key=value connection string.
pub fn parse_database_url(url: &str) -> std::result::Result<tokio_postgres::Config, String> {
    let mut config = tokio_postgres::Config::from_str(url).map_err(|e| e.to_string())?;
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
    Ok(config)
}

/// A NOTIFY channel name: a plain SQL identifier (letters, digits, `_`; not starting with a
/// digit; at most 63 bytes).
pub fn check_identifier(name: &str) -> std::result::Result<(), String> {
    let ok_start = name
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_');
    if !ok_start || name.len() > 63 || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
    {
        return Err(format!(
            "{name:?} is not a valid channel name (letters, digits and _, not starting with a digit, at most 63 bytes)"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        Config::default().validate().unwrap();
    }

    #[test]
    fn channel_names_are_identifiers() {
        assert!(check_identifier("eskit_events").is_ok());
        assert!(check_identifier("1abc").is_err());
        assert!(check_identifier("a-b").is_err());
        assert!(check_identifier("").is_err());
        assert!(check_identifier(&"a".repeat(64)).is_err());
    }

    #[test]
    fn file_then_flags_layering() {
        let dir = std::env::temp_dir().join(format!("pgstore-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("pgstore.toml");
        std::fs::write(
            &path,
            "listen = \"127.0.0.1:6000\"\n[database]\npool_size = 3\nconnect_timeout = \"250ms\"\n",
        )
        .unwrap();
        let c = Config::load(Some(&path), Overrides::default()).unwrap();
        assert_eq!(c.listen, "127.0.0.1:6000");
        assert_eq!(c.database.pool_size, 3);
        assert_eq!(c.database.connect_timeout, Duration::from_millis(250));
        let c = Config::load(
            Some(&path),
            Overrides {
                listen: Some("127.0.0.1:7000".into()),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(c.listen, "127.0.0.1:7000");
        std::fs::write(&path, "nonsense_key = 1\n").unwrap();
        assert!(Config::load(Some(&path), Overrides::default()).is_err());
        std::fs::write(&path, "[database]\nevents_channel = \"bad-name\"\n").unwrap();
        assert!(Config::load(Some(&path), Overrides::default()).is_err());
    }
}
