//! `deploy/` is documentation that must be right, and CI has no container engine: these tests
//! read the compose file, nginx.conf, the Kubernetes manifests and the Dockerfile, and hold them
//! against the real configuration. Every FHIRGATE_* variable must be one fhirgate reads; every
//! fhirgate service's environment must pass `Config` validation as `fhirgate proxy`/`control`
//! would see it; and the wiring between them (control address, trusted proxies, probe ports,
//! nginx upstreams, Service selectors) must agree with what that configuration says.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use clap::{CommandFactory, FromArgMatches};
use fhirgate::cli::{Cli, Command};
use fhirgate::config::Config;
use ipnet::{IpNet, Ipv4Net};
use serde::Deserialize;
use serde_norway::Value;

// === reading files ===

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn deploy() -> PathBuf {
    repo().join("deploy")
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn files_under(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    entries.sort();
    for path in entries {
        if path.is_dir() {
            files_under(&path, out);
        } else {
            out.push(path);
        }
    }
}

fn deploy_files() -> Vec<PathBuf> {
    let mut out = Vec::new();
    files_under(&deploy(), &mut out);
    // A developer's filled-in copy of .env.example holds secrets and is not part of the docs.
    out.retain(|p| p.file_name().is_some_and(|n| n != ".env"));
    out
}

fn is_yaml(path: &Path) -> bool {
    matches!(
        path.extension().and_then(|e| e.to_str()),
        Some("yml" | "yaml")
    )
}

/// Resolves `<<` merge keys, also those that come in through a merged mapping (serde_norway
/// resolves one level per pass).
fn resolve_merges(value: &mut Value) {
    fn has_merge(v: &Value) -> bool {
        match v {
            Value::Mapping(m) => m.contains_key("<<") || m.values().any(has_merge),
            Value::Sequence(s) => s.iter().any(has_merge),
            Value::Tagged(t) => has_merge(&t.value),
            _ => false,
        }
    }
    for _ in 0..16 {
        if !has_merge(value) {
            return;
        }
        value.apply_merge().unwrap();
    }
    panic!("merge keys nested too deeply");
}

/// Every document of a YAML file, merge keys resolved.
fn yaml_docs(path: &Path) -> Vec<Value> {
    let text = read(path);
    let mut docs = Vec::new();
    for doc in serde_norway::Deserializer::from_str(&text) {
        let mut v = Value::deserialize(doc)
            .unwrap_or_else(|e| panic!("{}: invalid YAML: {e}", path.display()));
        resolve_merges(&mut v);
        if !v.is_null() {
            docs.push(v);
        }
    }
    docs
}

fn s<'a>(v: &'a Value, what: &str) -> &'a str {
    v.as_str()
        .unwrap_or_else(|| panic!("{what}: expected a string, got {v:?}"))
}

fn strings(v: &Value, what: &str) -> Vec<String> {
    v.as_sequence()
        .unwrap_or_else(|| panic!("{what}: expected a list, got {v:?}"))
        .iter()
        .map(|x| s(x, what).to_string())
        .collect()
}

/// A scalar (string, number, bool) as the string a container would see.
fn scalar(v: &Value, what: &str) -> String {
    match v {
        Value::String(x) => x.clone(),
        Value::Number(n) => n.to_string(),
        Value::Bool(b) => b.to_string(),
        other => panic!("{what}: expected a scalar, got {other:?}"),
    }
}

// === the real configuration variables ===

/// The `fhirgate <command>` clap command with environment lookups removed, so the test
/// environment cannot leak into the configurations under test.
fn command_without_env() -> clap::Command {
    let mut cmd = Cli::command();
    for sub in ["serve", "proxy", "control"] {
        cmd = cmd.mut_subcommand(sub, |c| c.mut_args(|a| a.env(None)));
    }
    cmd
}

/// FHIRGATE_* variable → long flag, for `fhirgate <sub>`, from the clap definitions.
fn env_flags(sub: &str) -> BTreeMap<String, String> {
    let cmd = Cli::command();
    let sub = cmd
        .find_subcommand(sub)
        .unwrap_or_else(|| panic!("no `fhirgate {sub}`"));
    sub.get_arguments()
        .filter_map(|a| {
            let env = a.get_env()?.to_str()?.to_string();
            let long = a.get_long()?.to_string();
            Some((env, long))
        })
        .collect()
}

/// Variables read outside clap (e.g. the log filter): string literals handed to an
/// environment-reading call somewhere under src/.
fn env_read_outside_clap() -> BTreeSet<String> {
    let mut files = Vec::new();
    files_under(&repo().join("src"), &mut files);
    let mut names = BTreeSet::new();
    for f in files
        .iter()
        .filter(|f| f.extension().is_some_and(|e| e == "rs"))
    {
        let text = read(f);
        for call in ["from_env(\"", "env::var(\"", "env::var_os(\""] {
            for (i, _) in text.match_indices(call) {
                let rest = &text[i + call.len()..];
                let name: String = rest
                    .chars()
                    .take_while(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || *c == '_')
                    .collect();
                if name.starts_with("FHIRGATE_") {
                    names.insert(name);
                }
            }
        }
    }
    names
}

fn known_env_names() -> BTreeSet<String> {
    let mut names: BTreeSet<String> = env_flags("serve").into_keys().collect();
    names.extend(env_read_outside_clap());
    names
}

