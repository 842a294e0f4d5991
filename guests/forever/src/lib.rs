//! A hostile module: never returns. Only the node's time limit stops it.

wit_bindgen::generate!({ path: "../../wit", world: "module" });

struct Forever;

impl Guest for Forever {
    fn call(_input: Vec<u8>) -> Result<Vec<u8>, CallError> {
        let mut spins = 0u64;
        loop {
            spins = std::hint::black_box(spins.wrapping_add(1));
        }
    }
}

export!(Forever);
