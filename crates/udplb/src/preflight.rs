//! What a configuration needs from the machine it runs on, beyond its own rules: the user and
//! group udplb switches to exist, every program it may run (a pool's `notify` command,
//! `exec` health checks) exists and can be executed by the user that will run it, found as
//! spawning finds it (a bare name through `PATH`, a path with a `/` as it is), and no backend
//! is udplb itself on this host (an address of one of its interfaces on a wildcard listener's
//! port) or a broadcast address of one of its networks.
//!
//! Owns: [`problems`], the one function `udplb check`, `udplb run`, the one-liner and reloads
//! all call, so they cannot disagree (only binding sockets is left to `run`), and [`describe`],
//! which names each problem by file line or command-line flag.
//! Must not: change anything; it only reads the user database, the file system and the
//! interfaces' addresses.

use std::ffi::OsStr;
use std::fs::Metadata;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use nix::unistd::{Gid, Group, Uid, User};
use udplb_config::{Config, HealthCheck, Positions, Probe, Runtime};

use crate::privileges::{self, Plan};

/// What a listener with `dataplane = "kernel"` needs that this udplb or this process lacks:
/// the program built in, and the privileges to load it (root, or CAP_BPF, CAP_PERFMON and CAP_NET_ADMIN).
/// (`"auto"` serves with sockets instead, so it needs neither.)
fn kernel_problems(cfg: &Config, out: &mut Vec<Problem>) {
    for l in cfg
        .listeners
        .iter()
        .filter(|l| l.dataplane == udplb_config::Dataplane::Kernel)
    {
        let key = format!("listeners.{}.dataplane", l.name);
        if !udplb_kernel::built() {
            out.push(problem(
                &key,
                "this udplb was built without the kernel data plane (clang was missing at build \
                 time: apt install clang libbpf-dev, then rebuild; or dataplane = \"auto\")"
                    .into(),
            ));
        } else if !can_load_bpf() {
            out.push(problem(
                &key,
                "loading the kernel data plane needs root, or CAP_BPF, CAP_PERFMON and CAP_NET_ADMIN (or \
                 dataplane = \"auto\" to serve with sockets)"
                    .into(),
            ));
        }
    }
}

/// Whether this process may load and attach eBPF programs.
pub(crate) fn can_load_bpf() -> bool {
    if Uid::effective().is_root() {
        return true;
    }
    let has = |c| caps::has_cap(None, caps::CapSet::Effective, c).unwrap_or(false);
    has(caps::Capability::CAP_BPF)
        && has(caps::Capability::CAP_PERFMON)
        && has(caps::Capability::CAP_NET_ADMIN)
}

/// Something the machine cannot do for the configuration, at a key path.
#[derive(Debug, PartialEq, Eq)]
pub struct Problem {
    /// Dotted key path, e.g. `runtime.user`, `pools.dns.notify`.
    pub key: String,
    /// What is wrong.
    pub message: String,
}

/// When the configuration is checked.
#[derive(Clone, Copy, Debug)]
pub enum Stage {
    /// Before binding (`check`, `run`, the one-liner): `[runtime]` applies, and the programs
    /// will run as the user udplb switches to.
    Start,
    /// A reload: `[runtime]` is not re-read, and programs run as udplb runs now.
    Reload,
}

/// Every problem the machine has with `cfg`.
pub fn problems(cfg: &Config, stage: Stage) -> Vec<Problem> {
    let mut out = Vec::new();
    let runner = match stage {
        Stage::Start => runner_at_start(&cfg.runtime, &mut out),
        Stage::Reload => Runner::current(),
    };
    backends_on_this_host(cfg, &mut out);
    // The token is read at start only (a reload cannot change [admin]).
    if let (Stage::Start, Some(path)) = (
        stage,
        cfg.admin.as_ref().and_then(|a| a.token_file.as_ref()),
    ) && let Err(why) = crate::token::read(path)
    {
        out.push(problem("admin.token_file", why));
    }
    if let Stage::Start = stage {
        kernel_problems(cfg, &mut out);
    }
    if let (Stage::Start, Some(s)) = (stage, &cfg.sync)
        && let Err(why) = crate::token::read_key(&s.key_file)
    {
        out.push(problem("sync.key_file", why));
    }
    if let Some(a) = &cfg.announce {
        check_program(&mut out, "announce.up".into(), &a.up[0], &runner);
        check_program(&mut out, "announce.down".into(), &a.down[0], &runner);
    }
    for pool in &cfg.pools {
        let key = |k: &str| format!("pools.{}.{k}", pool.name);
        if let Some(command) = &pool.notify {
            check_program(&mut out, key("notify"), &command[0], &runner);
        }
        let pool_program = exec_program(pool.health.as_ref());
        if let Some(program) = pool_program {
            check_program(&mut out, key("health.command"), program, &runner);
        }
        for (i, b) in pool.backends.iter().enumerate() {
            // A backend that inherits the pool's command has its problem reported once.
            match exec_program(b.health.as_ref()) {
                Some(program) if Some(program) != pool_program => check_program(
                    &mut out,
                    key(&format!("backends[{i}].health.command")),
                    program,
                    &runner,
                ),
                _ => {}
            }
        }
    }
    out
}

