//! Replays the committed seed corpus of the `config` fuzz target (`fuzz/corpus/config`): every
//! file parses to a configuration or to errors that name file, line and key, never a panic.

use std::path::PathBuf;

#[test]
fn config_corpus() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus/config");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    assert!(files.len() >= 5, "{}: too few seeds", dir.display());
    for path in files {
        let Ok(text) = String::from_utf8(std::fs::read(&path).unwrap()) else {
            continue; // the target ignores non-UTF-8 input too
        };
        if let Err(errors) = udplb_config::parse(&text, "fuzz.toml") {
            for e in errors.to_string().lines() {
                assert!(e.starts_with("fuzz.toml:"), "{}: {e}", path.display());
            }
        }
    }
}
