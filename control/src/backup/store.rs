//! The backup destination, a directory or an S3-compatible object store,
//! behind one interface: the only code that speaks to it.

use std::path::Path;
use std::sync::Arc;

use futures::StreamExt;
use object_store::aws::AmazonS3Builder;
use object_store::local::LocalFileSystem;
use object_store::path::Path as Key;
use object_store::{ClientOptions, ObjectStore, PutPayload, WriteMultipart};
use rouse_config::{BackupDestination, BackupsConfig};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::error::{ControlError, Result};

/// Uploads go in parts of this size (S3's multipart minimum is 5 MiB).
const PART: usize = 8 << 20;
/// A manifest is a small JSON document; anything larger is not one.
pub const MAX_SMALL_OBJECT: u64 = 64 << 10;

pub struct BackupStore {
    inner: Arc<dyn ObjectStore>,
    /// Where the store is, for messages: no credentials.
    describe: String,
    prefix: String,
}

/// A destination that cannot be set up: the operator's error, at start.
fn setup(e: impl std::fmt::Display) -> ControlError {
    ControlError::Backup(e.to_string())
}

/// A destination that failed at work. Its own message may name host paths
/// or the bucket's layout: logged for the operator, not answered to a
/// caller, who may be a tenant.
fn failed(e: impl std::fmt::Display) -> ControlError {
    tracing::warn!(error = %e, "the backup destination failed");
    ControlError::Backup("the backup destination failed; control's log has the details".into())
}

impl BackupStore {
    pub fn open(config: &BackupsConfig, data_dir: &Path) -> Result<BackupStore> {
        let destination = config
            .destination(data_dir)
            .map_err(ControlError::BadRequest)?;
        Ok(match destination {
            BackupDestination::Dir(dir) => {
                std::fs::create_dir_all(&dir)
                    .map_err(|e| setup(format!("cannot create {}: {e}", dir.display())))?;
                BackupStore {
                    inner: Arc::new(LocalFileSystem::new_with_prefix(&dir).map_err(failed)?),
                    describe: format!("file://{}", dir.display()),
                    prefix: String::new(),
                }
            }
            BackupDestination::S3 { bucket, prefix } => {
                let s3 = &config.s3;
                let mut builder = AmazonS3Builder::from_env().with_bucket_name(&bucket);
                if let Some(region) = &s3.region {
                    builder = builder.with_region(region);
                }
                if let Some(endpoint) = &s3.endpoint {
                    builder = builder.with_endpoint(endpoint);
                }
                if let Some(id) = &s3.access_key_id {
                    builder = builder.with_access_key_id(id);
                }
                if let Some(secret) = &s3.secret_access_key {
                    builder = builder.with_secret_access_key(secret);
                }
                let mut options = ClientOptions::new().with_allow_http(
                    s3.endpoint
                        .as_deref()
                        .is_some_and(|e| e.starts_with("http://")),
                );
                if let Some(ca) = &s3.ca_file {
                    let pem = std::fs::read(ca)
                        .map_err(|e| setup(format!("backups.s3.ca_file {}: {e}", ca.display())))?;
                    let cert = object_store::Certificate::from_pem(&pem).map_err(failed)?;
                    options = options.with_root_certificate(cert);
                }
                let store = builder
                    .with_virtual_hosted_style_request(!s3.path_style)
                    .with_client_options(options)
                    // Backups run in the background and are tried again at
                    // the next turn: a dead endpoint fails in seconds.
                    .with_retry(object_store::RetryConfig {
                        max_retries: 3,
                        retry_timeout: std::time::Duration::from_secs(30),
                        ..Default::default()
                    })
                    .build()
                    .map_err(failed)?;
                BackupStore {
                    inner: Arc::new(store),
                    describe: format!("s3://{bucket}/{prefix}"),
                    prefix,
                }
            }
        })
    }

    pub fn describe(&self) -> &str {
        &self.describe
    }

    fn key(&self, name: &str) -> Key {
        if self.prefix.is_empty() {
            Key::from(name)
        } else {
            Key::from(format!("{}/{name}", self.prefix))
        }
    }

