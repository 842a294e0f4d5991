//! `modules/fib.wasm` is what `guests/fib` builds to: the two answer alike.

use std::path::Path;

use wasmrpc::runtime::{Limits, Module, Runtime, RuntimeConfig, Wasm};

use crate::support::guests;

async fn answers(module: &Module, input: &[u8]) -> Result<Vec<u8>, String> {
    module
        .call(input, None)
        .await
        .map_err(|error| error.to_string())
}

#[tokio::test(flavor = "multi_thread")]
async fn the_bundled_fib_answers_like_a_fresh_build() {
    let runtime = Runtime::new(&RuntimeConfig::new(2, None)).unwrap();
    let compile = |path: &Path| {
        let wasm = std::fs::read(path)
            .unwrap_or_else(|error| panic!("cannot read {}: {error}", path.display()));
        runtime.compile(&Wasm::new(wasm), &Limits::DEFAULT).unwrap()
    };
    let bundled = compile(&guests::repo().join("modules/fib.wasm"));
    let fresh = compile(&guests::wasm("fib"));

    let inputs = (0..=300)
        .map(|n: u32| n.to_string())
        .chain(["1000", "100000", "abc", "-1", "1.5", "", "100001"].map(String::from));
    for input in inputs {
        let (old, new) = (
            answers(&bundled, input.as_bytes()).await,
            answers(&fresh, input.as_bytes()).await,
        );
        assert_eq!(
            old, new,
            "modules/fib.wasm and a fresh build of guests/fib differ on {input:?}: rebuild it with ./guests/build"
        );
    }
}
