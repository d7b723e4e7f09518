//! Tidy checks of the source tree (as rust-analyzer's `tidy.rs`): the dependency rules of
//! ARCHITECTURE.md, read from the source files with plain string handling.
//!
//! - `core/` is pure: no tokio, pingora, axum, sqlx or reqwest, in its code or its manifest;
//! - `src/gateway` never uses `crate::control`;
//! - the rooms of `src/control` depend one way, `web` ← `base` ← `login` ← handler folders
//!   (`oauth2`, `auth`, `admin`, `fhir`), and handler folders never use each other. The control
//!   API's root `mod.rs` (the routes) and `bootstrap.rs` may use anything; no room uses them.
//!
//! A module's dependencies are the `crate::control::…` paths anywhere in its code (brace imports
//! expanded) and its `super::…` / `self::…` paths, resolved against the file's module path (and
//! against `…::tests` inside an inline `mod tests`). Comments are not code.

use std::fs;
use std::path::{Path, PathBuf};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// The rooms of the control API, lowest first; handler folders share the top layer.
const ROOMS: [(&str, u8); 7] = [
    ("web", 0),
    ("base", 1),
    ("login", 2),
    ("oauth2", 3),
    ("auth", 3),
    ("admin", 3),
    ("fhir", 3),
];

fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let entries = fs::read_dir(&d).unwrap_or_else(|e| panic!("{}: {e}", d.display()));
        for entry in entries {
            let path = entry.unwrap_or_else(|e| panic!("{e}")).path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|x| x == "rs") {
                out.push(path);
            }
        }
    }
    out.sort();
    out
}

fn read(path: &Path) -> String {
    fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The source without comments (line comments, doc comments, block comments); string
/// literals are kept as they are.
fn strip_comments(src: &str) -> String {
    let b = src.as_bytes();
    let mut out = String::with_capacity(src.len());
    let mut i = 0;
    let mut in_str = false;
    while i < b.len() {
        let c = b[i];
        if in_str {
            if c == b'\\' && i + 1 < b.len() {
                out.push(c as char);
                out.push(b[i + 1] as char);
                i += 2;
                continue;
            }
            if c == b'"' {
                in_str = false;
            }
            out.push(c as char);
            i += 1;
            continue;
        }
        if c == b'/' && b.get(i + 1) == Some(&b'/') {
            while i < b.len() && b[i] != b'\n' {
                i += 1;
            }
            continue;
        }
        if c == b'/' && b.get(i + 1) == Some(&b'*') {
            i += 2;
            while i + 1 < b.len() && !(b[i] == b'*' && b[i + 1] == b'/') {
                i += 1;
            }
            i += 2;
            continue;
        }
        // Raw strings: skipped to their end, so their quotes and slashes are not read.
        if c == b'r'
            && (src[i..].starts_with("r#\"") || src[i..].starts_with("r\""))
            && !(i > 0 && (b[i - 1].is_ascii_alphanumeric() || b[i - 1] == b'_'))
        {
            let hashes = src[i + 1..].bytes().take_while(|&h| h == b'#').count();
            let close = format!("\"{}", "#".repeat(hashes));
            let body = i + 2 + hashes;
            let end = src[body..]
                .find(&close)
                .map_or(src.len(), |e| body + e + close.len());
            out.push_str(&src[i..end]);
            i = end;
            continue;
        }
        if c == b'"' && !(i > 0 && b[i - 1] == b'\'') {
            in_str = true;
        }
        // Keep the text (not only ASCII): copy the whole UTF-8 character.
        let ch = src[i..].chars().next().unwrap_or(' ');
        out.push(ch);
        i += ch.len_utf8();
    }
    out
}

/// Expands a use tree (`a::{b, c::{d as e, self}}`) into its paths.
fn expand_use(tree: &str) -> Vec<String> {
    // One space at most, and none around punctuation: `a::{ b as c, d }` → `a::{b as c,d}`.
    let mut tree = tree.split_whitespace().collect::<Vec<_>>().join(" ");
    for p in ["::", "{", "}", ","] {
        tree = tree
            .replace(&format!(" {p}"), p)
            .replace(&format!("{p} "), p);
    }
    let mut out = Vec::new();
    expand_into("", &tree, &mut out);
    out
}

fn expand_into(prefix: &str, tree: &str, out: &mut Vec<String>) {
    let join = |p: &str, s: &str| {
        if p.is_empty() {
            s.to_string()
        } else {
            format!("{p}::{s}")
        }
    };
    match tree.find('{') {
        Some(open) if tree.ends_with('}') => {
            let head = tree[..open].trim_end_matches("::");
            let base = join(prefix, head);
            let inner = &tree[open + 1..tree.len() - 1];
            let mut depth = 0;
            let mut start = 0;
            for (i, c) in inner.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        expand_into(&base, &inner[start..i], out);
                        start = i + 1;
                    }
                    _ => {}
                }
            }
            expand_into(&base, &inner[start..], out);
        }
        _ if tree.is_empty() => {}
        _ => {
            let path = tree.split(" as ").next().unwrap_or(tree);
            let path = path.trim_end_matches("::self");
            if path == "self" {
                out.push(prefix.to_string());
            } else {
                out.push(join(prefix, path));
            }
        }
    }
}