    /// Stores `file` under `name`, in parts; its size and SHA-256.
    pub async fn put_file(&self, name: &str, file: &Path) -> Result<(u64, String)> {
        let mut f = tokio::fs::File::open(file).await.map_err(failed)?;
        let upload = self
            .inner
            .put_multipart(&self.key(name))
            .await
            .map_err(failed)?;
        let mut writer = WriteMultipart::new_with_chunk_size(upload, PART);
        let mut hash = Sha256::new();
        let mut size = 0u64;
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = f.read(&mut buf).await.map_err(failed)?;
            if n == 0 {
                break;
            }
            hash.update(&buf[..n]);
            size += n as u64;
            writer.wait_for_capacity(4).await.map_err(failed)?;
            writer.write(&buf[..n]);
        }
        writer.finish().await.map_err(failed)?;
        Ok((size, hex::encode(hash.finalize())))
    }

    pub async fn put_small(&self, name: &str, bytes: Vec<u8>) -> Result<()> {
        self.inner
            .put(&self.key(name), PutPayload::from(bytes))
            .await
            .map_err(failed)?;
        Ok(())
    }

    /// A small object (a manifest), refused when larger than
    /// [`MAX_SMALL_OBJECT`].
    pub async fn get_small(&self, name: &str) -> Result<Vec<u8>> {
        let got = self.inner.get(&self.key(name)).await.map_err(not_found)?;
        if got.meta.size > MAX_SMALL_OBJECT {
            return Err(failed(format!(
                "{name} is {} bytes, too large for a manifest",
                got.meta.size
            )));
        }
        Ok(got.bytes().await.map_err(failed)?.to_vec())
    }

    /// Copies `name` into `file`; its size and SHA-256.
    pub async fn get_file(&self, name: &str, file: &Path) -> Result<(u64, String)> {
        let got = self.inner.get(&self.key(name)).await.map_err(not_found)?;
        let mut out = tokio::fs::File::create(file).await.map_err(failed)?;
        let mut stream = got.into_stream();
        let mut hash = Sha256::new();
        let mut size = 0u64;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(failed)?;
            hash.update(&chunk);
            size += chunk.len() as u64;
            out.write_all(&chunk).await.map_err(failed)?;
        }
        out.flush().await.map_err(failed)?;
        Ok((size, hex::encode(hash.finalize())))
    }

    /// The names (relative to the store's prefix) under `dir`.
    pub async fn list(&self, dir: &str) -> Result<Vec<String>> {
        let base = self.key(dir);
        let strip = if self.prefix.is_empty() {
            String::new()
        } else {
            format!("{}/", self.prefix)
        };
        let mut names = Vec::new();
        let mut listing = self.inner.list(Some(&base));
        while let Some(meta) = listing.next().await {
            let meta = match meta {
                Ok(m) => m,
                // A destination never written to has no such directory yet.
                Err(object_store::Error::NotFound { .. }) => break,
                Err(e) => return Err(failed(e)),
            };
            let full = meta.location.to_string();
            names.push(full.strip_prefix(&strip).unwrap_or(&full).to_string());
        }
        Ok(names)
    }

    /// The names of the directories right under `dir`.
    pub async fn subdirs(&self, dir: &str) -> Result<Vec<String>> {
        let listed = match self.inner.list_with_delimiter(Some(&self.key(dir))).await {
            Ok(l) => l,
            Err(object_store::Error::NotFound { .. }) => return Ok(Vec::new()),
            Err(e) => return Err(failed(e)),
        };
        Ok(listed
            .common_prefixes
            .iter()
            .filter_map(|p| p.filename().map(str::to_string))
            .collect())
    }

    pub async fn delete(&self, name: &str) -> Result<()> {
        match self.inner.delete(&self.key(name)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(failed(e)),
        }
    }
}

fn not_found(e: object_store::Error) -> ControlError {
    match e {
        object_store::Error::NotFound { .. } => ControlError::NotFound("no such backup".into()),
        e => failed(e),
    }
}