/// Backends that are udplb's own listeners or broadcast addresses, as this host's interfaces
/// tell (the configuration rules refuse what the file alone shows).
fn backends_on_this_host(cfg: &Config, out: &mut Vec<Problem>) {
    let host = crate::host::Addresses::read();
    let guard = udplb_core::source::SourceGuard::new(
        cfg.listeners.iter().map(|l| l.address),
        [],
        host.local.iter().copied(),
    );
    for pool in &cfg.pools {
        for (i, b) in pool.backends.iter().enumerate() {
            let addr = b.spec.addr;
            let why = if guard.is_listener(addr) {
                "is an address of this host on a wildcard listener's port: udplb would send its \
                 datagrams to itself"
            } else if host.is_broadcast(addr.ip()) {
                "is the broadcast address of one of this host's networks: a backend is one host"
            } else {
                continue;
            };
            out.push(problem(
                &format!("pools.{}.backends[{i}].address", pool.name),
                format!("{addr} {why}"),
            ));
        }
    }
}

/// Each problem as a line: `udplb: FLAG: MESSAGE` for a key the command line set (`flags`
/// pairs keys with their flag), then `FILE:LINE:COLUMN: KEY: MESSAGE` in file order for the
/// others when they come from a file (`positions`), `udplb: KEY: MESSAGE` otherwise.
pub fn describe(
    problems: &[Problem],
    positions: Option<&Positions>,
    flags: &[(&str, &str)],
) -> Vec<String> {
    let mut lines = Vec::new();
    let mut in_file = Vec::new();
    for p in problems {
        match (flags.iter().find(|(key, _)| *key == p.key), positions) {
            (Some((_, flag)), _) => lines.push(format!("udplb: {flag}: {}", p.message)),
            (None, Some(positions)) => in_file.push(positions.error(&p.key, p.message.clone())),
            (None, None) => lines.push(format!("udplb: {}: {}", p.key, p.message)),
        }
    }
    in_file.sort_by_key(|e| (e.line, e.column));
    lines.extend(in_file.iter().map(ToString::to_string));
    lines
}

/// The program of an `exec` check.
fn exec_program(check: Option<&HealthCheck>) -> Option<&str> {
    match &check?.probe {
        Probe::Exec { command } => command.first().map(String::as_str),
        _ => None,
    }
}

/// Who runs the programs udplb starts, for the permission checks.
struct Runner {
    /// The user udplb switches to; `None`: udplb's own user.
    name: Option<String>,
    uid: u32,
    gids: Vec<u32>,
}

impl Runner {
    fn current() -> Runner {
        let mut gids = vec![Gid::effective().as_raw()];
        gids.extend(
            nix::unistd::getgroups()
                .unwrap_or_default()
                .into_iter()
                .map(Gid::as_raw),
        );
        Runner {
            name: None,
            uid: Uid::effective().as_raw(),
            gids,
        }
    }

    fn who(&self) -> String {
        match &self.name {
            Some(name) => format!("user {name:?}"),
            None => format!("uid {}", self.uid),
        }
    }

    /// Whether a file (execute) or directory (search) with `meta` lets this runner through,
    /// by its owner, group or other permission bits; root needs any execute bit on a file.
    fn may(&self, meta: &Metadata) -> bool {
        let mode = meta.mode();
        if self.uid == 0 {
            return meta.is_dir() || mode & 0o111 != 0;
        }
        let shift = if meta.uid() == self.uid {
            6
        } else if self.gids.contains(&meta.gid()) {
            3
        } else {
            0
        };
        (mode >> shift) & 0o1 != 0
    }
}

