//! The shipped example loads; each broken fixture fails with file, line and key first.

use std::path::PathBuf;

fn manifest() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn the_example_loads() {
    let cfg = udplb_config::load(&manifest().join("../../examples/udplb.toml")).unwrap();
    assert_eq!(cfg.listeners.len(), 1);
    let l = &cfg.listeners[0];
    assert_eq!((l.name.as_str(), l.pool.as_str()), ("dns", "echo"));
    assert_eq!(l.address, "127.0.0.1:5300".parse().unwrap());
    assert_eq!(l.mode, udplb_core::SessionMode::Flow);
    let p = &cfg.pools[0];
    assert_eq!(p.scheduler, udplb_core::SchedulerKind::RoundRobin);
    let ports: Vec<(u16, u32)> = p
        .backends
        .iter()
        .map(|b| (b.spec.addr.port(), b.spec.weight))
        .collect();
    assert_eq!(ports, [(5301, 1), (5302, 2), (5303, 1)]);
    assert_eq!(cfg.admin.unwrap().listen, "127.0.0.1:9190".parse().unwrap());
}

#[test]
fn broken_fixtures_name_file_line_and_key() {
    let cases = [
        ("unknown_key.toml", 2, "listeners.dns.adress", "adress"),
        ("bad_address.toml", 2, "listeners.dns.address", "address"),
        ("empty_pool.toml", 7, "pools.dns.backends", "backends"),
        (
            "duplicate_listener.toml",
            6,
            "listeners.second.address",
            "\"first\"",
        ),
    ];
    for (name, line, key, text) in cases {
        let path = manifest().join("tests/fixtures/bad").join(name);
        let errors = udplb_config::load(&path).unwrap_err();
        let first = &errors.errors[0];
        assert_eq!(
            (first.line, first.key.as_str()),
            (line, key),
            "{name}: {errors}"
        );
        let all = errors.to_string();
        let first_line = all.lines().next().unwrap();
        assert!(
            first_line.starts_with(&format!("{}:{line}:", path.display())),
            "{name}: {all}"
        );
        assert!(
            first_line.contains(key) && first_line.contains(text),
            "{name}: {all}"
        );
    }
}

#[test]
fn a_missing_file_is_an_error_naming_it() {
    let errors = udplb_config::load(&manifest().join("no/such.toml")).unwrap_err();
    assert!(
        errors
            .to_string()
            .contains("no/such.toml:1:1: (file): cannot read"),
        "{errors}"
    );
}
