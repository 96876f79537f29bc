//! A real S3-compatible server for tests: moto in server mode, behind
//! HAProxy for TLS (a certificate of a throwaway CA; moto's own TLS ends
//! connections without a close_notify, which OpenSSL clients refuse), on
//! free loopback ports, with a bucket.

use std::process::Command;

use anyhow::{Context, Result};
use tempfile::TempDir;

use crate::process::ServerProcess;
use crate::ControlBuilder;
use crate::{binary, free_port, temp_dir, TlsFiles, LOCALHOST, START_TIMEOUT};

/// Any key pair works against moto; these are what the tests pass.
pub const ACCESS_KEY_ID: &str = "rouse-test-key";
pub const SECRET_ACCESS_KEY: &str = "rouse-test-secret";
pub const REGION: &str = "us-east-1";

pub struct S3 {
    process: ServerProcess,
    _tls_front: ServerProcess,
    port: u16,
    tls: TlsFiles,
    _dir: TempDir,
}

impl S3 {
    /// Starts `$MOTO_SERVER` (else `moto_server` on PATH) and makes `bucket`.
    pub async fn start(bucket: &str) -> Result<S3> {
        let dir = temp_dir("rouse-s3")?;
        let tls = TlsFiles::make(dir.path());
        let (port, plain) = (free_port(LOCALHOST), free_port(LOCALHOST));
        let mut cmd = Command::new(binary("MOTO_SERVER", "moto_server"));
        cmd.args(["-H", "127.0.0.1", "-p", &plain.to_string()]);
        let process = ServerProcess::spawn("moto_server", cmd, &dir.path().join("moto.log"))?;
        let pem = dir.path().join("front.pem");
        std::fs::write(
            &pem,
            [std::fs::read(&tls.cert)?, std::fs::read(&tls.key)?].concat(),
        )?;
        let cfg = dir.path().join("haproxy.cfg");
        std::fs::write(
            &cfg,
            format!(
                "global\n  maxconn 256\ndefaults\n  mode http\n  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\n\
                 frontend s3\n  bind 127.0.0.1:{port} ssl crt {}\n  default_backend moto\n\
                 backend moto\n  server moto 127.0.0.1:{plain}\n",
                pem.display()
            ),
        )?;
        let mut front = Command::new(binary("HAPROXY", "haproxy"));
        front.arg("-db").arg("-f").arg(&cfg);
        let mut tls_front =
            ServerProcess::spawn("haproxy", front, &dir.path().join("haproxy.log"))?;
        let mut process = process;
        let client = client(&tls)?;
        let url = format!("https://localhost:{port}/");
        let plain_url = format!("http://127.0.0.1:{plain}/");
        process
            .wait_ready(START_TIMEOUT, || {
                let url = plain_url.clone();
                async move {
                    reqwest::get(url).await?;
                    Ok(())
                }
            })
            .await?;
        tls_front
            .wait_ready(START_TIMEOUT, || {
                let (client, url) = (client.clone(), url.clone());
                async move {
                    client.get(url).send().await?.error_for_status()?;
                    Ok(())
                }
            })
            .await?;
        // moto accepts any signature, so an unsigned request makes the bucket.
        let made = client
            .put(format!("https://localhost:{port}/{bucket}"))
            .send()
            .await?;
        anyhow::ensure!(
            made.status().is_success(),
            "cannot create bucket {bucket}: {}",
            made.status()
        );
        Ok(S3 {
            process,
            _tls_front: tls_front,
            port,
            tls,
            _dir: dir,
        })
    }

    /// By name, as clients check it against the certificate (pgBackRest
    /// does not match addresses).
    pub fn endpoint(&self) -> String {
        format!("https://localhost:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The CA that signed the server's certificate.
    pub fn ca_file(&self) -> &std::path::Path {
        &self.tls.ca
    }

    pub fn log_tail(&self, lines: usize) -> String {
        self.process.log_tail(lines)
    }

    /// `builder` with the settings of a control that backs up to
    /// `s3://<bucket>/<prefix>` here.
    pub fn backing_up(
        &self,
        builder: ControlBuilder,
        bucket: &str,
        prefix: &str,
    ) -> ControlBuilder {
        [
            ("DESTINATION", format!("s3://{bucket}/{prefix}")),
            ("S3__ENDPOINT", self.endpoint()),
            ("S3__REGION", REGION.into()),
            ("S3__PATH_STYLE", "true".into()),
            ("S3__ACCESS_KEY_ID", ACCESS_KEY_ID.into()),
            ("S3__SECRET_ACCESS_KEY", SECRET_ACCESS_KEY.into()),
            ("S3__CA_FILE", self.tls.ca.display().to_string()),
        ]
        .into_iter()
        .fold(builder, |b, (k, v)| b.env(format!("ROUSE_BACKUPS__{k}"), v))
    }

    /// Object keys under `prefix` in `bucket` (first 1,000).
    pub async fn keys(&self, bucket: &str, prefix: &str) -> Result<Vec<String>> {
        let body = client(&self.tls)?
            .get(format!(
                "{}/{bucket}?list-type=2&prefix={prefix}",
                self.endpoint()
            ))
            .send()
            .await?
            .text()
            .await?;
        Ok(body
            .split("<Key>")
            .skip(1)
            .filter_map(|s| s.split("</Key>").next())
            .map(str::to_string)
            .collect())
    }

    /// Overwrites the object `key` in `bucket` with `bytes`.
    pub async fn put(&self, bucket: &str, key: &str, bytes: Vec<u8>) -> Result<()> {
        let resp = client(&self.tls)?
            .put(format!("{}/{bucket}/{key}", self.endpoint()))
            .body(bytes)
            .send()
            .await?;
        anyhow::ensure!(resp.status().is_success(), "put {key}: {}", resp.status());
        Ok(())
    }

    pub async fn get(&self, bucket: &str, key: &str) -> Result<Vec<u8>> {
        let resp = client(&self.tls)?
            .get(format!("{}/{bucket}/{key}", self.endpoint()))
            .send()
            .await?;
        anyhow::ensure!(resp.status().is_success(), "get {key}: {}", resp.status());
        Ok(resp.bytes().await?.to_vec())
    }
}

fn client(tls: &TlsFiles) -> Result<reqwest::Client> {
    let ca = std::fs::read(&tls.ca).context("the test CA")?;
    Ok(reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(&ca)?)
        .build()?)
}
