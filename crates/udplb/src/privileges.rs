//! Who udplb runs as once its sockets are bound.
//!
//! Owns: the switch from root to the configured user and group, and trimming the capability
//! sets to what the configuration needs after binding: nothing, or `CAP_NET_ADMIN` for
//! transparent pools (binding low ports and forcing socket buffer sizes happen before); then
//! `no_new_privs`, so that no program udplb runs (exec checks, notify commands) can gain
//! privileges through a setuid or file-capability binary. Started
//! as root without a user, udplb switches to [`default_user`], as most daemons do, unless
//! `runtime.allow_root` (or `--allow-root`) says to stay root.
//! Must not: run once a second thread exists. Capabilities are per thread on Linux, so the
//! daemon calls [`drop_privileges`] after binding and before it starts any worker, the control
//! plane or a health check. (The exception, [`pass_to_next_program`], changes only the thread
//! that starts an upgrade's successor.)

use anyhow::{Context, bail};
use caps::{CapSet, Capability, CapsHashSet};
use nix::unistd::{Gid, Group, Uid, User};
use udplb_config::{Config, Runtime};

/// The user udplb switches to when started as root without `runtime.user` (nor `allow_root`):
/// its own system user when it exists (the package creates it), else [`FALLBACK_USER`].
pub const DEFAULT_USER: &str = "udplb";
/// The user of last resort: every system has it.
pub const FALLBACK_USER: &str = "nobody";

/// [`DEFAULT_USER`] if this system has it, else [`FALLBACK_USER`].
pub fn default_user() -> &'static str {
    match User::from_name(DEFAULT_USER) {
        Ok(Some(_)) => DEFAULT_USER,
        _ => FALLBACK_USER,
    }
}

/// What [`drop_privileges`] did, for the startup log and tests.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Switched from root to this user and group; `default`: [`default_user`], no user was
    /// configured.
    Switched {
        user: String,
        uid: u32,
        gid: u32,
        default: bool,
    },
    /// Still root, because `allow_root` said so.
    StayedRoot,
    /// Not started as root: only the capability sets were trimmed.
    NotRoot,
}

/// The capabilities `cfg` needs after its sockets are bound: `CAP_NET_ADMIN` when a pool is
/// transparent (every flow's socket is opened with `IP_TRANSPARENT`), `CAP_BPF` and
/// `CAP_PERFMON` and `CAP_NET_ADMIN` while the kernel data plane runs (`kernel`: an upgrade's
/// successor loads the program; not when `dataplane = "auto"` fell back to sockets, which
/// needs none of them), else none.
pub fn needed_capabilities(cfg: &Config, kernel: bool) -> CapsHashSet {
    let mut set = CapsHashSet::new();
    if cfg.pools.iter().any(|p| p.transparent) {
        set.insert(Capability::CAP_NET_ADMIN);
    }
    // The kernel data plane: an upgrade's successor loads and attaches its program (the
    // running process only updates maps, which needs no capability).
    // (CAP_PERFMON too: without it the verifier refuses the program's packet pointers.)
    if kernel {
        set.insert(Capability::CAP_BPF);
        set.insert(Capability::CAP_PERFMON);
        set.insert(Capability::CAP_NET_ADMIN);
    }
    set
}

/// Who udplb runs as once its sockets are bound, decided from `[runtime]` and whether it was
/// started as root. [`drop_privileges`] carries it out; [`crate::preflight`] checks it first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Plan<'a> {
    /// Not started as root: no user to switch to (a configured one is ignored).
    NotRoot,
    /// Started as root, and `allow_root` says to stay root.
    StayRoot,
    /// Started as root: switch to this user and group (default: the user's primary group).
    Switch {
        user: &'a str,
        group: Option<&'a str>,
        /// The user is [`default_user`]: none was configured, nor `allow_root`.
        default: bool,
    },
}

