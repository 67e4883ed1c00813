//! Black-box tests of the command line: `udplb check` and `--help`.

mod common;

use std::path::PathBuf;

use common::udplb_command;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../udplb-config/tests/fixtures/bad")
        .join(name)
}

fn example() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../examples/udplb.toml")
}

#[test]
fn check_accepts_the_example() {
    let out = udplb_command()
        .args(["check", "-c"])
        .arg(example())
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Each broken file exits 78 and names the file, the line and the key.
#[test]
fn check_rejects_broken_configs_with_file_line_and_key() {
    let cases = [
        ("unknown_key.toml", "adress"),
        ("bad_address.toml", "address"),
        ("empty_pool.toml", "backends"),
        ("duplicate_listener.toml", "address"),
    ];
    for (file, key) in cases {
        let path = fixture(file);
        let out = udplb_command()
            .args(["check", "-c"])
            .arg(&path)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(78), "{file}: {stderr}");
        let line = stderr.lines().next().unwrap_or_default();
        let prefix = format!("{}:", path.display());
        assert!(
            line.starts_with(&prefix),
            "{file}: error does not start with the file name: {stderr}"
        );
        let line_no: String = line[prefix.len()..]
            .chars()
            .take_while(char::is_ascii_digit)
            .collect();
        assert!(!line_no.is_empty(), "{file}: no line number: {stderr}");
        assert!(line.contains(key), "{file}: key {key} not named: {stderr}");
    }
}

