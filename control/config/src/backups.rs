//! Backups of every managed database (`backups:`): where they go, how often,
//! how many are kept.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BackupsConfig {
    /// `file:///path` or `s3://bucket/prefix`; `<data_dir>/backups` when unset.
    pub destination: Option<String>,
    pub s3: S3Config,
    /// A database that changed is backed up at least this often; 0 turns
    /// the schedule off.
    #[serde(with = "crate::duration")]
    pub interval: Duration,
    /// Backups kept per database (the newest); 0 keeps every one.
    pub keep: usize,
    /// Backups older than this are removed (the newest always stays); 0
    /// keeps them whatever their age.
    #[serde(with = "crate::duration")]
    pub max_age: Duration,
    /// A database going to sleep is backed up first.
    pub on_hibernate: bool,
    /// Backups under way at once on this node.
    pub max_concurrent: usize,
}

impl Default for BackupsConfig {
    fn default() -> Self {
        BackupsConfig {
            destination: None,
            s3: S3Config::default(),
            interval: Duration::from_secs(24 * 3600),
            keep: 7,
            max_age: Duration::ZERO,
            on_hibernate: true,
            max_concurrent: 2,
        }
    }
}

/// An S3-compatible object store. Unset credentials come from the usual
/// `AWS_*` variables.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct S3Config {
    /// `https://host:port` of a store other than AWS.
    pub endpoint: Option<String>,
    pub region: Option<String>,
    /// `https://endpoint/bucket/key` instead of `https://bucket.endpoint/key`.
    pub path_style: bool,
    pub access_key_id: Option<String>,
    #[serde(skip_serializing)]
    pub secret_access_key: Option<String>,
    /// A PEM CA the endpoint's certificate is checked against (a store
    /// with a private certificate authority).
    pub ca_file: Option<PathBuf>,
}

/// Where backups go, parsed from `backups.destination`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackupDestination {
    Dir(PathBuf),
    S3 { bucket: String, prefix: String },
}

impl BackupsConfig {
    /// The destination, `<data_dir>/backups` when none is configured.
    pub fn destination(&self, data_dir: &std::path::Path) -> Result<BackupDestination, String> {
        let Some(url) = self.destination.as_deref() else {
            return Ok(BackupDestination::Dir(data_dir.join("backups")));
        };
        if let Some(path) = url.strip_prefix("file://") {
            if !path.starts_with('/') {
                return Err(format!(
                    "backups.destination {url}: a file destination is file:///absolute/path"
                ));
            }
            return Ok(BackupDestination::Dir(PathBuf::from(path)));
        }
        if let Some(rest) = url.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            if bucket.is_empty() {
                return Err(format!("backups.destination {url}: no bucket"));
            }
            return Ok(BackupDestination::S3 {
                bucket: bucket.to_string(),
                prefix: prefix.trim_matches('/').to_string(),
            });
        }
        Err(format!(
            "backups.destination {url}: use file:///path or s3://bucket/prefix"
        ))
    }

    pub(crate) fn validate(&self) -> Result<(), String> {
        self.destination(std::path::Path::new("/")).map(|_| ())?;
        if self.max_concurrent == 0 {
            return Err("backups.max_concurrent must be at least 1".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    fn with(url: &str) -> BackupsConfig {
        BackupsConfig {
            destination: Some(url.into()),
            ..Default::default()
        }
    }

    #[test]
    fn destinations_parse_and_bad_ones_are_named() {
        let data = Path::new("/var/lib/rouse");
        assert_eq!(
            BackupsConfig::default().destination(data).unwrap(),
            BackupDestination::Dir(data.join("backups"))
        );
        assert_eq!(
            with("file:///srv/backups").destination(data).unwrap(),
            BackupDestination::Dir("/srv/backups".into())
        );
        assert_eq!(
            with("s3://bucket/some/prefix/").destination(data).unwrap(),
            BackupDestination::S3 {
                bucket: "bucket".into(),
                prefix: "some/prefix".into()
            }
        );
        for bad in ["file://relative", "s3:///x", "ftp://host/x"] {
            let err = with(bad).destination(data).unwrap_err();
            assert!(err.contains(bad), "{err}");
        }
    }
}
