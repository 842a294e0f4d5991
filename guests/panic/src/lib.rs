//! A hostile module: panics, with a message that names its input.

wit_bindgen::generate!({ path: "../../wit", world: "module" });

struct Panic;

impl Guest for Panic {
    fn call(input: Vec<u8>) -> Result<Vec<u8>, CallError> {
        panic!("the guest gave up on {:?}", String::from_utf8_lossy(&input));
    }
}

export!(Panic);
