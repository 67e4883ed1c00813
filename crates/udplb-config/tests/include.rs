//! `include`: listeners and pools from other files (a conf.d directory), with every error at
//! its own file and line.

use std::path::{Path, PathBuf};

/// A fresh directory with `files` (relative name, text) written into it.
fn dir_with(name: &str, files: &[(&str, &str)]) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("udplb-include-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    for (file, text) in files {
        let path = dir.join(file);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    }
    dir
}

fn load(dir: &Path) -> Result<udplb_config::Config, udplb_config::ConfigErrors> {
    udplb_config::load(&dir.join("udplb.toml"))
}

const MAIN: &str = "include = [\"conf.d/*.toml\"]\n\
    [listeners.dns]\naddress = \"127.0.0.1:5300\"\npool = \"dns\"\n\
    [pools.dns]\nbackends = [\"127.0.0.1:5301\"]\n";

#[test]
fn included_files_add_listeners_and_pools_in_name_order() {
    let dir = dir_with(
        "ok",
        &[
            ("udplb.toml", MAIN),
            (
                "conf.d/20-syslog.toml",
                "[listeners.syslog]\naddress = \"127.0.0.1:5514\"\npool = \"syslog\"\nmode = \"datagram\"\n\
                 [pools.syslog]\nbackends = [\"127.0.0.1:5515\"]\n",
            ),
            (
                "conf.d/10-radius.toml",
                "[listeners.radius]\naddress = \"127.0.0.1:5812\"\npool = \"dns\"\n",
            ),
            ("conf.d/notes.txt", "not read"),
        ],
    );
    let cfg = load(&dir).unwrap();
    let names: Vec<&str> = cfg.listeners.iter().map(|l| l.name.as_str()).collect();
    assert_eq!(names, ["dns", "radius", "syslog"]);
    assert_eq!(cfg.pools.len(), 2);
    // An empty conf.d is fine.
    let empty = dir_with("empty", &[("udplb.toml", MAIN)]);
    assert_eq!(load(&empty).unwrap().listeners.len(), 1);
}

#[test]
fn errors_name_the_included_file_and_line() {
    let dir = dir_with(
        "errors",
        &[
            ("udplb.toml", MAIN),
            (
                "conf.d/a.toml",
                "[listeners.radius]\naddress = \"127.0.0.1:5812\"\npool = \"nope\"\nadress = 1\n",
            ),
            (
                "conf.d/b.toml",
                "include = [\"more.toml\"]\n[pools.dns]\nbackends = [\"127.0.0.1:5302\"]\n\
                 [sync]\nlisten = \"10.0.0.1:7946\"\n",
            ),
            ("conf.d/c.toml", "[pools.broken\n"),
        ],
    );
    let text = load(&dir).unwrap_err().to_string();
    let a = dir.join("conf.d/a.toml").display().to_string();
    let b = dir.join("conf.d/b.toml").display().to_string();
    let c = dir.join("conf.d/c.toml").display().to_string();
    let main = dir.join("udplb.toml").display().to_string();
    for expected in [
        format!("{a}:4:1: listeners.radius.adress: unknown key \"adress\""),
        format!("{a}:3:1: listeners.radius.pool: no pool named \"nope\""),
        format!("{b}:1:1: include: unknown key \"include\""),
        format!("{b}:2:8: pools.dns: also defined in {main}:5"),
        format!("{b}:4:2: sync: unknown key \"sync\""),
        format!("{c}:1:"),
    ] {
        assert!(text.contains(&expected), "{expected}\nnot in:\n{text}");
    }
}

#[test]
fn a_bad_include_is_an_error_at_it() {
    let dir = dir_with(
        "bad",
        &[(
            "udplb.toml",
            &format!(
                "include = [\"conf.d/[\", 7]\n{}",
                &MAIN[MAIN.find('\n').unwrap() + 1..]
            ),
        )],
    );
    let text = load(&dir).unwrap_err().to_string();
    let main = dir.join("udplb.toml").display().to_string();
    assert!(
        text.contains(&format!(
            "{main}:1:12: include[0]: \"conf.d/[\" is not a file pattern"
        )),
        "{text}"
    );
    assert!(text.contains("include[1]: expected a string"), "{text}");
}

/// A kernel listener in an included file makes the main file's pool place with Maglev; a
/// scheduler given there that is not Maglev is refused at its line in the main file.
#[test]
fn a_kernel_listener_elsewhere_sets_its_pools_scheduler() {
    let kernel = (
        "conf.d/kernel.toml",
        "[listeners.vip]\naddress = \"10.0.0.1:53\"\npool = \"vip\"\ndataplane = \"kernel\"\n",
    );
    let pool = "[pools.vip]\nbackends = [\"10.0.1.1:53\"]\n";
    let dir = dir_with(
        "kernel",
        &[("udplb.toml", &format!("{MAIN}{pool}")), kernel],
    );
    let cfg = load(&dir).unwrap();
    let schedulers: Vec<udplb_core::SchedulerKind> =
        cfg.pools.iter().map(|p| p.scheduler).collect();
    assert_eq!(
        schedulers,
        [
            udplb_core::SchedulerKind::RoundRobin,
            udplb_core::SchedulerKind::Maglev
        ]
    );
    let dir = dir_with(
        "kernel-rr",
        &[
            (
                "udplb.toml",
                &format!("{MAIN}{pool}scheduler = \"random\"\n"),
            ),
            kernel,
        ],
    );
    let text = load(&dir).unwrap_err().to_string();
    let main = dir.join("udplb.toml").display().to_string();
    assert_eq!(
        text.trim_end(),
        format!(
            "{main}:9:1: pools.vip.scheduler: \"random\" cannot serve listeners.vip (dataplane = \
             \"kernel\"): the kernel data plane places with \"maglev\""
        )
    );
}
