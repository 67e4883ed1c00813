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

/// The `(file)` error of loading `path`, on another thread so that a load that blocks fails
/// the test instead of hanging it.
fn file_error(path: &std::path::Path) -> String {
    let (tx, rx) = std::sync::mpsc::channel();
    let path = path.to_path_buf();
    std::thread::spawn(move || {
        let _ = tx.send(udplb_config::load(&path).map(|_| ()));
    });
    match rx.recv_timeout(std::time::Duration::from_secs(5)) {
        Ok(Err(errors)) => errors.to_string(),
        Ok(Ok(())) => panic!("loaded"),
        Err(_) => panic!("load blocked for 5 s"),
    }
}

/// Only regular files are read: a FIFO (which would block the reader until someone writes to
/// it), a device, a directory are refused before they are opened, saying what they are; a file
/// over 16 MiB is refused without being read.
#[test]
fn only_regular_files_of_bounded_size_are_read() {
    let dir = std::env::temp_dir().join(format!("udplb-config-kinds-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let fifo = dir.join("fifo.toml");
    assert!(
        std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap()
            .success()
    );
    let error = file_error(&fifo);
    assert!(
        error.contains("(file): cannot read: it is a FIFO (named pipe), not a regular file"),
        "{error}"
    );
    let error = file_error(std::path::Path::new("/dev/null"));
    assert!(error.contains("it is a character device"), "{error}");
    let error = file_error(&dir);
    assert!(error.contains("it is a directory"), "{error}");
    let big = dir.join("big.toml");
    let f = std::fs::File::create(&big).unwrap();
    f.set_len(udplb_config::MAX_FILE_SIZE + 1).unwrap(); // sparse: nothing written
    let error = file_error(&big);
    assert!(
        error.contains("16777217 bytes, larger than the 16 MiB"),
        "{error}"
    );
    let latin1 = dir.join("latin1.toml");
    std::fs::write(&latin1, b"# caf\xe9\n").unwrap();
    let error = file_error(&latin1);
    assert!(error.contains("not UTF-8 text"), "{error}");
    // A symbolic link to a regular file is followed.
    let real = manifest().join("../../examples/udplb.toml");
    let link = dir.join("link.toml");
    std::os::unix::fs::symlink(&real, &link).unwrap();
    assert!(udplb_config::load(&link).is_ok());
    let _ = std::fs::remove_dir_all(dir);
}