#[test]
fn run_with_a_broken_config_exits_78_without_binding() {
    let out = udplb_command()
        .args(["run", "-c"])
        .arg(fixture("unknown_key.toml"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(78));
}

#[test]
fn help_shows_examples() {
    let out = udplb_command().arg("--help").output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    for needle in [
        "--mode",
        "--scheduler",
        "--idle-timeout",
        "--workers",
        "--responses",
        "Examples:",
    ] {
        assert!(text.contains(needle), "--help lacks {needle}");
    }
}

#[test]
fn one_liner_rejects_a_bad_backend() {
    let out = udplb_command()
        .args(["127.0.0.1:5300", "not-an-address"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(78));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not-an-address"));
}

/// A command line udplb cannot use exits 78 (EX_CONFIG), as a bad file does, whether clap or
/// the configuration rules find the problem, with a message naming it; `--help` and
/// `--version` exit 0.
#[test]
fn a_bad_command_line_exits_78() {
    let file = common::write_config(
        "[listeners.l]\naddress = \"127.0.0.1:5300\"\npool = \"p\"\n\
         [pools.p]\nbackends = [\"127.0.0.1:5301\"]\n",
    );
    let file_arg = file.display().to_string();
    let cases: [(&[&str], &str); 14] = [
        (
            &["--no-such-flag", "127.0.0.1:5300", "127.0.0.1:5301"],
            "--no-such-flag",
        ),
        (&["127.0.0.1", "127.0.0.1:5301"], "127.0.0.1"),
        (&["127.0.0.1:5300", "127.0.0.1:5301,weight=0"], "weight"),
        (
            &["--mode", "stream", "127.0.0.1:5300", "127.0.0.1:5301"],
            "stream",
        ),
        (
            &["--max-flows", "0", "127.0.0.1:5300", "127.0.0.1:5301"],
            "max_flows",
        ),
        (
            &["--responses", "2", "127.0.0.1:5300", "127.0.0.1:5301"],
            "--responses: only applies to --mode request-response (the mode is flow)",
        ),
        (
            &[
                "--mode",
                "datagram",
                "--responses",
                "1",
                "127.0.0.1:5300",
                "127.0.0.1:5301",
            ],
            "--responses: only applies to --mode request-response (the mode is datagram)",
        ),
        (
            &["--dataplane", "xdp", "127.0.0.1:5300", "127.0.0.1:5301"],
            "xdp",
        ),
        (
            &["--forwarding", "tunnel", "127.0.0.1:5300", "127.0.0.1:5301"],
            "tunnel",
        ),
        // The kernel data plane places with Maglev (the one-liner's default with it).
        (
            &[
                "--dataplane",
                "kernel",
                "--scheduler",
                "rr",
                "127.0.0.1:5300",
                "127.0.0.1:5301",
            ],
            "the kernel data plane places with \"maglev\"",
        ),
        (&["run", "-c", &file_arg, "--workers", "0"], "--workers"),
        // Without -c: the default path, named in the error.
        (&["run"], "/etc/udplb/udplb.toml"),
        (
            &["--log-level", "verbose", "127.0.0.1:5300", "127.0.0.1:5301"],
            "--log-level",
        ),
        (
            &["--log-level", "trace,,", "127.0.0.1:5300", "127.0.0.1:5301"],
            "is empty",
        ),
    ];
    for (args, needle) in cases {
        let (code, stderr) = common::exit_of(args, &[("UDPLB_ALLOW_ROOT", "1")]);
        assert_eq!(code, Some(78), "{args:?}: {stderr}");
        assert!(
            stderr.contains(needle),
            "{args:?}: {needle:?} not in {stderr}"
        );
    }
    let _ = std::fs::remove_dir_all(file.parent().unwrap());
    for args in [&["--help"][..], &["--version"], &["run", "--help"]] {
        let out = udplb_command().args(args).output().unwrap();
        assert_eq!(out.status.code(), Some(0), "{args:?}");
        assert!(!out.stdout.is_empty(), "{args:?}");
    }
}

/// The man page and completions are generated from the CLI definition, so they list every
/// subcommand and option without being maintained by hand.
#[test]
fn man_page_and_completions_come_from_the_cli() {
    let man = udplb_command().arg("man").output().unwrap();
    assert!(man.status.success());
    let man = String::from_utf8_lossy(&man.stdout);
    assert!(man.contains(".TH udplb 1"), "not roff");
    for needle in [
        "run",
        "check",
        "ctl",
        "\\-\\-mode",
        "\\-\\-scheduler",
        ".SH FILES",
        ".SH SIGNALS",
        ".SH EXIT STATUS",
        "udplb\\-run",
    ] {
        assert!(man.contains(needle), "man page lacks {needle}");
    }
    // The pages udplb(1) refers to exist: udplb-run(1) and the others.
    for command in ["run", "ctl", "check"] {
        let page = udplb_command().args(["man", command]).output().unwrap();
        let text = String::from_utf8_lossy(&page.stdout);
        assert!(
            page.status.success() && text.contains(&format!(".TH udplb-{command} 1")),
            "udplb man {command}: {text}"
        );
    }
    let unknown = udplb_command().args(["man", "nope"]).output().unwrap();
    assert!(!unknown.status.success());
    for shell in ["bash", "zsh", "fish"] {
        let out = udplb_command()
            .args(["completions", shell])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && text.contains("udplb") && text.contains("ctl"),
            "{shell}: {text}"
        );
    }
}

/// The shipped systemd unit is a notify service that validates before starting and reloading.
#[test]
fn the_systemd_unit_checks_before_reloading() {
    let unit = std::fs::read_to_string(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../contrib/udplb.service"),
    )
    .unwrap();
    for line in [
        "Type=notify",
        "ExecReload=/usr/bin/udplb check -c /etc/udplb/udplb.toml",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "WatchdogSec=",
        "LimitNOFILE=",
        "NoNewPrivileges=yes",
    ] {
        assert!(
            unit.lines().any(|l| l.starts_with(line)),
            "unit lacks {line}"
        );
    }
}

/// A failure at start is one line with one `udplb:` prefix, saying what failed.
#[test]
fn a_failure_at_start_has_one_prefix() {
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let admin = busy.local_addr().unwrap().to_string();
    let listen = std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .to_string();
    let out = udplb_command()
        .env("UDPLB_ALLOW_ROOT", "1")
        .args(["--admin", &admin, &listen, "127.0.0.1:9"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let last = stderr.lines().last().unwrap_or_default();
    assert!(
        last.starts_with(&format!("udplb: cannot bind the admin endpoint {admin}: ")),
        "{stderr}"
    );
    assert!(!stderr.contains("udplb: udplb"), "{stderr}");
}

/// Logs written to a pipe (a file, the journal) carry no colour escapes, in either format.
#[test]
fn logs_to_a_pipe_have_no_colour() {
    let a = common::Backend::start("127.0.0.1", "a");
    for format in ["human", "json"] {
        let (lb, _) = common::Udplb::serve(&["--log-format", format], &[a.addr]);
        assert!(
            common::wait_for(common::DEADLINE, || lb
                .stderr
                .lock()
                .unwrap()
                .contains("admin endpoint")),
            "{format}: {}",
            lb.stderr.lock().unwrap()
        );
        let stderr = lb.stderr.lock().unwrap().clone();
        assert!(stderr.contains("listening"), "{format}: {stderr}");
        assert!(
            !stderr.contains('\x1b'),
            "{format}: escape sequences in piped logs: {stderr:?}"
        );
    }
}

/// What a file needs from the machine (its user and group exist, its notify and exec check
/// programs can be run) is checked by `check` and by `run` alike, before anything is bound:
/// exit 78 with file, line and key.
#[test]
fn check_and_run_refuse_what_the_machine_cannot_do() {
    let dir = common::scratch_dir("machine");
    let script = dir.join("check.sh");
    std::fs::write(&script, "#!/bin/sh\nexit 0\n").unwrap(); // mode 0644: not executable
    let script = script.display().to_string();
    // Lines 1-5: a listener and a pool with `backends`; `extra` starts on line 6.
    let file = |name: &str, backends: &str, extra: &str| {
        let path = dir.join(format!("{name}.toml"));
        let listen = common::listen_addr("127.0.0.1");
        std::fs::write(
            &path,
            format!(
                "[listeners.l]\naddress = \"{listen}\"\npool = \"p\"\n[pools.p]\n\
                 backends = [{backends}]\n{extra}\n"
            ),
        )
        .unwrap();
        path.display().to_string()
    };
    let one = "\"127.0.0.1:5301\"";
    // Lines 6-9: a notify program found in PATH and an exec check run by path.
    let fine = "notify = [\"true\"]\n[pools.p.health]\ncheck = \"exec\"\n\
                command = [\"/bin/sh\", \"-c\", \"exit 0\"]";
    let user = format!("{fine}\n[runtime]\nuser = \"nosuchuser-udplb\"");
    let group = format!("{fine}\n[runtime]\nuser = \"nobody\"\ngroup = \"nosuchgroup-udplb\"");
    let programs = format!(
        "notify = [\"no-such-program-udplb\", \"x\"]\n[pools.p.health]\ncheck = \"exec\"\n\
         command = [\"{script}\"]"
    );
    let cases = [
        (
            file("user", one, &user),
            vec![":11:1: runtime.user: there is no user named \"nosuchuser-udplb\"".to_string()],
        ),
        (
            file("group", one, &group),
            vec![":12:1: runtime.group: there is no group named \"nosuchgroup-udplb\"".to_string()],
        ),
        (
            file("programs", one, &programs),
            vec![
                ":6:1: pools.p.notify: there is no program \"no-such-program-udplb\" in PATH"
                    .to_string(),
                format!(":9:1: pools.p.health.command: \"{script}\" is not executable"),
            ],
        ),
    ];
    for (path, errors) in &cases {
        for command in ["check", "run"] {
            let (code, stderr) =
                common::exit_of(&[command, "-c", path], &[("UDPLB_ALLOW_ROOT", "1")]);
            assert_eq!(code, Some(78), "{command} {path}: {stderr}");
            for error in errors {
                assert!(
                    stderr.contains(&format!("{path}{error}")),
                    "{command}: {path}{error} not in {stderr}"
                );
            }
        }
    }
    // Programs found in PATH or by path pass.
    let (code, stderr) = common::exit_of(
        &["check", "-c", &file("fine", one, fine)],
        &[("UDPLB_ALLOW_ROOT", "1")],
    );
    assert_eq!(code, Some(0), "{stderr}");
    // A backend's own check command is checked too.
    let own = "\"127.0.0.1:5301\", { address = \"127.0.0.1:5302\", health = { command = \
               [\"/nonexistent-udplb/own\"] } }";
    let path = file("backend", own, fine);
    let (code, stderr) = common::exit_of(&["check", "-c", &path], &[("UDPLB_ALLOW_ROOT", "1")]);
    assert_eq!(code, Some(78), "{stderr}");
    let error = "pools.p.backends[1].health.command: \"/nonexistent-udplb/own\" does not exist";
    assert!(stderr.contains(&format!("{path}:5:")), "{stderr}");
    assert!(stderr.contains(error), "{stderr}");
    // A user given on the command line is named by its flag.
    let (code, stderr) = common::exit_of(
        &["run", "-c", &cases[0].0, "--user", "nosuchuser-udplb2"],
        &[("UDPLB_ALLOW_ROOT", "1")],
    );
    assert_eq!(code, Some(78), "{stderr}");
    assert!(
        stderr.contains("udplb: --user: there is no user named \"nosuchuser-udplb2\""),
        "{stderr}"
    );
    let one_liner = [
        "--user",
        "nosuchuser-udplb",
        "127.0.0.1:5300",
        "127.0.0.1:5301",
    ];
    let (code, stderr) = common::exit_of(&one_liner, &[]);
    assert_eq!(code, Some(78), "{stderr}");
    assert!(
        stderr.contains("udplb: --user: there is no user named \"nosuchuser-udplb\""),
        "{stderr}"
    );
    let _ = std::fs::remove_dir_all(dir);
}

/// A second udplb on the address a first one receives on is refused, rather than joining its
/// SO_REUSEPORT group and silently taking part of its traffic.
#[test]
fn a_second_instance_on_the_same_address_is_refused() {
    let backend = common::listen_addr("127.0.0.1");
    let (_first, listen) = common::Udplb::serve(&[], &[backend]);
    let (code, stderr) = common::exit_of(
        &[&listen.to_string(), &backend.to_string()],
        &[("UDPLB_ALLOW_ROOT", "1")],
    );
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "cannot bind listener {listen}: another process already receives on it"
        )),
        "{stderr}"
    );
}
