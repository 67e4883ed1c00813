//! `runtime.bpf_dir`, where the kernel data plane pins its maps: whether this process may keep
//! them there, the lock that makes the directory this process's alone (and, in an upgrade,
//! its successor's), and handing what is pinned to the user udplb switches to.
//!
//! Owns: the directory's checks and its lock. Must not: pin, unpin or open a map
//! (`udplb_kernel` does, in the directory it is given).

use std::fs::File;
use std::os::fd::OwnedFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use udplb_config::Config;

/// How often a held directory is tried again while waiting for it.
const LOCK_RETRY_EVERY: Duration = Duration::from_millis(100);

/// Where the flow map is pinned: `runtime.bpf_dir` when it is on a bpf file system and this
/// process may keep maps there (created when missing); otherwise `Err` with that directory and
/// why not, which the caller says once the program has loaded (flows then start afresh with
/// each process).
pub fn pin_dir(cfg: &Config) -> Result<PathBuf, (PathBuf, String)> {
    let dir = cfg
        .runtime
        .bpf_dir
        .clone()
        .unwrap_or_else(|| udplb_config::defaults::BPF_DIR.into());
    // The nearest existing directory decides the file system.
    let on_bpf_fs = dir
        .ancestors()
        .find(|d| d.exists())
        .is_some_and(|existing| {
            nix::sys::statfs::statfs(existing)
                .is_ok_and(|fs| fs.filesystem_type() == nix::sys::statfs::BPF_FS_MAGIC)
        });
    if !on_bpf_fs {
        let why = "not on a bpf file system (mount -t bpf bpf /sys/fs/bpf, or set \
                   runtime.bpf_dir)";
        return Err((dir, why.to_string()));
    }
    let user = nix::unistd::User::from_uid(nix::unistd::Uid::effective())
        .ok()
        .flatten()
        .map_or_else(|| nix::unistd::Uid::effective().to_string(), |u| u.name);
    match not_ours(&dir, &user) {
        None => Ok(dir),
        Some(why) => {
            let why = format!(
                "{why} (chown -R {user} {dir}, or set runtime.bpf_dir to a directory of its own \
                 on a bpf file system: docs/kernel.md, \"Under systemd\")",
                dir = dir.display()
            );
            Err((dir, why))
        }
    }
}

/// Why this process (running as `user`) cannot keep maps in `dir` (created when missing), or
/// in what is already pinned there (one level of layout directories and their maps); `None`
/// when it can.
fn not_ours(dir: &Path, user: &str) -> Option<String> {
    use nix::fcntl::{AT_FDCWD, AtFlags};
    use nix::unistd::{AccessFlags, faccessat};
    let may = |p: &Path, how: AccessFlags| faccessat(AT_FDCWD, p, how, AtFlags::AT_EACCESS).is_ok();
    // A directory above it this user cannot pass (systemd mounts /sys/fs/bpf 0700); from the
    // root down, to the first one still to be made.
    let above: Vec<&Path> = dir.ancestors().skip(1).collect();
    for d in above.into_iter().rev() {
        match faccessat(AT_FDCWD, d, AccessFlags::X_OK, AtFlags::AT_EACCESS) {
            Ok(()) => {}
            Err(nix::errno::Errno::ENOENT) => break,
            Err(_) => {
                return Some(format!("{} is not searchable by user {user}", d.display()));
            }
        }
    }
    // Made for udplb's user alone: no other user opens it (and so none can hold its lock).
    let made =
        std::os::unix::fs::DirBuilderExt::mode(std::fs::DirBuilder::new().recursive(true), 0o700)
            .create(dir);
    if let Err(e) = made {
        return Some(format!(
            "{} cannot be made by user {user}: {e}",
            dir.display()
        ));
    }
    let mut paths = vec![dir.to_path_buf()];
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        paths.push(entry.path());
        let inner = std::fs::read_dir(entry.path())
            .into_iter()
            .flatten()
            .flatten();
        paths.extend(inner.map(|f| f.path()));
    }
    paths.into_iter().find_map(|p| {
        let read_write = AccessFlags::R_OK | AccessFlags::W_OK;
        let want = if p.is_dir() {
            read_write | AccessFlags::X_OK
        } else {
            read_write
        };
        (!may(&p, want)).then(|| format!("{} is not user {user}'s to change", p.display()))
    })
}

