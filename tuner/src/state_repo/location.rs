//! Where a repository lives: `--state-db` and `state_db` take a path (a SQLite file) or a
//! PostgreSQL connection URL (`postgres://USER@HOST/DB`, `postgresql://...`, any libpq-style
//! URL, e.g. `postgresql://vmm@/fleet?host=/run/postgresql` for a Unix socket directory).

use std::ffi::OsString;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::RepoError;

/// A state repository's location.
#[derive(Clone, PartialEq, Eq)]
pub enum Location {
    /// A SQLite file (created when missing).
    Sqlite(PathBuf),
    /// A PostgreSQL database.
    Postgres(PgUrl),
}

/// A PostgreSQL connection URL, checked when parsed.
#[derive(Clone)]
pub struct PgUrl {
    /// The text as the user gave it (passed on unchanged to a child monitor).
    text: String,
    /// What [`PgUrl`]'s `Display` shows: `postgresql://USER@HOST/DB`, no password. (The
    /// client's `Config` is parsed again when connecting: it holds a callback that is not
    /// unwind-safe, and the VM's configuration must be.)
    shown: String,
}

impl PartialEq for PgUrl {
    fn eq(&self, other: &Self) -> bool {
        self.text == other.text
    }
}

impl Eq for PgUrl {}

impl PgUrl {
    /// The client configuration (parsed from the text, checked when it was parsed).
    pub fn config(&self) -> Result<postgres::Config, RepoError> {
        parse_config(&self.text)
    }

    /// The URL as given (it may hold a password: not for logs; [`PgUrl`]'s `Display`
    /// leaves the password out).
    pub fn as_given(&self) -> &str {
        &self.text
    }
}

fn parse_config(text: &str) -> Result<postgres::Config, RepoError> {
    postgres::Config::from_str(text).map_err(|e| RepoError::BadUrl {
        backend: "postgresql",
        message: e.to_string(),
    })
}

/// `postgresql://USER@HOST[,HOST...]/DB`, without a password.
fn shown(c: &postgres::Config) -> String {
    use std::fmt::Write;
    let mut f = String::from("postgresql://");
    if let Some(u) = c.get_user() {
        let _ = write!(f, "{u}@");
    }
    for (i, h) in c.get_hosts().iter().enumerate() {
        if i > 0 {
            f.push(',');
        }
        let _ = match h {
            postgres::config::Host::Tcp(name) => write!(f, "{name}"),
            postgres::config::Host::Unix(dir) => write!(f, "[{}]", dir.display()),
        };
    }
    let _ = write!(f, "/{}", c.get_dbname().unwrap_or(""));
    f
}

impl fmt::Display for PgUrl {
    /// `postgresql://USER@HOST[,HOST...]/DB`, without a password.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.shown)
    }
}

impl fmt::Debug for PgUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PgUrl({self})")
    }
}

impl Location {
    /// Parses `--state-db`'s value: a `postgres://` or `postgresql://` URL, or a path.
    pub fn parse(text: &str) -> Result<Location, RepoError> {
        if text.is_empty() {
            return Err(RepoError::InvalidConfig("state_db is empty".into()));
        }
        let lower = text.get(..13).unwrap_or(text).to_ascii_lowercase();
        if lower.starts_with("postgres://") || lower.starts_with("postgresql://") {
            let config = parse_config(text)?;
            if config.get_hosts().is_empty() {
                return Err(RepoError::BadUrl {
                    backend: "postgresql",
                    message: "no host: give one (postgresql://USER@HOST/DB) or a socket \
                              directory (?host=/run/postgresql)"
                        .into(),
                });
            }
            return Ok(Location::Postgres(PgUrl {
                text: text.to_string(),
                shown: shown(&config),
            }));
        }
        if text.contains("://") {
            return Err(RepoError::BadUrl {
                backend: "state_db",
                message: format!(
                    "unknown scheme in {text:?}: a path (SQLite) or postgres://... expected"
                ),
            });
        }
        Ok(Location::Sqlite(PathBuf::from(text)))
    }

    /// The SQLite file's path, for a SQLite location.
    pub fn sqlite_path(&self) -> Option<&Path> {
        match self {
            Location::Sqlite(p) => Some(p),
            Location::Postgres(_) => None,
        }
    }

    /// The backend's name, for messages: `sqlite` or `postgresql`.
    pub fn backend(&self) -> &'static str {
        match self {
            Location::Sqlite(_) => "sqlite",
            Location::Postgres(_) => "postgresql",
        }
    }

    /// The value to hand a child process as `--state-db` (the URL as given, password
    /// included, or the path).
    pub fn to_arg(&self) -> OsString {
        match self {
            Location::Sqlite(p) => p.clone().into_os_string(),
            Location::Postgres(u) => OsString::from(&u.text),
        }
    }
}

impl From<PathBuf> for Location {
    fn from(p: PathBuf) -> Self {
        Location::Sqlite(p)
    }
}

impl From<&PathBuf> for Location {
    fn from(p: &PathBuf) -> Self {
        Location::Sqlite(p.clone())
    }
}

impl From<&Path> for Location {
    fn from(p: &Path) -> Self {
        Location::Sqlite(p.to_path_buf())
    }
}

impl FromStr for Location {
    type Err = RepoError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Location::parse(s)
    }
}

impl fmt::Display for Location {
    /// The path, or the URL without its password.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Location::Sqlite(p) => write!(f, "{}", p.display()),
            Location::Postgres(u) => write!(f, "{u}"),
        }
    }
}

impl fmt::Debug for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Location::Sqlite(p) => write!(f, "Sqlite({})", p.display()),
            Location::Postgres(u) => write!(f, "Postgres({u})"),
        }
    }
}

impl Serialize for Location {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Location::Sqlite(p) => p.serialize(s),
            Location::Postgres(u) => s.serialize_str(&u.text),
        }
    }
}

impl<'de> Deserialize<'de> for Location {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        Location::parse(&text).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_and_urls() {
        assert_eq!(
            Location::parse("/tmp/a.db").expect("path"),
            Location::Sqlite("/tmp/a.db".into())
        );
        let l = Location::parse("postgres://vmm:secret@db.example/fleet").expect("url");
        assert_eq!(l.backend(), "postgresql");
        assert_eq!(l.to_string(), "postgresql://vmm@db.example/fleet");
        assert!(!format!("{l:?}").contains("secret"));
        let l = Location::parse("postgresql://vmm@/fleet?host=/run/postgresql").expect("socket");
        assert_eq!(l.to_string(), "postgresql://vmm@[/run/postgresql]/fleet");
        for bad in [
            "",
            "postgres://vmm@h/db?nonsense=1",
            "mysql://x/y",
            "postgresql:///db",
        ] {
            let e = Location::parse(bad).expect_err(bad);
            assert!(!e.to_string().is_empty(), "{bad}");
        }
        let e = Location::parse("postgres://vmm@h/db?nonsense=1").expect_err("bad");
        assert!(e.to_string().starts_with("postgresql:"), "{e}");
    }
}
