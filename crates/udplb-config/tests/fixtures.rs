//! The shipped example loads; each broken fixture fails with file, line and key first.

use std::path::PathBuf;

fn manifest() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn the_example_loads() {
    let cfg = udplb_config::load(&manifest().join("../../examples/udplb.toml")).unwrap();
    assert_eq!(cfg.listeners.len(), 1);
    assert_eq!(cfg.pools[0].backends.len(), 3);
    assert!(cfg.admin.is_some());
}

#[test]
fn broken_fixtures_name_file_line_and_key() {
    let cases = [
        ("unknown_key.toml", 2, "listeners.dns.adress"),
        ("bad_address.toml", 2, "listeners.dns.address"),
        ("empty_pool.toml", 7, "pools.dns.backends"),
        ("duplicate_listener.toml", 6, "listeners.second.address"),
    ];
    for (name, line, key) in cases {
        let path = manifest().join("tests/fixtures/bad").join(name);
        let errors = udplb_config::load(&path).unwrap_err();
        let first = &errors.errors[0];
        assert_eq!(
            (first.line, first.key.as_str()),
            (line, key),
            "{name}: {errors}"
        );
        let text = errors.to_string();
        assert!(
            text.starts_with(&format!("{}:{line}:", path.display())),
            "{name}: {text}"
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
