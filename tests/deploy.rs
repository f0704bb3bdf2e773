//! The deployment files agree with the binary: docker-compose.yml, the Dockerfile and the
//! Kubernetes example. No container engine is needed: the files are parsed and every PGSTORE_*
//! setting, port, health-check command and referenced file is checked against `pgstore` itself.
//! (CI also validates the Kubernetes manifests against the Kubernetes schemas.)

use std::{collections::BTreeMap, path::Path, process::Command};

use yaml_rust2::{Yaml, YamlLoader};

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn read(path: &str) -> String {
    std::fs::read_to_string(repo().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn pgstore(args: &[&str], env: &BTreeMap<String, String>) -> (i32, String, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_pgstore"));
    for (k, _) in std::env::vars() {
        if k.starts_with("PGSTORE_") {
            cmd.env_remove(k);
        }
    }
    let out = cmd.args(args).envs(env).output().expect("run pgstore");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `pgstore config check` accepts these variables (names and values).
fn assert_config_accepts(what: &str, env: &BTreeMap<String, String>) {
    let pgstore_env: BTreeMap<String, String> = env
        .iter()
        .filter(|(k, _)| k.starts_with("PGSTORE_"))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let (code, out, err) = pgstore(&["config", "check", "--format", "env"], &pgstore_env);
    assert_eq!(
        code, 0,
        "{what}: pgstore config check refused {pgstore_env:?}: {err}"
    );
    for name in pgstore_env.keys() {
        assert!(
            out.contains(&format!("\n{name}=")) || out.starts_with(&format!("{name}=")),
            "{what}: {name} is not a setting `pgstore config check` prints"
        );
    }
}

/// A health-check command parses and runs: with no server it fails to connect (exit 1), never
/// with a usage error (exit 2).
fn assert_health_command_works(what: &str, argv: &[String], env: &BTreeMap<String, String>) {
    assert!(
        argv.first()
            .is_some_and(|a| a == "pgstore" || a.ends_with("/pgstore")),
        "{what}: the health check runs {argv:?}, not pgstore"
    );
    assert_eq!(argv.get(1).map(String::as_str), Some("health"), "{what}");
    let args: Vec<&str> = argv[1..].iter().map(String::as_str).collect();
    let (code, _, err) = pgstore(&args, env);
    assert!(code == 0 || code == 1, "{what}: {argv:?}: {err}");
    assert!(!err.contains("Usage:"), "{what}: {argv:?}: {err}");
}

fn port_of(addr: &str) -> u16 {
    addr.rsplit_once(':').unwrap().1.parse().unwrap()
}

/// `${NAME:-default}` replaced by its default (compose's interpolation with nothing set).
fn interpolate(s: &str) -> String {
    let mut out = String::new();
    let mut rest = s;
    while let Some(i) = rest.find("${") {
        out.push_str(&rest[..i]);
        let end = rest[i..].find('}').expect("closed ${") + i;
        let inner = &rest[i + 2..end];
        let default = inner.split_once(":-").map_or("", |(_, d)| d);
        out.push_str(default);
        rest = &rest[end + 1..];
    }
    out.push_str(rest);
    out
}

fn text(y: &Yaml) -> String {
    match y {
        Yaml::String(s) => s.clone(),
        Yaml::Integer(i) => i.to_string(),
        Yaml::Boolean(b) => b.to_string(),
        Yaml::Real(r) => r.clone(),
        other => panic!("not a scalar: {other:?}"),
    }
}

/// A mapping with YAML merge keys (`<<: *anchor`) applied.
fn merged(y: &Yaml) -> yaml_rust2::yaml::Hash {
    let mut out = yaml_rust2::yaml::Hash::new();
    if let Some(base) = y["<<"].as_hash() {
        out = merged(&Yaml::Hash(base.clone()));
    }
    for (k, v) in y.as_hash().expect("a mapping") {
        if k.as_str() != Some("<<") {
            out.insert(k.clone(), v.clone());
        }
    }
    out
}

fn compose_env(service: &yaml_rust2::yaml::Hash) -> BTreeMap<String, String> {
    let env = service
        .get(&Yaml::from_str("environment"))
        .cloned()
        .unwrap_or(Yaml::Null);
    let mut out = BTreeMap::new();
    match &env {
        Yaml::Hash(_) => {
            for (k, v) in merged(&env) {
                out.insert(text(&k), interpolate(&text(&v)));
            }
        }
        Yaml::Array(items) => {
            for item in items {
                let (k, v) = text(item)
                    .split_once('=')
                    .map(|(k, v)| (k.to_owned(), v.to_owned()))
                    .unwrap();
                out.insert(k, interpolate(&v));
            }
        }
        _ => {}
    }
    out
}

#[test]
fn the_compose_cluster_matches_the_binary() {
    let doc = &YamlLoader::load_from_str(&read("docker-compose.yml")).unwrap()[0];
    let services = doc["services"].as_hash().expect("services");
    let get = |name: &str| merged(&services[&Yaml::from_str(name)]);
    let mut pgstore_services = 0;
    for (name, service) in services {
        let name = text(name);
        let service = merged(service);
        let field = |k: &str| {
            service
                .get(&Yaml::from_str(k))
                .cloned()
                .unwrap_or(Yaml::BadValue)
        };
        let env = compose_env(&service);

        // Files and folders mounted from the repository exist.
        if let Some(volumes) = field("volumes").as_vec() {
            for v in volumes {
                let v = text(v);
                let source = v.split(':').next().unwrap();
                if source.starts_with("./") {
                    assert!(
                        repo().join(source).exists(),
                        "{name}: {source} does not exist"
                    );
                }
            }
        }
        if let Some(build) = field("build").as_str() {
            assert!(
                repo().join(build).join("Dockerfile").exists(),
                "{name}: no Dockerfile"
            );
        }
        // depends_on names services, with a condition that a health check can satisfy.
        if let Some(deps) = field("depends_on").as_hash() {
            for (dep, how) in deps {
                let dep_name = text(dep);
                let dep = get(&dep_name);
                let condition = how["condition"].as_str().unwrap_or("service_started");
                if condition == "service_healthy" {
                    let image = dep
                        .get(&Yaml::from_str("image"))
                        .map(text)
                        .unwrap_or_default();
                    let own_check = dep.contains_key(&Yaml::from_str("healthcheck"));
                    assert!(
                        own_check || image.starts_with("pgstore"),
                        "{name} waits for {dep_name} to be healthy, which has no health check"
                    );
                }
            }
        }

        let is_pgstore = field("image")
            .as_str()
            .is_some_and(|i| i.starts_with("pgstore"));
        if !is_pgstore {
            continue;
        }
        assert_config_accepts(&format!("docker-compose.yml service {name}"), &env);
        let command: Vec<String> = field("command")
            .as_vec()
            .map(|c| c.iter().map(text).collect())
            .unwrap_or_else(|| vec!["serve".into()]);
        if command[0] == "migrate" {
            assert!(
                env.contains_key("PGSTORE_DATABASE_URL"),
                "{name}: migrate needs the URL"
            );
            continue;
        }
        pgstore_services += 1;
        let listen = port_of(&env["PGSTORE_LISTEN"]);
        let metrics = port_of(&env["PGSTORE_METRICS_LISTEN"]);
        let published: Vec<u16> = field("ports")
            .as_vec()
            .expect("ports")
            .iter()
            .map(|p| text(p).rsplit(':').next().unwrap().parse().unwrap())
            .collect();
        assert!(
            published.contains(&listen),
            "{name}: gRPC port {listen} not published"
        );
        assert!(
            published.contains(&metrics),
            "{name}: metrics port {metrics} not published"
        );
        assert!(
            env.contains_key("PGSTORE_REPLICA_URLS"),
            "{name}: reads from the replica"
        );
        let check: Vec<String> = field("healthcheck")["test"]
            .as_vec()
            .expect("a health check")
            .iter()
            .map(text)
            .collect();
        assert_eq!(check[0], "CMD");
        assert_health_command_works(&format!("{name} health check"), &check[1..], &env);
        let deps = field("depends_on");
        assert_eq!(
            deps["migrate"]["condition"].as_str(),
            Some("service_completed_successfully"),
            "{name} starts after the migrations"
        );
    }
    assert_eq!(pgstore_services, 2, "two pgstore instances");

    // The replica is a streaming replica of the primary.
    let replica = get("postgres-replica");
    let entrypoint = text(&replica[&Yaml::from_str("entrypoint")][0]);
    let script = replica[&Yaml::from_str("volumes")]
        .as_vec()
        .unwrap()
        .iter()
        .map(text)
        .find(|v| v.contains(&entrypoint))
        .expect("the entrypoint is mounted from the repository");
    let script = read(script.split(':').next().unwrap().trim_start_matches("./"));
    assert!(script.contains("pg_basebackup") && script.contains("--write-recovery-conf"));
    let init = read("deploy/compose/primary-init.sh");
    assert!(init.contains("REPLICATION") && init.contains("pg_hba.conf"));

    // Prometheus (a profile) scrapes both instances on their metrics port.
    let prometheus = get("prometheus");
    assert!(prometheus.contains_key(&Yaml::from_str("profiles")));
    let scrape = &YamlLoader::load_from_str(&read("deploy/prometheus/prometheus.yml")).unwrap()[0];
    let targets: Vec<String> = scrape["scrape_configs"][0]["static_configs"][0]["targets"]
        .as_vec()
        .unwrap()
        .iter()
        .map(text)
        .collect();
    for t in &targets {
        let (host, port) = t.split_once(':').unwrap();
        let env = compose_env(&get(host));
        assert_eq!(
            port.parse::<u16>().unwrap(),
            port_of(&env["PGSTORE_METRICS_LISTEN"])
        );
    }
    assert_eq!(targets.len(), 2);
    // The dashboard is valid JSON and only asks for series pgstore has.
    let dashboard: serde_json::Value =
        serde_json::from_str(&read("deploy/grafana/pgstore-dashboard.json")).unwrap();
    assert!(
        dashboard["panels"]
            .as_array()
            .is_some_and(|p| !p.is_empty())
    );
}

#[test]
fn the_dockerfile_matches_the_binary() {
    let dockerfile = read("Dockerfile");
    // Join continuation lines.
    let text = dockerfile.replace("\\\n", " ");
    let mut env = BTreeMap::new();
    let mut exposed = Vec::new();
    let mut healthcheck = None;
    let mut final_stage = false;
    for line in text.lines().map(str::trim) {
        let (instr, rest) = line.split_once(' ').unwrap_or((line, ""));
        match instr {
            "FROM" => final_stage = !rest.contains(" AS "),
            "COPY" if !rest.starts_with("--from") => {
                let parts: Vec<&str> = rest.split_whitespace().collect();
                for source in &parts[..parts.len() - 1] {
                    assert!(
                        repo().join(source).exists(),
                        "Dockerfile copies {source}, missing"
                    );
                }
            }
            "ENV" if final_stage => {
                for pair in rest.split_whitespace() {
                    let (k, v) = pair.split_once('=').expect("ENV k=v");
                    env.insert(k.to_owned(), v.to_owned());
                }
            }
            "EXPOSE" => exposed.extend(rest.split_whitespace().map(|p| p.parse::<u16>().unwrap())),
            "HEALTHCHECK" => {
                let json = &rest[rest.find("CMD").expect("CMD") + 3..];
                let argv: Vec<String> = serde_json::from_str(json.trim()).expect("exec form");
                healthcheck = Some(argv);
            }
            _ => {}
        }
    }
    assert_config_accepts("Dockerfile", &env);
    assert!(exposed.contains(&port_of(&env["PGSTORE_LISTEN"])));
    assert!(exposed.contains(&port_of(&env["PGSTORE_METRICS_LISTEN"])));
    assert!(
        env["PGSTORE_LISTEN"].starts_with("0.0.0.0:"),
        "the image listens beyond the container"
    );
    let healthcheck = healthcheck.expect("a HEALTHCHECK");
    assert_health_command_works("Dockerfile HEALTHCHECK", &healthcheck, &env);
    assert!(
        dockerfile.contains("ca-certificates"),
        "CA certificates for TLS to PostgreSQL"
    );
    assert!(dockerfile.contains("--profile dist"), "the stripped build");
    let manifest = read("Cargo.toml");
    assert!(manifest.contains("[profile.dist]") && manifest.contains("strip = true"));
}

#[test]
fn the_kubernetes_example_matches_the_binary() {
    let docs = YamlLoader::load_from_str(&read("deploy/kubernetes/pgstore-sidecar.yaml")).unwrap();
    let deployment = docs
        .iter()
        .find(|d| d["kind"].as_str() == Some("Deployment"))
        .expect("a Deployment");
    let spec = &deployment["spec"]["template"]["spec"];
    let sidecar = spec["initContainers"]
        .as_vec()
        .and_then(|c| c.iter().find(|c| c["name"].as_str() == Some("pgstore")))
        .expect("the pgstore sidecar");
    assert_eq!(
        sidecar["restartPolicy"].as_str(),
        Some("Always"),
        "a native sidecar"
    );
    let mut env = BTreeMap::new();
    for e in sidecar["env"].as_vec().unwrap() {
        let value = match e["value"].as_str() {
            Some(v) => v.to_owned(),
            None => "from-a-secret".to_owned(),
        };
        env.insert(text(&e["name"]), value);
    }
    assert!(
        docs.iter().any(|d| d["kind"].as_str() == Some("Secret")),
        "the password comes from a Secret"
    );
    let url = env["PGSTORE_DATABASE_URL"].clone();
    assert!(url.contains("sslmode=verify-full"));
    // The CA comes from a volume in the pod: check the URL with a real CA file in its place.
    let mount = sidecar["volumeMounts"][0]["mountPath"].as_str().unwrap();
    assert!(
        url.contains(&format!("sslrootcert={mount}/")),
        "the CA is the mounted one"
    );
    let dir = std::env::temp_dir().join(format!("pgstore-deploy-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ca = rcgen::generate_simple_self_signed(vec!["db".to_owned()]).unwrap();
    std::fs::write(dir.join("ca.crt"), ca.cert.pem()).unwrap();
    env.insert(
        "PGSTORE_DATABASE_URL".into(),
        url.replace(mount, dir.to_str().unwrap()),
    );
    assert_config_accepts("deploy/kubernetes sidecar", &env);
    let _ = std::fs::remove_dir_all(&dir);
    let listen = port_of(&env["PGSTORE_LISTEN"]);
    assert!(
        env["PGSTORE_LISTEN"].starts_with("127.0.0.1:"),
        "localhost only"
    );
    for probe in ["startupProbe", "readinessProbe"] {
        let argv: Vec<String> = sidecar[probe]["exec"]["command"]
            .as_vec()
            .unwrap_or_else(|| panic!("{probe} is an exec probe"))
            .iter()
            .map(text)
            .collect();
        let addr = argv
            .iter()
            .position(|a| a == "--addr")
            .map(|i| argv[i + 1].clone());
        assert_eq!(
            addr.map(|a| port_of(&a)),
            Some(listen),
            "{probe} dials the gRPC port"
        );
        assert_health_command_works(probe, &argv, &env);
    }
    let metrics = port_of(&env["PGSTORE_METRICS_LISTEN"]);
    let ports: Vec<i64> = sidecar["ports"]
        .as_vec()
        .unwrap()
        .iter()
        .map(|p| p["containerPort"].as_i64().unwrap())
        .collect();
    assert!(ports.contains(&i64::from(metrics)));
    assert_eq!(
        sidecar["livenessProbe"]["httpGet"]["path"].as_str(),
        Some("/healthz")
    );
    assert!(sidecar["resources"]["limits"]["memory"].as_str().is_some());
    assert_eq!(
        sidecar["securityContext"]["runAsUser"].as_i64(),
        Some(10001)
    );
    assert_eq!(
        sidecar["securityContext"]["readOnlyRootFilesystem"].as_bool(),
        Some(true)
    );
}
