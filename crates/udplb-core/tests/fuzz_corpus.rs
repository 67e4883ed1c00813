//! Replays the committed seed corpora of the fuzz targets (`fuzz/corpus/`) through the same
//! entry points `cargo fuzz` uses, so every finding kept there stays fixed.

use std::path::PathBuf;

fn corpus(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../fuzz/corpus")
        .join(target);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "{} is empty", dir.display());
    files
        .into_iter()
        .map(|p| {
            let data = std::fs::read(&p).unwrap();
            (p, data)
        })
        .collect()
}

#[test]
fn flow_table_corpus() {
    for (path, data) in corpus("flow_table") {
        eprintln!("{}", path.display());
        udplb_core::fuzzing::flow_table(&data);
    }
}

#[test]
fn proxy_corpus() {
    for (path, data) in corpus("proxy") {
        eprintln!("{}", path.display());
        udplb_core::fuzzing::proxy(&data);
    }
}

#[test]
fn payload_corpus() {
    for (path, data) in corpus("payload") {
        eprintln!("{}", path.display());
        udplb_core::fuzzing::payload(&data);
    }
}
