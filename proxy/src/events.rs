//! Following control's event stream (`/events`) for the life of the proxy:
//! status changes and drops make the resolver read a database afresh, a
//! new leader reorders its cached endpoints, a deleted API key is revoked
//! across the fleet, a changed or removed login is read afresh. After a
//! reconnect or a resync, events may have been missed, so every cached
//! route and credential is forgotten.

use std::sync::Arc;
use std::time::Duration;

use rouse_control_api::{event, Client, DbKey, Event};
use tracing::{debug, warn};

use crate::auth::Authenticator;
use crate::pg::Verifiers;
use crate::resolve::Resolver;

/// What control's news makes the proxy forget.
#[derive(Clone)]
pub(crate) struct Forget {
    pub(crate) resolver: Arc<Resolver>,
    pub(crate) auth: Arc<Authenticator>,
    pub(crate) verifiers: Verifiers,
}

pub(crate) async fn follow(control: Client, forget: Forget) {
    let forget_all = || {
        forget.resolver.clear();
        forget.auth.forget_all();
        forget.verifiers.forget_all();
    };
    let mut backoff = Duration::from_millis(100);
    loop {
        let connected = tokio::time::timeout(event::SILENT_FOR, control.events()).await;
        match connected {
            Err(_) => debug!("control does not answer for its event stream"),
            Ok(Ok(mut resp)) if resp.status().is_success() => {
                forget_all();
                backoff = Duration::from_millis(100);
                let mut frames = event::Decoder::default();
                // Control sends a keep-alive every few seconds: silence means
                // it is wedged or out of reach, and events may be missed.
                while let Ok(Ok(Some(chunk))) =
                    tokio::time::timeout(event::SILENT_FOR, resp.chunk()).await
                {
                    let frames = match frames.push(&chunk) {
                        Ok(frames) => frames,
                        Err(e) => {
                            warn!(error = %e, "control's event stream is broken");
                            break;
                        }
                    };
                    for frame in frames {
                        match frame {
                            event::Frame::Event(event) => apply(&event, &forget),
                            event::Frame::Resync => forget_all(),
                            event::Frame::Other => {}
                        }
                    }
                }
                warn!("control event stream ended; reconnecting");
            }
            Ok(Ok(resp)) => warn!(status = %resp.status(), "control refused the event stream"),
            Ok(Err(e)) => debug!(error = %e, "control event stream unavailable"),
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

fn apply(event: &Event, forget: &Forget) {
    let resolver = &forget.resolver;
    match event {
        // Any change of status or settings: read the database afresh.
        Event::Status {
            app, name, status, ..
        } => resolver.status_changed(&DbKey::new(app.clone(), name.clone()), *status),
        Event::Dropped { app, name } => resolver.dropped(&DbKey::new(app.clone(), name.clone())),
        Event::Leader {
            app,
            name,
            endpoints,
        } => resolver.set_endpoints(&DbKey::new(app.clone(), name.clone()), endpoints),
        Event::KeyRevoked { id, .. } => {
            let (auth, id) = (forget.auth.clone(), id.clone());
            tokio::spawn(async move { auth.revoke_key(&id).await });
        }
        Event::UserChanged { app, name } => {
            let (verifiers, app, name) = (forget.verifiers.clone(), app.clone(), name.clone());
            tokio::spawn(async move { verifiers.forget(&app, &name).await });
        }
    }
}