/// Every path of `code` that starts with `crate`, `super` or `self`: the trees of `use`
/// items expanded, and paths written anywhere else.
fn paths_in(code: &str) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    // `use` items, braces expanded.
    let mut rest = code;
    let mut offset = 0;
    while let Some(i) = find_word(rest, "use") {
        let after = &rest[i + 3..];
        let Some(end) = after.find(';') else { break };
        for p in expand_use(&after[..end]) {
            out.push((offset + i, p));
        }
        offset += i + 3 + end;
        rest = &after[end..];
    }
    // Paths anywhere (a `use` path is found again; that does no harm).
    let bytes = code.as_bytes();
    for start in ["crate::", "super::", "self::"] {
        let mut from = 0;
        while let Some(i) = code[from..].find(start) {
            let at = from + i;
            from = at + start.len();
            if at > 0 && (bytes[at - 1].is_ascii_alphanumeric() || bytes[at - 1] == b'_') {
                continue;
            }
            let end = code[at..]
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
                .map_or(code.len(), |e| at + e);
            // `crate::control::{…}` is the head of a use tree, expanded above.
            if code[at..end].ends_with("::") && code[end..].starts_with('{') {
                continue;
            }
            out.push((at, code[at..end].trim_end_matches(':').to_string()));
        }
    }
    out
}

fn find_word(hay: &str, word: &str) -> Option<usize> {
    let b = hay.as_bytes();
    let mut from = 0;
    while let Some(i) = hay[from..].find(word) {
        let at = from + i;
        let before_ok = at == 0 || !(b[at - 1].is_ascii_alphanumeric() || b[at - 1] == b'_');
        let after = at + word.len();
        let after_ok = after < b.len() && b[after].is_ascii_whitespace();
        if before_ok && after_ok {
            return Some(at);
        }
        from = after;
    }
    None
}

/// The module path (inside `crate::control`) a path of the file at `module` names, or `None`
/// when it is outside the control API.
fn resolve(module: &[String], path: &str) -> Option<Vec<String>> {
    let segs: Vec<&str> = path.split("::").filter(|s| !s.is_empty()).collect();
    match segs.first() {
        Some(&"crate") => match segs.get(1) {
            Some(&"control") => Some(segs[2..].iter().map(|s| s.to_string()).collect()),
            _ => None,
        },
        Some(&"self") => Some(
            module
                .iter()
                .cloned()
                .chain(segs[1..].iter().map(|s| s.to_string()))
                .collect(),
        ),
        Some(&"super") => {
            let mut base = module.to_vec();
            let mut i = 0;
            while segs.get(i) == Some(&"super") {
                // `super` above `crate::control` leaves the control API.
                base.pop()?;
                i += 1;
            }
            Some(
                base.into_iter()
                    .chain(segs[i..].iter().map(|s| s.to_string()))
                    .collect(),
            )
        }
        _ => None,
    }
}

fn room(module: &[String]) -> Option<(&'static str, u8)> {
    let first = module.first()?;
    ROOMS.iter().copied().find(|(name, _)| name == first)
}

