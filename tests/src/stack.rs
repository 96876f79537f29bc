//! The stack most end-to-end tests run against: a control with app
//! [`APP`], an API key of it and its PostgreSQL user `alice` (password
//! `wonderland`), one or more proxies in front of it and, optionally, a
//! Redis the proxies share.
//!
//! ```ignore
//! let s = Stack::builder().proxies(2).redis().proxy(|p| p.set("pool_size", "4")).start().await;
//! ```

use reqwest::StatusCode;
use rouse_control_api::{CreateDatabase, Engine, Name};
use serde_json::Value;

use crate::{metric, Control, ControlBuilder, Proxy, ProxyBuilder, Redis};

/// The app every [`Stack`] has.
pub const APP: &str = "shop";

/// A name the test knows to be valid.
pub fn name(s: &str) -> Name {
    Name::new(s).unwrap()
}

/// Settings of a [`Stack`]: by default one proxy, no Redis, and a control
/// that never hibernates a database by itself (tests hibernate explicitly).
pub struct StackBuilder<'a> {
    control: ControlBuilder,
    proxies: usize,
    redis: bool,
    configure: Box<dyn Fn(ProxyBuilder) -> ProxyBuilder + 'a>,
}

impl<'a> StackBuilder<'a> {
    /// Control's `hibernation_timeout` (`"0"` unless set).
    pub fn hibernation(mut self, timeout: &str) -> Self {
        self.control = self.control.hibernation_timeout(timeout);
        self
    }

    /// Settings of control, applied after the hibernation timeout.
    pub fn control(mut self, configure: impl FnOnce(ControlBuilder) -> ControlBuilder) -> Self {
        self.control = configure(self.control);
        self
    }

    /// How many proxies to start (1 unless set).
    pub fn proxies(mut self, n: usize) -> Self {
        self.proxies = n;
        self
    }

    /// A Redis whose URL every proxy is given: they share their state.
    pub fn redis(mut self) -> Self {
        self.redis = true;
        self
    }

    /// Settings of every proxy, applied after the Redis URL.
    pub fn proxy(mut self, configure: impl Fn(ProxyBuilder) -> ProxyBuilder + 'a) -> Self {
        self.configure = Box::new(configure);
        self
    }

    /// Starts Redis (if asked), control, the app with its key and user,
    /// then the proxies one after the other; panics when anything fails.
    pub async fn start(self) -> Stack {
        let redis = if self.redis {
            Some(Redis::start().await.unwrap())
        } else {
            None
        };
        let control = self.control.start().await.unwrap();
        let api = control.client();
        api.create_app(&name(APP)).await.unwrap();
        api.create_user(&name(APP), "alice", "wonderland")
            .await
            .unwrap();
        let key = api.create_key(&name(APP)).await.unwrap().key;
        let mut stack = Stack {
            control,
            proxies: Vec::new(),
            redis,
            key,
            http: reqwest::Client::builder()
                .pool_max_idle_per_host(600)
                .build()
                .unwrap(),
        };
        for _ in 0..self.proxies {
            let proxy = (self.configure)(stack.proxy_builder());
            stack.proxies.push(proxy.start().await.unwrap());
        }
        stack
    }
}

/// What a [`StackBuilder`] started; dropping it stops every server.
pub struct Stack {
    pub control: Control,
    pub proxies: Vec<Proxy>,
    pub redis: Option<Redis>,
    /// An API key of [`APP`].
    pub key: String,
    /// A client that keeps many connections open, for loads.
    pub http: reqwest::Client,
}

impl Stack {
    pub fn builder<'a>() -> StackBuilder<'a> {
        StackBuilder {
            control: Control::builder().hibernation_timeout("0"),
            proxies: 1,
            redis: false,
            configure: Box::new(|p| p),
        }
    }

    /// The first proxy.
    pub fn proxy(&self) -> &Proxy {
        &self.proxies[0]
    }

    /// A proxy like the stack's own (on its Redis, if any) but without
    /// their settings, for a test to configure and start one more.
    pub fn proxy_builder(&self) -> ProxyBuilder {
        let builder = Proxy::builder(&self.control);
        match &self.redis {
            Some(redis) => builder.redis_url(&format!("redis://{}", redis.addr()), &[]),
            None => builder,
        }
    }