/// Every `FHIRGATE_…` word of `text` (a bare `FHIRGATE_` prefix, as in `FHIRGATE_*`, is prose).
fn fhirgate_words(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for (i, _) in text.match_indices("FHIRGATE_") {
        let before = text[..i].chars().next_back();
        if before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_') {
            continue;
        }
        let word: String = text[i..]
            .chars()
            .take_while(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || *c == '_')
            .collect();
        if word.len() > "FHIRGATE_".len() {
            out.insert(word);
        }
    }
    out
}

/// Words that name no variable; a word ending in `_` is a prefix (`FHIRGATE_ADMIN_*` in prose)
/// and must begin at least one.
fn unknown_variables(text: &str, known: &BTreeSet<String>) -> Vec<String> {
    fhirgate_words(text)
        .into_iter()
        .filter(|w| {
            if w.ends_with('_') {
                !known.iter().any(|k| k.starts_with(w.as_str()))
            } else {
                !known.contains(w)
            }
        })
        .collect()
}

/// The validated `Config` that `fhirgate <sub>` builds from exactly these variables (each is
/// turned into its flag: flags and variables are one definition in clap).
fn config_from_env(sub: &str, env: &BTreeMap<String, String>) -> Config {
    let flags = env_flags(sub);
    let mut args = vec!["fhirgate".to_string(), sub.to_string()];
    for (name, value) in env {
        if !name.starts_with("FHIRGATE_") {
            continue;
        }
        let long = flags
            .get(name)
            .unwrap_or_else(|| panic!("{name} is not a variable of `fhirgate {sub}`"));
        args.push(format!("--{long}={value}"));
    }
    let matches = command_without_env()
        .try_get_matches_from(&args)
        .unwrap_or_else(|e| panic!("`fhirgate {sub}` refuses {env:?}: {e}"));
    let cli = Cli::from_arg_matches(&matches).unwrap();
    let serve_args = match cli.command {
        Command::Serve(a) | Command::Proxy(a) | Command::Control(a) => a,
        Command::Policy(_) | Command::Keys(_) => unreachable!("not a server command"),
    };
    serve_args
        .config()
        .unwrap_or_else(|e| panic!("`fhirgate {sub}` with {env:?}: {e}"))
}

fn defaults() -> Config {
    config_from_env("serve", &BTreeMap::new())
}

// === compose ===

/// `KEY=value` lines of deploy/.env.example.
fn env_example() -> BTreeMap<String, String> {
    read(&deploy().join(".env.example"))
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            let (k, v) = l
                .split_once('=')
                .unwrap_or_else(|| panic!(".env.example: `{l}` is not KEY=value"));
            (k.to_string(), v.to_string())
        })
        .collect()
}

/// Compose interpolation: `$$`, `${VAR}`, `${VAR:-default}`, `${VAR-default}`, `${VAR:?err}`,
/// `${VAR?err}`. A required variable that `vars` lacks is an error.
fn interpolate(text: &str, vars: &BTreeMap<String, String>) -> Result<String, String> {
    let mut out = String::new();
    let mut rest = text;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        rest = &rest[i + 1..];
        if let Some(r) = rest.strip_prefix('$') {
            out.push('$');
            rest = r;
            continue;
        }
        let Some(r) = rest.strip_prefix('{') else {
            return Err(format!("unbraced `$` in `{text}`"));
        };
        let end = r
            .find('}')
            .ok_or_else(|| format!("unclosed `${{` in `{text}`"))?;
        let expr = &r[..end];
        rest = &r[end + 1..];
        let name_len = expr
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(expr.len());
        let (name, op) = expr.split_at(name_len);
        let value = vars.get(name).filter(|v| !v.is_empty());
        let resolved = match (op, value) {
            ("", Some(v)) => v.clone(),
            ("", None) => return Err(format!("`{name}` is not set and has no default")),
            (op, Some(v)) if op.starts_with(":-") || op.starts_with('-') => v.clone(),
            (op, None) if op.starts_with(":-") => op[2..].to_string(),
            (op, None) if op.starts_with('-') => op[1..].to_string(),
            (op, Some(v)) if op.starts_with(":?") || op.starts_with('?') => v.clone(),
            (op, None) if op.starts_with(":?") || op.starts_with('?') => {
                return Err(format!("`{name}` is required: {op}"));
            }
            (op, _) => return Err(format!("unsupported `${{{name}{op}}}`")),
        };
        out.push_str(&resolved);
    }
    out.push_str(rest);
    Ok(out)
}

struct Compose {
    services: serde_norway::Mapping,
    networks: serde_norway::Mapping,
}

fn compose() -> Compose {
    let docs = yaml_docs(&deploy().join("docker-compose.yml"));
    assert_eq!(docs.len(), 1, "one compose document");
    let doc = &docs[0];
    Compose {
        services: doc["services"]
            .as_mapping()
            .expect("compose: services")
            .clone(),
        networks: doc["networks"]
            .as_mapping()
            .expect("compose: networks")
            .clone(),
    }
}

impl Compose {
    fn service(&self, name: &str) -> &Value {
        self.services
            .get(name)
            .unwrap_or_else(|| panic!("compose: no service `{name}`"))
    }

    fn names(&self) -> Vec<String> {
        self.services
            .keys()
            .map(|k| s(k, "service name").to_string())
            .collect()
    }

    /// fhirgate services (built from the repo's Dockerfile) by subcommand.
    fn fhirgate_services(&self, sub: &str) -> Vec<String> {
        self.names()
            .into_iter()
            .filter(|n| {
                let svc = self.service(n);
                !svc["build"].is_null()
                    && svc["command"].as_sequence().is_some()
                    && strings(&svc["command"], n).first().map(String::as_str) == Some(sub)
            })
            .collect()
    }

