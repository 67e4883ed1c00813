//! Privileges: started as root, udplb binds, switches to the configured user (`nobody` by
//! default) and keeps no capability; it stays root only when allowed. Needs root (skipped with
//! a message otherwise).

mod common;

use common::*;

#[test]
fn switches_to_the_configured_user_with_no_capabilities_and_keeps_serving() {
    if !is_root() {
        eprintln!("skipped: switching users needs root");
        return;
    }
    let (uid, gid) = nobody();
    let a = Backend::start("127.0.0.1", "a");
    let (lb, listen) = Udplb::serve(&["--user", "nobody"], &[a.addr]);
    let pid = lb.pid();
    for field in ["Uid", "Gid"] {
        let want = if field == "Uid" { uid } else { gid };
        assert!(
            status_field(pid, field)
                .iter()
                .all(|v| v == &want.to_string()),
            "{field}: {:?}",
            status_field(pid, field)
        );
    }
    assert_eq!(status_field(pid, "Groups"), vec![gid.to_string()]);
    for caps in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        assert_eq!(
            status_field(pid, caps),
            vec!["0000000000000000".to_string()],
            "{caps}"
        );
    }
    // Every thread, not just the main one (capabilities are per thread).
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let tid = task.unwrap().file_name().into_string().unwrap();
        let status = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/status")).unwrap();
        assert!(status.contains("CapEff:\t0000000000000000"), "thread {tid}");
        assert!(
            status.contains(&format!("Uid:\t{uid}\t{uid}\t{uid}\t{uid}")),
            "thread {tid}"
        );
    }
    let c = client("127.0.0.1:0");
    let (reply, from) = request(&c, listen, b"hello");
    assert_eq!(from, listen);
    assert!(reply.ends_with(b"hello"), "{reply:?}");
}

/// Started as root without a user, udplb switches to `nobody`, as nginx does, and says so
/// and why in its startup line; the one-liner and `udplb run` alike.
#[test]
fn switches_to_nobody_by_default_when_started_as_root() {
    if !is_root() {
        eprintln!("skipped: switching users needs root");
        return;
    }
    let (uid, gid) = nobody();
    let a = Backend::start("127.0.0.1", "a");
    let not_allowed = [("UDPLB_ALLOW_ROOT", "0")];
    let listen = listen_addr("127.0.0.1");
    let one_liner =
        Udplb::start_with_env(&[&listen.to_string(), &a.addr.to_string()], &not_allowed);
    let admin = admin_addr();
    let file = write_config(&one_pool_toml(
        admin,
        listen_addr("127.0.0.1"),
        "",
        &[quoted(a.addr)],
        "",
    ));
    let from_file = Udplb::run_config_with_env(&file, admin, &not_allowed);
    for lb in [&one_liner, &from_file] {
        let pid = lb.pid();
        for (field, want) in [("Uid", uid), ("Gid", gid)] {
            assert!(
                status_field(pid, field)
                    .iter()
                    .all(|v| v == &want.to_string()),
                "{field}: {:?}",
                status_field(pid, field)
            );
        }
        assert_eq!(
            status_field(pid, "CapEff"),
            vec!["0000000000000000".to_string()]
        );
        let stderr = lb.stderr.lock().unwrap().clone();
        let line = stderr
            .lines()
            .find(|l| l.contains("switched user after binding"))
            .unwrap_or_else(|| panic!("no startup line about the user: {stderr}"));
        assert!(line.contains("user=nobody"), "{line}");
        assert!(line.contains("the default"), "{line}");
    }
    let c = client("127.0.0.1:0");
    assert!(request(&c, listen, b"hi").0.ends_with(b"hi"));
}

/// Root stays root only when told to: `--allow-root`, `UDPLB_ALLOW_ROOT=1` or
/// `runtime.allow_root`.
#[test]
fn stays_root_when_allowed() {
    if !is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let a = Backend::start("127.0.0.1", "a");
    let flag = Udplb::start_with_env(
        &[
            "--allow-root",
            &listen_addr("127.0.0.1").to_string(),
            &a.addr.to_string(),
        ],
        &[("UDPLB_ALLOW_ROOT", "0")],
    );
    let (env, _) = Udplb::serve(&[], &[a.addr]);
    let admin = admin_addr();
    let file = write_config(&format!(
        "[runtime]\nallow_root = true\n[admin]\nlisten = \"{admin}\"\n[listeners.l]\n\
         address = \"{}\"\npool = \"p\"\n[pools.p]\nbackends = [\"{}\"]\n",
        listen_addr("127.0.0.1"),
        a.addr
    ));
    let key = Udplb::run_config_with_env(&file, admin, &[("UDPLB_ALLOW_ROOT", "0")]);
    for lb in [&flag, &env, &key] {
        assert!(
            status_field(lb.pid(), "Uid").iter().all(|v| v == "0"),
            "{:?}",
            status_field(lb.pid(), "Uid")
        );
    }
}

