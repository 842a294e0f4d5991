//! The bundled compute module: the n-th Fibonacci number, exactly.
//!
//! The input is n as decimal text (surrounding ASCII whitespace is ignored, so
//! `echo 30 |` works); the output is F(n) as decimal text. Arbitrary precision
//! keeps every answer exact; the cap on n keeps every answer fast (F(100000)
//! has 20,899 digits and takes a few milliseconds).

use num_bigint::BigUint;

wit_bindgen::generate!({ path: "../../wit", world: "module" });

/// The largest n this module accepts.
pub const MAX_N: u32 = 100_000;

struct Fib;

impl Guest for Fib {
    fn call(input: Vec<u8>) -> Result<Vec<u8>, CallError> {
        let n = parse(&input).map_err(CallError::InvalidInput)?;
        Ok(fib(n).to_string().into_bytes())
    }
}

export!(Fib);

/// Reads n, or says in one line why the input is not an acceptable n.
fn parse(input: &[u8]) -> Result<u32, String> {
    let text = std::str::from_utf8(input)
        .map_err(|_| "expected n as decimal text, got bytes that are not UTF-8".to_string())?
        .trim_ascii();
    if text.is_empty() {
        return Err("expected n as decimal text, got an empty body".into());
    }
    if !text.bytes().all(|b| b.is_ascii_digit()) {
        let shown: String = text.chars().take(40).collect();
        return Err(match text.strip_prefix('-') {
            Some(rest) if !rest.is_empty() && rest.bytes().all(|b| b.is_ascii_digit()) => {
                format!("n must not be negative, got {shown:?}")
            }
            _ => format!("expected n as a non-negative whole number, got {shown:?}"),
        });
    }
    match text.parse::<u32>() {
        Ok(n) if n <= MAX_N => Ok(n),
        // Only overflow is left: the text is all digits and not empty.
        _ => Err(format!("n must be at most {MAX_N}, got {text}")),
    }
}

/// F(n) by fast doubling: F(2k) = F(k)(2F(k+1) - F(k)), F(2k+1) = F(k)² + F(k+1)².
/// O(log n) big multiplications instead of n big additions.
fn fib(n: u32) -> BigUint {
    let mut a = BigUint::ZERO; // F(k)
    let mut b = BigUint::from(1u32); // F(k+1)
    for bit in (0..u32::BITS - n.leading_zeros()).rev() {
        let d = &a * ((&b << 1usize) - &a); // F(2k)
        let e = &a * &a + &b * &b; // F(2k+1)
        if n >> bit & 1 == 0 {
            (a, b) = (d, e);
        } else {
            b = &d + &e;
            a = e;
        }
    }
    a
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fast_doubling_agrees_with_the_definition() {
        let (mut a, mut b) = (BigUint::ZERO, BigUint::from(1u32));
        for n in 0..=1000 {
            assert_eq!(fib(n), a, "F({n})");
            (a, b) = (b.clone(), a + b);
        }
    }

    #[test]
    fn parse_accepts_decimal_text_with_surrounding_whitespace() {
        assert_eq!(parse(b"30"), Ok(30));
        assert_eq!(parse(b" 7\n"), Ok(7));
        assert_eq!(parse(b"100000"), Ok(MAX_N));
    }

    #[test]
    fn parse_refuses_what_is_not_an_acceptable_n() {
        for bad in [
            &b""[..],
            b"  ",
            b"abc",
            b"-1",
            b"1.5",
            b"+5",
            b"1e3",
            b"100001",
            b"99999999999",
            b"\xff",
        ] {
            assert!(
                parse(bad).is_err(),
                "{:?} should be refused",
                String::from_utf8_lossy(bad)
            );
        }
        assert!(parse(b"-1").unwrap_err().contains("negative"));
        assert!(parse(b"100001").unwrap_err().contains("at most 100000"));
    }
}