    /// A service's environment, interpolated with deploy/.env.example.
    fn env(&self, name: &str) -> BTreeMap<String, String> {
        let vars = env_example();
        let env = &self.service(name)["environment"];
        let map = env
            .as_mapping()
            .unwrap_or_else(|| panic!("{name}: environment must be a mapping"));
        map.iter()
            .map(|(k, v)| {
                let k = s(k, "variable").to_string();
                let raw = scalar(v, &k);
                let value = interpolate(&raw, &vars).unwrap_or_else(|e| panic!("{name}: {k}: {e}"));
                (k, value)
            })
            .collect()
    }

    fn config(&self, name: &str, sub: &str) -> Config {
        config_from_env(sub, &self.env(name))
    }

    /// network → fixed address of a service.
    fn addresses(&self, name: &str) -> BTreeMap<String, Ipv4Addr> {
        let Some(nets) = self.service(name)["networks"].as_mapping() else {
            return BTreeMap::new();
        };
        nets.iter()
            .filter_map(|(net, cfg)| {
                let ip = cfg.get("ipv4_address")?;
                Some((
                    s(net, "network").to_string(),
                    s(ip, "ipv4_address").parse().unwrap(),
                ))
            })
            .collect()
    }

    fn networks_of(&self, name: &str) -> BTreeSet<String> {
        match &self.service(name)["networks"] {
            Value::Mapping(m) => m.keys().map(|k| s(k, "network").to_string()).collect(),
            Value::Sequence(l) => l.iter().map(|k| s(k, "network").to_string()).collect(),
            _ => BTreeSet::from(["default".to_string()]),
        }
    }

    fn subnet(&self, network: &str) -> Ipv4Net {
        let cfg = &self.networks[network]["ipam"]["config"];
        let first = &cfg.as_sequence().expect("ipam.config")[0];
        s(&first["subnet"], "subnet").parse().unwrap()
    }

    fn depends_healthy(&self, name: &str, on: &str) -> bool {
        self.service(name)["depends_on"][on]["condition"].as_str() == Some("service_healthy")
    }
}

// === nginx.conf ===

/// The directives of an nginx configuration: (block path, words), comments removed.
fn nginx_directives(text: &str) -> Vec<(Vec<String>, Vec<String>)> {
    let mut out = Vec::new();
    let mut stack: Vec<String> = Vec::new();
    let mut words: Vec<String> = Vec::new();
    let mut word = String::new();
    let mut quote: Option<char> = None;
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if let Some(q) = quote {
            if c == q {
                quote = None;
            } else {
                word.push(c);
            }
            continue;
        }
        match c {
            '#' => {
                for c in chars.by_ref() {
                    if c == '\n' {
                        break;
                    }
                }
            }
            '"' | '\'' => quote = Some(c),
            ';' | '{' | '}' => {
                if !word.is_empty() {
                    words.push(std::mem::take(&mut word));
                }
                match c {
                    ';' => out.push((stack.clone(), std::mem::take(&mut words))),
                    '{' => {
                        out.push((stack.clone(), words.clone()));
                        stack.push(std::mem::take(&mut words).join(" "));
                    }
                    _ => {
                        assert!(words.is_empty(), "nginx.conf: `}}` after {words:?}");
                        stack.pop().expect("nginx.conf: unbalanced `}`");
                    }
                }
            }
            c if c.is_whitespace() => {
                if !word.is_empty() {
                    words.push(std::mem::take(&mut word));
                }
            }
            c => word.push(c),
        }
    }
    assert!(stack.is_empty(), "nginx.conf: unclosed block {stack:?}");
    out
}

struct Nginx {
    /// upstream name → its `server` addresses.
    upstreams: BTreeMap<String, Vec<String>>,
    /// `proxy_pass` targets.
    proxy_passes: Vec<String>,
    listen: Vec<String>,
    client_max_body_size: Option<String>,
    headers: BTreeMap<String, String>,
}

fn parse_nginx(text: &str) -> Nginx {
    let mut n = Nginx {
        upstreams: BTreeMap::new(),
        proxy_passes: Vec::new(),
        listen: Vec::new(),
        client_max_body_size: None,
        headers: BTreeMap::new(),
    };
    for (path, words) in nginx_directives(text) {
        let Some(name) = words.first() else { continue };
        let in_upstream = path.last().and_then(|b| b.strip_prefix("upstream "));
        match (name.as_str(), in_upstream) {
            ("upstream", None) if words.len() == 2 => {
                n.upstreams.entry(words[1].clone()).or_default();
            }
            ("server", Some(up)) => n
                .upstreams
                .entry(up.to_string())
                .or_default()
                .push(words[1].clone()),
            ("proxy_pass", _) => n.proxy_passes.push(words[1].clone()),
            ("listen", _) => n.listen.push(words[1].clone()),
            ("client_max_body_size", _) => n.client_max_body_size = Some(words[1].clone()),
            ("proxy_set_header", _) if words.len() == 3 => {
                n.headers
                    .insert(words[1].to_ascii_lowercase(), words[2].clone());
            }
            _ => {}
        }
    }
    n
}

/// nginx sizes: `16m`, `1k`, `1048576`.
fn nginx_size(v: &str) -> u64 {
    let (digits, mult) = match v.chars().last() {
        Some('k' | 'K') => (&v[..v.len() - 1], 1 << 10),
        Some('m' | 'M') => (&v[..v.len() - 1], 1 << 20),
        Some('g' | 'G') => (&v[..v.len() - 1], 1 << 30),
        _ => (v, 1),
    };
    digits.parse::<u64>().unwrap() * mult
}