/// The dependency-rule violations of one control API file, at module path `module` (relative
/// to `crate::control`; a `mod.rs` names its folder).
fn control_violations(module: &[String], src: &str) -> Vec<String> {
    let Some((from, from_layer)) = room(module) else {
        // The routes and bootstrap may use anything.
        return Vec::new();
    };
    let code = strip_comments(src);
    let tests_at = code.find("mod tests {").unwrap_or(code.len());
    let mut in_tests = module.to_vec();
    in_tests.push("tests".into());
    let mut out = Vec::new();
    for (at, path) in paths_in(&code) {
        let here = if at > tests_at { &in_tests } else { module };
        let Some(target) = resolve(here, &path) else {
            continue;
        };
        let verdict = match room(&target) {
            Some((to, to_layer)) if to == from || to_layer < from_layer => None,
            Some((to, _)) => Some(format!("`{from}` uses `{to}`")),
            None => Some(format!("`{from}` uses the control API's root or bootstrap")),
        };
        if let Some(v) = verdict {
            out.push(format!("{} ({path})", v));
        }
    }
    out.sort();
    out.dedup();
    out
}

fn module_path(control: &Path, file: &Path) -> Vec<String> {
    let rel = file
        .strip_prefix(control)
        .unwrap_or(file)
        .with_extension("");
    let mut segs: Vec<String> = rel
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    if segs.last().is_some_and(|s| s == "mod") {
        segs.pop();
    }
    segs
}

const IMPURE: [&str; 5] = ["tokio", "pingora", "axum", "sqlx", "reqwest"];

fn impure_uses(src: &str) -> Vec<&'static str> {
    let code = strip_comments(src);
    IMPURE
        .iter()
        .copied()
        .filter(|krate| {
            let needle = format!("{krate}::");
            code.match_indices(&needle).any(|(i, _)| {
                let b = code.as_bytes();
                i == 0
                    || !(b[i - 1].is_ascii_alphanumeric() || b[i - 1] == b'_' || b[i - 1] == b':')
            }) || code.contains(&format!("extern crate {krate}"))
        })
        .collect()
}

#[test]
fn control_rooms_depend_one_way() {
    let control = Path::new(ROOT).join("src/control");
    let mut problems = Vec::new();
    for file in rust_files(&control) {
        let module = module_path(&control, &file);
        for v in control_violations(&module, &read(&file)) {
            problems.push(format!("{}: {v}", file.display()));
        }
    }
    assert!(
        problems.is_empty(),
        "the control API's rooms must depend one way (web ← base ← login ← oauth2 | auth | admin | fhir):\n{}",
        problems.join("\n")
    );
}

#[test]
fn every_control_file_is_in_a_room() {
    let control = Path::new(ROOT).join("src/control");
    let stray: Vec<String> = rust_files(&control)
        .iter()
        .filter(|f| {
            let m = module_path(&control, f);
            !(m.is_empty() || m == ["bootstrap"] || room(&m).is_some())
        })
        .map(|f| f.display().to_string())
        .collect();
    assert!(
        stray.is_empty(),
        "control API files outside the rooms: {stray:?}"
    );
}

#[test]
fn the_gateway_never_uses_the_control_api() {
    let gateway = Path::new(ROOT).join("src/gateway");
    let mut problems = Vec::new();
    for file in rust_files(&gateway) {
        let code = strip_comments(&read(&file));
        // How many modules the file is below the crate root: `gateway` is one, `gateway::x` two.
        let below_root = module_path(&gateway, &file).len() + 1;
        for (_, path) in paths_in(&code) {
            let mut segs: Vec<&str> = path.split("::").collect();
            let mut depth = below_root;
            while segs.first() == Some(&"super") {
                segs.remove(0);
                depth = depth.saturating_sub(1);
            }
            let names_control = match segs.first() {
                Some(&"crate") => segs.get(1) == Some(&"control"),
                _ if path.starts_with("super") && depth == 0 => segs.first() == Some(&"control"),
                _ => false,
            };
            if names_control {
                problems.push(format!("{}: {path}", file.display()));
            }
        }
    }
    assert!(
        problems.is_empty(),
        "the gateway uses the control API:\n{}",
        problems.join("\n")
    );
}

#[test]
fn core_is_pure() {
    let core = Path::new(ROOT).join("core");
    let mut problems = Vec::new();
    for file in rust_files(&core.join("src")) {
        for krate in impure_uses(&read(&file)) {
            problems.push(format!("{}: {krate}", file.display()));
        }
    }
    let manifest = read(&core.join("Cargo.toml"));
    for line in manifest.lines() {
        let name = line.split(['=', '.', ' ']).next().unwrap_or("").trim();
        if IMPURE.contains(&name) {
            problems.push(format!("core/Cargo.toml: {}", line.trim()));
        }
    }
    assert!(
        problems.is_empty(),
        "core/ must stay pure (no I/O crates):\n{}",
        problems.join("\n")
    );
}