/// Gives the pinned flow map to the user udplb switches to, so that an upgrade's successor
/// (which starts as that user, with CAP_BPF and CAP_PERFMON) can open it.
pub fn hand_to_runtime_user(cfg: &Config, dir: &Path) {
    let root = nix::unistd::Uid::effective().is_root();
    let crate::privileges::Plan::Switch { user, .. } = crate::privileges::plan(&cfg.runtime, root)
    else {
        return;
    };
    let Ok(Some(u)) = nix::unistd::User::from_name(user) else {
        return;
    };
    let mut paths = vec![dir.to_path_buf()];
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            paths.push(e.path());
            if let Ok(inner) = std::fs::read_dir(e.path()) {
                paths.extend(inner.flatten().map(|f| f.path()));
            }
        }
    }
    for p in paths {
        if let Err(e) = nix::unistd::chown(&p, Some(u.uid), Some(u.gid)) {
            tracing::warn!(path = %p.display(), error = %e, "kernel data plane: cannot hand the pinned map to the runtime user (an upgrade will not load)");
        }
    }
}

/// An exclusive lock (flock) on a `runtime.bpf_dir`, held while this process's program uses
/// the maps pinned there, so that no other udplb process resizes, unpins or shares them.
/// Dropped, its descriptor is closed, never unlocked: an upgrade's successor that holds a
/// descriptor of the same lock keeps it.
pub struct Lock {
    dir: PathBuf,
    file: File,
}

impl Lock {
    /// Takes the lock on `dir` (made by [`pin_dir`]): `inherited`, a predecessor's descriptor
    /// of it, is this process's at once; otherwise it waits up to `wait` for the process that
    /// holds it (one shutting down, say) to let go, and fails naming that process.
    pub fn take(dir: &Path, inherited: Option<File>, wait: Duration) -> anyhow::Result<Lock> {
        let file = match inherited.filter(|f| same_file(f, dir)) {
            Some(file) => file,
            None => File::open(dir)
                .map_err(|e| anyhow::anyhow!("runtime.bpf_dir {}: {e}", dir.display()))?,
        };
        let deadline = Instant::now() + wait;
        let mut said = false;
        loop {
            match file.try_lock() {
                Ok(()) => {
                    return Ok(Lock {
                        dir: dir.to_path_buf(),
                        file,
                    });
                }
                Err(std::fs::TryLockError::Error(e)) => {
                    anyhow::bail!("runtime.bpf_dir {}: locking it: {e}", dir.display())
                }
                Err(std::fs::TryLockError::WouldBlock) if Instant::now() < deadline => {
                    if !said {
                        said = true;
                        tracing::warn!(
                            directory = %dir.display(),
                            holder = %holder_of(&file),
                            wait = ?wait,
                            "kernel data plane: runtime.bpf_dir is held by another process \
                             (another udplb, or one shutting down): waiting for it to let go"
                        );
                    }
                    std::thread::sleep(LOCK_RETRY_EVERY);
                }
                Err(std::fs::TryLockError::WouldBlock) => anyhow::bail!(
                    "runtime.bpf_dir {} is held by another process ({}): each udplb \
                     process on a host needs a runtime.bpf_dir of its own (docs/kernel.md, \
                     \"Restarts, upgrades, reloads\")",
                    dir.display(),
                    holder_of(&file)
                ),
            }
        }
    }

    /// The locked directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// A descriptor of the lock, for an upgrade's successor.
    pub fn share(&self) -> std::io::Result<OwnedFd> {
        Ok(self.file.try_clone()?.into())
    }
}

/// Whether `file` is `path` (a descriptor the predecessor sent for the directory the
/// configuration names now).
fn same_file(file: &File, path: &Path) -> bool {
    match (file.metadata(), std::fs::metadata(path)) {
        (Ok(a), Ok(b)) => (a.dev(), a.ino()) == (b.dev(), b.ino()),
        _ => false,
    }
}

/// Who holds the lock on `file`'s directory: the other processes with a descriptor of it
/// ("pid N udplb", with its command; `/proc/locks` names only the process that took the lock, which after an upgrade
/// is the predecessor, gone), or "pid unknown" when none can be seen (another PID namespace).
fn holder_of(file: &File) -> String {
    let Ok(meta) = file.metadata() else {
        return "pid unknown".into();
    };
    let me = std::process::id();
    let holds_it = |pid: u32| {
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .into_iter()
            .flatten()
            .flatten()
            .any(|fd| {
                std::fs::metadata(fd.path())
                    .is_ok_and(|m| (m.dev(), m.ino()) == (meta.dev(), meta.ino()))
            })
    };
    let pids: Vec<String> = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| pid != me && holds_it(pid))
        .map(|pid| {
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            format!("{pid} {}", comm.trim())
        })
        .collect();
    match pids.len() {
        0 => "pid unknown".into(),
        1 => format!("pid {}", pids[0]),
        _ => format!("pids {}", pids.join(", ")),
    }
}
