//! Configuration, layered: built-in defaults < TOML file < `PGSTORE_*` environment < command-line
//! flags. Unknown keys are refused, and everything is validated before the port is bound.
//!
//! Nested keys from the environment use `__`: `PGSTORE_DATABASE__POOL_SIZE=32` sets
//! `[database] pool_size = 32`.

use std::{
    fmt,
    net::{SocketAddr, ToSocketAddrs},
    path::PathBuf,
    str::FromStr,
    time::Duration,
};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::store::target::{SocketSettings, Target};

/// The whole configuration. Its `Debug` output hides connection strings and tokens.
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Address the gRPC server listens on (`host:port`; host names are resolved).
    pub listen: String,
    /// The primary's connection string (libpq URL or key=value). When absent, pgstore runs a local
    /// PostgreSQL cluster in `data_dir`.
    pub database_url: Option<String>,
    /// A file holding the primary's connection string (first line), so that a password is neither
    /// on the command line nor in the environment. Used when `database_url` is absent.
    pub database_url_file: Option<PathBuf>,
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
/// Its `Debug` output counts the tokens and shows none.
#[derive(Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthSection {
    /// Tokens that may call every method.
    pub tokens: Vec<String>,
    /// Tokens that may only call methods that read.
    pub read_tokens: Vec<String>,
}

impl fmt::Debug for AuthSection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuthSection")
            .field("tokens", &format_args!("[{} redacted]", self.tokens.len()))
            .field(
                "read_tokens",
                &format_args!("[{} redacted]", self.read_tokens.len()),
            )
            .finish()
    }
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let urls: Vec<String> = self.replica_urls.iter().map(|u| redact_url(u)).collect();
        f.debug_struct("Config")
            .field("listen", &self.listen)
            .field(
                "database_url",
                &self.database_url.as_deref().map(redact_url),
            )
            .field("database_url_file", &self.database_url_file)
            .field("replica_urls", &urls)
            .field("data_dir", &self.data_dir)
            .field("metrics_listen", &self.metrics_listen)
            .field("log", &self.log)
            .field("database", &self.database)
            .field("writer", &self.writer)
            .field("limits", &self.limits)
            .field("server", &self.server)
            .field("live", &self.live)
            .field("groups", &self.groups)
            .field("locks", &self.locks)
            .field("replicas", &self.replicas)
            .field("auth", &self.auth)
            .field("tls", &self.tls)
            .finish()
    }
}

/// A connection string with its password replaced by `***` (URL user info, `password=` and
/// `?password=`).
pub fn redact_url(url: &str) -> String {
    let mut out = url.to_owned();
    if let Some(rest) = out
        .strip_prefix("postgres://")
        .or_else(|| out.strip_prefix("postgresql://"))
    {
        let scheme_len = out.len() - rest.len();
        let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
        if let Some(at) = rest[..authority_end].rfind('@')
            && let Some(colon) = rest[..at].find(':')
        {
            out.replace_range(scheme_len + colon + 1..scheme_len + at, "***");
        }
    }
    // key=value and query forms: password=... up to the next space or '&'.
    let mut result = String::with_capacity(out.len());
    let mut rest = out.as_str();
    while let Some(i) = rest.find("password=") {
        let boundary = i == 0 || matches!(rest.as_bytes()[i - 1], b' ' | b'&' | b'?' | b'\t');
        result.push_str(&rest[..i + "password=".len()]);
        rest = &rest[i + "password=".len()..];
        if boundary {
            let end = if let Some(quoted) = rest.strip_prefix('\'') {
                let mut end = quoted.len();
                let mut esc = false;
                for (j, c) in quoted.char_indices() {
                    match c {
                        '\\' if !esc => esc = true,
                        '\'' if !esc => {
                            end = j + 1;
                            break;
                        }
                        _ => esc = false,
                    }
                }
                (end + 1).min(rest.len())
            } else {
                rest.find([' ', '&']).unwrap_or(rest.len())
            };
            result.push_str("***");
            rest = &rest[end..];
        }
    }
    result.push_str(rest);
    result
}

/// The environment variable of a setting: `database.pool_size` is `PGSTORE_DATABASE__POOL_SIZE`.
pub fn env_name(key: &str) -> String {
    format!("PGSTORE_{}", key.to_uppercase().replace('.', "__"))
}

