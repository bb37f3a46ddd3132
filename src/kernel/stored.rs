//! `stored_enum!`: a closed set of values kept as text in the database.
//!
//! Each value has one spelling, used in the tables and nowhere else; the API maps the
//! enum to its wire enum and the domain matches on variants, never on the text. A text
//! the database holds that this build does not know is an internal error (a newer
//! build wrote it, or the row was edited by hand), never a silent default.

/// Declares an enum whose values are stored as the given texts, with `as_str`,
/// `from_db` and `ALL` (every value, in declaration order).
#[macro_export]
macro_rules! stored_enum {
    (
        $(#[$meta:meta])*
        $vis:vis enum $name:ident {
            $( $(#[$vmeta:meta])* $variant:ident = $text:literal ),+ $(,)?
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        $vis enum $name {
            $( $(#[$vmeta])* $variant ),+
        }

        impl $name {
            /// Every value, in declaration order.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            /// The text the database stores.
            pub fn as_str(self) -> &'static str {
                match self {
                    $( $name::$variant => $text ),+
                }
            }

            /// The value the database's text stands for.
            pub fn from_db(text: &str) -> $crate::kernel::error::Result<Self> {
                match text {
                    $( $text => Ok($name::$variant), )+
                    other => Err($crate::kernel::error::Error::internal(anyhow::anyhow!(
                        "unknown {} {:?} in the database",
                        stringify!($name),
                        other
                    ))),
                }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

#[cfg(test)]
mod tests {
    crate::stored_enum! {
        enum Colour {
            Red = "red",
            DarkBlue = "dark_blue",
        }
    }

    #[test]
    fn every_value_round_trips_through_its_text() {
        for c in Colour::ALL {
            assert_eq!(Colour::from_db(c.as_str()).unwrap(), *c);
        }
        assert_eq!(Colour::DarkBlue.to_string(), "dark_blue");
    }

    #[test]
    fn an_unknown_text_is_an_internal_error() {
        let err = Colour::from_db("green").unwrap_err();
        assert!(matches!(err, crate::kernel::error::Error::Internal(_)), "{err:?}");
    }
}
