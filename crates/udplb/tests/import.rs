//! `udplb import keepalived` on the example configurations Debian's keepalived package ships
//! (/usr/share/doc/keepalived/samples): every file is read; UDP virtual servers become a
//! configuration `udplb check` accepts; everything left out is named with its line. Needs the
//! package keepalived (`scripts/test.sh` installs it as root).

mod common;

use std::path::PathBuf;

use common::*;

fn samples() -> Vec<PathBuf> {
    let dir = std::path::Path::new("/usr/share/doc/keepalived/samples");
    assert!(
        dir.is_dir(),
        "{} missing: install Debian's keepalived (scripts/test.sh does as root)",
        dir.display()
    );
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("keepalived.conf"))
        })
        .collect();
    files.sort();
    files
}

#[test]
fn debian_keepalived_samples_import_or_say_why_not() {
    let dir = scratch_dir("import");
    let mut translated = 0;
    for sample in samples() {
        let out = udplb_command()
            .args(["import", "keepalived"])
            .arg(&sample)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        let text = std::fs::read_to_string(&sample).unwrap();
        let virtual_servers = text
            .lines()
            .filter(|l| l.trim_start().starts_with("virtual_server "))
            .count();
        // Every virtual server is either translated or named in a note.
        let noted = stderr.matches("virtual_server").count();
        match out.status.code() {
            Some(0) => {
                translated += 1;
                let toml = dir.join("imported.toml");
                std::fs::write(&toml, &out.stdout).unwrap();
                let (code, check) = check_path(&toml);
                assert_eq!(code, Some(0), "{}: {check}", sample.display());
                let listeners = String::from_utf8_lossy(&out.stdout)
                    .matches("[listeners.")
                    .count();
                assert_eq!(
                    listeners + noted,
                    virtual_servers,
                    "{}: {stderr}",
                    sample.display()
                );
            }
            Some(78) => {
                assert!(noted >= virtual_servers, "{}: {stderr}", sample.display());
                assert!(
                    stderr
                        .lines()
                        .all(|l| l.contains(": line ") || l.contains("no UDP virtual_server")),
                    "{}: {stderr}",
                    sample.display()
                );
            }
            other => panic!("{}: exit {other:?}: {stderr}", sample.display()),
        }
    }
    assert!(translated >= 1, "no sample had a UDP virtual server");

    // The UDP_CHECK sample, exactly.
    let udp = samples()
        .into_iter()
        .find(|p| p.ends_with("keepalived.conf.UDP_CHECK"))
        .unwrap();
    let out = udplb_command()
        .args(["import", "keepalived"])
        .arg(&udp)
        .output()
        .unwrap();
    let toml = String::from_utf8_lossy(&out.stdout);
    for line in [
        "address = \"10.10.10.2:1358\"",
        "persistence = \"50s\"",
        "{ address = \"192.168.200.6:1358\", weight = 1 }",
        "check = \"udp\"",
        "interval = \"6s\"",
        "timeout = \"3s\"",
        "fall = 3",
    ] {
        assert!(toml.contains(line), "{line} not in:\n{toml}");
    }
}

/// `udplb check -c PATH`: its exit code and output.
fn check_path(path: &std::path::Path) -> (Option<i32>, String) {
    let out = udplb_command()
        .args(["check", "-c"])
        .arg(path)
        .env("UDPLB_ALLOW_ROOT", "1")
        .output()
        .unwrap();
    (
        out.status.code(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn a_pen_command_line_imports() {
    let out = udplb_command()
        .args([
            "import", "pen", "--", "-U", "-T", "30", "-C", "8888", "5300",
        ])
        .args(["127.0.0.1:5301", "127.0.0.1:5302"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("-C not translated"), "{stderr}");
    let dir = scratch_dir("import-pen");
    let toml = dir.join("pen.toml");
    std::fs::write(&toml, &out.stdout).unwrap();
    let (code, check) = check_path(&toml);
    assert_eq!(code, Some(0), "{check}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("persistence = \"30s\""), "{text}");
    // Without -U pen balances TCP: refused, saying so.
    let tcp = udplb_command()
        .args(["import", "pen", "--", "53", "10.0.0.1"])
        .output()
        .unwrap();
    assert_eq!(tcp.status.code(), Some(78));
    assert!(String::from_utf8_lossy(&tcp.stderr).contains("-U"));
}