/// The handler folders, whose files take extractors rather than the raw request.
const HANDLER_ROOMS: [&str; 4] = ["oauth2", "auth", "admin", "fhir"];

/// Places allowed to authenticate by hand: `POST …/_search` reads its form before the caller
/// (as Medplum does), so the caller cannot be an extractor there.
const AUTHENTICATES_BY_HAND: [&str; 1] = ["fhir/search"];

/// The code without the bodies of `FromRequest` / `FromRequestParts` impls: an extractor a
/// handler folder defines for itself takes the request apart, as extractors do.
fn without_extractor_impls(code: &str) -> String {
    let mut out = String::with_capacity(code.len());
    let mut rest = code;
    while let Some(i) = rest.find("impl") {
        let header_end = rest[i..].find('{').map_or(rest.len(), |j| i + j);
        let header = &rest[i..header_end];
        if !(header.contains("FromRequest") && header_end < rest.len()) {
            out.push_str(&rest[..i + 4]);
            rest = &rest[i + 4..];
            continue;
        }
        out.push_str(&rest[..i]);
        let mut depth = 0usize;
        let mut end = rest.len();
        for (k, c) in rest[header_end..].char_indices() {
            match c {
                '{' => depth += 1,
                '}' => {
                    depth -= 1;
                    if depth == 0 {
                        end = header_end + k + 1;
                        break;
                    }
                }
                _ => {}
            }
        }
        rest = &rest[end..];
    }
    out.push_str(rest);
    out
}

/// What in a handler file bypasses the extractors of `web` and `base::access`: the raw
/// `axum::extract::Request`, splitting a request by hand, or authenticating by hand. Extractors
/// the file defines itself are not counted.
fn extractor_bypasses(module: &[String], src: &str) -> Vec<String> {
    let code = without_extractor_impls(&strip_comments(src));
    let mut out = Vec::new();
    let is_word = |c: char| c.is_ascii_alphanumeric() || c == '_';
    let extract_imports_request = code.match_indices("axum::extract::").any(|(i, _)| {
        let rest = &code[i + "axum::extract::".len()..];
        let plain = rest
            .strip_prefix("Request")
            .is_some_and(|after| !after.starts_with(is_word));
        let listed = rest.strip_prefix('{').is_some_and(|list| {
            list[..list.find('}').unwrap_or(list.len())]
                .split(',')
                .any(|item| item.trim() == "Request")
        });
        plain || listed
    });
    if extract_imports_request {
        out.push("takes the raw `axum::extract::Request`".to_string());
    }
    if code.contains(".into_parts()") {
        out.push("splits a request by hand (`into_parts`)".to_string());
    }
    let calls = |name: &str| {
        let needle = format!("{name}(");
        code.match_indices(&needle)
            .any(|(i, _)| !code[..i].ends_with(is_word))
    };
    let joined = module.join("/");
    if !AUTHENTICATES_BY_HAND.contains(&joined.as_str())
        && (calls("authenticate") || calls("authenticate_admin"))
    {
        out.push("authenticates by hand instead of taking `Caller`".to_string());
    }
    out
}

#[test]
fn handlers_take_extractors() {
    let control = Path::new(ROOT).join("src/control");
    let mut problems = Vec::new();
    for file in rust_files(&control) {
        let module = module_path(&control, &file);
        if !module
            .first()
            .is_some_and(|r| HANDLER_ROOMS.contains(&r.as_str()))
        {
            continue;
        }
        for v in extractor_bypasses(&module, &read(&file)) {
            problems.push(format!("{}: {v}", file.display()));
        }
    }
    assert!(
        problems.is_empty(),
        "handlers get the caller and the body through extractors:\n{}",
        problems.join("\n")
    );
}

// === the detector checks itself ===

fn m(path: &str) -> Vec<String> {
    path.split('/').map(str::to_string).collect()
}

