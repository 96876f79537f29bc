//! What a backup is made of in the store, and which ones retention keeps.
//!
//! rqlite: `rqlite/<app>/<db>/<id>.sqlite.gz` (the SQLite file, gzip) and
//! `<id>.json`, its manifest, written last: a backup without a manifest is
//! an unfinished one and is ignored. The id is the time it was taken
//! (`20261203T231500123Z`), so names sort by age.

use std::time::Duration;

use rouse_control_api::{BackupInfo, DbKey};
use serde::{Deserialize, Serialize};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use crate::error::{ControlError, Result};

/// The format of the stored file.
pub const SQLITE_GZIP: &str = "sqlite+gzip";

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    #[serde(flatten)]
    pub info: BackupInfo,
    pub format: String,
    /// SHA-256 of the SQLite file before compression: an unchanged
    /// database is not stored twice.
    pub data_sha256: String,
}

/// Where a database's rqlite backups live.
pub fn rqlite_dir(key: &DbKey) -> String {
    format!("rqlite/{}/{}", key.app, key.db)
}

pub fn data_name(key: &DbKey, id: &str) -> String {
    format!("{}/{id}.sqlite.gz", rqlite_dir(key))
}

pub fn manifest_name(key: &DbKey, id: &str) -> String {
    format!("{}/{id}.json", rqlite_dir(key))
}

/// The id of a manifest's name in a listing, if it is one.
pub fn manifest_id<'a>(key: &DbKey, name: &'a str) -> Option<&'a str> {
    let rest = name.strip_prefix(&rqlite_dir(key))?.strip_prefix('/')?;
    let id = rest.strip_suffix(".json")?;
    valid_id(id).then_some(id)
}

/// Ids are letters, digits, `-`, `_` and `.` only: nothing that could name
/// another path.
pub fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
        && !id.contains("..")
}

/// A backup id for `time_ms`.
pub fn id_at(time_ms: u64) -> String {
    let t = datetime(time_ms);
    format!(
        "{:04}{:02}{:02}T{:02}{:02}{:02}{:03}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second(),
        t.millisecond()
    )
}

fn datetime(time_ms: u64) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp_nanos(time_ms as i128 * 1_000_000)
        .unwrap_or(OffsetDateTime::UNIX_EPOCH)
}

/// RFC 3339 of `time_ms`.
pub fn rfc3339(time_ms: u64) -> String {
    datetime(time_ms)
        .format(&Rfc3339)
        .unwrap_or_else(|_| time_ms.to_string())
}

/// Unix milliseconds of an RFC 3339 time.
pub fn parse_rfc3339(text: &str) -> Result<u64> {
    let t = OffsetDateTime::parse(text, &Rfc3339).map_err(|e| {
        ControlError::BadRequest(format!(
            "time {text:?} is not RFC 3339 (2026-12-03T23:15:00Z): {e}"
        ))
    })?;
    Ok((t.unix_timestamp_nanos() / 1_000_000).max(0) as u64)
}

/// Of backups sorted oldest first, the ones retention removes: past the
/// newest `keep` (0: no limit), or older than `max_age` (zero: no limit).
/// The newest is always kept.
pub fn expired(
    backups: &[BackupInfo],
    keep: usize,
    max_age: Duration,
    now_ms: u64,
) -> Vec<BackupInfo> {
    let n = backups.len();
    backups
        .iter()
        .enumerate()
        .filter(|(i, b)| {
            let newest = *i + 1 == n;
            let over_count = keep > 0 && n - i > keep;
            let too_old =
                !max_age.is_zero() && now_ms.saturating_sub(b.time_ms) > max_age.as_millis() as u64;
            !newest && (over_count || too_old)
        })
        .map(|(_, b)| b.clone())
        .collect()
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use rouse_control_api::{Engine, Name};

    use super::*;

    fn backup(time_ms: u64) -> BackupInfo {
        BackupInfo {
            id: id_at(time_ms),
            app: Name::new("app").unwrap(),
            database: Name::new("db").unwrap(),
            engine: Engine::Rqlite,
            time_ms,
            time: rfc3339(time_ms),
            size: 1,
            sha256: None,
            kind: "snapshot".into(),
            reason: "manual".into(),
            engine_version: String::new(),
        }
    }

    #[test]
    fn ids_sort_by_time_and_name_only_themselves() {
        assert_eq!(id_at(1_764_803_700_123), "20251203T231500123Z");
        assert!(id_at(1_000) < id_at(2_000));
        assert_eq!(
            parse_rfc3339(&rfc3339(1_764_803_700_123)).unwrap(),
            1_764_803_700_123
        );
        let key = DbKey::new(Name::new("app").unwrap(), Name::new("db").unwrap());
        assert_eq!(
            manifest_id(&key, "rqlite/app/db/20251203T231500123Z.json"),
            Some("20251203T231500123Z")
        );
        for bad in [
            "rqlite/app/db/x.sqlite.gz",
            "rqlite/app/dbx/1.json",
            "rqlite/app/db/a/../b.json",
        ] {
            assert_eq!(manifest_id(&key, bad), None, "{bad}");
        }
        assert!(!valid_id("../x") && !valid_id("") && !valid_id("a/b"));
        assert!(parse_rfc3339("yesterday").is_err());
    }

    proptest! {
        /// Retention never removes the newest, keeps at most `keep`, and
        /// removes nothing younger than `max_age` unless over the count.
        #[test]
        fn retention_keeps_the_newest_and_obeys_both_limits(
            mut times in proptest::collection::vec(0u64..1_000_000, 0..30),
            keep in 0usize..10,
            max_age in 0u64..1_000_000,
            now in 1_000_000u64..2_000_000,
        ) {
            times.sort();
            times.dedup();
            let all: Vec<_> = times.iter().map(|t| backup(*t)).collect();
            let max_age = Duration::from_millis(max_age);
            let gone = expired(&all, keep, max_age, now);
            if let Some(newest) = all.last() {
                prop_assert!(!gone.contains(newest));
            }
            let left = all.len() - gone.len();
            if keep > 0 {
                prop_assert!(left <= keep.max(1));
            }
            for b in &gone {
                let rank_from_newest = all.len() - all.iter().position(|x| x == b).unwrap();
                let old = !max_age.is_zero() && now - b.time_ms > max_age.as_millis() as u64;
                prop_assert!(old || (keep > 0 && rank_from_newest > keep));
            }
        }
    }
}
