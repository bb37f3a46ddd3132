//! Free text that people read (notes, display names, descriptions): bounded, without
//! control characters, and unable to make a chat bubble read other than it is.

use super::error::{Error, Result};

/// A display name or reason: bounded, no control characters.
pub fn parse_text(field: &str, raw: &str, len_max: usize, required: bool) -> Result<String> {
    if required && raw.trim().is_empty() {
        return Err(Error::invalid(field, "required"));
    }
    if raw.chars().count() > len_max {
        return Err(Error::invalid(field, format!("at most {len_max} characters")));
    }
    if raw.chars().any(char::is_control) {
        return Err(Error::invalid(field, "control characters are not allowed"));
    }
    if let Some(c) = spoofing_char(raw) {
        return Err(Error::invalid(
            field,
            format!("invisible or direction-changing characters are not allowed (U+{:04X})", u32::from(c)),
        ));
    }
    Ok(raw.to_owned())
}

/// The first character that could make text in a chat bubble read other than it is:
/// a bidirectional embedding, override or isolate (which reorders what follows, so
/// "pay 100" can show as "pay 001"), a direction mark, or a zero-width or invisible
/// character (which hides text or splits a word a reader would match). A zero-width
/// joiner between two pictographs is allowed: it is how emoji such as 🏳️‍🌈 are built.
pub fn spoofing_char(text: &str) -> Option<char> {
    let chars: Vec<char> = text.chars().collect();
    let pictograph =
        |c: char| matches!(u32::from(c), 0x2190..=0x2BFF | 0x1F000..=0x1FAFF | 0xFE0F) && !c.is_alphanumeric();
    chars.iter().enumerate().find_map(|(i, &c)| {
        let forbidden = match u32::from(c) {
            // Embeddings and overrides, isolates, marks.
            0x202A..=0x202E | 0x2066..=0x2069 | 0x200E | 0x200F | 0x061C => true,
            // Zero-width space and non-joiner, word joiner and invisible operators,
            // zero-width no-break space, Mongolian vowel separator, soft hyphen,
            // Hangul fillers.
            0x200B | 0x200C | 0x2060..=0x2064 | 0xFEFF | 0x180E | 0x00AD | 0x115F | 0x1160 | 0x3164 | 0xFFA0 => true,
            // Combining grapheme joiner, line and paragraph separators.
            0x034F | 0x2028 | 0x2029 => true,
            // Tags are invisible; they belong only in a flag's tag sequence (🏴 then
            // tags, as in the flags of England or Scotland).
            0xE0000..=0xE007F => {
                let before = i.checked_sub(1).and_then(|j| chars.get(j)).copied();
                !before.is_some_and(|b| b == '\u{1F3F4}' || matches!(u32::from(b), 0xE0020..=0xE007E))
            }
            0x200D => {
                let before = i.checked_sub(1).and_then(|j| chars.get(j)).copied();
                let after = chars.get(i + 1).copied();
                !(before.is_some_and(pictograph) && after.is_some_and(pictograph))
            }
            _ => false,
        };
        forbidden.then_some(c)
    })
}

/// A plain-text table for a terminal: the header, a rule, then the rows; the first
/// column left-aligned and the others (amounts, counts) right-aligned, so that numbers
/// line up.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    use comfy_table::{CellAlignment, ContentArrangement, LineStyle, Table, TableStyle};
    let mut t = Table::new();
    t.load_style(TableStyle::new().header_separator(LineStyle::none().fill('-').junction(' ')));
    t.set_content_arrangement(ContentArrangement::Disabled);
    t.set_header(headers.to_vec());
    for row in rows {
        t.add_row(row.clone());
    }
    for i in 0..headers.len() {
        if let Some(column) = t.column_mut(i) {
            if i == 0 {
                column.set_padding((0, 1));
            } else {
                column.set_padding((1, 0));
                column.set_cell_alignment(CellAlignment::Right);
            }
        }
    }
    let mut out = t.to_string();
    out.push('\n');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spoofing_characters_are_refused_and_emoji_kept() {
        for bad in [
            "pay \u{202E}001",
            "a\u{2066}b",
            "zero\u{200B}width",
            "a\u{200D}b",
            "\u{FEFF}x",
            "l\u{200F}r",
            "x\u{00AD}y",
        ] {
            let err = parse_text("note", bad, 280, false).unwrap_err();
            assert!(err.to_string().contains("note"), "{bad:?}: {err}");
        }
        for bad in ["a\u{E0041}", "x\u{2028}y", "c\u{034F}d"] {
            assert!(parse_text("note", bad, 280, false).is_err(), "{bad:?}");
        }
        let scotland = "\u{1F3F4}\u{E0067}\u{E0062}\u{E0073}\u{E0063}\u{E0074}\u{E007F}";
        for good in ["lunch 🍕", "🏳️\u{200D}🌈", "👨\u{200D}👩\u{200D}👧", "café", "שלום", "مرحبا", "日本語", scotland]
        {
            assert!(parse_text("note", good, 280, false).is_ok(), "{good:?}");
        }
    }

    #[test]
    fn text_rejects_control_characters_and_length() {
        assert!(parse_text("reason", "fraud\n", 10, true).is_err());
        assert!(parse_text("reason", "  ", 10, true).is_err());
        assert!(parse_text("reason", &"é".repeat(11), 10, true).is_err());
        assert_eq!(parse_text("reason", "é".repeat(10).as_str(), 10, true).unwrap(), "é".repeat(10));
    }

    #[test]
    fn tables_align_amounts_right() {
        let t =
            table(&["account", "debits"], &[vec!["a".into(), "1.00".into()], vec!["longer".into(), "100.00".into()]]);
        let lines: Vec<&str> = t.lines().collect();
        assert!(lines[0].starts_with("account") && lines[0].ends_with("debits"), "{t}");
        assert!(lines[1].chars().all(|c| c == '-' || c == ' '), "{t}");
        assert!(lines[2].starts_with("a ") && lines[2].ends_with("  1.00"), "{t}");
        assert!(lines[3].starts_with("longer") && lines[3].ends_with("100.00"), "{t}");
        assert!(lines.iter().all(|l| l.len() == lines[0].len()), "{t}");
    }
}
