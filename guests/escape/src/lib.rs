//! A hostile module: tries to reach outside its sandbox (files, directories,
//! sockets, environment, arguments, stdin) and reports, one line each, what
//! it got. Every line should be a refusal or an emptiness.

use std::io::Read as _;

wit_bindgen::generate!({ path: "../../wit", world: "module" });

struct Escape;

fn attempt<T, E: std::fmt::Display>(
    what: &str,
    result: Result<T, E>,
    shown: impl FnOnce(T) -> String,
) -> String {
    match result {
        Ok(value) => format!("{what}: GRANTED {}", shown(value)),
        Err(error) => format!("{what}: refused ({error})"),
    }
}

impl Guest for Escape {
    fn call(_input: Vec<u8>) -> Result<Vec<u8>, CallError> {
        let mut stdin = Vec::new();
        let lines = [
            attempt(
                "read /etc/passwd",
                std::fs::read_to_string("/etc/passwd"),
                |text| format!("{} bytes", text.len()),
            ),
            attempt("list /", std::fs::read_dir("/"), |dir| {
                format!("{} entries", dir.count())
            }),
            attempt("list .", std::fs::read_dir("."), |dir| {
                format!("{} entries", dir.count())
            }),
            attempt(
                "create /tmp/escaped",
                std::fs::write("/tmp/escaped", b"out"),
                |()| String::new(),
            ),
            attempt(
                "connect 127.0.0.1:5672",
                std::net::TcpStream::connect("127.0.0.1:5672"),
                |_| String::new(),
            ),
            attempt(
                "bind 0.0.0.0:0",
                std::net::TcpListener::bind("0.0.0.0:0"),
                |_| String::new(),
            ),
            attempt(
                "udp bind 0.0.0.0:0",
                std::net::UdpSocket::bind("0.0.0.0:0"),
                |_| String::new(),
            ),
            attempt(
                "resolve localhost",
                std::net::ToSocketAddrs::to_socket_addrs("localhost:80"),
                |addrs| format!("{:?}", addrs.collect::<Vec<_>>()),
            ),
            attempt("read HOME", std::env::var("HOME"), |home| home),
            format!("environment: {} variables", std::env::vars_os().count()),
            format!("arguments: {}", std::env::args_os().count()),
            match std::io::stdin().read_to_end(&mut stdin) {
                Ok(n) => format!("stdin: {n} bytes"),
                Err(error) => format!("stdin: refused ({error})"),
            },
        ];
        Ok(lines.join("\n").into_bytes())
    }
}

export!(Escape);
