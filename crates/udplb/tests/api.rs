//! The admin API: reads always, changes only when allowed and only by POST/PUT/DELETE, body
//! limit; add, weight, drain, enable, disable, remove (absent: no-op success), reload, explain.

mod common;

use std::net::SocketAddr;
use std::path::PathBuf;

use common::*;

fn tag_of(c: &std::net::UdpSocket, listen: SocketAddr) -> String {
    tag(&request(c, listen, b"x").0)
}

#[test]
fn read_only_by_default_and_changes_only_by_the_right_method() {
    let a = Backend::start("127.0.0.1", "a");
    let (lb, _) = Udplb::serve(&[], &[a.addr]);
    let (code, body) = lb.call("GET", "/api/v1/status", None);
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["listeners"][0]["name"], "default");
    let (code, body) = lb.call("GET", "/api/v1/pools", None);
    assert_eq!((code, body[0]["name"].as_str()), (200, Some("default")));
    let drain = format!("/api/v1/pools/default/backends/{}/drain", a.addr);
    let (code, body) = lb.call("POST", &drain, None);
    assert_eq!(code, 403, "{body}");
    assert!(body["error"].as_str().unwrap().contains("read-only"));
    let (code, _) = lb.call("GET", &drain, None);
    assert_eq!(code, 405, "a change needs POST");
    let (code, _) = lb.call("POST", "/api/v1/reload", None);
    assert_eq!(code, 403);
}

