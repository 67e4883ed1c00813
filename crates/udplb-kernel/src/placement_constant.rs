// Shared by build.rs (which hands the constants to the eBPF program) and the crate.

/// The first 56 bytes of xxh3's default secret (the part short inputs read).
const SECRET: [u8; 56] = [
    0xb8, 0xfe, 0x6c, 0x39, 0x23, 0xa4, 0x4b, 0xbe, 0x7c, 0x01, 0x81, 0x2c, 0xf7, 0x21, 0xad, 0x1c,
    0xde, 0xd4, 0x6d, 0xe9, 0x83, 0x90, 0x97, 0xdb, 0x72, 0x40, 0xa4, 0xa4, 0xb7, 0xb3, 0x67, 0x1f,
    0xcb, 0x79, 0xe6, 0x4e, 0xcc, 0xc0, 0xe5, 0x78, 0x82, 0x5a, 0xd0, 0x7d, 0xcc, 0xff, 0x72, 0x21,
    0xb8, 0x08, 0x46, 0x74, 0xf7, 0x43, 0x24, 0x8e,
];

/// Bytes `at..at + 8` of the secret, read little-endian.
const fn secret(at: usize) -> u64 {
    let mut v = 0u64;
    let mut i = 0;
    while i < 8 {
        v |= (SECRET[at + i] as u64) << (8 * i);
        i += 1;
    }
    v
}

/// The constant xxh3-64 folds into inputs of 4 to 8 bytes hashed with `seed`.
pub const fn bitflip(seed: u64) -> u64 {
    let seed = seed ^ (((seed as u32).swap_bytes() as u64) << 32);
    (secret(8) ^ secret(16)).wrapping_sub(seed)
}

/// The two constants xxh3-64 folds into inputs of 9 to 16 bytes hashed with `seed` (an IPv6
/// address): the first 8 bytes, the last 8.
pub const fn flips_9to16(seed: u64) -> [u64; 2] {
    [
        (secret(24) ^ secret(32)).wrapping_add(seed),
        (secret(40) ^ secret(48)).wrapping_sub(seed),
    ]
}

/// The four constants xxh3-64 folds into inputs of 17 to 32 bytes hashed with `seed` (an IPv6
/// address and a port): its first 16 bytes, then its last 16, 8 at a time.
pub const fn mixes_17to32(seed: u64) -> [u64; 4] {
    [
        secret(0).wrapping_add(seed),
        secret(8).wrapping_sub(seed),
        secret(16).wrapping_add(seed),
        secret(24).wrapping_sub(seed),
    ]
}