/// Checks the user and group udplb will switch to and returns who will run its programs.
fn runner_at_start(runtime: &Runtime, out: &mut Vec<Problem>) -> Runner {
    let plan = privileges::plan(runtime, Uid::effective().is_root());
    let (user, group) = match plan {
        Plan::Switch { user, group, .. } => (Some(user), group),
        // Not switching: a user or group named anyway (ignored when not started as root) must
        // still exist, or the file says something untrue.
        _ => (runtime.user.as_deref(), runtime.group.as_deref()),
    };
    let user = user.and_then(|name| match User::from_name(name) {
        Ok(Some(u)) => Some(u),
        Ok(None) => {
            let default = matches!(plan, Plan::Switch { default: true, .. });
            out.push(problem("runtime.user", no_such_user(name, default)));
            None
        }
        Err(e) => {
            out.push(problem(
                "runtime.user",
                format!("cannot look up user {name:?}: {e}"),
            ));
            None
        }
    });
    let group = group.and_then(|name| match Group::from_name(name) {
        Ok(Some(g)) => Some(g),
        Ok(None) => {
            out.push(problem(
                "runtime.group",
                format!("there is no group named {name:?}"),
            ));
            None
        }
        Err(e) => {
            out.push(problem(
                "runtime.group",
                format!("cannot look up group {name:?}: {e}"),
            ));
            None
        }
    });
    match (plan, user) {
        (Plan::Switch { user: name, .. }, Some(u)) => Runner {
            name: Some(name.to_string()),
            uid: u.uid.as_raw(),
            gids: vec![group.map_or(u.gid, |g| g.gid).as_raw()],
        },
        _ => Runner::current(),
    }
}

fn no_such_user(name: &str, default: bool) -> String {
    if default {
        format!(
            "there is no user named {name:?}, the user udplb switches to when started as root \
             without a user: set runtime.user (--user) to an existing user, or \
             runtime.allow_root = true (--allow-root) to stay root"
        )
    } else {
        format!("there is no user named {name:?}")
    }
}

fn problem(key: &str, message: String) -> Problem {
    Problem {
        key: key.into(),
        message,
    }
}

/// Checks that `program` can be spawned by `runner`: a name with a `/` as a path (relative to
/// the working directory), a bare name through `PATH` (`/bin:/usr/bin` when unset), as
/// `execvp` does.
fn check_program(out: &mut Vec<Problem>, key: String, program: &str, runner: &Runner) {
    let message = if program.contains('/') {
        match file_problem(Path::new(program), runner) {
            Ok(()) => return,
            Err(why) => format!("{program:?} {}", why.text()),
        }
    } else {
        let path = std::env::var_os("PATH");
        let path = path.as_deref().unwrap_or(OsStr::new("/bin:/usr/bin"));
        let mut found = None;
        for dir in std::env::split_paths(path) {
            let candidate = if dir.as_os_str().is_empty() {
                PathBuf::from(program)
            } else {
                dir.join(program)
            };
            match file_problem(&candidate, runner) {
                Ok(()) => return,
                Err(FileProblem::Missing) => {}
                Err(why) => {
                    found.get_or_insert(format!(
                        "{program:?} ({}) {}",
                        candidate.display(),
                        why.text()
                    ));
                }
            }
        }
        found.unwrap_or_else(|| {
            format!(
                "there is no program {program:?} in PATH ({})",
                path.to_string_lossy()
            )
        })
    };
    out.push(Problem { key, message });
}

/// Why a program file cannot be executed.
enum FileProblem {
    Missing,
    Other(String),
}

impl FileProblem {
    fn text(&self) -> String {
        match self {
            FileProblem::Missing => "does not exist".into(),
            FileProblem::Other(why) => why.clone(),
        }
    }
}

