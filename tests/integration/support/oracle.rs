//! Independent ways to know what fib(n) is, to check the module against.

/// F(n) in decimal, by schoolbook addition of decimal digit strings: slow,
/// but shares nothing with the module's fast doubling over num-bigint.
pub fn fib_decimal(n: u32) -> String {
    // Little-endian decimal digits.
    let (mut a, mut b) = (vec![0u8], vec![1u8]);
    for _ in 0..n {
        let mut sum = Vec::with_capacity(b.len() + 1);
        let mut carry = 0;
        for i in 0..b.len().max(a.len()) {
            let digit = a.get(i).copied().unwrap_or(0) + b.get(i).copied().unwrap_or(0) + carry;
            sum.push(digit % 10);
            carry = digit / 10;
        }
        if carry > 0 {
            sum.push(carry);
        }
        a = std::mem::replace(&mut b, sum);
    }
    a.iter()
        .rev()
        .map(|digit| char::from(b'0' + digit))
        .collect()
}

/// F(n) mod 10^18: the last 18 digits, for n too large to add out in full.
pub fn fib_last_digits(n: u32) -> u64 {
    const MODULUS: u64 = 1_000_000_000_000_000_000;
    let (mut a, mut b) = (0u64, 1u64);
    for _ in 0..n {
        (a, b) = (b, (a + b) % MODULUS);
    }
    a
}

/// The number of decimal digits of F(n), from F(n) ≈ φⁿ/√5 (n ≥ 2).
pub fn fib_digit_count(n: u32) -> usize {
    let phi = (1.0 + 5f64.sqrt()) / 2.0;
    (f64::from(n) * phi.log10() - 5f64.sqrt().log10()).floor() as usize + 1
}
