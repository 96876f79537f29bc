//! App and database names. They become data directory names, so they are
//! validated, never sanitised.

use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Longest name accepted: 63 characters, like a DNS label, so that
/// `<db>.<app>.<base_domain>` stays a valid host name.
pub const MAX_NAME_LEN: usize = 63;

/// An app (tenant) or database name: `[a-z0-9][a-z0-9-]{0,62}`. Shared,
/// not copied: every session and request holds its database's key, and
/// a clone costs a reference count, not an allocation. One pointer wide
/// (the text behind a second one), so that a key is 16 bytes in each of
/// the places an idle session keeps it.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Name(Arc<Box<str>>);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("name is empty")]
    Empty,
    #[error("name {0:?} is longer than 63 characters")]
    TooLong(String),
    #[error("name {0:?} must start with a lowercase letter or digit")]
    BadStart(String),
    #[error("name {0:?} may contain only lowercase letters, digits and '-'")]
    BadChar(String),
}

impl Name {
    pub fn new(name: &str) -> Result<Self, NameError> {
        let bytes = name.as_bytes();
        let Some(first) = bytes.first() else {
            return Err(NameError::Empty);
        };
        if bytes.len() > MAX_NAME_LEN {
            return Err(NameError::TooLong(name.to_string()));
        }
        if !(first.is_ascii_lowercase() || first.is_ascii_digit()) {
            return Err(NameError::BadStart(name.to_string()));
        }
        if !bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
        {
            return Err(NameError::BadChar(name.to_string()));
        }
        Ok(Name(Arc::new(name.into())))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Postgres login names: like app names but `_` is allowed and `.` is not,
/// because the proxy splits `user.app` at the last dot. The proxy checks
/// names from the wire with this before any lookup.
pub fn validate_user_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_lowercase() || b == b'_')
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
    let reserved = ["rouse_admin", "rouse_owner", API_USER];
    if ok && !name.starts_with("pg_") && !reserved.contains(&name) {
        Ok(())
    } else {
        Err(format!(
            "invalid user name {name:?}: expected [a-z_][a-z0-9_-]{{0,62}}, not pg_* or a reserved name"
        ))
    }
}

/// The role of app `app`'s user `name` on a PostgreSQL cluster that several
/// apps share (Patroni): `<name>.<app>`, the user part of the app's own
/// `DATABASE_URL`, so that two apps' `alice` are two roles.
pub fn cluster_role(name: &str, app: &Name) -> String {
    format!("{name}.{app}")
}

/// The login the proxy's read-only port uses on a managed PostgreSQL
/// instance for tenant role `name`: same password, reading rights only.
/// `@` is not allowed in user names, so it never collides with one.
/// The login proxies use on a managed PostgreSQL database for the app's
/// API credentials (the gateway API): an app user, acting as the owner
/// role like the others.
pub const API_USER: &str = "rouse_api";

pub fn read_only_role(name: &str) -> String {
    format!("{name}@ro")
}

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(&self.0)
    }
}

impl std::str::FromStr for Name {
    type Err = NameError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Name::new(s)
    }
}

impl Serialize for Name {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for Name {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Name::new(&s).map_err(serde::de::Error::custom)
    }
}

/// One database of one app. Its internal name `<app>_<db>` is unambiguous
/// because `_` cannot occur in either part.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct DbKey {
    pub app: Name,
    #[serde(rename = "name")]
    pub db: Name,
}

impl DbKey {
    pub fn new(app: Name, db: Name) -> Self {
        DbKey { app, db }
    }

    /// Parses an internal name `<app>_<db>`; `None` for anything else.
    pub fn from_internal(internal: &str) -> Option<Self> {
        let (app, db) = internal.split_once('_')?;
        Some(DbKey::new(Name::new(app).ok()?, Name::new(db).ok()?))
    }

    pub fn internal(&self) -> String {
        format!("{}_{}", self.app, self.db)
    }
}

impl fmt::Display for DbKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}_{}", self.app, self.db)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn accepts_and_refuses() {
        assert!(Name::new("myapp").is_ok());
        assert!(Name::new("0-a").is_ok());
        assert_eq!(Name::new(""), Err(NameError::Empty));
        assert!(matches!(Name::new("-a"), Err(NameError::BadStart(_))));
        assert!(matches!(Name::new("My"), Err(NameError::BadStart(_))));
        assert!(matches!(Name::new("a_b"), Err(NameError::BadChar(_))));
        assert!(matches!(Name::new("a/../b"), Err(NameError::BadChar(_))));
        assert!(Name::new(&"a".repeat(63)).is_ok());
        assert!(matches!(
            Name::new(&"a".repeat(64)),
            Err(NameError::TooLong(_))
        ));
    }

    proptest! {
        #[test]
        fn valid_names_round_trip_through_internal(app in "[a-z0-9][a-z0-9-]{0,62}", db in "[a-z0-9][a-z0-9-]{0,62}") {
            let key = DbKey::new(Name::new(&app).unwrap(), Name::new(&db).unwrap());
            prop_assert_eq!(DbKey::from_internal(&key.internal()), Some(key));
        }

        #[test]
        fn accepted_names_are_safe_path_components(s in "\\PC{0,80}") {
            if let Ok(name) = Name::new(&s) {
                prop_assert!(!name.as_str().contains(['/', '.', '_', '\0']));
                prop_assert!(name.as_str().len() <= MAX_NAME_LEN);
            }
        }
    }
}