/// Problems of an nginx configuration that must send client traffic to `proxies` (host:port)
/// and nowhere else.
fn nginx_problems(n: &Nginx, proxies: &BTreeSet<String>) -> Vec<String> {
    let mut problems = Vec::new();
    if n.proxy_passes.is_empty() {
        problems.push("no proxy_pass".to_string());
    }
    for target in &n.proxy_passes {
        let Some(name) = target.strip_prefix("http://") else {
            problems.push(format!("proxy_pass {target}: not http://<upstream>"));
            continue;
        };
        let name = name.trim_end_matches('/');
        match n.upstreams.get(name) {
            None => problems.push(format!("proxy_pass {target}: no upstream `{name}`")),
            Some(servers) => {
                let got: BTreeSet<String> = servers.iter().cloned().collect();
                if &got != proxies {
                    problems.push(format!(
                        "upstream {name}: servers {got:?}, expected the proxies {proxies:?}"
                    ));
                }
            }
        }
    }
    problems
}

// === Kubernetes ===

fn k8s_docs() -> Vec<(PathBuf, Value)> {
    let dir = deploy().join("k8s");
    let mut files = Vec::new();
    files_under(&dir, &mut files);
    files
        .into_iter()
        .filter(|p| is_yaml(p) && p.file_name().is_some_and(|n| n != "kustomization.yaml"))
        .flat_map(|p| yaml_docs(&p).into_iter().map(move |d| (p.clone(), d)))
        .collect()
}

fn find<'a>(docs: &'a [(PathBuf, Value)], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .map(|(_, d)| d)
        .find(|d| d["kind"].as_str() == Some(kind) && d["metadata"]["name"].as_str() == Some(name))
        .unwrap_or_else(|| panic!("k8s: no {kind} `{name}`"))
}

fn labels(v: &Value) -> BTreeMap<String, String> {
    v.as_mapping()
        .map(|m| {
            m.iter()
                .map(|(k, v)| (s(k, "label").to_string(), scalar(v, "label")))
                .collect()
        })
        .unwrap_or_default()
}

/// A selector matches labels when each of its pairs is among them (and it is not empty).
fn selects(selector: &BTreeMap<String, String>, labels: &BTreeMap<String, String>) -> bool {
    !selector.is_empty() && selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// The environment a Deployment's container gets from its ConfigMaps, Secrets and `env`.
fn container_env(docs: &[(PathBuf, Value)], container: &Value) -> BTreeMap<String, String> {
    let mut env = BTreeMap::new();
    if let Some(from) = container["envFrom"].as_sequence() {
        for src in from {
            let (kind, name, field) = if !src["configMapRef"].is_null() {
                (
                    "ConfigMap",
                    s(&src["configMapRef"]["name"], "configMapRef"),
                    "data",
                )
            } else {
                (
                    "Secret",
                    s(&src["secretRef"]["name"], "secretRef"),
                    "stringData",
                )
            };
            for (k, v) in find(docs, kind, name)[field].as_mapping().unwrap() {
                env.insert(s(k, "key").to_string(), scalar(v, "value"));
            }
        }
    }
    for var in container["env"].as_sequence().into_iter().flatten() {
        let name = s(&var["name"], "env name").to_string();
        if !var["value"].is_null() {
            env.insert(name, scalar(&var["value"], "env value"));
            continue;
        }
        let from = &var["valueFrom"];
        let (kind, r, field) = if !from["secretKeyRef"].is_null() {
            ("Secret", &from["secretKeyRef"], "stringData")
        } else {
            ("ConfigMap", &from["configMapKeyRef"], "data")
        };
        let obj = find(docs, kind, s(&r["name"], "ref name"));
        match obj[field].get(s(&r["key"], "ref key")) {
            Some(v) => {
                env.insert(name, scalar(v, "value"));
            }
            None => assert_eq!(
                r["optional"].as_bool(),
                Some(true),
                "{name}: {kind} key missing and not optional"
            ),
        }
    }
    env
}

/// The port number a probe or Service names (a number or a container port's name).
fn port_number(container: &Value, port: &Value) -> u16 {
    match port {
        Value::Number(n) => u16::try_from(n.as_u64().unwrap()).unwrap(),
        Value::String(name) => {
            let p = container["ports"]
                .as_sequence()
                .unwrap()
                .iter()
                .find(|p| p["name"].as_str() == Some(name))
                .unwrap_or_else(|| panic!("no container port named `{name}`"));
            u16::try_from(p["containerPort"].as_u64().unwrap()).unwrap()
        }
        other => panic!("port: {other:?}"),
    }
}

struct Plane<'a> {
    deployment: &'a Value,
    container: &'a Value,
    pod_labels: BTreeMap<String, String>,
    config: Config,
}

fn plane<'a>(docs: &'a [(PathBuf, Value)], name: &str, sub: &str) -> Plane<'a> {
    let deployment = find(docs, "Deployment", name);
    let pod = &deployment["spec"]["template"];
    let pod_labels = labels(&pod["metadata"]["labels"]);
    assert!(
        selects(
            &labels(&deployment["spec"]["selector"]["matchLabels"]),
            &pod_labels
        ),
        "{name}: selector does not match its pods"
    );
    let containers = pod["spec"]["containers"].as_sequence().unwrap();
    assert_eq!(containers.len(), 1, "{name}: one container");
    let container = &containers[0];
    assert_eq!(
        strings(&container["args"], "args"),
        vec![sub.to_string()],
        "{name}: runs `fhirgate {sub}`"
    );
    let config = config_from_env(sub, &container_env(docs, container));
    Plane {
        deployment,
        container,
        pod_labels,
        config,
    }
}

// === the tests ===

