//! The guests, built from `guests/` for wasm32-wasip2 once per test process.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// The repository's root.
pub fn repo() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

/// The freshly built `NAME.wasm` of the guest crate `guests/NAME`.
pub fn wasm(name: &str) -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    let dir = BUILT.get_or_init(build);
    let path = dir.join(format!("{name}.wasm"));
    assert!(
        path.is_file(),
        "no guest named {name:?}: {} does not exist",
        path.display()
    );
    path
}

/// Builds every guest. A no-op, apart from cargo's own check, when
/// `scripts/test` has built them already.
fn build() -> PathBuf {
    let guests = repo().join("guests");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(cargo)
        .args(["build", "--release", "--target", "wasm32-wasip2"])
        .current_dir(&guests)
        // Flags meant for the host build must not leak into the guests'.
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("CARGO_BUILD_TARGET")
        .status()
        .expect("failed to run cargo to build the guests");
    assert!(
        status.success(),
        "building guests/ failed; is the wasm32-wasip2 target installed? (rustup target add wasm32-wasip2)"
    );
    guests.join("target/wasm32-wasip2/release")
}
