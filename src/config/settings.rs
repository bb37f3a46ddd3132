//! Where each raw setting comes from and how it becomes a typed value. A setting is
//! read by its variable's name once: from the environment (`Source`), else from the
//! TOML file, whose keys are the same names without `DMPAY_`, in lower case. Every
//! error names the variable.

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use super::ConfigError;

/// Where raw string settings come from, so tests can load without touching the process
/// environment.
pub trait Source {
    fn get(&self, name: &str) -> Option<String>;
}

/// The process environment.
pub struct ProcessEnv;

impl Source for ProcessEnv {
    fn get(&self, name: &str) -> Option<String> {
        std::env::var(name).ok()
    }
}

impl Source for HashMap<String, String> {
    fn get(&self, name: &str) -> Option<String> {
        HashMap::get(self, name).cloned()
    }
}

/// The raw settings of one load: the environment first, then the file.
pub(super) struct Settings<'a> {
    source: &'a dyn Source,
    /// The file's path (for messages) and its keys with their values.
    path: String,
    file: HashMap<String, String>,
    /// The file keys that a setting was read under: any other key in the file is a
    /// mistake (a typo would otherwise be ignored without a word), reported by `finish`.
    read: RefCell<HashSet<String>>,
}

impl<'a> Settings<'a> {
    pub fn new(source: &'a dyn Source, file: Option<&Path>) -> Result<Self, ConfigError> {
        let mut settings = Settings { source, path: String::new(), file: HashMap::new(), read: RefCell::default() };
        let Some(path) = file else { return Ok(settings) };
        settings.path = path.display().to_string();
        let error = |detail: String| ConfigError::File { path: path.display().to_string(), detail };
        let text = std::fs::read_to_string(path).map_err(|e| error(e.to_string()))?;
        let table: toml::Table = toml::from_str(&text).map_err(|e| error(e.to_string()))?;
        for (key, value) in table {
            let toml::Value::String(value) = value else {
                return Err(error(format!("{key}: expected a string, as in {key} = \"...\"")));
            };
            settings.file.insert(key, value);
        }
        Ok(settings)
    }

    /// The raw value of `name` (`DMPAY_…`), if it is set anywhere.
    pub fn raw(&self, name: &'static str) -> Option<String> {
        let key = name.strip_prefix("DMPAY_").unwrap_or(name).to_ascii_lowercase();
        let value = self.source.get(name).or_else(|| self.file.get(&key).cloned());
        self.read.borrow_mut().insert(key);
        value
    }

    pub fn string_or(&self, name: &'static str, default: &str) -> String {
        self.raw(name).unwrap_or_else(|| default.to_owned())
    }

    /// One of `choices` (the value, then what it stands for); `default` when unset.
    pub fn choice<T: Copy>(&self, name: &'static str, default: &str, choices: &[(&str, T)]) -> Result<T, ConfigError> {
        let raw = self.string_or(name, default);
        choices.iter().find(|(word, _)| *word == raw).map(|(_, value)| *value).ok_or_else(|| {
            let words: Vec<&str> = choices.iter().map(|(word, _)| *word).collect();
            ConfigError::Invalid { name, detail: format!("expected one of {}, got {raw:?}", words.join(", ")) }
        })
    }

    pub fn num<T>(&self, name: &'static str, default: T, range: std::ops::RangeInclusive<T>) -> Result<T, ConfigError>
    where
        T: std::str::FromStr + PartialOrd + std::fmt::Display + Copy,
    {
        let Some(raw) = self.raw(name) else { return Ok(default) };
        let value: T = raw
            .trim()
            .parse()
            .map_err(|_| ConfigError::Invalid { name, detail: format!("expected a number, got {raw:?}") })?;
        if !range.contains(&value) {
            return Err(ConfigError::Invalid {
                name,
                detail: format!("{value} is outside {}..={}", range.start(), range.end()),
            });
        }
        Ok(value)
    }

    pub fn duration(&self, name: &'static str, default: Duration) -> Result<Duration, ConfigError> {
        let Some(raw) = self.raw(name) else { return Ok(default) };
        humantime::parse_duration(raw.trim()).map_err(|e| ConfigError::Invalid {
            name,
            detail: format!("expected a duration like 500ms or 10s, got {raw:?}: {e}"),
        })
    }

    /// A probability, 0.0 to 1.0; 0 when unset.
    pub fn rate(&self, name: &'static str) -> Result<f64, ConfigError> {
        let Some(raw) = self.raw(name) else { return Ok(0.0) };
        let invalid = || ConfigError::Invalid { name, detail: format!("expected 0.0 to 1.0, got {raw:?}") };
        let rate: f64 = raw.trim().parse().map_err(|_| invalid())?;
        if !(0.0..=1.0).contains(&rate) {
            return Err(invalid());
        }
        Ok(rate)
    }

    /// An address, or `None` when the value is `off`.
    pub fn addr_or_off(&self, name: &'static str, default: &str) -> Result<Option<SocketAddr>, ConfigError> {
        let raw = self.string_or(name, default);
        if raw.eq_ignore_ascii_case("off") {
            return Ok(None);
        }
        raw.parse().map(Some).map_err(|_| ConfigError::Invalid {
            name,
            detail: format!("expected HOST:PORT with an IP address, got {raw:?}"),
        })
    }

    /// Refuses a file key that no setting was read under.
    pub fn finish(&self) -> Result<(), ConfigError> {
        let read = self.read.borrow();
        let mut unknown: Vec<&String> = self.file.keys().filter(|k| !read.contains(*k)).collect();
        unknown.sort();
        match unknown.first() {
            None => Ok(()),
            Some(key) => Err(ConfigError::File { path: self.path.clone(), detail: format!("unknown setting {key:?}") }),
        }
    }
}