#[test]
fn every_yaml_file_under_deploy_parses() {
    let yaml: Vec<_> = deploy_files().into_iter().filter(|p| is_yaml(p)).collect();
    assert!(
        yaml.len() >= 7,
        "expected the compose file and the manifests: {yaml:?}"
    );
    for path in yaml {
        let docs = yaml_docs(&path);
        assert!(!docs.is_empty(), "{}: no document", path.display());
        if path.starts_with(deploy().join("k8s")) {
            for d in &docs {
                assert!(
                    d["apiVersion"].is_string(),
                    "{}: apiVersion",
                    path.display()
                );
                assert!(d["kind"].is_string(), "{}: kind", path.display());
            }
        }
    }
}

#[test]
fn every_fhirgate_variable_in_deploy_is_a_real_one() {
    let known = known_env_names();
    // The set is read from the real definitions: the basics must be there.
    for must in ["FHIRGATE_STORE", "FHIRGATE_CONTROL_LISTEN", "FHIRGATE_LOG"] {
        assert!(known.contains(must), "{must} missing from {known:?}");
    }
    let mut files = deploy_files();
    files.push(repo().join("Dockerfile"));
    let mut seen = 0;
    for path in files {
        let text = read(&path);
        seen += fhirgate_words(&text).len();
        let unknown = unknown_variables(&text, &known);
        assert!(
            unknown.is_empty(),
            "{}: not fhirgate configuration variables: {unknown:?}",
            path.display()
        );
    }
    assert!(seen > 20, "deploy/ names the configuration it sets");
    // ... and the check bites.
    assert_eq!(
        unknown_variables(
            "FHIRGATE_STORE=x FHIRGATE_DATABASE_URL=y FHIRGATE_* FHIRGATE_ADMIN_* FHIRGATE_DB_*",
            &known
        ),
        vec![
            "FHIRGATE_DATABASE_URL".to_string(),
            "FHIRGATE_DB_".to_string()
        ]
    );
}

#[test]
fn all_three_commands_accept_the_same_variables() {
    let serve = env_flags("serve");
    assert_eq!(env_flags("proxy"), serve);
    assert_eq!(env_flags("control"), serve);
}

#[test]
fn compose_runs_two_proxies_one_control_postgres_hapi_and_nginx() {
    let c = compose();
    for name in ["postgres", "hapi", "nginx", "control", "proxy-1", "proxy-2"] {
        c.service(name);
    }
    assert_eq!(c.fhirgate_services("proxy"), vec!["proxy-1", "proxy-2"]);
    assert_eq!(c.fhirgate_services("control"), vec!["control"]);
    for name in ["control", "proxy-1", "proxy-2"] {
        let svc = c.service(name);
        assert_eq!(s(&svc["image"], "image"), "fhirgate:local", "{name}");
        let context = deploy().join(s(&svc["build"]["context"], "build.context"));
        let dockerfile = context.join(s(&svc["build"]["dockerfile"], "build.dockerfile"));
        assert_eq!(
            dockerfile.canonicalize().unwrap(),
            repo().join("Dockerfile").canonicalize().unwrap(),
            "{name}: built from the repo's Dockerfile"
        );
    }
    // The HAPI release the end-to-end tests run against (tests/hapi/pom.xml): its image tags
    // are `v<release>-<image revision>`.
    let pom = std::fs::read_to_string(repo().join("tests/hapi/pom.xml")).unwrap();
    let tested = pom
        .split("<hapi.version>")
        .nth(1)
        .and_then(|rest| rest.split("</hapi.version>").next())
        .expect("hapi.version in tests/hapi/pom.xml");
    let image = s(&c.service("hapi")["image"], "image");
    assert!(
        image.starts_with(&format!("hapiproject/hapi:v{tested}-")),
        "HAPI FHIR image {image} is not the tested release {tested}"
    );
    assert_eq!(
        scalar(
            &c.service("hapi")["environment"]["hapi.fhir.fhir_version"],
            "fhir_version"
        ),
        "R4"
    );
    assert!(s(&c.service("postgres")["image"], "image").starts_with("postgres:"));
    assert!(s(&c.service("nginx")["image"], "image").starts_with("nginx:"));
    // The init script the postgres service mounts exists.
    let mounts = strings(&c.service("postgres")["volumes"], "postgres volumes");
    let init = mounts
        .iter()
        .find(|m| m.contains("/docker-entrypoint-initdb.d/"))
        .expect("postgres: init script mounted");
    let host = init.split(':').next().unwrap();
    assert!(deploy().join(host).is_file(), "{host}");
}