#[test]
fn an_unknown_user_is_a_clear_error() {
    if !is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let listen = listen_addr("127.0.0.1").to_string();
    let (code, stderr) = exit_of(
        &[
            "--user",
            "no-such-user-udplb",
            listen.as_str(),
            "127.0.0.1:9",
        ],
        &[],
    );
    assert_eq!(code, Some(78), "{stderr}");
    assert!(
        stderr.contains("udplb: --user: there is no user named \"no-such-user-udplb\""),
        "{stderr}"
    );
}

/// Programs are checked for the user udplb will run them as: started as root and switching
/// to nobody, a check script only root may run is refused by `check` and `run` alike, naming
/// the user; staying root, the same file passes.
#[test]
fn programs_are_checked_for_the_user_udplb_switches_to() {
    if !is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    use std::os::unix::fs::PermissionsExt;
    let dir = scratch_dir("programs");
    let script = dir.join("check.sh");
    std::fs::write(&script, "#!/bin/sh\nexit 0\n").unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o700)).unwrap();
    let config = |runtime: &str| {
        format!(
            "{runtime}\n[listeners.l]\naddress = \"{}\"\npool = \"p\"\n[pools.p]\n\
             backends = [\"127.0.0.1:9\"]\n[pools.p.health]\ncheck = \"exec\"\ncommand = [\"{}\"]\n",
            listen_addr("127.0.0.1"),
            script.display()
        )
    };
    let as_nobody = write_config(&config("[runtime]\nuser = \"nobody\""));
    let as_nobody = as_nobody.display().to_string();
    let error = format!(
        "{as_nobody}:10:1: pools.p.health.command: \"{}\" is not executable by user \"nobody\"",
        script.display()
    );
    for command in ["check", "run"] {
        let (code, stderr) = exit_of(&[command, "-c", &as_nobody], &[]);
        assert_eq!(code, Some(78), "{command}: {stderr}");
        assert!(
            stderr.contains(&error),
            "{command}: {error} not in {stderr}"
        );
    }
    let as_root = write_config(&config(""));
    let (code, stderr) = exit_of(
        &["check", "-c", &as_root.display().to_string()],
        &[("UDPLB_ALLOW_ROOT", "1")],
    );
    assert_eq!(code, Some(0), "{stderr}");
    let _ = std::fs::remove_dir_all(dir);
}

/// Started as root and switched to nobody, the commands udplb runs (here an exec check) cannot
/// gain privileges: `NoNewPrivs` is set, and a setuid-root copy of `id` they run does not make
/// them root.
#[test]
fn commands_udplb_runs_cannot_gain_privileges() {
    if !is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;
    let dir = scratch_dir("nnp");
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let out = dir.join("out");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::set_permissions(&out, std::fs::Permissions::from_mode(0o777)).unwrap();
    let suid_id = dir.join("suid-id");
    std::fs::copy("/usr/bin/id", &suid_id).unwrap();
    std::fs::set_permissions(&suid_id, std::fs::Permissions::from_mode(0o4755)).unwrap();
    // Whether setuid works here at all: run the copy as nobody without udplb.
    let (uid, gid) = nobody();
    let direct = std::process::Command::new(&suid_id)
        .arg("-u")
        .uid(uid)
        .gid(gid)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let script = dir.join("check.sh");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\ngrep NoNewPrivs /proc/self/status > {out}/nnp.tmp\n\
             {id} -u > {out}/euid.tmp\nmv {out}/euid.tmp {out}/euid\nmv {out}/nnp.tmp {out}/nnp\n",
            out = out.display(),
            id = suid_id.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    let a = Backend::start("127.0.0.1", "a");
    let admin = admin_addr();
    let file = write_config(&format!(
        "[runtime]\nuser = \"nobody\"\n[admin]\nlisten = \"{admin}\"\n[listeners.l]\n\
         address = \"{}\"\npool = \"p\"\n[pools.p]\nbackends = [\"{}\"]\n[pools.p.health]\n\
         check = \"exec\"\ncommand = [\"/bin/sh\", \"{}\"]\ninterval = \"200ms\"\ntimeout = \"200ms\"\n",
        listen_addr("127.0.0.1"),
        a.addr,
        script.display()
    ));
    let lb = Udplb::run_config_with_env(&file, admin, &[("UDPLB_ALLOW_ROOT", "0")]);
    let read = |name: &str| std::fs::read_to_string(out.join(name)).unwrap_or_default();
    assert!(
        wait_for(DEADLINE, || !read("nnp").is_empty()),
        "the check never ran: {}",
        lb.stderr.lock().unwrap()
    );
    let (nnp, euid) = (read("nnp"), read("euid"));
    eprintln!(
        "exec check run by udplb switched to nobody: {} ; a setuid-root id it runs says euid {} \
         (run directly as nobody: {direct})",
        nnp.trim(),
        euid.trim()
    );
    assert_eq!(nnp.split_whitespace().nth(1), Some("1"), "{nnp}");
    if direct == "0" {
        assert_ne!(
            euid.trim(),
            "0",
            "the check became root through a setuid binary"
        );
    } else {
        eprintln!("setuid binaries do not work here ({direct:?}): only NoNewPrivs is checked");
    }
    let _ = std::fs::remove_dir_all(dir);
}
