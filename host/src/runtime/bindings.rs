//! The host's bindings of the wasmrpc world (`wit/wasmrpc.wit`): the
//! `fleet-module` world, which is the `module` world and the `fleet` import,
//! so that one linker serves modules with and without it.

wasmtime::component::bindgen!({
    path: "../wit",
    world: "fleet-module",
    imports: { default: async },
    exports: { default: async },
});