/// One setting as `pgstore config check` shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct Setting {
    /// The dotted key, as in the file: `listen`, `database.pool_size`.
    pub key: String,
    /// Its value (JSON: durations are strings such as `"5s"`, unset values are null).
    pub value: serde_json::Value,
}

impl Setting {
    /// The value as the environment would give it (lists comma-separated; `None` when unset).
    pub fn env_value(&self) -> Option<String> {
        match &self.value {
            serde_json::Value::Null => None,
            serde_json::Value::Array(items) if items.is_empty() => None,
            serde_json::Value::String(s) => Some(s.clone()),
            serde_json::Value::Array(items) => Some(
                items
                    .iter()
                    .map(|v| {
                        v.as_str()
                            .map(str::to_owned)
                            .unwrap_or_else(|| v.to_string())
                    })
                    .collect::<Vec<_>>()
                    .join(","),
            ),
            other => Some(other.to_string()),
        }
    }
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
    /// How often a waiting Lock call retries even without a release notification (a safety net:
    /// waiters are woken by the holder's release, on any instance).
    #[serde(with = "humantime_serde")]
    pub poll_interval: Duration,
}

impl Default for LocksSection {
    fn default() -> Self {
        LocksSection {
            lease_timeout: Duration::from_secs(10),
            poll_interval: Duration::from_secs(2),
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
    /// Bytes that may wait in one subscriber's queue (a single larger event still goes alone).
    pub max_buffered_bytes: usize,
    /// A subscriber whose queue stays full this long is cut off with RESOURCE_EXHAUSTED.
    #[serde(with = "humantime_serde")]
    pub stall_timeout: Duration,
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
            max_buffered_bytes: 1024 * 1024,
            stall_timeout: Duration::from_secs(30),
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
    /// How long to wait for a connection (TCP, TLS and login), or for a busy pool, before
    /// answering UNAVAILABLE.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// PostgreSQL `statement_timeout` of every pgstore session; 0s leaves the server's default.
    #[serde(with = "humantime_serde")]
    pub statement_timeout: Duration,
    /// `tcp_user_timeout` of every connection: data unacknowledged this long drops it.
    #[serde(with = "humantime_serde")]
    pub tcp_user_timeout: Duration,
    /// Idle time before TCP keepalive probes on every connection (then every third of it, three
    /// probes).
    #[serde(with = "humantime_serde")]
    pub keepalives_idle: Duration,
    /// Consecutive failed connection attempts at startup, each refused for a reason that waiting
    /// will not change (authentication, missing database, TLS verification), before pgstore
    /// exits.
    pub startup_permanent_failures: u32,
    /// NOTIFY channel carrying the log head after each commit.
    pub events_channel: String,
    /// NOTIFY channel carrying projection-change notices.
    pub changes_channel: String,
    /// NOTIFY channel carrying lock releases (wakes waiting Lock calls on every instance).
    pub locks_channel: String,
    /// DeleteStream removes a stream's events in transactions of at most this many rows, without
    /// the global lock, so that appends never wait for a large delete.
    pub delete_batch_size: u32,
    /// How long an instance waits for another one's migration (an online index build on a large
    /// table can take minutes) before giving up with an error.
    #[serde(with = "humantime_serde")]
    pub migration_wait: Duration,
    /// Rows of consumer-group members and locks idle for longer than this are deleted in the
    /// background (`0s`: never).
    #[serde(with = "humantime_serde")]
    pub dead_row_retention: Duration,
    /// How often the scavenger deletes the events that stream retention rules expired (`0s`:
    /// never; reads hide them all the same).
    #[serde(with = "humantime_serde")]
    pub scavenge_interval: Duration,
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
    /// How long an idempotency key is remembered (`0s`: forever). Older keys are deleted in the
    /// background, and a retry with one is a new append.
    #[serde(with = "humantime_serde")]
    pub idempotency_key_retention: Option<Duration>,
    /// A batch not committed within this long is given up: its callers get UNAVAILABLE with
    /// "commit outcome unknown" and the writer reconnects.
    #[serde(with = "humantime_serde")]
    pub commit_timeout: Duration,
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
    /// Most tags on one event.
    pub max_tags: usize,
    /// Longest tag, in bytes.
    pub max_tag_bytes: usize,
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
    /// A Load or ReadFrom page stops before it grows past this many bytes (a single larger event
    /// is still returned alone); the cursor in the answer continues after the last event sent.
    pub max_response_bytes: usize,
    /// A filtered ReadFrom (or Subscribe catch-up page) looks at most this many sequences: when
    /// fewer events match, the page is short and its cursor moves past the window.
    pub max_scan_window: u64,
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
    /// Concurrent HTTP/2 streams (calls) per client connection.
    pub max_concurrent_streams: u32,
    /// Concurrent long-lived calls (Subscribe, WatchChanges, Lock) per instance.
    pub max_subscribers: usize,
    /// HTTP/2 keepalive ping interval (and TCP keepalive idle time) on client connections.
    #[serde(with = "humantime_serde")]
    pub keepalive_interval: Duration,
    /// A client that does not answer a keepalive ping within this long is disconnected, and its
    /// locks, leases and subscriber slots are freed.
    #[serde(with = "humantime_serde")]
    pub keepalive_timeout: Duration,
    /// Longest time a unary call may take (a shorter `grpc-timeout` from the client wins); then
    /// DEADLINE_EXCEEDED.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// Gather each client connection's writes and write them once per scheduler round: more
    /// deliveries per second when the CPU is saturated by many subscribers, at a much higher
    /// latency; off by default (see docs/benchmarks.md).
    pub coalesce_writes: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: "127.0.0.1:50051".into(),
            database_url: None,
            database_url_file: None,
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
            statement_timeout: Duration::from_secs(60),
            tcp_user_timeout: Duration::from_secs(30),
            keepalives_idle: Duration::from_secs(30),
            startup_permanent_failures: 3,
            events_channel: "eskit_events".into(),
            changes_channel: "eskit_changes".into(),
            locks_channel: "pgstore_locks".into(),
            delete_batch_size: 1000,
            migration_wait: Duration::from_secs(15 * 60),
            dead_row_retention: Duration::from_secs(24 * 3600),
            scavenge_interval: Duration::from_secs(60),
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
            idempotency_key_retention: Some(Duration::from_secs(7 * 24 * 3600)),
            commit_timeout: w.commit_timeout,
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_stream_id_bytes: 256,
            max_event_type_bytes: 256,
            max_tags: 32,
            max_tag_bytes: 256,
            max_event_bytes: 1024 * 1024,
            max_metadata_bytes: 16 * 1024,
            max_events_per_append: 10_000,
            max_append_bytes: 16 * 1024 * 1024,
            default_page_size: 1000,
            max_page_size: 10_000,
            max_response_bytes: 3 * 1024 * 1024,
            max_scan_window: 100_000,
        }
    }
}