#[test]
fn the_detector_flags_handler_folders_using_each_other() {
    let v = control_violations(
        &m("admin/members"),
        "use crate::control::auth::login::login;\n",
    );
    assert_eq!(v.len(), 1, "{v:?}");
    assert!(v[0].contains("`admin` uses `auth`"), "{v:?}");
    // Anywhere in the code, not only in `use`.
    let v = control_violations(
        &m("fhir"),
        "fn f() { crate::control::oauth2::token::token(); }",
    );
    assert!(
        v.iter().any(|x| x.contains("`fhir` uses `oauth2`")),
        "{v:?}"
    );
}

#[test]
fn the_detector_flags_lower_rooms_using_higher_ones() {
    let v = control_violations(
        &m("web/body"),
        "use crate::control::base::users::read_user;",
    );
    assert!(v.iter().any(|x| x.contains("`web` uses `base`")), "{v:?}");
    let v = control_violations(
        &m("base/users"),
        "use crate::control::{web::body::body_str, login::state::keys};",
    );
    assert_eq!(v.len(), 1, "{v:?}");
    assert!(v[0].contains("`base` uses `login`"), "{v:?}");
    let v = control_violations(&m("login/flow"), "use crate::control::ApiError;");
    assert!(v.iter().any(|x| x.contains("root or bootstrap")), "{v:?}");
}

#[test]
fn the_detector_resolves_super_and_self() {
    // `super::super` from `auth/mfa` is the control root: `super::super::admin` is `admin`.
    let v = control_violations(&m("auth/mfa"), "use super::super::admin::invite::invite;");
    assert!(v.iter().any(|x| x.contains("`auth` uses `admin`")), "{v:?}");
    // From a folder's `mod.rs`, `super` is the control root.
    let v = control_violations(&m("base"), "use super::login::state::keys;");
    assert!(v.iter().any(|x| x.contains("`base` uses `login`")), "{v:?}");
    // Inside `mod tests`, `super` is the file itself, and `super::super` its folder.
    let src = "use crate::control::web::body::body_str;\n#[cfg(test)]\nmod tests {\n    use super::*;\n    use super::super::users::x;\n}\n";
    assert!(control_violations(&m("base/links"), src).is_empty());
    // Comments are not code.
    assert!(
        control_violations(&m("web/form"), "//! See `crate::control::login::flow`.\n").is_empty()
    );
}

#[test]
fn the_detector_allows_what_the_rule_allows() {
    let src = "use crate::control::web::error::ApiError;\nuse crate::control::base::users::find_user;\nuse crate::control::login::flow::login_response;\nuse crate::control::auth::mfa::x;\n";
    assert!(control_violations(&m("auth/login"), src).is_empty());
    // The routes and bootstrap use everything.
    assert!(control_violations(&[], "use crate::control::fhir::search::search;").is_empty());
    assert!(control_violations(&m("bootstrap"), "use crate::control::admin::x::y;").is_empty());
}

#[test]
fn the_detector_flags_impure_core_code() {
    assert_eq!(impure_uses("use tokio::sync::Mutex;"), vec!["tokio"]);
    assert_eq!(
        impure_uses("fn f() { let _ = axum::Router::new(); }"),
        vec!["axum"]
    );
    assert!(impure_uses("// tokio::spawn is not used here\nuse serde_json::Value;").is_empty());
    assert!(impure_uses("use crate::fhir::mytokio::x;").is_empty());
}

#[test]
fn the_detector_flags_handlers_bypassing_extractors() {
    let v = extractor_bypasses(
        &m("auth/me"),
        "use axum::extract::{Request, State as AxState};\nfn f(req: Request) { let (parts, _) = req.into_parts(); authenticate(&s, &parts); }",
    );
    assert_eq!(v.len(), 3, "{v:?}");
    assert_eq!(
        extractor_bypasses(&m("oauth2/token"), "use axum::extract::Request;").len(),
        1
    );
    // Other names that merely start the same way, and comments, are fine.
    assert!(
        extractor_bypasses(
            &m("auth/login"),
            "use crate::control::login::state::LoginRequest;\nuse axum::extract::RequestParts2;\n// authenticate(&state, &parts)\n",
        )
        .is_empty()
    );
    // Words in strings are not calls; an extractor the file defines may split the request.
    assert!(
        extractor_bypasses(
            &m("oauth2/token"),
            "let e = \"Cannot authenticate: x\";\nimpl<S> FromRequest<S> for F { async fn from_request(req: Request, _: &S) { let (p, b) = req.into_parts(); if x { } } }\n",
        )
        .is_empty()
    );
    // The named exception may authenticate by hand.
    assert!(extractor_bypasses(&m("fhir/search"), "let c = authenticate(&s, &p);").is_empty());
}

