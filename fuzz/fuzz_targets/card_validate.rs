//! Card validation: `dmpay::vault::card::validate` (PAN, expiry, CVC) on any input.
//!
//! Input: UTF-8 text `NUMBER|MONTH|YEAR|CVC` (missing or non-numeric month and year
//! become 0); today is fixed at 2026-06. Oracles: no panic; an accepted card has 12 to
//! 19 digits that pass Luhn, the brand of its BIN, the submitted digits without spaces
//! and dashes, a month 1 to 12, a CVC of the brand's length, and prints masked; an error
//! never echoes the submitted number or CVC. `luhn_valid` and `brand_of` are also called
//! on the raw text: public functions must not panic on any string.
#![no_main]

use dmpay::vault::card::{brand_of, luhn_valid, validate, Brand};
use libfuzzer_sys::fuzz_target;

const TODAY: (u32, u32) = (2026, 6);

fn digit_runs(s: &str) -> impl Iterator<Item = &str> {
    s.split(|c: char| !c.is_ascii_digit()).filter(|r| !r.is_empty())
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let mut fields = text.splitn(4, '|');
    let number = fields.next().unwrap_or("");
    let month: u32 = fields.next().and_then(|s| s.parse().ok()).unwrap_or(0);
    let year: u32 = fields.next().and_then(|s| s.parse().ok()).unwrap_or(0);
    let cvc = fields.next().unwrap_or("");

    let _ = luhn_valid(number);
    let _ = brand_of(number);

    let digits: String = number.chars().filter(|c| *c != ' ' && *c != '-').collect();
    match validate(number, month, year, cvc, TODAY) {
        Ok(card) => {
            let pan = card.pan.expose();
            assert_eq!(pan, digits);
            assert!((12..=19).contains(&pan.len()) && pan.bytes().all(|b| b.is_ascii_digit()), "{pan:?}");
            assert!(luhn_valid(pan), "accepted a PAN that fails Luhn");
            assert_eq!(brand_of(pan), Some(card.brand));
            assert!(card.brand != Brand::Amex || pan.len() == 15);
            assert!((1..=12).contains(&card.exp_month));
            assert!((card.exp_year, card.exp_month) >= TODAY, "accepted an expired card");
            assert!(card.exp_year <= TODAY.0 + 20);
            let want_cvc = if card.brand == Brand::Amex { 4 } else { 3 };
            let c = card.cvc.expose();
            assert!(c.len() == want_cvc && c.bytes().all(|b| b.is_ascii_digit()), "cvc {c:?}");
            assert_eq!(c, cvc.trim());
            for shown in [format!("{card:?}"), card.pan.to_string(), format!("{:?}", card.pan)] {
                assert!(!shown.contains(pan), "the PAN is printed in clear: {shown}");
                assert!(shown.contains(card.pan.last4()));
            }
            assert!(!format!("{card:?}").contains(&format!("\"{c}\"")), "the CVC is printed");
        }
        Err(e) => {
            // Messages hold at most 4-digit numbers ("e.g. 2030"), so any run of 5 or
            // more digits from the input that shows up in one was echoed.
            let shown = format!("{e} {e:?}");
            let runs = digit_runs(number).chain(digit_runs(cvc)).chain(digit_runs(&digits));
            for run in runs.filter(|r| r.len() >= 5) {
                assert!(!shown.contains(run), "the error echoes the input digits {run:?}: {shown}");
            }
        }
    }
});