impl Default for ServerSection {
    fn default() -> Self {
        ServerSection {
            health_interval: Duration::from_secs(1),
            shutdown_grace: Duration::from_secs(10),
            max_concurrent_streams: 256,
            max_subscribers: 4096,
            keepalive_interval: Duration::from_secs(20),
            keepalive_timeout: Duration::from_secs(20),
            request_timeout: Duration::from_secs(30),
            coalesce_writes: false,
        }
    }
}

/// A command-line flag: the key of the setting it overrides (as in the file: `listen`,
/// `database.pool_size`) and its value. Flags are the last layer, over the same model as every
/// other layer: there is no separate command-line shape of the settings.
pub type Flag = (&'static str, config::Value);

impl Config {
    /// Loads defaults < `file` < `PGSTORE_*` environment < `flags`, then validates.
    pub fn load(file: Option<&std::path::Path>, flags: Vec<Flag>) -> Result<Config> {
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
        for (key, value) in flags {
            builder = builder.set_override(key, value).map_err(bad)?;
        }
        let mut config: Config = builder
            .build()
            .map_err(bad)?
            .try_deserialize()
            .map_err(|e| {
                let text = e.to_string();
                if text.contains("unknown field") {
                    // Any PGSTORE_* variable is read as a setting, so a stray one lands here too.
                    Error::invalid(
                        "configuration",
                        format!(
                            "{text} (from the file or a PGSTORE_* variable; \
                             `pgstore config check --format env` lists the settings)"
                        ),
                    )
                } else {
                    bad(e)
                }
            })?;
        if config.database_url.is_none()
            && let Some(path) = &config.database_url_file
        {
            let text = std::fs::read_to_string(path).map_err(|e| {
                Error::invalid("database_url_file", format!("{}: {e}", path.display()))
            })?;
            let url = text.lines().next().unwrap_or_default().trim().to_owned();
            if url.is_empty() {
                return Err(Error::invalid(
                    "database_url_file",
                    format!("{}: empty", path.display()),
                ));
            }
            config.database_url = Some(url);
        }
        config.validate()?;
        Ok(config)
    }

    /// A copy with the secrets replaced: passwords in connection strings become `***`, tokens
    /// become `***`. What `pgstore config check` prints.
    pub fn redacted(&self) -> Config {
        let mut c = self.clone();
        c.database_url = c.database_url.as_deref().map(redact_url);
        c.replica_urls = c.replica_urls.iter().map(|u| redact_url(u)).collect();
        c.auth.tokens = c.auth.tokens.iter().map(|_| "***".to_owned()).collect();
        c.auth.read_tokens = c
            .auth
            .read_tokens
            .iter()
            .map(|_| "***".to_owned())
            .collect();
        c
    }

    /// Every setting of the model with its value here, in the order of the file.
    pub fn settings(&self) -> Vec<Setting> {
        fn walk(prefix: &str, v: serde_json::Value, out: &mut Vec<Setting>) {
            match v {
                serde_json::Value::Object(m) => {
                    for (k, v) in m {
                        let key = if prefix.is_empty() {
                            k
                        } else {
                            format!("{prefix}.{k}")
                        };
                        walk(&key, v, out);
                    }
                }
                value => out.push(Setting {
                    key: prefix.to_owned(),
                    value,
                }),
            }
        }
        let mut out = Vec::new();
        let value = serde_json::to_value(self).expect("the configuration serializes");
        walk("", value, &mut out);
        out
    }

    /// Checks every value; the error names the key.
    pub fn validate(&self) -> Result<()> {
        let bad = |key: &str, why: String| Err::<(), _>(Error::invalid(key, why));
        self.listen_addr()?;
        if self.database.delete_batch_size == 0 {
            return bad("database.delete_batch_size", "must be at least 1".into());
        }
        if let Some(m) = &self.metrics_listen {
            SocketAddr::from_str(m).map_err(|e| Error::invalid("metrics_listen", e.to_string()))?;
        }
        if let Some(url) = &self.database_url {
            Target::parse(url).map_err(|e| Error::invalid("database_url", e))?;
        }
        for url in &self.replica_urls {
            Target::parse(url).map_err(|e| Error::invalid("replica_urls", e))?;
        }
        if !matches!(self.log.format.as_str(), "human" | "json") {
            return bad("log.format", "must be \"human\" or \"json\"".into());
        }
        let channels = [
            ("database.events_channel", &self.database.events_channel),
            ("database.changes_channel", &self.database.changes_channel),
            ("database.locks_channel", &self.database.locks_channel),
        ];
        for (key, name) in channels {
            if let Err(why) = check_identifier(name) {
                return bad(key, why);
            }
        }
        for (i, (key, name)) in channels.iter().enumerate() {
            if channels[..i].iter().any(|(_, other)| other == name) {
                return bad(key, "the NOTIFY channels must all differ".into());
            }
        }
        if self.database.connect_timeout.is_zero() {
            return bad("database.connect_timeout", "must be positive".into());
        }
        if self.database.startup_permanent_failures == 0 {
            return bad(
                "database.startup_permanent_failures",
                "must be at least 1".into(),
            );
        }
        if self.writer.commit_timeout < Duration::from_millis(100) {
            return bad("writer.commit_timeout", "must be at least 100ms".into());
        }
        let s = &self.server;
        if s.max_concurrent_streams == 0 || s.max_subscribers == 0 {
            return bad(
                "server",
                "max_concurrent_streams and max_subscribers must be at least 1".into(),
            );
        }
        if s.keepalive_interval.is_zero() || s.keepalive_timeout.is_zero() {
            return bad(
                "server.keepalive_interval",
                "keepalive_interval and keepalive_timeout must be positive".into(),
            );
        }
        if s.request_timeout < Duration::from_millis(10) {
            return bad("server.request_timeout", "must be at least 10ms".into());
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
            .is_some_and(|d| d < Duration::from_secs(1) && !d.is_zero())
        {
            return bad(
                "writer.idempotency_key_retention",
                "must be at least 1s (or 0s: keep keys forever)".into(),
            );
        }
        let l = &self.limits;
        if l.max_stream_id_bytes == 0
            || l.max_event_type_bytes == 0
            || l.max_tags == 0
            || l.max_tag_bytes == 0
            || l.max_event_bytes == 0
            || l.max_events_per_append == 0
            || l.max_page_size == 0
            || l.max_scan_window == 0
        {
            return bad("limits", "limits must be at least 1".into());
        }
        if l.default_page_size == 0 || l.default_page_size > l.max_page_size {
            return bad(
                "limits.default_page_size",
                "must be between 1 and limits.max_page_size".into(),
            );
        }
        if l.max_response_bytes < 1024 {
            return bad("limits.max_response_bytes", "must be at least 1024".into());
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
        if live.max_buffered_bytes == 0 || live.stall_timeout.is_zero() {
            return bad(
                "live",
                "max_buffered_bytes and stall_timeout must be positive".into(),
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

    /// The socket settings every database connection gets.
    pub fn socket_settings(&self) -> SocketSettings {
        SocketSettings {
            connect_timeout: self.database.connect_timeout,
            tcp_user_timeout: self.database.tcp_user_timeout,
            keepalives_idle: self.database.keepalives_idle,
            statement_timeout: self.database.statement_timeout,
        }
    }

    /// The primary, when a connection string is configured.
    pub fn primary_target(&self) -> Result<Option<Target>> {
        let Some(url) = &self.database_url else {
            return Ok(None);
        };
        let mut t = Target::parse(url).map_err(|e| Error::invalid("database_url", e))?;
        t.apply(&self.socket_settings());
        Ok(Some(t))
    }

    /// The replicas.
    pub fn replica_targets(&self) -> Result<Vec<Target>> {
        self.replica_urls
            .iter()
            .map(|url| {
                let mut t = Target::parse(url).map_err(|e| Error::invalid("replica_urls", e))?;
                t.apply(&self.socket_settings());
                Ok(t)
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
    pub fn live_config(&self) -> crate::live::context::LiveConfig {
        crate::live::context::LiveConfig {
            page_size: self.live.page_size,
            buffer: self.live.buffer,
            heartbeat: self.live.heartbeat_interval,
            poll_interval: self.live.poll_interval,
            groups: crate::live::groups::GroupConfig {
                partitions: self.groups.partitions,
                lease_timeout: self.groups.lease_timeout,
                renew_interval: self.groups.renew_interval,
            },
            locks: crate::live::context::LockConfig {
                lease_timeout: self.locks.lease_timeout,
                poll: self.locks.poll_interval,
                channel: self.database.locks_channel.clone(),
            },
            max_buffered_bytes: self.live.max_buffered_bytes,
            stall_timeout: self.live.stall_timeout,
            max_scan_window: self.limits.max_scan_window,
        }
    }

    /// The gRPC listen address: `ip:port`, or `host:port` with the host name resolved (the first
    /// address it resolves to).
    pub fn listen_addr(&self) -> Result<SocketAddr> {
        if let Ok(a) = SocketAddr::from_str(&self.listen) {
            return Ok(a);
        }
        let bad = |why: String| Error::invalid("listen", format!("{:?}: {why}", self.listen));
        if !self.listen.contains(':') {
            return Err(bad(
                "expected host:port, e.g. 127.0.0.1:50051, [::1]:50051 or localhost:50051".into(),
            ));
        }
        let mut addrs = self
            .listen
            .to_socket_addrs()
            .map_err(|e| bad(format!("cannot resolve: {e}")))?;
        addrs
            .next()
            .ok_or_else(|| bad("resolves to no address".into()))
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
            .map_err(|e| Error::invalid("tls", crate::error::chain(&e)))
    }

    /// The writer settings.
    pub fn writer_config(&self) -> crate::store::writer::WriterConfig {
        crate::store::writer::WriterConfig {
            queue_depth: self.writer.queue_depth,
            max_batch_appends: self.writer.max_batch_appends,
            max_batch_events: self.writer.max_batch_events,
            pipeline_depth: self.writer.pipeline_depth,
            commit_timeout: self.writer.commit_timeout,
        }
    }
}

/// Parses a libpq-style URL or key=value connection string (with TLS options, see
/// [`Target::parse`]).
pub fn parse_database_url(url: &str) -> std::result::Result<Target, String> {
    Target::parse(url)
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
    fn passwords_are_redacted() {
        for (url, want) in [
            (
                "postgres://app:s3cret@db:5432/x?sslmode=require",
                "postgres://app:***@db:5432/x?sslmode=require",
            ),
            ("postgres://app@db/x", "postgres://app@db/x"),
            (
                "host=db password=s3cret user=app",
                "host=db password=*** user=app",
            ),
            (
                "host=db password='s3 cr\\'et' user=app",
                "host=db password=*** user=app",
            ),
            (
                "postgres://db/x?password=s3cret&a=b",
                "postgres://db/x?password=***&a=b",
            ),
        ] {
            assert_eq!(redact_url(url), want);
        }
        let c = Config {
            database_url: Some("postgres://app:s3cret@db/x".into()),
            replica_urls: vec!["host=r password=s3cret".into()],
            auth: AuthSection {
                tokens: vec!["token-s3cret-0123456789".into()],
                read_tokens: vec![],
            },
            ..Config::default()
        };
        let shown = format!("{c:?}");
        assert!(!shown.contains("s3cret"), "{shown}");
    }

    #[test]
    fn listen_takes_host_names() {
        let mut c = Config {
            listen: "localhost:50051".into(),
            ..Config::default()
        };
        assert_eq!(c.listen_addr().unwrap().port(), 50051);
        c.listen = "50051".into();
        let e = c.listen_addr().unwrap_err().to_string();
        assert!(e.contains("host:port"), "{e}");
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
        let c = Config::load(Some(&path), Vec::new()).unwrap();
        assert_eq!(c.listen, "127.0.0.1:6000");
        assert_eq!(c.database.pool_size, 3);
        assert_eq!(c.database.connect_timeout, Duration::from_millis(250));
        let c = Config::load(Some(&path), vec![("listen", "127.0.0.1:7000".into())]).unwrap();
        assert_eq!(c.listen, "127.0.0.1:7000");
        std::fs::write(&path, "nonsense_key = 1\n").unwrap();
        assert!(Config::load(Some(&path), Vec::new()).is_err());
        std::fs::write(&path, "[database]\nevents_channel = \"bad-name\"\n").unwrap();
        assert!(Config::load(Some(&path), Vec::new()).is_err());
    }

    #[test]
    fn the_documented_settings_are_the_model() {
        let doc = include_str!("../docs/configuration.md");
        let rows: std::collections::BTreeMap<String, Vec<String>> = doc
            .lines()
            .filter(|l| l.starts_with("| `"))
            .map(|l| {
                let cells: Vec<String> = l
                    .trim_matches('|')
                    .split(" | ")
                    .map(|c| c.trim().to_owned())
                    .collect();
                (cells[0].trim_matches('`').to_owned(), cells)
            })
            .collect();
        let model: Vec<(String, serde_json::Value)> = Config::default()
            .settings()
            .into_iter()
            .map(|s| (s.key, s.value))
            .collect();
        let mut wrong = Vec::new();
        for (key, default) in &model {
            let Some(row) = rows.get(key) else {
                wrong.push(format!("{key} is not in docs/configuration.md"));
                continue;
            };
            let env = env_name(key);
            if !row[1].contains(&env) {
                wrong.push(format!("{key}: the row should name {env}"));
            }
            let shown = match default {
                serde_json::Value::Null => None,
                serde_json::Value::Array(a) if a.is_empty() => None,
                serde_json::Value::String(s) => Some(s.clone()),
                other => Some(other.to_string()),
            };
            let ok = match &shown {
                None => row[2].starts_with("none"),
                Some(v) => row[2].contains(&format!("`{v}`")),
            };
            if !ok {
                wrong.push(format!(
                    "{key}: the default is {}, the table says {}",
                    shown.as_deref().unwrap_or("none"),
                    row[2]
                ));
            }
        }
        for key in rows.keys() {
            if !model.iter().any(|(k, _)| k == key) {
                wrong.push(format!(
                    "docs/configuration.md documents {key}, which is not a setting"
                ));
            }
        }
        assert!(wrong.is_empty(), "\n{}", wrong.join("\n"));
    }
}
