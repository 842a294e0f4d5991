//! A hostile module: recurses without end, until the wasm stack runs out.

wit_bindgen::generate!({ path: "../../wit", world: "module" });

struct Recurse;

/// Two calls per level, so no optimisation can turn the recursion into a
/// loop; the first call descends without bound before the second is reached.
/// The base case is one the optimiser cannot rule out, and never comes.
#[inline(never)]
fn descend(depth: u64) -> u64 {
    if depth == std::hint::black_box(u64::MAX) {
        return 0;
    }
    descend(depth + 1).wrapping_mul(31) ^ descend(depth + 2)
}

impl Guest for Recurse {
    fn call(input: Vec<u8>) -> Result<Vec<u8>, CallError> {
        Ok(descend(input.len() as u64).to_le_bytes().to_vec())
    }
}

export!(Recurse);
