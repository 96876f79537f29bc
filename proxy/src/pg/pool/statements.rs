//! A transaction-pooled client's named statements, remembered so that they
//! can be prepared again on whichever backend serves its next transaction.

use std::collections::HashMap;

use bytes::BytesMut;

/// Name -> the Parse message that made it. Most clients of a pool never
/// name a statement, and an idle client should cost little: the map is
/// made at the first (a `HashMap` is 48 bytes before it holds anything).
#[derive(Default)]
#[allow(clippy::box_collection)]
pub(crate) struct Statements(Option<Box<HashMap<String, BytesMut>>>);

impl Statements {
    pub(super) fn get(&self, name: &str) -> Option<&BytesMut> {
        self.0.as_ref()?.get(name)
    }

    pub(super) fn insert(&mut self, name: String, parse: BytesMut) {
        self.0.get_or_insert_default().insert(name, parse);
    }

    pub(super) fn remove(&mut self, name: &str) {
        if let Some(map) = &mut self.0 {
            map.remove(name);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remembers_replaces_and_forgets_by_name() {
        let mut s = Statements::default();
        assert!(s.get("a").is_none());
        s.remove("a");
        s.insert("a".into(), BytesMut::from(&b"P1"[..]));
        s.insert("a".into(), BytesMut::from(&b"P2"[..]));
        s.insert("b".into(), BytesMut::from(&b"P3"[..]));
        assert_eq!(s.get("a").map(|p| &p[..]), Some(&b"P2"[..]));
        s.remove("a");
        assert!(s.get("a").is_none());
        assert_eq!(s.get("b").map(|p| &p[..]), Some(&b"P3"[..]));
    }
}