#[test]
fn changes_drain_enable_disable_weight_add_remove() {
    let (a, b, c) = (
        Backend::start("127.0.0.1", "a"),
        Backend::start("127.0.0.1", "b"),
        Backend::start("127.0.0.1", "c"),
    );
    let (lb, listen) = Udplb::serve(
        &["--admin-allow-changes", "--workers", "1"],
        &[a.addr, b.addr],
    );
    let path =
        |addr: SocketAddr, what: &str| format!("/api/v1/pools/default/backends/{addr}{what}");

    // Drain b: established flows on b continue, new flows avoid it.
    let clients: Vec<_> = (0..6).map(|_| client("127.0.0.1:0")).collect();
    let before: Vec<String> = clients.iter().map(|c| tag_of(c, listen)).collect();
    assert!(before.iter().any(|t| t == "b"));
    let (code, body) = lb.call("POST", &path(b.addr, "/drain"), None);
    assert_eq!(
        (code, body["changed"].as_bool()),
        (200, Some(true)),
        "{body}"
    );
    let (code, body) = lb.call("POST", &path(b.addr, "/drain"), None);
    assert_eq!(
        (code, body["changed"].as_bool()),
        (200, Some(false)),
        "draining twice changes nothing"
    );
    for (c, was) in clients.iter().zip(&before) {
        assert_eq!(
            &tag_of(c, listen),
            was,
            "an established flow moved on drain"
        );
    }
    for _ in 0..6 {
        assert_eq!(
            tag_of(&client("127.0.0.1:0"), listen),
            "a",
            "a new flow went to the drained backend"
        );
    }

    // Enable it again: new flows reach it.
    assert_eq!(lb.call("POST", &path(b.addr, "/enable"), None).0, 200);
    let tags: Vec<String> = (0..6)
        .map(|_| tag_of(&client("127.0.0.1:0"), listen))
        .collect();
    assert!(tags.iter().any(|t| t == "b"), "{tags:?}");

    // Disable b: its flows move at their next datagram.
    assert_eq!(lb.call("POST", &path(b.addr, "/disable"), None).0, 200);
    for c in &clients {
        assert_eq!(tag_of(c, listen), "a");
    }
    assert_eq!(lb.call("POST", &path(b.addr, "/enable"), None).0, 200);

    // Weight: validated like the file.
    let (code, body) = lb.call("PUT", &path(a.addr, "/weight"), Some(r#"{"weight": 0}"#));
    assert_eq!(code, 409, "{body}");
    let (code, body) = lb.call("PUT", &path(a.addr, "/weight"), Some(r#"{"weight": 7}"#));
    assert_eq!(code, 200, "{body}");
    assert_eq!(lb.backend(0)["weight"], 7);

    // Add c, then remove a: new flows reach c, a's flows move.
    let add = format!(r#"{{"address": "{}", "weight": 2}}"#, c.addr);
    let (code, body) = lb.call("POST", "/api/v1/pools/default/backends", Some(&add));
    assert_eq!(
        (code, body["changed"].as_bool()),
        (200, Some(true)),
        "{body}"
    );
    assert_eq!(
        lb.call("POST", "/api/v1/pools/default/backends", Some(&add))
            .0,
        409,
        "added twice"
    );
    assert_eq!(lb.call("DELETE", &path(a.addr, ""), None).0, 200);
    let tags: Vec<String> = (0..9)
        .map(|_| tag_of(&client("127.0.0.1:0"), listen))
        .collect();
    assert!(
        tags.iter().all(|t| t != "a") && tags.iter().any(|t| t == "c"),
        "{tags:?}"
    );
    // Removing an absent backend is a no-op success.
    let (code, body) = lb.call("DELETE", &path(a.addr, ""), None);
    assert_eq!(
        (code, body["changed"].as_bool()),
        (200, Some(false)),
        "{body}"
    );
    // Unknown pool, bad address, oversized body.
    assert_eq!(
        lb.call(
            "POST",
            "/api/v1/pools/nope/backends/127.0.0.1:1/drain",
            None
        )
        .0,
        409
    );
    assert_eq!(
        lb.call(
            "POST",
            "/api/v1/pools/default/backends/not-an-address/drain",
            None
        )
        .0,
        400
    );
    let huge = format!(
        r#"{{"address": "127.0.0.1:9", "pad": "{}"}}"#,
        "x".repeat(20_000)
    );
    assert_eq!(
        lb.call("POST", "/api/v1/pools/default/backends", Some(&huge))
            .0,
        413
    );
}

#[test]
fn explain_names_the_backend_a_new_flow_gets_and_why() {
    let backends: Vec<Backend> = ["a", "b", "c"]
        .iter()
        .map(|t| Backend::start("127.0.0.1", t))
        .collect();
    let addrs: Vec<SocketAddr> = backends.iter().map(|b| b.addr).collect();
    let (lb, listen) = Udplb::serve(&["--scheduler", "maglev"], &addrs);
    for _ in 0..5 {
        let c = client("127.0.0.1:0");
        let me = c.local_addr().unwrap();
        let (code, body) = lb.call("GET", &format!("/api/v1/explain?client={me}"), None);
        assert_eq!(code, 200, "{body}");
        let predicted = body["backend"].as_str().unwrap().to_string();
        let (reply, _) = request(&c, listen, b"x");
        let tag = tag(&reply);
        let got = backends
            .iter()
            .position(|b| b.addr.to_string() == predicted)
            .map(|i| ["a", "b", "c"][i]);
        assert_eq!(
            got,
            Some(tag.as_str()),
            "explain said {predicted}, the flow went to {tag}: {body}"
        );
        assert!(
            body["reason"].as_str().unwrap().contains("maglev"),
            "{body}"
        );
    }
}

/// With persistence, explain names the backend the client is remembered on (not the table's
/// pick) while that takes new clients, and says when it no longer does.
#[test]
fn explain_names_the_backend_persistence_remembers() {
    let backends: Vec<Backend> = ["a", "b", "c"]
        .iter()
        .map(|t| Backend::start("127.0.0.1", t))
        .collect();
    let addrs: Vec<SocketAddr> = backends.iter().map(|b| b.addr).collect();
    let (lb, listen) = Udplb::serve(
        &[
            "--admin-allow-changes",
            "--scheduler",
            "round-robin",
            "--mode",
            "request-response",
            "--affinity",
            "ip",
            "--persistence",
            "60s",
        ],
        &addrs,
    );
    let explain = |client: &str| {
        let (code, body) = lb.call("GET", &format!("/api/v1/explain?client={client}"), None);
        assert_eq!(code, 200, "{body}");
        body
    };
    // Nothing remembered yet: round robin, any candidate.
    let before = explain("127.0.0.1:40000");
    assert!(before["remembered"].is_null(), "{before}");
    assert!(before["backend"].is_null(), "{before}");
    // One exchange (its flow closes with the answer): the client is remembered there.
    let c = client("127.0.0.1:0");
    let (reply, _) = request(&c, listen, b"x");
    let used = addrs[["a", "b", "c"]
        .iter()
        .position(|t| *t == tag(&reply))
        .unwrap()]
    .to_string();
    let remembered = explain("127.0.0.1:40000");
    assert_eq!(remembered["remembered"], used.as_str(), "{remembered}");
    assert_eq!(remembered["backend"], used.as_str(), "{remembered}");
    assert!(
        remembered["reason"]
            .as_str()
            .unwrap()
            .starts_with("persistence"),
        "{remembered}"
    );
    // ... and its next flow goes there, as explain said.
    let again = client("127.0.0.1:0");
    assert_eq!(
        addrs[["a", "b", "c"]
            .iter()
            .position(|t| *t == tag(&request(&again, listen, b"x").0))
            .unwrap()]
        .to_string(),
        used
    );
    // Another client is not.
    assert!(explain("127.0.0.2:40000")["remembered"].is_null());
    // Drained, the backend takes no new clients: explain says so and names none.
    let (code, body) = lb.call(
        "POST",
        &format!("/api/v1/pools/default/backends/{used}/drain"),
        None,
    );
    assert_eq!(code, 200, "{body}");
    let drained = explain("127.0.0.1:40000");
    assert!(drained["backend"].is_null(), "{drained}");
    assert!(
        drained["reason"]
            .as_str()
            .unwrap()
            .contains("which takes no new clients"),
        "{drained}"
    );
}

#[test]
fn reload_through_the_api() {
    let dir = scratch_dir("reload");
    let a = Backend::start("127.0.0.1", "a");
    let admin = admin_addr();
    let listen = listen_addr("127.0.0.1");
    let cfg = |weight: u32| {
        format!(
            "[admin]\nlisten = \"{admin}\"\nallow_changes = true\n[listeners.l]\naddress = \"{listen}\"\npool = \"p\"\n\
             [pools.p]\nbackends = [{{ address = \"{}\", weight = {weight} }}]\n",
            a.addr
        )
    };
    let path = dir.join("udplb.toml");
    std::fs::write(&path, cfg(1)).unwrap();
    let lb = Udplb::run_config(&path, admin);
    std::fs::write(&path, cfg(5)).unwrap();
    let (code, body) = lb.call("POST", "/api/v1/reload", None);
    assert_eq!(
        (code, body["reloaded"].as_bool()),
        (200, Some(true)),
        "{body}"
    );
    assert_eq!(lb.backend(0)["weight"], 5);
    std::fs::write(&path, "[listeners.l]\nadress = 1\n").unwrap();
    let (code, body) = lb.call("POST", "/api/v1/reload", None);
    assert_eq!(code, 422, "{body}");
    assert!(body["error"].as_str().unwrap().contains("adress"), "{body}");
}

/// `udplb ctl` against a running instance: tables, --json, changes and their errors.
#[test]
fn ctl_drives_a_running_instance() {
    let (a, b) = (
        Backend::start("127.0.0.1", "a"),
        Backend::start("127.0.0.1", "b"),
    );
    let (lb, listen) = Udplb::serve(&["--admin-allow-changes"], &[a.addr, b.addr]);
    request(&client("127.0.0.1:0"), listen, b"hi");

    let (ok, out, err) = ctl(lb.admin, &["status"], &[]);
    assert!(ok, "{err}");
    assert!(
        out.starts_with("LISTENER") && out.contains("default") && out.contains(&listen.to_string()),
        "{out}"
    );
    let (ok, out, _) = ctl(lb.admin, &["backends"], &[]);
    assert!(
        ok && out.contains(&a.addr.to_string()) && out.contains("enabled"),
        "{out}"
    );
    // UDPLB_ADMIN instead of --admin.
    let out = udplb_command()
        .args(["ctl", "backends"])
        .env("UDPLB_ADMIN", lb.admin.to_string())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains(&a.addr.to_string()),
        "{text}"
    );

    let b_addr = b.addr.to_string();
    let (ok, out, err) = ctl(lb.admin, &["drain", "default", &b_addr], &[]);
    assert!(ok && out.starts_with("ok"), "{out} {err}");
    // The log says what the change did and who asked.
    let logged = wait_for(DEADLINE, || {
        let log = lb.stderr.lock().unwrap();
        log.lines().any(|l| {
            l.contains("admin API change")
                && l.contains(&format!(
                    "pool default: backend {b_addr} state enabled -> draining"
                ))
                && l.contains("peer=Some(127.0.0.1:")
                && l.contains("/backends/")
        })
    });
    assert!(logged, "{}", lb.stderr.lock().unwrap());
    let (_, json, _) = ctl(lb.admin, &["--json", "backends"], &[]);
    let pools: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(pools[0]["backends"][1]["admin"], "draining", "{json}");
    let (ok, out, _) = ctl(lb.admin, &["weight", "default", &b_addr, "4"], &[]);
    assert!(ok, "{out}");
    assert_eq!(lb.backend(1)["weight"], 4);
    let (ok, out, _) = ctl(lb.admin, &["remove", "default", "127.0.0.1:1"], &[]);
    assert!(ok && out.contains("nothing to change"), "{out}");
    let (ok, _, err) = ctl(lb.admin, &["weight", "default", &b_addr, "0"], &[]);
    assert!(
        !ok && err.contains("409") && err.contains("weight"),
        "{err}"
    );
    let (ok, out, _) = ctl(lb.admin, &["explain", "192.0.2.7:4000"], &[]);
    assert!(ok && out.contains("candidates"), "{out}");
    let (ok, _, err) = ctl(lb.admin, &["reload"], &[]);
    assert!(!ok && err.contains("no file to reload"), "{err}");
}

/// The log level changes at runtime: `debug` lines appear only after the change.
#[test]
fn log_level_changes_at_runtime() {
    let a = Backend::start("127.0.0.1", "a");
    let (mut lb, _) = Udplb::serve(&["--admin-allow-changes", "--log-level", "info"], &[a.addr]);
    assert_eq!(lb.call("GET", "/api/v1/log-level", None).1["level"], "info");
    let (code, body) = lb.call(
        "PUT",
        "/api/v1/log-level",
        Some(r#"{"level": "not a filter=="}"#),
    );
    assert_eq!(code, 400, "{body}");
    let (code, body) = lb.call("PUT", "/api/v1/log-level", Some(r#"{"level": "debug"}"#));
    assert_eq!(
        (code, body["level"].as_str()),
        (200, Some("debug")),
        "{body}"
    );
    // Workers log at debug when they stop; with the old level this line would not appear.
    signal(lb.pid(), "TERM");
    assert!(wait_for(DEADLINE, || !lb.alive()));
    let stderr = lb.stderr.lock().unwrap().clone();
    assert!(stderr.contains("worker stopped"), "{stderr}");
}

/// A log filter is either levels or TARGET=LEVEL directives; anything else (which tracing
/// would read as a target name and so log nothing) is refused with the reason, and the filter
/// in force stays.
#[test]
fn log_level_filters_are_checked_strictly() {
    let a = Backend::start("127.0.0.1", "a");
    let (lb, _) = Udplb::serve(&["--admin-allow-changes"], &[a.addr]);
    for (filter, why) in [
        ("verbose", "neither a level"),
        ("trace,,", "is empty"),
        ("", "is empty"),
        ("udplb=loud", "\"loud\" is not a level"),
        ("udplb::=debug", "is not a target"),
        ("udp lb=debug", "is not a target"),
        ("udplb=debug,info=", "is not a level"),
    ] {
        let body = serde_json::json!({ "level": filter }).to_string();
        let (code, body) = lb.call("PUT", "/api/v1/log-level", Some(&body));
        assert_eq!(code, 400, "{filter:?}: {body}");
        let error = body["error"].as_str().unwrap_or_default();
        assert!(error.contains(why), "{filter:?}: {body}");
        assert_eq!(lb.call("GET", "/api/v1/log-level", None).1["level"], "info");
    }
    let body = r#"{"level": "udplb_dataplane::worker=debug, WARN"}"#;
    let (code, body) = lb.call("PUT", "/api/v1/log-level", Some(body));
    assert_eq!(
        (code, body["level"].as_str()),
        (200, Some("udplb_dataplane::worker=debug,warn")),
        "{body}"
    );
}

/// Every error of the API is `{"error": "..."}` with its status: bodies too large, of the
/// wrong type or that do not deserialise, paths and queries that do not parse, unknown paths
/// and methods.
#[test]
fn every_api_error_is_json() {
    let a = Backend::start("127.0.0.1", "a");
    let (lb, _) = Udplb::serve(&["--admin-allow-changes"], &[a.addr]);
    let json = Some("application/json");
    let weight = format!("/api/v1/pools/default/backends/{}/weight", a.addr);
    let drain = format!("/api/v1/pools/default/backends/{}/drain", a.addr);
    let huge = format!(
        r#"{{"address": "127.0.0.1:9", "pad": "{}"}}"#,
        "x".repeat(20_000)
    );
    // (method, path, content type, body, status)
    type Case<'a> = (&'a str, &'a str, Option<&'a str>, Option<&'a str>, u16);
    let cases: Vec<Case> = vec![
        (
            "POST",
            "/api/v1/pools/default/backends",
            json,
            Some(&huge),
            413,
        ),
        (
            "PUT",
            &weight,
            Some("text/plain"),
            Some(r#"{"weight": 2}"#),
            415,
        ),
        ("PUT", &weight, None, Some(r#"{"weight": 2}"#), 415),
        ("PUT", &weight, json, Some(r#"{"weight": "#), 400),
        ("PUT", &weight, json, Some(r#"{"weight": "two"}"#), 422),
        (
            "PUT",
            &weight,
            json,
            Some(r#"{"weight": 2, "extra": 1}"#),
            422,
        ),
        (
            "PUT",
            "/api/v1/log-level",
            json,
            Some(r#"{"lvl": "info"}"#),
            422,
        ),
        (
            "POST",
            "/api/v1/pools/default/backends",
            json,
            Some("{}"),
            422,
        ),
        (
            "POST",
            "/api/v1/pools/%FF/backends/127.0.0.1:1/drain",
            None,
            None,
            400,
        ),
        ("GET", "/api/v1/explain?client=nope", None, None, 400),
        ("GET", "/api/v1/explain", None, None, 400),
        ("GET", "/api/v1/nope", None, None, 404),
        (
            "POST",
            "/api/v1/pools/default/backends/127.0.0.1:1/nope",
            None,
            None,
            404,
        ),
        ("GET", &drain, None, None, 405),
        ("DELETE", "/api/v1/status", None, None, 405),
        ("POST", "/api/v1/log-level", None, None, 405),
    ];
    for (method, path, content_type, body, status) in cases {
        let (code, answer) = lb.call_as(method, path, content_type, body);
        assert_eq!(code, status, "{method} {path}: {answer}");
        assert!(
            answer["error"].as_str().is_some_and(|e| !e.is_empty()),
            "{method} {path}: {code} without a JSON error: {answer}"
        );
    }
    // Nothing was changed by the refused calls.
    assert_eq!(lb.backend(0)["weight"], 1);
}

/// Read-only: every change answers 403, before its body is read (a malformed or oversized
/// body of a change that is not allowed anyway says so, not what is wrong with the body).
#[test]
fn read_only_refuses_a_change_before_reading_its_body() {
    let a = Backend::start("127.0.0.1", "a");
    let (lb, _) = Udplb::serve(&[], &[a.addr]);
    let json = Some("application/json");
    let weight = format!("/api/v1/pools/default/backends/{}/weight", a.addr);
    let huge = format!(r#"{{"pad": "{}"}}"#, "x".repeat(20_000));
    type Case<'a> = (&'a str, &'a str, Option<&'a str>, Option<&'a str>);
    let cases: Vec<Case> = vec![
        ("PUT", &weight, json, Some(r#"{"weight": "two"}"#)),
        ("PUT", &weight, json, Some(r#"{"weight": "#)),
        ("PUT", &weight, Some("text/plain"), Some(r#"{"weight": 2}"#)),
        ("POST", "/api/v1/pools/default/backends", json, Some("{}")),
        ("POST", "/api/v1/pools/default/backends", json, Some(&huge)),
        ("PUT", "/api/v1/log-level", json, Some(r#"{"lvl": "info"}"#)),
        (
            "POST",
            "/api/v1/pools/default/backends/not-an-address/drain",
            None,
            None,
        ),
        (
            "DELETE",
            "/api/v1/pools/default/backends/not-an-address",
            None,
            None,
        ),
    ];
    let mut answers = Vec::new();
    for (method, path, content_type, body) in cases {
        let (code, answer) = lb.call_as(method, path, content_type, body);
        answers.push(format!("{method} {path}: {code}"));
        assert!(
            answer["error"]
                .as_str()
                .is_some_and(|e| e.contains("read-only"))
                || code != 403,
            "{method} {path}: {answer}"
        );
    }
    eprintln!("read-only admin API, changes with bad bodies: {answers:?}");
    assert!(answers.iter().all(|a| a.ends_with(": 403")), "{answers:?}");
}

/// `METHOD path` on the admin endpoint with extra headers: the status code and the answer.
fn call_with(lb: &Udplb, method: &str, path: &str, headers: &[(&str, &str)]) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(lb.admin).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .unwrap();
    let extra: String = headers
        .iter()
        .map(|(k, v)| format!("{k}: {v}\r\n"))
        .collect();
    write!(
        s,
        "{method} {path} HTTP/1.0\r\nHost: udplb\r\n{extra}Content-Length: 0\r\n\r\n"
    )
    .unwrap();
    let mut text = String::new();
    let _ = s.read_to_string(&mut text);
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (code, text)
}

/// A token file of `mode` holding `token`.
fn token_file(dir: &std::path::Path, token: &str, mode: u32) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join(format!("token-{mode:o}"));
    std::fs::write(&path, format!("{token}\n")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
    path
}

/// With `[admin] token_file`, changes need `Authorization: Bearer TOKEN`: 401 without it or
/// with another token, 200 with it; reads need none. `udplb ctl` sends it from `--token-file`
/// or `UDPLB_ADMIN_TOKEN_FILE`.
#[test]
fn changes_need_the_token_when_one_is_configured() {
    let dir = scratch_dir("token");
    let a = Backend::start("127.0.0.1", "a");
    let token = "s3cret-token-of-the-admin-0123456789";
    let file = token_file(&dir, token, 0o600);
    let admin = admin_addr();
    let cfg = format!(
        "[admin]\nlisten = \"{admin}\"\nallow_changes = true\ntoken_file = \"{}\"\n\
         [listeners.l]\naddress = \"{}\"\npool = \"p\"\n[pools.p]\nbackends = [\"{}\"]\n",
        file.display(),
        listen_addr("127.0.0.1"),
        a.addr
    );
    let lb = run_toml(admin, &cfg);
    let drain = format!("/api/v1/pools/p/backends/{}/drain", a.addr);
    let bearer = format!("Bearer {token}");
    let codes = [
        call_with(&lb, "POST", &drain, &[]),
        call_with(&lb, "POST", &drain, &[("Authorization", "Bearer wrong")]),
        call_with(&lb, "POST", &drain, &[("Authorization", &token[..10])]),
        call_with(&lb, "POST", &drain, &[("Authorization", &bearer)]),
        call_with(&lb, "GET", "/api/v1/pools", &[]),
    ]
    .map(|(code, _)| code);
    eprintln!(
        "admin changes with a token file: without a token, with a wrong one, without Bearer, \
         with the right one, a read without: {codes:?}"
    );
    assert_eq!(codes, [401, 401, 401, 200, 200]);
    let (_, answer) = call_with(&lb, "POST", &drain, &[]);
    assert!(answer.contains("\"error\""), "{answer}");
    assert!(
        answer.contains("WWW-Authenticate: Bearer") || answer.contains("www-authenticate: Bearer"),
        "{answer}"
    );

    let enable = ["enable", "p", &a.addr.to_string()];
    let (ok, _, err) = ctl(admin, &enable, &[]);
    assert!(!ok && err.contains("401"), "{err}");
    let file_arg = file.display().to_string();
    let with_file = [&["--token-file", &file_arg][..], &enable].concat();
    let (ok, _, err) = ctl(admin, &with_file, &[]);
    assert!(ok, "{err}");
    let (ok, _, err) = ctl(admin, &enable, &[("UDPLB_ADMIN_TOKEN_FILE", &file_arg)]);
    assert!(ok, "{err}");
    let _ = std::fs::remove_dir_all(dir);
}

/// Changes on an admin endpoint reachable from elsewhere need a token: `check` and `run`
/// refuse `allow_changes` on a non-loopback address without `token_file`, or with a token
/// file others may read; on loopback, changes without a token are logged loudly.
#[test]
fn a_non_loopback_admin_that_allows_changes_needs_a_token() {
    let dir = scratch_dir("token-rule");
    let port = free_tcp_port();
    let admin = |extra: &str| {
        format!(
            "[admin]\nlisten = \"0.0.0.0:{port}\"\nallow_changes = true\n{extra}\n\
             [listeners.l]\naddress = \"{}\"\npool = \"p\"\n[pools.p]\nbackends = [\"127.0.0.1:9\"]\n",
            listen_addr("127.0.0.1")
        )
    };
    let (code, stderr) = check_toml(&admin(""));
    eprintln!("check, non-loopback admin with changes and no token: {code:?} {stderr}");
    assert_eq!(code, Some(78), "{stderr}");
    assert!(
        stderr.contains("admin.allow_changes") && stderr.contains("token_file"),
        "{stderr}"
    );
    let path = write_config(&admin(""));
    let (code, stderr) = exit_of(&["run", "-c", &path.display().to_string()], &[]);
    assert_eq!(code, Some(78), "run: {stderr}");

    let readable = token_file(&dir, "0123456789abcdef0123", 0o644);
    let (code, stderr) = check_toml(&admin(&format!("token_file = \"{}\"", readable.display())));
    assert_eq!(code, Some(78), "{stderr}");
    assert!(
        stderr.contains("admin.token_file") && stderr.contains("readable"),
        "{stderr}"
    );
    let private = token_file(&dir, "0123456789abcdef0123", 0o600);
    let (code, stderr) = check_toml(&admin(&format!("token_file = \"{}\"", private.display())));
    assert_eq!(code, Some(0), "{stderr}");

    let (code, stderr) = exit_of(
        &[
            "--admin",
            &format!("0.0.0.0:{port}"),
            "--admin-allow-changes",
            &listen_addr("127.0.0.1").to_string(),
            "127.0.0.1:9",
        ],
        &[],
    );
    assert_eq!(code, Some(78), "one-liner: {stderr}");
    assert!(stderr.contains("--admin-token-file"), "{stderr}");

    let a = Backend::start("127.0.0.1", "a");
    let (lb, _) = Udplb::serve(&["--admin-allow-changes"], &[a.addr]);
    // The log is read by a thread of its own: the warning may reach it a moment later.
    let warned = || {
        let stderr = lb.stderr.lock().unwrap();
        stderr.contains("WARN") && stderr.contains("without a token")
    };
    assert!(wait_for(DEADLINE, warned), "{}", lb.stderr.lock().unwrap());
    let _ = std::fs::remove_dir_all(dir);
}

/// Per-backend visibility under traffic: live flows, rates each way, reply latency and how long
/// each backend has been up, in the API and in `udplb ctl backends`.
#[test]
fn backends_show_their_flows_rates_and_latency() {
    let (a, b) = (
        Backend::start("127.0.0.1", "a"),
        Backend::start("127.0.0.1", "b"),
    );
    let (lb, listen) = Udplb::serve(&["--mode", "datagram"], &[a.addr, b.addr]);
    let load = Load::start(listen, 8);
    let pools = |lb: &Udplb| lb.call("GET", "/api/v1/pools", None).1;
    let busy = wait_for(DEADLINE, || {
        let p = pools(&lb);
        (0..2).all(|i| {
            let b = &p[0]["backends"][i];
            b["flows"].as_u64().unwrap_or(0) > 0
                && b["rates"]["forwarded_per_s"].as_f64().unwrap_or(0.0) > 0.0
                && b["rates"]["replies_per_s"].as_f64().unwrap_or(0.0) > 0.0
                && b["healthy_since_unix"].as_f64().is_some()
        })
    });
    assert!(busy, "{}", pools(&lb));
    let (ok, out, err) = ctl(lb.admin, &["backends"], &[]);
    assert!(ok, "{err}");
    let header = out.lines().next().unwrap_or_default();
    for column in ["FLOWS", "TO/S", "FROM/S", "LATENCY P50/P99", "SINCE"] {
        assert!(header.contains(column), "{out}");
    }
    load.finish();
    // Idle again: the rates fall to zero (each interval is 2 s).
    let idle = wait_for(std::time::Duration::from_secs(8), || {
        let p = pools(&lb);
        p[0]["backends"][0]["rates"]["forwarded_per_s"].as_f64() == Some(0.0)
    });
    assert!(idle, "{}", pools(&lb));
    drop(lb);

    // Request-response: the reply latency's quantiles.
    let (lb, listen) = Udplb::serve(&["--mode", "request-response"], &[a.addr]);
    let c = client("127.0.0.1:0");
    for _ in 0..20 {
        request(&c, listen, b"hi");
    }
    let p = pools(&lb);
    let latency = &p[0]["backends"][0]["reply_latency"];
    assert_eq!(latency["samples"].as_u64(), Some(20), "{p}");
    let p50 = latency["p50_ms_at_most"].as_f64().unwrap();
    let p99 = latency["p99_ms_at_most"].as_f64().unwrap();
    assert!(p50 > 0.0 && p50 <= p99, "{latency}");
}

/// A change a browser sends for a page of another site (its Origin differs from the Host it
/// sent to) is refused, so a web page cannot drain backends through its visitor's browser; the
/// status page's own (same origin) and clients that send no Origin are served.
#[test]
fn changes_from_another_site_are_refused() {
    use std::io::{Read, Write};
    let a = Backend::start("127.0.0.1", "a");
    let (lb, _) = Udplb::serve(&["--admin-allow-changes"], &[a.addr]);
    let post = |origin: &str| {
        let mut s = std::net::TcpStream::connect(lb.admin).unwrap();
        write!(
            s,
            "POST /api/v1/pools/default/backends/{}/drain HTTP/1.0\r\nHost: {}\r\n\
             Origin: {origin}\r\nContent-Length: 0\r\n\r\n",
            a.addr, lb.admin
        )
        .unwrap();
        let mut text = String::new();
        let _ = s.read_to_string(&mut text);
        text
    };
    let refused = post("http://evil.example");
    assert!(refused.starts_with("HTTP/1.0 403"), "{refused}");
    assert!(refused.contains("another site"), "{refused}");
    assert_eq!(lb.backend(0)["admin"], "enabled");
    let same = post(&format!("http://{}", lb.admin));
    assert!(same.starts_with("HTTP/1.0 200"), "{same}");
    assert_eq!(lb.backend(0)["admin"], "draining");
}
