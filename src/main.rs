//! The `pgstore` command: `serve`, `migrate`, `health`, `tail` and `config check`.

use std::{io::IsTerminal, path::PathBuf};

use clap::{Args, Parser, Subcommand, ValueEnum};
use pgstore::cli::tail::{Filter, Format, StartAt};
use pgstore::client::Connect;
use pgstore::config::{Config, Flag, env_name, parse_database_url, redact_url};
use tracing_subscriber::EnvFilter;

#[derive(Parser)]
#[command(name = "pgstore", version, about = "A gRPC event store on PostgreSQL")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// The settings that `serve` takes as flags. Every flag is also a `PGSTORE_*` variable and a key
/// of the TOML file (docs/configuration.md lists all settings); a flag wins over both.
#[derive(Args, Debug)]
struct ServeArgs {
    /// TOML configuration file.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Address to listen on [env: PGSTORE_LISTEN] [default: 127.0.0.1:50051].
    #[arg(long, value_name = "ADDR")]
    listen: Option<String>,
    /// The primary's connection string (postgres://user@host:port/db or key=value). Without
    /// it, pgstore runs a local PostgreSQL cluster in --data-dir. A password here is visible
    /// in the process list: prefer the variable, --database-url-file or PGPASSWORD
    /// [env: PGSTORE_DATABASE_URL] [default: none].
    #[arg(long, value_name = "URL")]
    database_url: Option<String>,
    /// A file whose first line is the primary's connection string
    /// [env: PGSTORE_DATABASE_URL_FILE] [default: none].
    #[arg(long, value_name = "FILE", conflicts_with = "database_url")]
    database_url_file: Option<PathBuf>,
    /// A read replica's connection string, repeatable (the variable takes a comma-separated
    /// list) [env: PGSTORE_REPLICA_URLS] [default: none].
    #[arg(long = "replica-url", value_name = "URL")]
    replica_urls: Vec<String>,
    /// Directory of the embedded PostgreSQL cluster, used without a database URL
    /// [env: PGSTORE_DATA_DIR] [default: pgstore-data].
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// Address of the Prometheus /metrics endpoint [env: PGSTORE_METRICS_LISTEN] [default: none].
    #[arg(long, value_name = "ADDR")]
    metrics_listen: Option<String>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gRPC server.
    #[command(
        after_help = "Every other setting is a PGSTORE_* variable or a key of the \
        --config file: `pgstore config check --format env` prints them all with their values, \
        docs/configuration.md explains each."
    )]
    Serve(ServeArgs),
    /// Apply the database migrations and exit.
    Migrate {
        /// The primary's connection string.
        #[arg(long, env = "PGSTORE_DATABASE_URL", value_name = "URL")]
        database_url: Option<String>,
        /// A file whose first line is the primary's connection string.
        #[arg(
            long,
            env = "PGSTORE_DATABASE_URL_FILE",
            value_name = "FILE",
            conflicts_with = "database_url"
        )]
        database_url_file: Option<PathBuf>,
        /// Print the migrations that would be applied, with their SQL, and change nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Ask a server whether it is serving (gRPC health check): exit status 0 when SERVING,
    /// 1 with a one-line reason otherwise.
    Health {
        #[command(flatten)]
        connect: Connect,
        /// The service to check ("" = the whole server, or pgstore.v1.EventStore).
        #[arg(long, default_value = "")]
        service: String,
    },
    /// Print events as they are committed (JSON lines by default), until Ctrl-C.
    Tail {
        /// Only this stream.
        #[arg(value_name = "STREAM", conflicts_with = "prefix")]
        stream: Option<String>,
        /// Start at the beginning of the log (or of the stream).
        #[arg(long, conflicts_with_all = ["from_end", "from_sequence"])]
        from_start: bool,
        /// Start with events committed from now on (the default).
        #[arg(long, conflicts_with = "from_sequence")]
        from_end: bool,
        /// Start at this global sequence.
        #[arg(long, value_name = "N")]
        from_sequence: Option<u64>,
        /// Only events of this type (repeatable).
        #[arg(long = "type", value_name = "TYPE")]
        types: Vec<String>,
        /// Only streams whose id starts with this.
        #[arg(long, value_name = "PREFIX")]
        prefix: Option<String>,
        /// Output format.
        #[arg(long, value_enum, default_value = "json")]
        format: Format,
        #[command(flatten)]
        connect: Connect,
    },
    /// Configuration tools.
    #[command(subcommand)]
    Config(ConfigCommand),
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Load the configuration as `serve` would (file, PGSTORE_* variables, flags), validate it
    /// and print the effective settings with secrets redacted. Exit status 1 on an error.
    Check {
        #[command(flatten)]
        serve: ServeArgs,
        /// Print as TOML (the file's shape) or as PGSTORE_* variables.
        #[arg(long, value_enum, default_value = "toml")]
        format: ConfigFormat,
    },
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum ConfigFormat {
    Toml,
    Env,
}