/// `docs/<file>.md §N` citations in `text`: (file, section).
fn citations(text: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(at) = rest.find("docs/") {
        rest = &rest[at + 5..];
        let Some(md) = rest.find(".md §") else {
            break;
        };
        let file = &rest[..md];
        if file.is_empty() || !file.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
            continue;
        }
        let after = &rest[md + ".md §".len()..];
        let section: String = after
            .chars()
            .take_while(|c| c.is_ascii_digit() || *c == '.')
            .collect();
        let section = section.trim_end_matches('.').to_string();
        if !section.is_empty() {
            out.push((format!("{file}.md"), section));
        }
    }
    out
}

/// The documents the code cites live in the repository, with the sections it names (issue 16:
/// no citation of a document a reader cannot open).
#[test]
fn cited_documents_and_sections_exist() {
    let root = Path::new(ROOT);
    let mut files = Vec::new();
    for dir in ["src", "core/src", "tests", "benches", "core/benches"] {
        files.extend(
            rust_files(&root.join(dir))
                .into_iter()
                .filter(|p| !p.components().any(|c| c.as_os_str() == "node_modules")),
        );
    }
    files.push(root.join("README.md"));
    files.push(root.join("ARCHITECTURE.md"));
    let mut checked = 0;
    // This file names what it looks for.
    files.retain(|f| !f.ends_with("tests/tidy.rs"));
    for file in &files {
        let text = read(file);
        for stale in ["SPEC §", "medplum-auth.md"] {
            assert!(
                !text.contains(stale),
                "{} cites `{stale}`, which is not in the repository",
                file.display()
            );
        }
        for (doc, section) in citations(&text) {
            let path = root.join("docs").join(&doc);
            let body = std::fs::read_to_string(&path).unwrap_or_else(|_| {
                panic!("{} cites docs/{doc}, which does not exist", file.display())
            });
            let has = body.lines().any(|l| {
                let heading = l.trim_start_matches('#').trim_start();
                l.starts_with('#')
                    && (heading.starts_with(&format!("{section} "))
                        || heading.starts_with(&format!("{section}. ")))
            });
            assert!(
                has,
                "{} cites docs/{doc} §{section}, which has no such section",
                file.display()
            );
            checked += 1;
        }
    }
    assert!(
        checked > 50,
        "only {checked} citations found: is the scan broken?"
    );
}

#[test]
fn citations_are_found_with_their_sections() {
    assert_eq!(
        citations("see docs/contract.md §2, and docs/medplum-compat.md §4.3: x; docs/x.md"),
        vec![
            ("contract.md".to_string(), "2".to_string()),
            ("medplum-compat.md".to_string(), "4.3".to_string())
        ]
    );
}

/// `unsafe` code is denied by the workspace's lints; the process allocator is the one module
/// that allows it, and core/ forbids it outright.
#[test]
fn unsafe_code_lives_only_in_the_allocator() {
    let root = Path::new(ROOT);
    let allowed = root.join("src/allocator.rs");
    // Spelt in two pieces, so this file does not match itself.
    let allow = concat!("allow(", "unsafe_code)");
    let mut allowing = Vec::new();
    for dir in ["src", "core/src", "tests", "benches"] {
        for file in rust_files(&root.join(dir)) {
            let code = strip_comments(&read(&file));
            if code.contains(allow) && file != allowed {
                allowing.push(file.display().to_string());
            }
        }
    }
    assert!(
        allowing.is_empty(),
        "unsafe code allowed outside the allocator: {allowing:?}"
    );
    assert!(strip_comments(&read(&allowed)).contains(&format!("#![{allow}]")));
    let core = strip_comments(&read(&root.join("core/src/lib.rs")));
    assert!(
        core.contains("#![forbid(unsafe_code)]"),
        "core/ forbids unsafe code"
    );
    let manifest = read(&root.join("Cargo.toml"));
    assert!(
        manifest.contains("unsafe_code = \"deny\""),
        "the workspace denies unsafe code"
    );
}
