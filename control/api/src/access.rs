//! Who may call the control API: bearer tokens and their roles.
//!
//! `admin` may do everything; `proxy` what a proxy needs (verify
//! credentials, read routes and events, wake, report activity, create on
//! first access); `app:<name>` one app's own databases, keys and users.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::name::Name;

/// The role a token carries.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Role {
    Admin,
    Proxy,
    App(Name),
}

impl Role {
    /// Whether this role may act on `app`'s own resources.
    pub fn owns(&self, app: &Name) -> bool {
        match self {
            Role::Admin => true,
            Role::Proxy => false,
            Role::App(own) => own == app,
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Role::Admin => f.write_str("admin"),
            Role::Proxy => f.write_str("proxy"),
            Role::App(app) => write!(f, "app:{app}"),
        }
    }
}

impl FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "admin" => Ok(Role::Admin),
            "proxy" => Ok(Role::Proxy),
            _ => match s.strip_prefix("app:") {
                Some(app) => Name::new(app)
                    .map(Role::App)
                    .map_err(|e| format!("role {s:?}: {e}")),
                None => Err(format!(
                    "unknown role {s:?}: expected admin, proxy or app:<name>"
                )),
            },
        }
    }
}

impl Serialize for Role {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Role {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// `POST /tokens`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CreateToken {
    pub role: Role,
}

/// A new token: `token` is shown once; only its hash is kept.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TokenCreated {
    pub id: String,
    pub role: Role,
    pub token: String,
}

/// `GET /tokens`: what is known of a token without the token.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct TokenInfo {
    pub id: String,
    pub role: Role,
    pub created_at: u64,
}

/// Where a founding node writes its first tokens, under `node.data_dir`.
pub const TOKENS_DIR: &str = "tokens";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_read_as_they_print() {
        for role in ["admin", "proxy", "app:shop"] {
            assert_eq!(role.parse::<Role>().unwrap().to_string(), role);
        }
        for bad in ["", "root", "app:", "app:Shop", "app:a/b", "Admin"] {
            assert!(bad.parse::<Role>().is_err(), "{bad:?} parsed");
        }
        let shop = Name::new("shop").unwrap();
        assert!(Role::Admin.owns(&shop));
        assert!(!Role::Proxy.owns(&shop));
        assert!(Role::App(shop.clone()).owns(&shop));
        assert!(!Role::App(Name::new("other").unwrap()).owns(&shop));
    }
}
