//! Which database a request is for. First match wins: a path prefix
//! `/<app>/<db>/...`, a Host `<db>.<app>.<base_domain>`, a basic-auth user
//! `<db>.<app>`, the database a static listener is bound to. The gateway API
//! (`/v1/database/*`) names its database in the request instead.

use rouse_control_api::{DbKey, Name};

/// rqlite API paths the proxy passes through.
const RQLITE_PATHS: [&str; 6] = [
    "/db/execute",
    "/db/query",
    "/db/request",
    "/status",
    "/readyz",
    "/nodes",
];

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Route {
    /// `/v1/database/<op>`
    Gateway(String),
    /// `/v1/auth/revoke`: the presented token is revoked (logout).
    RevokeToken,
    /// rqlite API on `key`; `path` without any routing prefix.
    Rqlite {
        key: DbKey,
        path: String,
        prefix: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum RouteError {
    /// An rqlite path, but nothing says which database.
    NoDatabase,
    /// Neither the gateway nor the rqlite API.
    Unknown,
}

pub(crate) struct RouteInput<'a> {
    pub(crate) path: &'a str,
    pub(crate) host: Option<&'a str>,
    pub(crate) basic_user: Option<&'a str>,
    pub(crate) bound: Option<&'a DbKey>,
    pub(crate) base_domain: Option<&'a str>,
}

fn is_rqlite_path(path: &str) -> bool {
    RQLITE_PATHS.contains(&path)
}

pub(crate) fn route(input: &RouteInput<'_>) -> Result<Route, RouteError> {
    let path = input.path;
    if path == "/v1/auth/revoke" {
        return Ok(Route::RevokeToken);
    }
    if let Some(op) = path.strip_prefix("/v1/database/") {
        return Ok(Route::Gateway(op.to_string()));
    }
    if let Some((key, rest)) = path_prefix(path) {
        if is_rqlite_path(rest) {
            let prefix = path[..path.len() - rest.len()].to_string();
            return Ok(Route::Rqlite {
                key,
                path: rest.to_string(),
                prefix,
            });
        }
    }
    if !is_rqlite_path(path) {
        return Err(RouteError::Unknown);
    }
    let rqlite = |key: DbKey| Route::Rqlite {
        key,
        path: path.to_string(),
        prefix: String::new(),
    };
    if let (Some(host), Some(base)) = (input.host, input.base_domain) {
        let host = host.rsplit_once(':').map_or(host, |(h, _)| h);
        if let Some(sub) = host.strip_suffix(base).and_then(|s| s.strip_suffix('.')) {
            if let Some(key) = dotted(sub) {
                return Ok(rqlite(key));
            }
        }
    }
    if let Some(key) = input.basic_user.and_then(dotted) {
        return Ok(rqlite(key));
    }
    if let Some(key) = input.bound {
        return Ok(rqlite(key.clone()));
    }
    Err(RouteError::NoDatabase)
}

/// `/<app>/<db>/<rest>` with valid names.
fn path_prefix(path: &str) -> Option<(DbKey, &str)> {
    let mut parts = path.strip_prefix('/')?.splitn(3, '/');
    let app = Name::new(parts.next()?).ok()?;
    let db = Name::new(parts.next()?).ok()?;
    let rest = parts.next()?;
    let rest = &path[path.len() - rest.len() - 1..];
    Some((DbKey::new(app, db), rest))
}

/// `<db>.<app>`
fn dotted(s: &str) -> Option<DbKey> {
    let (db, app) = s.split_once('.')?;
    Some(DbKey::new(Name::new(app).ok()?, Name::new(db).ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn key(app: &str, db: &str) -> DbKey {
        DbKey::new(Name::new(app).unwrap(), Name::new(db).unwrap())
    }

    fn input(path: &str) -> RouteInput<'_> {
        RouteInput {
            path,
            host: None,
            basic_user: None,
            bound: None,
            base_domain: Some("db.example"),
        }
    }

    #[test]
    fn first_match_wins() {
        let bound = key("side", "car");
        let r = route(&RouteInput {
            host: Some("users.shop.db.example:8080"),
            basic_user: Some("orders.shop"),
            bound: Some(&bound),
            ..input("/shop/stock/db/query")
        });
        assert_eq!(
            r,
            Ok(Route::Rqlite {
                key: key("shop", "stock"),
                path: "/db/query".into(),
                prefix: "/shop/stock".into()
            })
        );
        let r = route(&RouteInput {
            host: Some("users.shop.db.example:8080"),
            basic_user: Some("orders.shop"),
            ..input("/db/query")
        });
        assert_eq!(
            r,
            Ok(Route::Rqlite {
                key: key("shop", "users"),
                path: "/db/query".into(),
                prefix: String::new()
            })
        );
        let r = route(&RouteInput {
            basic_user: Some("orders.shop"),
            bound: Some(&bound),
            ..input("/status")
        });
        assert_eq!(
            r,
            Ok(Route::Rqlite {
                key: key("shop", "orders"),
                path: "/status".into(),
                prefix: String::new()
            })
        );
        let r = route(&RouteInput {
            bound: Some(&bound),
            ..input("/db/execute")
        });
        assert_eq!(
            r,
            Ok(Route::Rqlite {
                key: bound.clone(),
                path: "/db/execute".into(),
                prefix: String::new()
            })
        );
    }

    #[test]
    fn gateway_and_errors() {
        assert_eq!(
            route(&input("/v1/database/exec")),
            Ok(Route::Gateway("exec".into()))
        );
        assert_eq!(route(&input("/db/query")), Err(RouteError::NoDatabase));
        assert_eq!(route(&input("/admin")), Err(RouteError::Unknown));
        assert_eq!(
            route(&input("/shop/users/secret")),
            Err(RouteError::Unknown)
        );
        assert_eq!(
            route(&input("/Shop/users/db/query")),
            Err(RouteError::Unknown)
        );
        let foreign = RouteInput {
            host: Some("users.shop.other.example"),
            ..input("/db/query")
        };
        assert_eq!(route(&foreign), Err(RouteError::NoDatabase));
    }

    proptest! {
        #[test]
        fn never_panics_and_only_routes_valid_names(path in "\\PC{0,60}", host in "\\PC{0,40}", user in "\\PC{0,30}") {
            let r = route(&RouteInput { path: &path, host: Some(&host), basic_user: Some(&user), bound: None, base_domain: Some("x") });
            if let Ok(Route::Rqlite { key, .. }) = r {
                prop_assert!(Name::new(key.app.as_str()).is_ok() && Name::new(key.db.as_str()).is_ok());
            }
        }
    }
}
