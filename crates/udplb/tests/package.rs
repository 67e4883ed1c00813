//! The Debian package (`scripts/package.sh`): built from the binary under test, unpacked into
//! a clean root that holds only it and the host's systemd units, and checked as an installed
//! system would be: `systemd-analyze verify` of the unit (its /usr/bin/udplb, its man page
//! reference aside), `udplb check` of the default /etc/udplb/udplb.toml, the man pages the
//! unit and udplb(1) name, the completions, the conffile, and the system user the unit runs as
//! (created by `systemd-sysusers` from the package's sysusers.d file).

mod common;

use std::path::Path;
use std::process::Command;

use common::*;

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Copies the host's systemd units into `root` (what a system with systemd has), so that the
/// unit can be verified against them.
fn copy_system_units(root: &Path) {
    run(Command::new("cp")
        .args(["-rn", "/lib/systemd/system/."])
        .arg(root.join("lib/systemd/system")));
}

#[test]
fn the_package_installs_a_unit_that_verifies_and_a_config_that_checks() {
    for tool in ["dpkg-deb", "systemd-analyze"] {
        need(tool, "dpkg and systemd");
    }
    let dir = scratch_dir("package");
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let deb = run(Command::new(manifest.join("../../scripts/package.sh"))
        .arg(&dir)
        .env("UDPLB", env!("CARGO_BIN_EXE_udplb"))
        .env("COMPRESSION", "none"));
    let deb = deb.trim();
    assert!(deb.ends_with(".deb"), "{deb}");

    let info = run(Command::new("dpkg-deb").args(["-I", deb]));
    assert!(info.contains("Package: udplb"), "{info}");
    let conffiles = run(Command::new("dpkg-deb").args(["-f", deb, "Package"]));
    assert_eq!(conffiles.trim(), "udplb");
    let control = dir.join("control");
    run(Command::new("dpkg-deb").arg("-e").arg(deb).arg(&control));
    let conffiles = std::fs::read_to_string(control.join("conffiles")).unwrap();
    assert_eq!(
        conffiles.trim(),
        "/etc/udplb/udplb.toml\n/etc/default/udplb-decap",
        "edits survive upgrades"
    );
    let root = dir.join("root");
    run(Command::new("dpkg-deb").arg("-x").arg(deb).arg(&root));
    for file in [
        "usr/bin/udplb",
        "lib/systemd/system/udplb.service",
        "etc/udplb/udplb.toml",
        "usr/share/man/man1/udplb.1.gz",
        "usr/share/man/man1/udplb-run.1.gz",
        "usr/share/man/man1/udplb-ctl.1.gz",
        "usr/share/man/man1/udplb-check.1.gz",
        "usr/share/bash-completion/completions/udplb",
        "usr/share/zsh/vendor-completions/_udplb",
        "usr/share/fish/vendor_completions.d/udplb.fish",
        "usr/share/doc/udplb/config.md",
        "usr/lib/sysusers.d/udplb.conf",
    ] {
        assert!(root.join(file).is_file(), "{file} not in the package");
    }
    // The default config path `udplb run` and `check` read, checked by the installed binary.
    let checked = run(Command::new(root.join("usr/bin/udplb"))
        .args(["check", "-c"])
        .arg(root.join("etc/udplb/udplb.toml"))
        .env("UDPLB_ALLOW_ROOT", "1"));
    assert!(checked.contains(": ok ("), "{checked}");

    // The system user the unit runs as, created as the package's configure step creates it.
    let unit = std::fs::read_to_string(root.join("lib/systemd/system/udplb.service")).unwrap();
    assert!(unit.contains("\nUser=udplb\n"), "{unit}");
    let postinst = std::fs::read_to_string(control.join("postinst")).unwrap();
    assert!(
        postinst.contains("systemd-sysusers udplb.conf"),
        "{postinst}"
    );
    run(Command::new(need("systemd-sysusers", "systemd")).arg(format!("--root={}", root.display())));
    let passwd = std::fs::read_to_string(root.join("etc/passwd")).unwrap_or_default();
    assert!(
        passwd.lines().any(|l| l.starts_with("udplb:")),
        "no udplb user: {passwd}"
    );

    copy_system_units(&root);
    let verify = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(format!("--root={}", root.display()))
        .args(["udplb.service", "udplb-decap.service"])
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&verify.stderr);
    assert!(verify.status.success(), "{said}");
    // An unknown or misspelt key is only a warning to systemd (and ignored): none either.
    assert!(!said.contains("udplb"), "{said}");
    let _ = std::fs::remove_dir_all(&dir);
}
