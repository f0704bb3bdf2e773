//! A local PostgreSQL cluster managed by pgstore: with no database URL, `pgstore serve` creates
//! (initdb) and starts (pg_ctl) a cluster in its data directory, so trying pgstore takes one
//! command. When run as root, the cluster runs as the `postgres` user, as PostgreSQL requires.
//!
//! The embedded cluster is private to the user that runs it: its directories (data, socket) are
//! mode 0700, it listens on its Unix socket only (no TCP port), the socket itself is 0700, and
//! `pg_hba.conf` trusts only local socket connections (TCP logins would need a password, and none
//! is set). When the socket path would be too long, the socket goes to `$XDG_RUNTIME_DIR` (a
//! private per-user directory), never to a shared temporary directory.
//!
//! The same [`Cluster`] type drives the throwaway clusters of the test suite.

use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
};

use crate::error::{Error, Result};

/// Where to look for PostgreSQL's server programs, after `PATH`.
const BIN_DIRS: &[&str] = &[
    "/usr/lib/postgresql",
    "/usr/local/pgsql/bin",
    "/opt/homebrew/bin",
    "/usr/pgsql-17/bin",
    "/usr/pgsql-16/bin",
    "/usr/pgsql-15/bin",
];

/// The hint given when PostgreSQL's server programs are missing.
pub const INSTALL_HINT: &str = "PostgreSQL's server programs (initdb, pg_ctl, postgres) were not found. \
     Install them (Debian/Ubuntu: `apt-get install postgresql`; Fedora: `dnf install postgresql-server`; \
     macOS: `brew install postgresql`), or point pgstore at a database with --database-url";

/// Finds the directory holding `initdb` and `pg_ctl`.
pub fn find_bindir() -> Result<PathBuf> {
    let has_tools = |d: &Path| d.join("initdb").is_file() && d.join("pg_ctl").is_file();
    if let Some(path) = std::env::var_os("PATH") {
        for d in std::env::split_paths(&path) {
            if has_tools(&d) {
                // Follow links (e.g. /usr/local/bin/initdb -> /usr/lib/postgresql/15/bin/initdb)
                // to the directory that has all of PostgreSQL's programs.
                let real = std::fs::canonicalize(d.join("initdb"))
                    .ok()
                    .and_then(|p| p.parent().map(Path::to_path_buf))
                    .filter(|p| has_tools(p));
                return Ok(real.unwrap_or(d));
            }
        }
    }
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output()
        && out.status.success()
    {
        let d = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if has_tools(&d) {
            return Ok(d);
        }
    }
    for base in BIN_DIRS {
        let base = Path::new(base);
        if has_tools(base) {
            return Ok(base.to_path_buf());
        }
        // Debian layout: /usr/lib/postgresql/<major>/bin; take the newest.
        if let Ok(entries) = std::fs::read_dir(base) {
            let mut versions: Vec<(u32, PathBuf)> = entries
                .flatten()
                .filter_map(|e| {
                    let major = e.file_name().to_str()?.parse::<u32>().ok()?;
                    let bin = e.path().join("bin");
                    has_tools(&bin).then_some((major, bin))
                })
                .collect();
            versions.sort();
            if let Some((_, bin)) = versions.pop() {
                return Ok(bin);
            }
        }
    }
    Err(Error::Unavailable(INSTALL_HINT.into()))
}

/// Whether this process runs as root (PostgreSQL refuses to).
pub fn running_as_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|euid| euid == "0"))
        })
        .unwrap_or(false)
}

/// A PostgreSQL cluster in a directory.
#[derive(Debug, Clone)]
pub struct Cluster {
    /// `initdb`, `pg_ctl`, `pg_basebackup`, ...
    pub bindir: PathBuf,
    /// The cluster's data directory.
    pub data: PathBuf,
    /// Directory of the Unix socket.
    pub socket_dir: PathBuf,
    /// The port (also names the Unix socket).
    pub port: u16,
    /// Listen on 127.0.0.1 as well as the socket.
    pub tcp: bool,
    /// Run the programs as the `postgres` user (when we are root).
    pub as_postgres: bool,
    /// Server log file.
    pub log: PathBuf,
}

