fn main() -> std::process::ExitCode {
    wasmrpc::cli::main()
}
