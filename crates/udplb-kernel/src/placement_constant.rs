// Shared by build.rs (which hands the constant to the eBPF program) and the crate.

/// Bytes 8..16 and 16..24 of xxh3's default secret, read little-endian.
const SECRET_8: u64 = 0x1cad_21f7_2c81_017c;
const SECRET_16: u64 = 0xdb97_9083_e96d_d4de;

/// The constant xxh3-64 folds into inputs of 4 to 8 bytes hashed with `seed`.
pub const fn bitflip(seed: u64) -> u64 {
    let seed = seed ^ (((seed as u32).swap_bytes() as u64) << 32);
    (SECRET_8 ^ SECRET_16).wrapping_sub(seed)
}