#[test]
fn compose_configurations_are_valid_and_agree() {
    let c = compose();
    let control = c.config("control", "control");
    let proxies: Vec<Config> = ["proxy-1", "proxy-2"]
        .iter()
        .map(|n| c.config(n, "proxy"))
        .collect();

    // One store, one issuer, one upstream for all instances.
    for p in &proxies {
        assert_eq!(p.store_url, control.store_url);
        assert_eq!(p.base_url, control.base_url, "the issuer must be the same");
        assert_eq!(p.upstream.base_url, control.upstream.base_url);
    }
    let store = url::Url::parse(&control.store_url).unwrap();
    assert_eq!(store.scheme(), "postgres");
    c.service(store.host_str().unwrap());
    let up = &control.upstream;
    c.service(&up.host);
    assert_eq!(
        (up.port, up.base_path.as_str()),
        (8080, "/fhir"),
        "HAPI's FHIR base"
    );

    // The proxies reach the control API by its service name, on a network they share, at the
    // port it listens on; it listens on every address of its container.
    let control_nets = c.networks_of("control");
    for (name, p) in ["proxy-1", "proxy-2"].iter().zip(&proxies) {
        let target = &p.control_url;
        assert_eq!(
            c.fhirgate_services("control"),
            vec![target.host.clone()],
            "{name}: control_url {} names the control service",
            target.url
        );
        assert!(!target.tls, "{name}: plain HTTP inside the backend network");
        assert_eq!(target.port, control.control_listen.port(), "{name}");
        assert!(
            !c.networks_of(name).is_disjoint(&control_nets),
            "{name}: shares a network with the control service"
        );
        // `control_listen` means nothing to a proxy any more; setting it would mislead.
        assert!(
            !c.env(name).contains_key("FHIRGATE_CONTROL_LISTEN"),
            "{name}: FHIRGATE_CONTROL_LISTEN on a proxy"
        );
    }
    assert!(
        control.control_listen.ip().is_unspecified(),
        "control listens where the proxies connect"
    );
    assert!(
        c.addresses("control").is_empty(),
        "the control service needs no fixed address"
    );

    // Fixed addresses sit inside their network's subnet.
    for name in c.names() {
        for (net, ip) in c.addresses(&name) {
            assert!(c.subnet(&net).contains(&ip), "{name}: {ip} outside {net}");
        }
    }

    // Only the hop in front may speak for a client: single addresses of known services.
    let trusted_hosts = |cfg: &Config| -> BTreeSet<Ipv4Addr> {
        cfg.trusted_proxies
            .iter()
            .map(|n| match n {
                IpNet::V4(v4) if v4.prefix_len() == 32 => v4.addr(),
                other => panic!("trusted_proxies {other}: not a single service address"),
            })
            .collect()
    };
    let nginx_ips: BTreeSet<Ipv4Addr> = c.addresses("nginx").into_values().collect();
    for p in &proxies {
        assert_eq!(trusted_hosts(p), nginx_ips, "proxies trust nginx only");
    }
    let proxy_ips: BTreeSet<Ipv4Addr> = ["proxy-1", "proxy-2"]
        .iter()
        .flat_map(|n| c.addresses(n).into_iter())
        .filter(|(net, _)| control_nets.contains(net))
        .map(|(_, ip)| ip)
        .collect();
    assert_eq!(proxy_ips.len(), 2);
    assert_eq!(
        trusted_hosts(&control),
        proxy_ips,
        "control trusts the proxies only"
    );

    // Health checks: readiness on the metrics port each instance really uses.
    for (name, cfg) in [
        ("control", &control),
        ("proxy-1", &proxies[0]),
        ("proxy-2", &proxies[1]),
    ] {
        let test = strings(&c.service(name)["healthcheck"]["test"], "healthcheck");
        let url = format!("http://127.0.0.1:{}/readyz", cfg.metrics_listen.port());
        assert!(
            test.contains(&url),
            "{name}: healthcheck {test:?} should use {url}"
        );
    }

    // Start order: the store first, the control plane (bootstrap) before the proxies, the
    // proxies before nginx.
    for name in ["control", "proxy-1", "proxy-2"] {
        assert!(
            c.depends_healthy(name, "postgres"),
            "{name} waits for postgres"
        );
    }
    for name in ["proxy-1", "proxy-2"] {
        assert!(
            c.depends_healthy(name, "control"),
            "{name} waits for control"
        );
        assert!(c.depends_healthy("nginx", name), "nginx waits for {name}");
    }
    // Bootstrap credentials are known in advance, on the control instance.
    assert!(control.bootstrap.admin_password.is_some());
    assert!(control.bootstrap.admin_client_secret.is_some());
    assert!(control.policies_dir.is_some());
}

#[test]
fn compose_keeps_secrets_out_of_the_file_and_the_control_api_private() {
    let c = compose();
    for name in ["control", "proxy-1", "proxy-2"] {
        let raw = &c.service(name)["environment"];
        for key in [
            "FHIRGATE_STORE",
            "FHIRGATE_ADMIN_PASSWORD",
            "FHIRGATE_ADMIN_CLIENT_SECRET",
        ] {
            if let Some(v) = raw.get(key) {
                assert!(
                    scalar(v, key).contains("${"),
                    "{name}: {key} must come from deploy/.env, not the file"
                );
            }
        }
    }
    for (k, v) in env_example() {
        if k.contains("PASSWORD") || k.contains("SECRET") {
            assert!(
                v.starts_with("change-me"),
                ".env.example: {k} must be a placeholder"
            );
        }
    }
    // Only nginx is published; it shares no network with the control API.
    for name in c.names() {
        let published = !c.service(&name)["ports"].is_null();
        assert_eq!(published, name == "nginx", "{name}: published ports");
    }
    assert!(
        c.networks_of("nginx")
            .is_disjoint(&c.networks_of("control")),
        "nginx must not reach the control API directly"
    );
    let ignore = read(&repo().join(".dockerignore"));
    for entry in ["target/", "deploy/.env"] {
        assert!(
            ignore.lines().any(|l| l.trim() == entry),
            ".dockerignore: {entry}"
        );
    }
    assert!(
        read(&deploy().join(".gitignore"))
            .lines()
            .any(|l| l.trim() == ".env")
    );
}