/// What `runtime` asks for when udplb was (`root`) or was not started as root.
pub fn plan(runtime: &Runtime, root: bool) -> Plan<'_> {
    let group = runtime.group.as_deref();
    match (&runtime.user, root) {
        (_, false) => Plan::NotRoot,
        (Some(user), true) => Plan::Switch {
            user,
            group,
            default: false,
        },
        (None, true) if runtime.allow_root => Plan::StayRoot,
        (None, true) => Plan::Switch {
            user: default_user(),
            group,
            default: true,
        },
    }
}

/// Switches to `runtime.user` (or [`default_user`]) when started as root, unless allowed to
/// stay root, and keeps only the capabilities in `keep`.
pub fn drop_privileges(runtime: &Runtime, keep: &CapsHashSet) -> anyhow::Result<Outcome> {
    ensure_single_threaded()?;
    let (name, group, default) = match plan(runtime, Uid::effective().is_root()) {
        Plan::NotRoot => {
            if let Some(user) = &runtime.user {
                tracing::warn!(
                    user,
                    "runtime.user is ignored: udplb was not started as root"
                );
            }
            trim_capabilities(keep)?;
            no_new_privileges()?;
            return Ok(Outcome::NotRoot);
        }
        Plan::StayRoot => {
            tracing::warn!("running as root (allow_root is set)");
            return Ok(Outcome::StayedRoot);
        }
        Plan::Switch {
            user,
            group,
            default,
        } => (user, group, default),
    };
    let (uid, gid) = resolve(name, group)?;
    switch_user(uid, gid, keep).with_context(|| format!("switching to user {name}"))?;
    trim_capabilities(keep)?;
    if nix::unistd::setuid(Uid::from_raw(0)).is_ok() {
        bail!("switched to user {name} but could regain root");
    }
    no_new_privileges()?;
    Ok(Outcome::Switched {
        user: name.to_string(),
        uid: uid.as_raw(),
        gid: gid.as_raw(),
        default,
    })
}

/// The uid of `user` and the gid of `group` (default: the user's primary group).
fn resolve(user: &str, group: Option<&str>) -> anyhow::Result<(Uid, Gid)> {
    let u = User::from_name(user)
        .with_context(|| format!("looking up user {user}"))?
        .with_context(|| format!("runtime.user: there is no user named {user:?}"))?;
    let gid = match group {
        None => u.gid,
        Some(g) => {
            Group::from_name(g)
                .with_context(|| format!("looking up group {g}"))?
                .with_context(|| format!("runtime.group: there is no group named {g:?}"))?
                .gid
        }
    };
    Ok((u.uid, gid))
}

/// Drops every capability but `keep` from the bounding set, then setgroups, setresgid,
/// setresuid, in that order (each later step needs the privilege the one before it still
/// had). With a non-empty `keep` the permitted set survives the uid change so
/// [`trim_capabilities`] can keep that part of it.
fn switch_user(uid: Uid, gid: Gid, keep: &CapsHashSet) -> anyhow::Result<()> {
    let keep_caps = !keep.is_empty();
    if keep_caps {
        nix::sys::prctl::set_keepcaps(true).context("PR_SET_KEEPCAPS")?;
    }
    // While still root (CAP_SETPCAP): nothing udplb runs later can ever regain the rest.
    for cap in caps::all() {
        if !keep.contains(&cap) {
            caps::drop(None, CapSet::Bounding, cap)
                .with_context(|| format!("dropping {cap} from the bounding set"))?;
        }
    }
    nix::unistd::setgroups(&[gid]).context("setgroups")?;
    nix::unistd::setresgid(gid, gid, gid).context("setresgid")?;
    nix::unistd::setresuid(uid, uid, uid).context("setresuid")?;
    if keep_caps {
        nix::sys::prctl::set_keepcaps(false).context("PR_SET_KEEPCAPS")?;
    }
    Ok(())
}