impl Cluster {
    /// A cluster whose files live under `root` (`root/pg`, `root/run`, `root/postgres.log`).
    pub fn in_dir(root: &Path, port: u16, tcp: bool) -> Result<Cluster> {
        let root = std::path::absolute(root)
            .map_err(|e| Error::Internal(format!("data directory {}: {e}", root.display())))?;
        let mut socket_dir = root.join("run");
        let as_postgres = running_as_root();
        // Unix socket paths are limited to ~107 bytes.
        if socket_dir.as_os_str().len() + 20 > 100 {
            let private = std::env::var_os("XDG_RUNTIME_DIR")
                .map(PathBuf::from)
                .filter(|d| d.is_dir() && !as_postgres);
            let Some(runtime) = private else {
                return Err(Error::invalid(
                    "data_dir",
                    format!(
                        "{} is too long a path for PostgreSQL's Unix socket; use a shorter --data-dir",
                        root.display()
                    ),
                ));
            };
            socket_dir = runtime.join(format!(
                "pgstore-{:08x}",
                crate::store::partition_key(&root.to_string_lossy())
            ));
        }
        Ok(Cluster {
            bindir: find_bindir()?,
            data: root.join("pg"),
            log: root.join("postgres.log"),
            socket_dir,
            port,
            tcp,
            as_postgres,
        })
    }

    fn cmd(&self, program: &str) -> Command {
        let path = self.bindir.join(program);
        if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(path);
            c
        } else {
            Command::new(path)
        }
    }

    fn run(&self, what: &str, mut cmd: Command) -> Result<Output> {
        let out = cmd
            .output()
            .map_err(|e| Error::Internal(format!("{what}: cannot run: {e}")))?;
        if !out.status.success() {
            return Err(Error::Internal(format!(
                "{what} failed: {}{}",
                String::from_utf8_lossy(&out.stderr),
                String::from_utf8_lossy(&out.stdout)
            )));
        }
        Ok(out)
    }

    /// Creates a directory private to the server's user (mode 0700), given to the `postgres` user
    /// when we run as root.
    pub fn own(&self, dir: &Path) -> Result<()> {
        use std::os::unix::fs::PermissionsExt;
        std::fs::create_dir_all(dir)
            .map_err(|e| Error::Internal(format!("create {}: {e}", dir.display())))?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| Error::Internal(format!("chmod 0700 {}: {e}", dir.display())))?;
        if self.as_postgres {
            let mut c = Command::new("chown");
            c.args(["-R", "postgres:postgres"]).arg(dir);
            self.run("chown", c)?;
        }
        Ok(())
    }

    /// Whether the data directory holds a cluster.
    pub fn exists(&self) -> bool {
        self.data.join("PG_VERSION").is_file()
    }

    /// Creates a throwaway cluster for tests (superuser `postgres`, trust authentication on the
    /// socket and on TCP, UTF-8).
    pub fn init(&self) -> Result<()> {
        self.initdb("trust")
    }

    /// Creates a private cluster: trust on the (0700) Unix socket only; TCP logins need a
    /// password (scram-sha-256), and none is set.
    pub fn init_private(&self) -> Result<()> {
        self.initdb("scram-sha-256")
    }

    fn initdb(&self, host_auth: &str) -> Result<()> {
        let root = self.data.parent().unwrap_or(&self.data).to_path_buf();
        self.own(&root)?;
        let mut c = self.cmd("initdb");
        c.arg("-D").arg(&self.data).args([
            "-U",
            "postgres",
            "--auth-local=trust",
            &format!("--auth-host={host_auth}"),
            "-E",
            "UTF8",
            "--no-locale",
        ]);
        self.run("initdb", c)?;
        Ok(())
    }

    /// Makes this (not yet existing) cluster a streaming replica of `primary` with
    /// `pg_basebackup -R` (the primary must accept replication connections on 127.0.0.1).
    pub fn basebackup_from(&self, primary: &Cluster) -> Result<()> {
        let root = self.data.parent().unwrap_or(&self.data).to_path_buf();
        self.own(&root)?;
        let mut c = self.cmd("pg_basebackup");
        c.args([
            "-h",
            "127.0.0.1",
            "-p",
            &primary.port.to_string(),
            "-U",
            "postgres",
            "-D",
        ])
        .arg(&self.data)
        .args(["-R", "-X", "stream", "-c", "fast"]);
        self.run("pg_basebackup", c)?;
        Ok(())
    }

    /// Whether the server is running.
    pub fn is_running(&self) -> bool {
        let mut c = self.cmd("pg_ctl");
        c.arg("-D").arg(&self.data).arg("status");
        c.output().map(|o| o.status.success()).unwrap_or(false)
    }

    /// Starts the server and waits until it accepts connections. `settings` are extra
    /// `-c name=value` server settings.
    pub fn start(&self, settings: &[(&str, &str)]) -> Result<()> {
        self.own(&self.socket_dir)?;
        let listen = if self.tcp { "127.0.0.1" } else { "''" };
        let mut opts = format!(
            "-p {} -k {} -c listen_addresses={listen}",
            self.port,
            self.socket_dir.display()
        );
        for (k, v) in settings {
            opts.push_str(&format!(" -c {k}={v}"));
        }
        let mut c = self.cmd("pg_ctl");
        c.arg("-D")
            .arg(&self.data)
            .arg("-l")
            .arg(&self.log)
            .args(["-w", "-t", "60", "-o", &opts, "start"]);
        self.run("pg_ctl start", c).map_err(|e| {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(10).collect();
            Error::Internal(format!(
                "{e}\nlast lines of {}:\n{}",
                self.log.display(),
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            ))
        })?;
        Ok(())
    }

    /// Stops the server (`mode`: smart, fast or immediate).
    pub fn stop(&self, mode: &str) -> Result<()> {
        let mut c = self.cmd("pg_ctl");
        c.arg("-D")
            .arg(&self.data)
            .args(["-m", mode, "-w", "-t", "60", "stop"]);
        self.run("pg_ctl stop", c)?;
        Ok(())
    }

    /// A connection config for the `postgres` superuser on database `dbname`, over the socket.
    pub fn config(&self, dbname: &str) -> tokio_postgres::Config {
        let mut c = tokio_postgres::Config::new();
        c.host_path(&self.socket_dir)
            .port(self.port)
            .user("postgres")
            .dbname(dbname)
            .application_name("pgstore");
        c
    }

    /// A libpq URL over TCP (requires `tcp`).
    pub fn url(&self, dbname: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{dbname}", self.port)
    }
}