#[test]
fn nginx_balances_over_the_proxies_only() {
    let c = compose();
    let nginx_svc = c.service("nginx");
    let mounts = strings(&nginx_svc["volumes"], "nginx volumes");
    assert!(
        mounts.contains(&"./nginx.conf:/etc/nginx/nginx.conf:ro".to_string()),
        "{mounts:?}"
    );
    let n = parse_nginx(&read(&deploy().join("nginx.conf")));
    let proxies: BTreeSet<String> = c
        .fhirgate_services("proxy")
        .iter()
        .map(|name| format!("{name}:{}", c.config(name, "proxy").listen.port()))
        .collect();
    assert_eq!(proxies.len(), 2);
    let problems = nginx_problems(&n, &proxies);
    assert!(problems.is_empty(), "{problems:?}");

    // nginx listens on the published container port, which is the base URL's port.
    let control = c.config("control", "control");
    let base = url::Url::parse(&control.base_url).unwrap();
    let ports = strings(&nginx_svc["ports"], "nginx ports");
    assert_eq!(ports.len(), 1);
    let (host_port, container_port) = ports[0].split_once(':').unwrap();
    assert_eq!(n.listen, vec![container_port.to_string()]);
    assert_eq!(
        host_port.parse::<u16>().unwrap(),
        base.port_or_known_default().unwrap()
    );
    // Large Bundles pass nginx up to fhirgate's own limit.
    let proxy_cfg = c.config("proxy-1", "proxy");
    let body = n
        .client_max_body_size
        .as_deref()
        .expect("client_max_body_size");
    assert!(nginx_size(body) >= proxy_cfg.max_request_body as u64);
    // The proxies believe X-Forwarded-For from nginx only; nginx must set it from the peer.
    assert_eq!(
        n.headers.get("x-forwarded-for").map(String::as_str),
        Some("$remote_addr")
    );

    // ... and the check bites: an upstream with the control API in it is refused.
    let bad = parse_nginx(
        "http { upstream u { server proxy-1:8080; server control:8081; } \
         server { location / { proxy_pass http://u; } } }",
    );
    let only_one = BTreeSet::from(["proxy-1:8080".to_string()]);
    assert_eq!(nginx_problems(&bad, &only_one).len(), 1);
    let direct = parse_nginx("http { server { location / { proxy_pass http://control:8081; } } }");
    assert_eq!(nginx_problems(&direct, &only_one).len(), 1);
}

#[test]
fn kubernetes_planes_probes_and_services_agree_with_the_configuration() {
    let docs = k8s_docs();
    let defaults = defaults();
    let proxy = plane(&docs, "fhirgate-proxy", "proxy");
    let control = plane(&docs, "fhirgate-control", "control");

    let replicas = proxy.deployment["spec"]["replicas"].as_u64().unwrap();
    assert!(replicas >= 2, "at least two proxies");
    assert_eq!(proxy.config.store_url, control.config.store_url);
    assert_eq!(proxy.config.base_url, control.config.base_url);
    assert!(proxy.config.store_url.starts_with("postgres://"));

    for (name, p) in [("proxy", &proxy), ("control", &control)] {
        let c = p.container;
        // Probes on the metrics port: liveness /healthz, readiness /readyz.
        for (probe, path) in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")] {
            let get = &c[probe]["httpGet"];
            assert_eq!(s(&get["path"], probe), path, "{name}: {probe}");
            assert_eq!(
                port_number(c, &get["port"]),
                p.config.metrics_listen.port(),
                "{name}: {probe} on the metrics port"
            );
        }
        assert_eq!(
            p.config.metrics_listen.port(),
            defaults.metrics_listen.port()
        );
        for kind in ["requests", "limits"] {
            for res in ["cpu", "memory"] {
                assert!(
                    !c["resources"][kind][res].is_null(),
                    "{name}: resources.{kind}.{res}"
                );
            }
        }
    }
    assert_eq!(
        port_number(proxy.container, &Value::from("http")),
        proxy.config.listen.port()
    );
    assert_eq!(proxy.config.listen.port(), defaults.listen.port());
    assert_eq!(
        port_number(control.container, &Value::from("control")),
        control.config.control_listen.port()
    );
    assert!(control.config.control_listen.ip().is_unspecified());

    // Services select the right pods and forward to the ports the processes listen on.
    let proxy_svc = find(&docs, "Service", "fhirgate-proxy");
    assert!(selects(
        &labels(&proxy_svc["spec"]["selector"]),
        &proxy.pod_labels
    ));
    assert!(!selects(
        &labels(&proxy_svc["spec"]["selector"]),
        &control.pod_labels
    ));
    let target = &proxy_svc["spec"]["ports"][0]["targetPort"];
    assert_eq!(
        port_number(proxy.container, target),
        proxy.config.listen.port()
    );

    let control_svc = find(&docs, "Service", "fhirgate-control");
    assert!(selects(
        &labels(&control_svc["spec"]["selector"]),
        &control.pod_labels
    ));
    assert!(!selects(
        &labels(&control_svc["spec"]["selector"]),
        &proxy.pod_labels
    ));
    // The proxies reach the control Service by its name (in their namespace, or fully
    // qualified) and port.
    let target = &proxy.config.control_url;
    let svc_name = s(&control_svc["metadata"]["name"], "Service name");
    assert!(
        target.host == svc_name || target.host.starts_with(&format!("{svc_name}.")),
        "control_url {} names the Service {svc_name}",
        target.url
    );
    assert!(
        control_svc["spec"]["clusterIP"].is_null(),
        "no fixed clusterIP needed"
    );
    assert!(
        !container_env(&docs, proxy.container).contains_key("FHIRGATE_CONTROL_LISTEN"),
        "FHIRGATE_CONTROL_LISTEN on a proxy"
    );
    let port = &control_svc["spec"]["ports"][0];
    assert_eq!(port["port"].as_u64().unwrap(), u64::from(target.port));
    assert_eq!(
        port_number(control.container, &port["targetPort"]),
        control.config.control_listen.port()
    );

    // The disruption budget covers the proxies and lets a drain proceed.
    let pdb = find(&docs, "PodDisruptionBudget", "fhirgate-proxy");
    assert!(selects(
        &labels(&pdb["spec"]["selector"]["matchLabels"]),
        &proxy.pod_labels
    ));
    let min = pdb["spec"]["minAvailable"].as_u64().unwrap();
    assert!(
        min >= 1 && min < replicas,
        "minAvailable {min} with {replicas} replicas"
    );

    // Only the proxies may reach the control port.
    let np = find(&docs, "NetworkPolicy", "fhirgate-control");
    assert!(selects(
        &labels(&np["spec"]["podSelector"]["matchLabels"]),
        &control.pod_labels
    ));
    let rule = &np["spec"]["ingress"][0];
    assert!(selects(
        &labels(&rule["from"][0]["podSelector"]["matchLabels"]),
        &proxy.pod_labels
    ));
    assert_eq!(
        rule["ports"][0]["port"].as_u64().unwrap(),
        u64::from(control.config.control_listen.port())
    );
}

