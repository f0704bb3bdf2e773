//! The `pgstore` command: `serve` and `migrate`.

use std::{io::IsTerminal, path::PathBuf};

use clap::{Parser, Subcommand};
use pgstore::config::{Config, Flag, parse_database_url, redact_url};
use tracing_subscriber::EnvFilter;

#[derive(Parser)]
#[command(name = "pgstore", version, about = "A gRPC event store on PostgreSQL")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gRPC server.
    Serve {
        /// TOML configuration file.
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// Address to listen on [default: 127.0.0.1:50051].
        #[arg(long, value_name = "ADDR")]
        listen: Option<String>,
        /// The primary's connection string (postgres://user@host:port/db or key=value). Without
        /// it, pgstore runs a local PostgreSQL cluster in --data-dir. A password here is visible
        /// in the process list: prefer PGSTORE_DATABASE_URL, --database-url-file or PGPASSWORD.
        #[arg(long, value_name = "URL")]
        database_url: Option<String>,
        /// A file whose first line is the primary's connection string.
        #[arg(long, value_name = "FILE", conflicts_with = "database_url")]
        database_url_file: Option<PathBuf>,
        /// A read replica's connection string (repeatable).
        #[arg(long = "replica-url", value_name = "URL")]
        replica_urls: Vec<String>,
        /// Directory of the embedded PostgreSQL cluster [default: ./pgstore-data].
        #[arg(long, value_name = "DIR")]
        data_dir: Option<PathBuf>,
        /// Address of the Prometheus /metrics endpoint.
        #[arg(long, value_name = "ADDR")]
        metrics_listen: Option<String>,
    },
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
    },
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

async fn run(cli: Cli) -> Result<(), pgstore::Error> {
    match cli.command {
        Command::Serve {
            config,
            listen,
            database_url,
            database_url_file,
            replica_urls,
            data_dir,
            metrics_listen,
        } => {
            let password_on_command_line =
                database_url.as_deref().is_some_and(|u| redact_url(u) != u);
            let mut flags: Vec<Flag> = Vec::new();
            let path = |p: PathBuf| p.display().to_string();
            if let Some(v) = listen {
                flags.push(("listen", v.into()));
            }
            if let Some(v) = database_url {
                flags.push(("database_url", v.into()));
            }
            if let Some(v) = database_url_file {
                // The file given here wins over a URL from the file or the environment.
                flags.push(("database_url_file", path(v).into()));
                flags.push((
                    "database_url",
                    config::Value::new(None, config::ValueKind::Nil),
                ));
            }
            if !replica_urls.is_empty() {
                flags.push(("replica_urls", replica_urls.into()));
            }
            if let Some(v) = data_dir {
                flags.push(("data_dir", path(v).into()));
            }
            if let Some(v) = metrics_listen {
                flags.push(("metrics_listen", v.into()));
            }
            let config = Config::load(config.as_deref(), flags)?;
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
            pgstore::server::run(listener, config, shutdown_signal()).await
        }
        Command::Migrate {
            database_url,
            database_url_file,
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
                    ));
                }
            };
            let config = parse_database_url(&database_url)
                .map_err(|e| pgstore::Error::invalid("database_url", e))?;
            let mut conn = pgstore::store::db::connect(&config).await?;
            let applied = pgstore::store::migrate::migrate(&mut conn.client).await?;
            println!("applied {applied} migration(s)");
            Ok(())
        }
    }
}
