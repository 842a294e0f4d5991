//! Module names: the one identifier a module has on disk, on the wire and in
//! the broker's topology.
//!
//! A name is the stem of the module's file (`fib` for `modules/fib.wasm`), the
//! routing key callers publish with, and part of its queue's name. The rules
//! keep it all three at once without escaping.

use std::fmt;
use std::str::FromStr;

/// A validated module name: 1 to [`ModuleName::MAX_LEN`] characters, each a
/// lowercase ASCII letter, a digit, `-` or `_`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ModuleName(String);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "{0:?} is not a valid module name: use 1 to {max} lowercase letters, digits, '-' or '_'",
    max = ModuleName::MAX_LEN
)]
pub struct InvalidModuleName(pub String);

impl ModuleName {
    pub const MAX_LEN: usize = 64;

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for ModuleName {
    type Err = InvalidModuleName;

    fn from_str(name: &str) -> Result<Self, Self::Err> {
        let valid = (1..=Self::MAX_LEN).contains(&name.len())
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
        if valid {
            Ok(ModuleName(name.to_owned()))
        } else {
            Err(InvalidModuleName(name.to_owned()))
        }
    }
}

impl fmt::Display for ModuleName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_lowercase_letters_digits_dashes_and_underscores() {
        for name in [
            "fib",
            "a",
            "sha-256",
            "image_resize",
            "7zip",
            &"x".repeat(64),
        ] {
            assert_eq!(name.parse::<ModuleName>().unwrap().as_str(), name);
        }
    }

    #[test]
    fn refuses_anything_else() {
        for name in [
            "",
            "Fib",
            "fib.v2",
            "a b",
            "fib/x",
            "é",
            "#",
            "*",
            &"x".repeat(65),
        ] {
            assert_eq!(
                name.parse::<ModuleName>(),
                Err(InvalidModuleName(name.into()))
            );
        }
    }
}
