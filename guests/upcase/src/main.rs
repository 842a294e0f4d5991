//! A plain WASI program, for the tests: the request body comes on stdin and
//! the reply goes to stdout. It upper-cases its input, unless the input is
//! one of these commands:
//!
//! - `exit N TEXT`: writes TEXT to stderr and exits with status N;
//! - `spin`: computes forever;
//! - `alloc N`: allocates and touches N MiB;
//! - `big N`: writes N bytes of `x`;
//! - `probe`: reports what of the world it can see (arguments, environment,
//!   the root directory).

use std::io::{Read as _, Write as _};

fn main() {
    let mut input = String::new();
    if let Err(error) = std::io::stdin().read_to_string(&mut input) {
        eprintln!("stdin is not UTF-8 text: {error}");
        std::process::exit(2);
    }
    let mut words = input.trim().splitn(3, ' ');
    let command = words.next().unwrap_or_default();
    let number = || -> usize {
        words
            .clone()
            .next()
            .and_then(|word| word.parse().ok())
            .unwrap_or(0)
    };
    let mut stdout = std::io::stdout().lock();
    match command {
        "exit" => {
            let status = number() as i32;
            let text = input.trim().splitn(3, ' ').nth(2).unwrap_or_default();
            eprintln!("{text}");
            std::process::exit(status);
        }
        "spin" => {
            let mut spins = 0u64;
            loop {
                spins = std::hint::black_box(spins.wrapping_add(1));
            }
        }
        "alloc" => {
            let memory = vec![1u8; number() << 20];
            write!(
                stdout,
                "{}",
                memory.iter().map(|&b| b as usize).sum::<usize>()
            )
            .unwrap();
        }
        "big" => {
            let chunk = [b'x'; 4096];
            let mut left = number();
            while left > 0 {
                let n = left.min(chunk.len());
                stdout.write_all(&chunk[..n]).unwrap();
                left -= n;
            }
        }
        "probe" => {
            let root = match std::fs::read_dir("/") {
                Ok(_) => "GRANTED",
                Err(_) => "refused",
            };
            write!(
                stdout,
                "args={} env={} root={root}",
                std::env::args().count(),
                std::env::vars().count()
            )
            .unwrap();
        }
        _ => stdout.write_all(input.to_uppercase().as_bytes()).unwrap(),
    }
}