/// The embedded cluster of `pgstore serve` without a database URL: created on first use, started
/// if needed, stopped at shutdown if this process started it.
pub struct Embedded {
    /// The cluster.
    pub cluster: Cluster,
    started_here: bool,
}

impl Embedded {
    /// Creates and starts the cluster under `data_dir` (blocking: call from a blocking context).
    pub fn start(data_dir: &Path) -> Result<Embedded> {
        let cluster = Cluster::in_dir(data_dir, 5432, false)?;
        if !cluster.exists() {
            tracing::info!(dir = %cluster.data.display(), "creating an embedded PostgreSQL cluster (initdb)");
            cluster.init_private()?;
        }
        // A cluster made by an older pgstore: make its directory private too.
        cluster.own(data_dir)?;
        let started_here = if cluster.is_running() {
            tracing::info!(dir = %cluster.data.display(), "embedded PostgreSQL is already running; using it");
            false
        } else {
            cluster.start(&[("unix_socket_permissions", "0700")])?;
            true
        };
        tracing::info!(
            data = %cluster.data.display(),
            socket = %cluster.socket_dir.display(),
            log = %cluster.log.display(),
            "embedded PostgreSQL ready (for development). For production, point pgstore at a real database: \
             --database-url postgres://user@host:5432/db (or PGSTORE_DATABASE_URL)"
        );
        Ok(Embedded {
            cluster,
            started_here,
        })
    }

    /// Stops the cluster if this process started it.
    pub fn stop(&self) {
        if self.started_here {
            match self.cluster.stop("fast") {
                Ok(()) => tracing::info!("embedded PostgreSQL stopped"),
                Err(e) => tracing::warn!(error = %e, "stopping embedded PostgreSQL failed"),
            }
        }
    }
}