impl ServeArgs {
    /// Loads the layered configuration with these flags on top. Also says whether a password
    /// came on the command line.
    fn load(self) -> Result<(Config, bool), pgstore::Error> {
        let password_on_command_line = self
            .database_url
            .as_deref()
            .is_some_and(|u| redact_url(u) != u);
        let mut flags: Vec<Flag> = Vec::new();
        let path = |p: PathBuf| p.display().to_string();
        if let Some(v) = self.listen {
            flags.push(("listen", v.into()));
        }
        if let Some(v) = self.database_url {
            flags.push(("database_url", v.into()));
        }
        if let Some(v) = self.database_url_file {
            // The file given here wins over a URL from the file or the environment.
            flags.push(("database_url_file", path(v).into()));
            flags.push((
                "database_url",
                config::Value::new(None, config::ValueKind::Nil),
            ));
        }
        if !self.replica_urls.is_empty() {
            flags.push(("replica_urls", self.replica_urls.into()));
        }
        if let Some(v) = self.data_dir {
            flags.push(("data_dir", path(v).into()));
        }
        if let Some(v) = self.metrics_listen {
            flags.push(("metrics_listen", v.into()));
        }
        let config = Config::load(self.config.as_deref(), flags)?;
        Ok((config, password_on_command_line))
    }
}

fn init_tracing(format: &str, level: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stdout().is_terminal());
    if format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("install SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    match run(Cli::parse()).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pgstore: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Why a command failed, printed as one line after `pgstore: `.
enum Failure {
    /// From the server's own code.
    Pgstore(pgstore::Error),
    /// From a client command, already phrased.
    Message(String),
}

impl From<pgstore::Error> for Failure {
    fn from(e: pgstore::Error) -> Self {
        Failure::Pgstore(e)
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Pgstore(e) => e.fmt(f),
            Failure::Message(m) => f.write_str(m),
        }
    }
}

async fn run(cli: Cli) -> Result<(), Failure> {
    match cli.command {
        Command::Serve(args) => {
            let (config, password_on_command_line) = args.load()?;
            init_tracing(&config.log.format, &config.log.level);
            if password_on_command_line {
                tracing::warn!(
                    "--database-url holds a password, which every local user can read in the \
                     process list: pass it with PGSTORE_DATABASE_URL, --database-url-file or \
                     PGPASSWORD instead"
                );
            }
            let addr = config.listen_addr()?;
            let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| {
                pgstore::Error::invalid("listen", format!("cannot bind {addr}: {e}"))
            })?;
            Ok(pgstore::server::run(listener, config, shutdown_signal()).await?)
        }
        Command::Config(ConfigCommand::Check { serve, format }) => {
            let (config, _) = serve.load()?;
            let shown = config.redacted();
            let text = match format {
                ConfigFormat::Toml => toml::to_string(&shown)
                    .map_err(|e| pgstore::Error::invalid("configuration", e.to_string()))?,
                ConfigFormat::Env => shown
                    .settings()
                    .iter()
                    .map(|setting| {
                        let name = env_name(&setting.key);
                        match setting.env_value() {
                            Some(v) => format!("{name}={v}\n"),
                            None => format!("# {name} is not set\n"),
                        }
                    })
                    .collect(),
            };
            // A closed pipe (`| head`) is not an error.
            let _ = std::io::Write::write_all(&mut std::io::stdout(), text.as_bytes());
            Ok(())
        }
        Command::Health { connect, service } => {
            match pgstore::cli::health::check(&connect, &service).await {
                Ok(line) => {
                    println!("{line}");
                    Ok(())
                }
                Err(line) => Err(Failure::Message(line)),
            }
        }
        Command::Tail {
            stream,
            from_start,
            from_end: _,
            from_sequence,
            types,
            prefix,
            format,
            connect,
        } => {
            let filter = Filter {
                stream,
                prefix,
                types,
                start: match (from_start, from_sequence) {
                    (true, _) => StartAt::Start,
                    (false, Some(n)) => StartAt::Sequence(n),
                    (false, None) => StartAt::End,
                },
            };
            let mut out = std::io::stdout();
            let stop = async {
                let _ = tokio::signal::ctrl_c().await;
            };
            pgstore::cli::tail::run(&connect, &filter, format, &mut out, stop)
                .await
                .map_err(Failure::Message)
        }
        Command::Migrate {
            database_url,
            database_url_file,
            dry_run,
        } => {
            init_tracing("human", "info");
            let database_url = match (database_url, database_url_file) {
                (Some(u), _) => u,
                (None, Some(f)) => std::fs::read_to_string(&f)
                    .map_err(|e| {
                        pgstore::Error::invalid(
                            "database_url_file",
                            format!("{}: {e}", f.display()),
                        )
                    })?
                    .lines()
                    .next()
                    .unwrap_or_default()
                    .trim()
                    .to_owned(),
                (None, None) => {
                    return Err(pgstore::Error::invalid(
                        "database_url",
                        "give --database-url, --database-url-file or PGSTORE_DATABASE_URL",
                    )
                    .into());
                }
            };
            let config = parse_database_url(&database_url)
                .map_err(|e| pgstore::Error::invalid("database_url", e))?;
            let mut conn = pgstore::store::db::connect(&config).await?;
            if dry_run {
                let pending = pgstore::store::migrate::pending(&conn.client).await?;
                if pending.is_empty() {
                    println!("the schema is up to date: nothing to apply");
                }
                for m in pending {
                    let how = if m.transactional {
                        "in one transaction"
                    } else {
                        "statement by statement, outside a transaction (online)"
                    };
                    println!("would apply {:04}_{} {how}:", m.version, m.name);
                    for line in m.sql.lines() {
                        println!("    {line}");
                    }
                }
                return Ok(());
            }
            let wait = Config::default().database.migration_wait;
            let applied = pgstore::store::migrate::migrate(&mut conn.client, wait).await?;
            println!("applied {applied} migration(s)");
            Ok(())
        }
    }
}