/// Sets `no_new_privs` (inherited by every thread and process started afterwards): execve no
/// longer grants the privileges of setuid or setgid binaries or file capabilities, so neither
/// udplb nor a program it runs can gain what it gave up. Outside systemd (whose unit sets
/// `NoNewPrivileges=yes`) nothing else sets it.
fn no_new_privileges() -> anyhow::Result<()> {
    nix::sys::prctl::set_no_new_privs().context("PR_SET_NO_NEW_PRIVS")?;
    if !nix::sys::prctl::get_no_new_privs().context("PR_GET_NO_NEW_PRIVS")? {
        bail!("no_new_privs did not stay set");
    }
    Ok(())
}

/// Leaves exactly `keep` in the permitted and effective sets and nothing inheritable or
/// ambient, so neither udplb nor the commands it runs (exec checks) hold more.
fn trim_capabilities(keep: &CapsHashSet) -> anyhow::Result<()> {
    let permitted = caps::read(None, CapSet::Permitted).context("reading capabilities")?;
    if let Some(missing) = keep.iter().find(|c| !permitted.contains(c)) {
        bail!("the configuration needs {missing}, which udplb was not given");
    }
    caps::clear(None, CapSet::Ambient).context("clearing ambient capabilities")?;
    caps::set(None, CapSet::Inheritable, &CapsHashSet::new())
        .context("clearing inheritable capabilities")?;
    caps::set(None, CapSet::Effective, keep).context("setting effective capabilities")?;
    caps::set(None, CapSet::Permitted, keep).context("setting permitted capabilities")?;
    Ok(())
}

/// Makes the capabilities this process kept ambient in the calling thread only, so that a
/// program it executes next (an upgrade's successor, which no longer starts as root) holds them
/// too; the other threads, and the commands they run, still hold none to pass on.
pub fn pass_to_next_program() -> anyhow::Result<()> {
    let kept = caps::read(None, CapSet::Permitted).context("reading capabilities")?;
    if kept.is_empty() {
        return Ok(());
    }
    caps::set(None, CapSet::Inheritable, &kept).context("setting inheritable capabilities")?;
    for cap in kept {
        caps::raise(None, CapSet::Ambient, cap)
            .with_context(|| format!("raising {cap} to the ambient set"))?;
    }
    Ok(())
}

fn ensure_single_threaded() -> anyhow::Result<()> {
    let count = || {
        std::fs::read_dir("/proc/self/task")
            .map(|d| d.count())
            .unwrap_or(1)
    };
    // The thread that read the configuration file has been joined, but the kernel may list it
    // for a moment longer.
    let mut threads = count();
    for _ in 0..100 {
        if threads == 1 {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
        threads = count();
    }
    if threads > 1 {
        bail!(
            "internal error: privileges must be dropped before any thread starts ({threads} running)"
        );
    }
    Ok(())
}

/// The name of a capability as `capsh` prints it, for logs.
pub fn names(set: &CapsHashSet) -> String {
    let mut v: Vec<String> = set.iter().map(Capability::to_string).collect();
    v.sort();
    v.join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_switches_to_the_configured_user_or_nobody_unless_allowed_to_stay() {
        let mut runtime = Runtime::default();
        let nobody = Plan::Switch {
            user: default_user(),
            group: None,
            default: true,
        };
        assert_eq!(plan(&runtime, true), nobody);
        assert_eq!(plan(&runtime, false), Plan::NotRoot);
        runtime.group = Some("daemon".into());
        assert!(matches!(
            plan(&runtime, true),
            Plan::Switch {
                user,
                group: Some("daemon"),
                default: true
            } if user == default_user()
        ));
        runtime.allow_root = true;
        assert_eq!(plan(&runtime, true), Plan::StayRoot);
        runtime.user = Some("udplb".into());
        assert!(matches!(
            plan(&runtime, true),
            Plan::Switch {
                user: "udplb",
                default: false,
                ..
            }
        ));
        assert_eq!(plan(&runtime, false), Plan::NotRoot);
    }
}
