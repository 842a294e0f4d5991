//! A hostile module: allocates, and writes to, memory until it is refused.

wit_bindgen::generate!({ path: "../../wit", world: "module" });

struct Bomb;

impl Guest for Bomb {
    fn call(_input: Vec<u8>) -> Result<Vec<u8>, CallError> {
        let mut hoard: Vec<Vec<u8>> = Vec::new();
        loop {
            // Touch every page, so nothing is merely reserved.
            hoard.push(vec![0xa5; 1 << 20]);
            std::hint::black_box(&hoard);
        }
    }
}

export!(Bomb);
