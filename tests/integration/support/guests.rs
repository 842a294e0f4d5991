//! The guests, built from `guests/` for wasm32-wasip2 once per test process
//! (and for the benchmarks, which include this file).

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
    build_for("wasm32-wasip2").unwrap_or_else(|error| panic!("{error}"))
}

/// Builds every guest for `target` and returns where the `.wasm` files are.
/// The benchmarks share this file (`#[path]`), hence a `Result`.
pub fn build_for(target: &str) -> Result<PathBuf, String> {
    build_packages(target, &[])
}

/// Builds `packages` of the guests (all of them if none) for `target`.
fn build_packages(target: &str, packages: &[&str]) -> Result<PathBuf, String> {
    let guests = repo().join("guests");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(cargo)
        .args(["build", "--quiet", "--release", "--target", target])
        .args(packages.iter().flat_map(|package| ["--package", package]))
        .current_dir(&guests)
        // Flags meant for the host build must not leak into the guests'.
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("CARGO_BUILD_TARGET")
        .status()
        .map_err(|error| format!("failed to run cargo to build the guests: {error}"))?;
    if !status.success() {
        return Err(format!(
            "building guests/ for {target} failed; is the target installed? (rustup target add {target})"
        ));
    }
    Ok(guests.join(format!("target/{target}/release")))
}

/// The same module, as another build: a custom section changes its bytes
/// (and so its version) but not what it does.
pub fn variant(wasm: &[u8], tag: &str) -> Vec<u8> {
    fn leb128(mut n: usize, out: &mut Vec<u8>) {
        loop {
            let byte = (n & 0x7f) as u8;
            n >>= 7;
            out.push(if n == 0 { byte } else { byte | 0x80 });
            if n == 0 {
                return;
            }
        }
    }
    let name = b"wasmrpc-test";
    let mut payload = Vec::new();
    leb128(name.len(), &mut payload);
    payload.extend_from_slice(name);
    payload.extend_from_slice(tag.as_bytes());
    let mut out = wasm.to_vec();
    out.push(0); // a custom section
    leb128(payload.len(), &mut out);
    out.extend_from_slice(&payload);
    out
}

/// The guest program `guests/NAME` (only `upcase`) built for WASI preview 1: a core module,
/// as C with wasi-libc, Zig or TinyGo would make.
pub fn preview1(name: &str) -> PathBuf {
    static BUILT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let dir = BUILT
        .get_or_init(|| build_packages("wasm32-wasip1", &["upcase"]))
        .as_ref()
        .unwrap_or_else(|error| panic!("{error}"));
    dir.join(format!("{name}.wasm"))
}

/// The guest `NAME` written in another language (`pyfib`, `jsstats`,
/// `cfib`), built by `guests/build-lang` if it is not yet; panics with the
/// build's message (which toolchain is missing) if it cannot be.
pub fn lang(name: &str) -> PathBuf {
    let language = match name {
        "pyfib" | "pysumfib" => "python",
        "jsstats" => "js",
        "cfib" => "c",
        other => panic!("no guest named {other:?} in another language"),
    };
    let path = repo().join(format!("guests/target/lang/{name}.wasm"));
    static BUILDING: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one_at_a_time = BUILDING
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if !path.is_file() {
        let output = Command::new(repo().join("guests/build-lang"))
            .arg(language)
            .output()
            .expect("failed to run guests/build-lang");
        assert!(
            output.status.success(),
            "guests/build-lang {language} failed (scripts/test installs every toolchain):\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    path
}
