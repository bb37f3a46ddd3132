//! Keyset pages of rows listed newest first by (time, id). A page token is `<time>/<id>`
//! of the previous page's last row, so every page is one index range, however deep.

use super::error::{Error, Result};

/// A list call's page, parsed.
pub struct Page {
    size: u32,
    /// Rows strictly before this (time, id) key; `(i64::MAX, "")` for the first page.
    pub before: (i64, String),
}

impl Page {
    /// Parses `page_size` (0 means `default`, at most `max`) and `page_token` (empty:
    /// from the newest; else a token this listing gave, whose ids start with `prefix`).
    pub fn parse(page_size: u32, default: u32, max: u32, page_token: &str, prefix: &str) -> Result<Page> {
        let size = match page_size {
            0 => default,
            n if n > max => return Err(Error::invalid("page_size", format!("at most {max}"))),
            n => n,
        };
        let before = if page_token.is_empty() {
            (i64::MAX, String::new())
        } else {
            page_token
                .split_once('/')
                .and_then(|(t, id)| Some((t.parse::<i64>().ok()?, id.to_owned())))
                .filter(|(_, id)| id.starts_with(prefix) && super::ids::check_shape("page_token", id).is_ok())
                .ok_or_else(|| Error::invalid("page_token", "not a token from a previous page"))?
        };
        Ok(Page { size, before })
    }

    /// The rows to read: one more than the page, to tell whether another follows.
    pub fn limit(&self) -> i64 {
        i64::from(self.size) + 1
    }

    /// Cuts the extra row off `rows` and answers the next page's token, if there is a
    /// next page; `key` is a row's (time, id).
    pub fn finish<T>(&self, rows: &mut Vec<T>, key: impl Fn(&T) -> (i64, String)) -> Option<String> {
        if rows.len() <= self.size as usize {
            return None;
        }
        rows.truncate(self.size as usize);
        rows.last().map(|r| {
            let (time, id) = key(r);
            format!("{time}/{id}")
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_and_bad_ones_name_their_field() {
        let first = Page::parse(0, 50, 200, "", "po_").unwrap();
        assert_eq!((first.limit(), first.before), (51, (i64::MAX, String::new())));
        let page = Page::parse(2, 50, 200, "", "po_").unwrap();
        let mut rows = vec![(3, "po_c"), (2, "po_b"), (1, "po_a")];
        let next = page.finish(&mut rows, |r| (r.0, r.1.to_owned())).unwrap();
        assert_eq!((rows.len(), next.as_str()), (2, "2/po_b"));
        assert_eq!(Page::parse(0, 50, 200, &next, "po_").unwrap().before, (2, "po_b".to_owned()));
        for bad in ["x", "1/pay_a", "1/po_\u{0}", "a/po_a"] {
            assert!(Page::parse(0, 50, 200, bad, "po_").is_err(), "{bad:?}");
        }
        assert!(Page::parse(201, 50, 200, "", "po_").is_err());
    }
}