    /// The shared Redis; panics unless the builder asked for one.
    pub fn redis(&self) -> &Redis {
        self.redis.as_ref().expect("the stack has no Redis")
    }

    pub fn redis_mut(&mut self) -> &mut Redis {
        self.redis.as_mut().expect("the stack has no Redis")
    }

    /// Creates database `db` of [`APP`] with control's replication factor.
    pub async fn create(&self, db: &str, engine: Engine) {
        let req = CreateDatabase {
            app: name(APP),
            name: name(db),
            engine,
            replication_factor: None,
            patroni: None,
        };
        self.control.client().create_database(&req).await.unwrap();
    }

    /// Puts [`APP`]'s database `db` to sleep now.
    pub async fn hibernate(&self, db: &str) {
        self.control
            .client()
            .hibernate(&name(APP), &name(db), true)
            .await
            .unwrap();
    }

    /// `postgres://user:password@<first proxy>/db`, without parameters.
    pub fn pg_url(&self, user: &str, password: &str, db: &str) -> String {
        self.pg_url_via(0, user, password, db)
    }

    /// `postgres://user:password@<proxy i>/db`, without parameters.
    pub fn pg_url_via(&self, i: usize, user: &str, password: &str, db: &str) -> String {
        let addr = self.proxies[i].postgres_addr();
        format!("postgres://{user}:{password}@{addr}/{db}")
    }

    /// A tokio-postgres session through the first proxy, without TLS.
    pub async fn pg_connect(
        &self,
        user: &str,
        password: &str,
        db: &str,
    ) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
        self.pg_connect_via(0, user, password, db).await
    }

    /// A tokio-postgres session through proxy `i`, without TLS.
    pub async fn pg_connect_via(
        &self,
        i: usize,
        user: &str,
        password: &str,
        db: &str,
    ) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
        let url = format!("{}?sslmode=disable", self.pg_url_via(i, user, password, db));
        let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await?;
        tokio::spawn(conn);
        Ok(client)
    }

    /// A gateway API call (`/v1/database/<op>`) through the first proxy,
    /// with the key as bearer; the status and the JSON answer (else null).
    pub async fn gateway(&self, op: &str, body: Value) -> (StatusCode, Value) {
        let resp = self
            .http
            .post(format!("{}/v1/database/{op}", self.proxy().url()))
            .bearer_auth(&self.key)
            .json(&body)
            .send()
            .await
            .unwrap();
        (resp.status(), resp.json().await.unwrap_or(Value::Null))
    }

    /// An rqlite API call through the first proxy's path prefix, with the
    /// key as `Authorization: ApiKey`; the status and the JSON answer.
    pub async fn rqlite(&self, db: &str, path: &str, body: Value) -> (StatusCode, Value) {
        let resp = self
            .http
            .post(format!("{}/{APP}/{db}{path}", self.proxy().url()))
            .header("Authorization", format!("ApiKey {}", self.key))
            .json(&body)
            .send()
            .await
            .unwrap();
        (resp.status(), resp.json().await.unwrap_or(Value::Null))
    }

    /// An rqlite API call through proxy `i` with `credential` as bearer.
    pub async fn rqlite_via(
        &self,
        i: usize,
        credential: &str,
        db: &str,
        path: &str,
        body: Value,
    ) -> reqwest::Response {
        self.http
            .post(format!("{}/{APP}/{db}{path}", self.proxies[i].url()))
            .bearer_auth(credential)
            .json(&body)
            .send()
            .await
            .unwrap()
    }

    /// One series of control's `/metrics` (0 when absent).
    pub async fn control_metric(&self, series: &str) -> f64 {
        metric(&format!("{}/metrics", self.control.api_url()), series).await
    }

    /// One series of proxy `i`'s `/metrics` (0 when absent).
    pub async fn proxy_metric(&self, i: usize, series: &str) -> f64 {
        let url = format!("http://{}/metrics", self.proxies[i].stats_addr());
        metric(&url, series).await
    }
}
