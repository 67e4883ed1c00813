//! The admin token: the secret a change through the admin API must present
//! (`Authorization: Bearer TOKEN`) when `[admin] token_file` is set. udplb reads it at start,
//! before it drops privileges; `udplb ctl` reads it from `--token-file`.
//!
//! Owns: what a token file may be (a regular file others cannot read, one line of at least
//! [`MIN_LEN`] visible ASCII characters) and the comparison, in constant time. Must not: log or
//! print a token.

use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// Fewest characters in a token.
pub const MIN_LEN: usize = 16;
/// Largest token file read.
const MAX_FILE: u64 = 4096;

/// A token, never shown.
pub struct Token(Vec<u8>);

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(..)")
    }
}

impl Token {
    /// Whether `given` is this token. Takes the same time whatever bytes `given` has in common
    /// with it (only their lengths show).
    pub fn matches(&self, given: &[u8]) -> bool {
        let mut diff = self.0.len() ^ given.len();
        for i in 0..self.0.len().max(given.len()) {
            let (a, b) = (
                self.0.get(i).copied().unwrap_or(0),
                given.get(i).copied().unwrap_or(0),
            );
            diff |= usize::from(a ^ b);
        }
        std::hint::black_box(diff) == 0
    }

    /// The secret itself (a key to authenticate with: `[sync] key_file`).
    pub fn secret(&self) -> &[u8] {
        &self.0
    }

    /// The value of an `Authorization` header carrying it.
    pub fn header(&self) -> String {
        format!("Bearer {}", String::from_utf8_lossy(&self.0))
    }
}

/// The token of an `Authorization` header value: `Bearer TOKEN`, the scheme in any case.
pub fn bearer(value: &[u8]) -> Option<&[u8]> {
    let space = value.iter().position(|&b| b == b' ')?;
    let (scheme, rest) = value.split_at(space);
    scheme
        .eq_ignore_ascii_case(b"bearer")
        .then(|| rest.trim_ascii())
}

/// Reads the token in `path`: a regular file (a link to one is followed) that other users
/// cannot read, holding one token of at least [`MIN_LEN`] visible ASCII characters (surrounding
/// white space, such as the final newline, is ignored). `Err` says what is wrong.
pub fn read(path: &Path) -> Result<Token, String> {
    read_secret(path, "token")
}

/// Reads a key (`[sync] key_file`) as [`read`] reads a token; errors say "key".
pub fn read_key(path: &Path) -> Result<Token, String> {
    read_secret(path, "key")
}

/// [`read`], naming what the file holds `what` in its errors.
fn read_secret(path: &Path, what: &str) -> Result<Token, String> {
    let meta = std::fs::metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
    if !meta.is_file() {
        return Err(format!("{} is not a regular file", path.display()));
    }
    if meta.mode() & 0o004 != 0 {
        return Err(format!(
            "{} is readable by every user (mode {:04o}): the {what} would be no secret \
             (chmod o-r, and let only udplb's user or group read it)",
            path.display(),
            meta.mode() & 0o7777
        ));
    }
    if meta.len() > MAX_FILE {
        return Err(format!(
            "{} is larger than {MAX_FILE} bytes: a {what} file holds one {what}",
            path.display()
        ));
    }
    let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let token = bytes.trim_ascii();
    if let Some(&bad) = token.iter().find(|b| !b.is_ascii_graphic()) {
        return Err(format!(
            "{} holds more than one {what}, or a character that is not visible ASCII (byte \
             {bad:#04x})",
            path.display()
        ));
    }
    if token.len() < MIN_LEN {
        return Err(format!(
            "{} holds a {what} of {} characters; at least {MIN_LEN} are needed (e.g. \
             `head -c 32 /dev/urandom | base64 > FILE`)",
            path.display(),
            token.len()
        ));
    }
    Ok(Token(token.to_vec()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_token_matches_only_itself() {
        let t = Token(b"0123456789abcdef".to_vec());
        assert!(t.matches(b"0123456789abcdef"));
        for other in [
            &b"0123456789abcdeF"[..],
            b"0123456789abcde",
            b"0123456789abcdef0",
            b"",
            b"1123456789abcdef",
        ] {
            assert!(!t.matches(other), "{other:?}");
        }
        assert_eq!(format!("{t:?}"), "Token(..)");
    }

    #[test]
    fn the_bearer_scheme_is_read_in_any_case() {
        assert_eq!(bearer(b"Bearer abc"), Some(&b"abc"[..]));
        assert_eq!(bearer(b"bearer  abc "), Some(&b"abc"[..]));
        assert_eq!(bearer(b"Basic abc"), None);
        assert_eq!(bearer(b"abc"), None);
    }

    #[test]
    fn token_files_must_be_private_and_hold_one_long_token() {
        let dir = std::env::temp_dir().join(format!("udplb-token-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let file = |name: &str, text: &str, mode: u32| {
            let path = dir.join(name);
            std::fs::write(&path, text).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
            path
        };
        let good = file("good", "0123456789abcdef\n", 0o640);
        assert!(read(&good).unwrap().matches(b"0123456789abcdef"));
        let error = |path: &Path| read(path).err().unwrap_or_default();
        assert!(
            error(&file("open", "0123456789abcdef\n", 0o644))
                .contains("readable by every user (mode 0644)")
        );
        assert!(error(&file("short", "secret\n", 0o600)).contains("at least 16"));
        assert!(
            error(&file("two", "0123456789abcdef 0123456789abcdef\n", 0o600))
                .contains("more than one token")
        );
        assert!(error(&dir).contains("not a regular file"));
        assert!(error(&dir.join("absent")).contains("No such file"));
        // A sync key file is read the same way, and its errors say "key".
        let key_error = read_key(&file("key", "secret\n", 0o600))
            .err()
            .unwrap_or_default();
        assert!(
            key_error.contains("holds a key of 6 characters"),
            "{key_error}"
        );
        assert!(read_key(&good).is_ok());
        let _ = std::fs::remove_dir_all(dir);
    }
}
