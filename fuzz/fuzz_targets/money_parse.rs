//! Amount parsing: `dmpay::kernel::money::parse_minor` and `parse_positive` on any string.
//!
//! Input: byte 0 picks the currency (mod 15) and whether negatives are allowed (bit 7);
//! the rest is the amount text (UTF-8, else ignored). Oracles: no panic; the result
//! agrees with an independent reference parser (plain `DIGITS[.DIGITS]`, at most the
//! currency's fraction digits, |minor| <= AMOUNT_MINOR_MAX); an accepted amount formats
//! back and re-parses to the same minor units; `parse_positive` accepts exactly the
//! amounts above zero.
#![no_main]

use dmpay::kernel::money::{parse_minor, parse_positive, Currency, Money, AMOUNT_MINOR_MAX};
use libfuzzer_sys::fuzz_target;

/// What the strict grammar says `raw` is worth, in minor units, or None if refused.
fn reference(raw: &str, exponent: u32, allow_negative: bool) -> Option<i64> {
    if raw.is_empty() || raw.len() > 40 {
        return None;
    }
    let (negative, digits) = match raw.strip_prefix('-') {
        Some(rest) if allow_negative => (true, rest),
        Some(_) => return None,
        None => (false, raw),
    };
    let (int_part, frac_part) = match digits.split_once('.') {
        Some((i, f)) => (i, Some(f)),
        None => (digits, None),
    };
    let all_digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !all_digits(int_part) || frac_part.is_some_and(|f| !all_digits(f)) {
        return None;
    }
    let frac = frac_part.unwrap_or("");
    if frac.len() as u32 > exponent {
        return None;
    }
    let mut value: i128 = 0;
    for b in int_part.bytes().chain(frac.bytes()) {
        value = value.checked_mul(10)?.checked_add(i128::from(b - b'0'))?;
    }
    for _ in frac.len() as u32..exponent {
        value = value.checked_mul(10)?;
    }
    if value > i128::from(AMOUNT_MINOR_MAX) {
        return None;
    }
    let value = i64::try_from(value).ok()?;
    Some(if negative { -value } else { value })
}

fuzz_target!(|data: &[u8]| {
    let Some((&sel, rest)) = data.split_first() else { return };
    let Ok(raw) = std::str::from_utf8(rest) else { return };
    let Some(currency) = Currency::all().nth(usize::from(sel & 0x7f) % 15) else { return };
    let allow_negative = sel & 0x80 != 0;

    let got = parse_minor("amount", raw, currency, allow_negative);
    let want = reference(raw, currency.exponent(), allow_negative);
    match (&got, want) {
        (Ok(minor), Some(expected)) => assert_eq!(*minor, expected, "{raw:?} in {currency}"),
        (Err(_), None) => {}
        (got, want) => panic!("{raw:?} in {currency} (negatives {allow_negative}): got {got:?}, want {want:?}"),
    }
    if let Ok(minor) = got {
        assert!(minor.unsigned_abs() <= AMOUNT_MINOR_MAX as u64, "{raw:?} -> {minor} is beyond the maximum");
        assert!(allow_negative || minor >= 0, "{raw:?} -> {minor} is negative");
        let text = Money::from_minor(currency, minor).amount_string();
        let again = parse_minor("amount", &text, currency, true);
        assert_eq!(again.ok(), Some(minor), "{raw:?} -> {minor} -> {text:?} does not round-trip");
    }

    match parse_positive("amount", raw, currency) {
        Ok(money) => {
            assert!(money.minor() > 0, "{raw:?} accepted as a positive amount: {money:?}");
            assert_eq!(money.currency(), currency);
            assert_eq!(Some(money.minor()), reference(raw, currency.exponent(), false));
        }
        Err(_) => assert!(reference(raw, currency.exponent(), false).is_none_or(|m| m == 0), "{raw:?} refused"),
    }
});
