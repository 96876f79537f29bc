//! Entry points for the fuzz targets in `fuzz/`: each feeds arbitrary bytes
//! to one parser of hostile input, the way the proxy itself would, and
//! checks what must hold whatever the bytes are. Nothing here runs in the
//! proxy.

use bytes::BytesMut;
use hyper::header::{HeaderMap, HeaderName, HeaderValue};

use crate::pg::console::commands;
use crate::pg::proto::{extended, frame, messages, results, startup};
use crate::pg::{scram, traffic};

/// PostgreSQL startup framing (untyped) and the startup packet.
pub fn pg_startup(data: &[u8]) {
    if let Ok(Some(len)) = frame::frame_len(data, false, frame::MAX_STARTUP) {
        assert!((4..=frame::MAX_STARTUP).contains(&len));
        if data.len() >= len {
            let _ = startup::parse(BytesMut::from(&data[..len]));
        }
    }
}

/// Typed messages as a client sends them while logging in, and as an
/// operator sends them to the admin console; a backend's answers to SQL
/// over HTTP; and a backend's bytes as session mode scans them for
/// ReadyForQuery, the same however cut.
pub fn pg_messages(mut data: &[u8]) {
    let statuses = |pieces: &[&[u8]]| {
        let mut scanner = traffic::ReadyScanner::default();
        let mut seen = Vec::new();
        for piece in pieces {
            scanner.feed(piece, |s| seen.push(s));
        }
        seen
    };
    let (head, tail) = data.split_at(data.len() / 3);
    assert_eq!(statuses(&[data]), statuses(&[head, tail]));
    while let Ok(Some(len)) = frame::frame_len(data, true, frame::MAX_AUTH_MESSAGE) {
        if data.len() < len {
            break;
        }
        let (_, body) = frame::typed(BytesMut::from(&data[..len]));
        let _ = messages::parse_sasl_initial(body.clone());
        let _ = results::parse_password(&body);
        if let Some(text) = results::parse_query(&body) {
            let _ = commands::parse(&text);
        }
        let _ = extended::row_description(&body);
        let _ = extended::data_row(&body);
        let _ = extended::command_tag(&body)
            .as_deref()
            .map(extended::tag_rows);
        let _ = extended::error_fields(&body);
        let _ = messages::parse_auth(body);
        data = &data[len..];
    }
}

/// Both SCRAM roles: the proxy as server to a client, and as client to a
/// backend, with the two messages taken from the input.
pub fn scram(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let (first, last) = text.split_once('\n').unwrap_or((&text, ""));
    let verifier = scram::Verifier::impossible(&[1; 32], "fuzz");
    if let Ok((server, _)) = scram::ServerExchange::start(&verifier, first) {
        // No password matches an impossible verifier.
        assert!(server.finish(&verifier, last).is_err());
    }
    let (mut client, _) = scram::ClientExchange::start();
    if client.respond(&verifier, &[0; 32], first).is_ok() {
        let _ = client.verify(last);
    }
}

/// RESP replies from a Redis server, one after another.
pub fn resp(mut data: &[u8]) {
    while let Ok(Some((_, used))) = crate::redis_front::resp::parse(data) {
        assert!(used > 0 && used <= data.len());
        data = &data[used..];
    }
}

/// HTTP routing: path, Host and basic-auth user from the input.
pub fn http_route(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let mut parts = text.splitn(3, '\n');
    let (path, host, user) = (parts.next().unwrap_or(""), parts.next(), parts.next());
    if let Ok(crate::route::Route::Rqlite { key, .. }) =
        crate::route::route(&crate::route::RouteInput {
            path,
            host,
            basic_user: user,
            bound: None,
            base_domain: Some("example.test"),
        })
    {
        // Whatever routed, routed to valid names.
        assert!(rouse_control_api::Name::new(key.app.as_str()).is_ok());
        assert!(rouse_control_api::Name::new(key.db.as_str()).is_ok());
    }
}

/// Credentials in request headers.
pub fn credentials(data: &[u8]) {
    let mut headers = HeaderMap::new();
    for (i, line) in data.split(|b| *b == b'\n').enumerate().take(4) {
        let name = match i % 2 {
            0 => HeaderName::from_static("authorization"),
            _ => HeaderName::from_static("x-api-key"),
        };
        if let Ok(value) = HeaderValue::from_bytes(line) {
            headers.append(name, value);
        }
    }
    let _ = crate::auth::presented(&headers);
}

/// The gateway's JSON: statements in every accepted shape.
pub fn gateway_json(data: &[u8]) {
    if let Ok(serde_json::Value::Array(queries)) = serde_json::from_slice(data) {
        for q in &queries {
            if let Ok(stmt) = crate::http::gateway::transaction_statement(q) {
                assert!(stmt[0].is_string());
            }
        }
    }
}

/// SQL over HTTP: a connection string (the first line) and a body.
pub fn sql_over_http(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let (connection, body) = text.split_once('\n').unwrap_or((&text, ""));
    if let Ok((login, statements, batch)) = crate::http::sql::parse(connection, body.as_bytes()) {
        // A login always names a role and a database; one query is never a batch.
        assert!(!login.user.is_empty() && !login.database.is_empty());
        assert!(batch || statements.len() == 1);
    }
}

/// The statement filter and the rqlite bodies and query strings around it.
pub fn sql_filter(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let verdict = crate::sql::check(&text);
    // Whatever passes alone also passes as a one-statement rqlite body, and
    // what is refused alone is refused there too.
    let body = serde_json::to_vec(&[text.as_ref()]).expect("a string serialises");
    assert_eq!(verdict.is_ok(), crate::sql::checked_body(&body).is_ok());
    let _ = crate::sql::checked_query(&text);
}

/// Control's event stream as the proxy reads it, cut into chunks at the
/// first byte's value.
pub fn events(data: &[u8]) {
    let cut = data.first().map_or(1, |b| usize::from(*b).max(1));
    let mut decoder = rouse_control_api::event::Decoder::default();
    for chunk in data.chunks(cut) {
        if decoder.push(chunk).is_err() {
            return;
        }
    }
}

/// An engine's HTTP answer as the rqlite leg reads it: the head, and a
/// chunked body decoded the same however its bytes arrive.
pub fn http_answer(data: &[u8]) {
    use crate::http::upstream::answer::{self, Chunked, Framing};
    if let Ok(Some((head, len))) = answer::parse_head(data, false) {
        assert!(len <= data.len().min(answer::MAX_HEAD));
        if let Framing::Length(n) = head.framing {
            assert!(n <= answer::MAX_BODY);
        }
    }
    let decode = |pieces: &[&[u8]]| {
        let (mut chunked, mut body, mut buf) =
            (Chunked::default(), BytesMut::new(), BytesMut::new());
        for piece in pieces {
            buf.extend_from_slice(piece);
            match chunked.decode(&mut buf, &mut body) {
                Ok(false) => {}
                Ok(true) => return Some(Ok(body)),
                Err(e) => return Some(Err(e)),
            }
        }
        None
    };
    let (head, tail) = data.split_at(data.len() / 2);
    assert_eq!(decode(&[data]), decode(&[head, tail]));
}
