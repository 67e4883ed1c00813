//! Compiles the eBPF program (bpf/udplb.bpf.c) with clang. Without clang (or when it fails)
//! udplb still builds: the kernel data plane then says it is unavailable.

use std::path::{Path, PathBuf};
use std::process::Command;

include!("src/placement_constant.rs");

fn main() {
    println!("cargo:rustc-check-cfg=cfg(udplb_bpf)");
    println!("cargo:rerun-if-changed=bpf/udplb.bpf.c");
    println!("cargo:rerun-if-changed=bpf/decap.bpf.c");
    println!("cargo:rerun-if-changed=bpf/ipv6.h");
    println!("cargo:rerun-if-changed=src/placement_constant.rs");
    println!("cargo:rerun-if-env-changed=UDPLB_CLANG");
    let dir = PathBuf::from(std::env::var_os("OUT_DIR").expect("OUT_DIR"));
    let clang = std::env::var("UDPLB_CLANG").unwrap_or_else(|_| "clang".into());
    // Two builds: the flow map pinned (kept for the next udplb process), and not (no bpf file
    // system to pin it on).
    // And the backends' side of direct server return (`udplb decap`).
    let built = compile(&clang, "bpf/udplb.bpf.c", &dir.join("udplb.bpf.o"), &[])
        && compile(
            &clang,
            "bpf/udplb.bpf.c",
            &dir.join("udplb-pinned.bpf.o"),
            &["-DUDPLB_PIN"],
        )
        && compile(&clang, "bpf/decap.bpf.c", &dir.join("decap.bpf.o"), &[]);
    if built {
        println!("cargo:rustc-cfg=udplb_bpf");
    }
}

/// Compiles the program `source` into `out` with `defines`; says why not as a build warning.
fn compile(clang: &str, source: &str, out: &Path, defines: &[&str]) -> bool {
    let mut cmd = Command::new(clang);
    // v3: atomic compare-and-swap (the rate limits' cells; Linux 5.12 and later).
    cmd.args(["-O2", "-g", "-Wall", "-target", "bpf", "-mcpu=v3"])
        .args(placement_defines(udplb_core::hash::PLACEMENT_SEED))
        .args(defines);
    // The flow tables' readers rely on x86's ordering of loads (bpf/udplb.bpf.c, read_word).
    if std::env::var("CARGO_CFG_TARGET_ARCH").as_deref() == Ok("x86_64") {
        cmd.arg("-DUDPLB_TSO");
    }
    if let Some(dir) = multiarch_include() {
        cmd.arg(format!("-I{dir}"));
    }
    cmd.arg("-c").arg(source).arg("-o").arg(out);
    match cmd.output() {
        Ok(o) if o.status.success() => true,
        Ok(o) => {
            println!(
                "cargo:warning=the kernel data plane is not built: {clang} failed: {}",
                String::from_utf8_lossy(&o.stderr)
                    .lines()
                    .next()
                    .unwrap_or("")
            );
            false
        }
        Err(e) => {
            println!(
                "cargo:warning=the kernel data plane is not built: {clang}: {e} (Debian: apt install clang libbpf-dev)"
            );
            false
        }
    }
}

/// The placement hash's constants for `seed`, as the program's macros.
fn placement_defines(seed: u64) -> Vec<String> {
    let [flip1, flip2] = flips_9to16(seed);
    let [mix0, mix1, mix2, mix3] = mixes_17to32(seed);
    [
        ("UDPLB_BITFLIP", bitflip(seed)),
        ("UDPLB_FLIP1", flip1),
        ("UDPLB_FLIP2", flip2),
        ("UDPLB_MIX0", mix0),
        ("UDPLB_MIX1", mix1),
        ("UDPLB_MIX2", mix2),
        ("UDPLB_MIX3", mix3),
    ]
    .iter()
    .map(|(name, v)| format!("-D{name}={v:#x}ULL"))
    .collect()
}

/// Where <asm/types.h> is on Debian (/usr/include/x86_64-linux-gnu).
fn multiarch_include() -> Option<String> {
    let o = Command::new("cc").arg("-print-multiarch").output().ok()?;
    let arch = String::from_utf8(o.stdout).ok()?;
    let dir = format!("/usr/include/{}", arch.trim());
    Path::new(&dir).is_dir().then_some(dir)
}
