//! Broker-neutral messages: what every adapter turns its own message type into.

use bytes::Bytes;

/// Message headers: case-insensitive names, one value each, in insertion order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Headers(Vec<(String, String)>);

impl Headers {
    /// No headers.
    pub fn new() -> Self {
        Self::default()
    }

    /// The value of `name` (case-insensitive), if present.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Sets `name` to `value`, replacing an earlier value.
    pub fn insert(&mut self, name: impl Into<String>, value: impl Into<String>) {
        let name = name.into();
        let value = value.into();
        match self
            .0
            .iter_mut()
            .find(|(k, _)| k.eq_ignore_ascii_case(&name))
        {
            Some(slot) => slot.1 = value,
            None => self.0.push((name, value)),
        }
    }

    /// Builder form of [`Headers::insert`].
    pub fn with(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.insert(name, value);
        self
    }

    /// Removes `name`.
    pub fn remove(&mut self, name: &str) {
        self.0.retain(|(k, _)| !k.eq_ignore_ascii_case(name));
    }

    /// All headers in order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }
}

/// A message as the broker carries it: headers and an opaque body.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Message {
    /// Metadata (see [`crate::protocol`] for the names Conveyor uses).
    pub headers: Headers,
    /// The payload.
    pub body: Bytes,
}

impl Message {
    /// A message with the given headers and body.
    pub fn new(headers: Headers, body: impl Into<Bytes>) -> Self {
        Message {
            headers,
            body: body.into(),
        }
    }
}

/// Makes a header value safe for every broker: no line breaks, at most `MAX` bytes.
pub fn header_safe(value: &str) -> String {
    const MAX: usize = 2000;
    let mut out: String = value
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if out.len() > MAX {
        let mut cut = MAX;
        while !out.is_char_boundary(cut) {
            cut -= 1;
        }
        out.truncate(cut);
        out.push('…');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_are_case_insensitive_and_replace() {
        let mut h = Headers::new().with("Conveyor-Id", "a");
        h.insert("conveyor-id", "b");
        assert_eq!(h.get("CONVEYOR-ID"), Some("b"));
        assert_eq!(h.iter().count(), 1);
        h.remove("Conveyor-Id");
        assert_eq!(h.get("Conveyor-Id"), None);
    }

    #[test]
    fn header_values_lose_line_breaks_and_length() {
        assert_eq!(header_safe("a\r\nb"), "a  b");
        assert!(header_safe(&"é".repeat(3000)).len() <= 2004);
    }
}