#[test]
fn kubernetes_policies_configmap_is_mounted_and_valid() {
    let docs = k8s_docs();
    let control = plane(&docs, "fhirgate-control", "control");
    let dir = control.config.policies_dir.clone().expect("policies_dir");
    let pod = &control.deployment["spec"]["template"]["spec"];
    let mount = control.container["volumeMounts"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|m| Path::new(s(&m["mountPath"], "mountPath")) == dir.as_path())
        .expect("policies_dir is a mounted volume");
    let volume = pod["volumes"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|v| v["name"] == mount["name"])
        .unwrap();
    let cm = find(
        &docs,
        "ConfigMap",
        s(&volume["configMap"]["name"], "configMap"),
    );
    let files = cm["data"].as_mapping().unwrap();
    assert!(!files.is_empty());
    for (name, body) in files {
        let name = s(name, "file");
        assert!(name.ends_with(".json"), "{name}");
        fhirgate::policies_dir::parse_policy(Path::new(name), s(body, name).as_bytes())
            .unwrap_or_else(|e| panic!("{name}: {e}"));
    }
}

#[test]
fn kustomization_lists_every_manifest() {
    let dir = deploy().join("k8s");
    let docs = yaml_docs(&dir.join("kustomization.yaml"));
    let listed: BTreeSet<String> = strings(&docs[0]["resources"], "resources")
        .into_iter()
        .collect();
    let mut files = Vec::new();
    files_under(&dir, &mut files);
    let present: BTreeSet<String> = files
        .iter()
        .filter(|p| is_yaml(p))
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .filter(|n| n != "kustomization.yaml")
        .collect();
    assert_eq!(listed, present);
}

#[test]
fn dockerfile_image_matches_the_defaults() {
    let text = read(&repo().join("Dockerfile"));
    let lines: Vec<&str> = text.lines().map(str::trim).collect();
    assert!(lines.contains(&r#"ENTRYPOINT ["fhirgate"]"#));
    // The image's own ENV, as `fhirgate serve` sees it.
    let mut env = BTreeMap::new();
    for line in lines.iter().filter_map(|l| l.strip_prefix("ENV ")) {
        for pair in line.split_whitespace() {
            let (k, v) = pair.split_once('=').expect("ENV KEY=value");
            env.insert(k.to_string(), v.to_string());
        }
    }
    let cfg = config_from_env("serve", &env);
    let exposed: BTreeSet<u16> = lines
        .iter()
        .filter_map(|l| l.strip_prefix("EXPOSE "))
        .flat_map(|l| l.split_whitespace().map(|p| p.parse::<u16>().unwrap()))
        .collect();
    for port in [
        cfg.listen.port(),
        cfg.control_listen.port(),
        cfg.metrics_listen.port(),
    ] {
        assert!(exposed.contains(&port), "EXPOSE {port}");
    }
    assert!(cfg.listen.ip().is_unspecified() && cfg.metrics_listen.ip().is_unspecified());
    let health = lines
        .iter()
        .find(|l| l.starts_with("HEALTHCHECK"))
        .expect("HEALTHCHECK");
    let url = format!("http://127.0.0.1:{}/readyz", cfg.metrics_listen.port());
    assert!(health.contains(&url), "{health}");
    // Numeric user: Kubernetes' runAsNonRoot must be able to check it, and the manifests run
    // as that user.
    let user = lines
        .iter()
        .rev()
        .find_map(|l| l.strip_prefix("USER "))
        .expect("USER");
    let uid = user.split(':').next().unwrap();
    assert!(uid.parse::<u32>().is_ok_and(|u| u != 0), "USER {user}");
    for (_, d) in k8s_docs() {
        if d["kind"].as_str() == Some("Deployment") {
            let sc = &d["spec"]["template"]["spec"]["securityContext"];
            assert_eq!(
                sc["runAsUser"].as_u64().map(|u| u.to_string()),
                Some(uid.to_string())
            );
        }
    }
}

#[test]
fn interpolation_follows_compose_rules() {
    let vars = BTreeMap::from([("A".to_string(), "1".to_string())]);
    assert_eq!(interpolate("x${A}y$${A}", &vars).unwrap(), "x1y${A}");
    assert_eq!(interpolate("${B:-d}", &vars).unwrap(), "d");
    assert_eq!(interpolate("${A:?set A}", &vars).unwrap(), "1");
    assert!(interpolate("${B:?set B}", &vars).is_err());
    assert!(interpolate("${B}", &vars).is_err());
}
