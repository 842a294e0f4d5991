//! A hostile module: answers with as many bytes as its input asks for
//! (decimal text), to overflow the reply limit.

wit_bindgen::generate!({ path: "../../wit", world: "module" });

struct Flood;

impl Guest for Flood {
    fn call(input: Vec<u8>) -> Result<Vec<u8>, CallError> {
        let size: usize = std::str::from_utf8(&input)
            .ok()
            .and_then(|text| text.trim().parse().ok())
            .ok_or_else(|| CallError::InvalidInput("expected a number of bytes".into()))?;
        Ok(vec![b'x'; size])
    }
}

export!(Flood);