fn file_problem(path: &Path, runner: &Runner) -> Result<(), FileProblem> {
    let meta = match std::fs::metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(FileProblem::Missing),
        Err(e) if e.raw_os_error() == Some(nix::libc::ENOTDIR) => {
            return Err(FileProblem::Missing);
        }
        Err(e) => return Err(FileProblem::Other(format!("cannot be read: {e}"))),
    };
    if meta.is_dir() {
        return Err(FileProblem::Other("is a directory".into()));
    }
    if !meta.is_file() {
        return Err(FileProblem::Other("is not a regular file".into()));
    }
    if !runner.may(&meta) {
        return Err(FileProblem::Other(format!(
            "is not executable by {} (mode {:04o}, owner uid {}, group gid {})",
            runner.who(),
            meta.mode() & 0o7777,
            meta.uid(),
            meta.gid()
        )));
    }
    // Every directory on the way must be searchable by the runner too.
    for dir in path
        .ancestors()
        .skip(1)
        .filter(|d| !d.as_os_str().is_empty())
    {
        if let Ok(meta) = std::fs::metadata(dir)
            && !runner.may(&meta)
        {
            return Err(FileProblem::Other(format!(
                "cannot be reached by {}: {} (mode {:04o}, owner uid {}) is not searchable",
                runner.who(),
                dir.display(),
                meta.mode() & 0o7777,
                meta.uid()
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn runner(uid: u32, gid: u32) -> Runner {
        Runner {
            name: Some("someone".into()),
            uid,
            gids: vec![gid],
        }
    }

    #[test]
    fn programs_need_the_runners_permission_on_the_file_and_the_way_to_it() {
        let dir = std::env::temp_dir().join(format!("udplb-preflight-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("closed")).unwrap();
        let program = dir.join("p");
        std::fs::write(&program, "#!/bin/sh\n").unwrap();
        let meta = std::fs::metadata(&program).unwrap();
        let (owner, group) = (meta.uid(), meta.gid());
        let (stranger, strangers) = (owner.wrapping_add(4242), group.wrapping_add(4242));
        let chmod = |path: &Path, mode| {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap()
        };
        let ok = |path: &Path, r: &Runner| file_problem(path, r).is_ok();
        chmod(&program, 0o750);
        assert!(ok(&program, &runner(owner, strangers)), "owner bit");
        assert!(ok(&program, &runner(stranger, group)), "group bit");
        assert!(!ok(&program, &runner(stranger, strangers)), "no other bit");
        assert!(ok(&program, &runner(0, strangers)), "root: any bit");
        chmod(&program, 0o644);
        assert!(!ok(&program, &runner(0, 0)), "root needs an execute bit");
        chmod(&program, 0o701);
        assert!(ok(&program, &runner(stranger, strangers)), "other bit");
        assert!(
            !ok(&program, &runner(stranger, group)),
            "the group bit decides"
        );

        let hidden = dir.join("closed/p");
        std::fs::copy(&program, &hidden).unwrap();
        chmod(&hidden, 0o755);
        chmod(&dir.join("closed"), 0o700);
        let why = file_problem(&hidden, &runner(stranger, strangers))
            .err()
            .map(|e| e.text())
            .unwrap_or_default();
        assert!(why.contains("is not searchable"), "{why}");
        assert!(matches!(
            file_problem(&dir.join("absent"), &runner(0, 0)),
            Err(FileProblem::Missing)
        ));
        assert!(matches!(
            file_problem(&dir.join("p/under-a-file"), &runner(0, 0)),
            Err(FileProblem::Missing)
        ));
        let why = file_problem(&dir, &runner(0, 0)).err().map(|e| e.text());
        assert_eq!(why.as_deref(), Some("is a directory"));
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn a_missing_default_user_says_how_to_choose_another() {
        assert_eq!(no_such_user("x", false), "there is no user named \"x\"");
        let default = no_such_user("nobody", true);
        for needle in ["\"nobody\"", "runtime.user (--user)", "allow_root"] {
            assert!(default.contains(needle), "{default}");
        }
    }

    #[test]
    fn problems_are_named_by_flag_or_by_file_position() {
        let src = "[runtime]\nuser = \"x\"\n[listeners.l]\naddress = \"127.0.0.1:53\"\npool = \"p\"\n\
                   [pools.p]\nbackends = [\"127.0.0.1:5301\"]\nnotify = [\"n\"]\n";
        let (_, positions) = udplb_config::parse_with_positions(src, "u.toml").unwrap();
        let problems = [
            problem("pools.p.notify", "late".into()),
            problem("runtime.user", "early".into()),
        ];
        assert_eq!(
            describe(&problems, Some(&positions), &[]),
            [
                "u.toml:2:1: runtime.user: early",
                "u.toml:8:1: pools.p.notify: late"
            ]
        );
        assert_eq!(
            describe(&problems, Some(&positions), &[("runtime.user", "--user")]),
            ["udplb: --user: early", "u.toml:8:1: pools.p.notify: late"]
        );
        assert_eq!(
            describe(&problems, None, &[]),
            ["udplb: pools.p.notify: late", "udplb: runtime.user: early"]
        );
    }
}
