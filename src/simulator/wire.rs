//! What goes over the wire, whichever forge is simulated: the request a handler sees (raw path
//! split into decoded segments, query pairs with repeated keys), the reply it builds, the
//! percent-encoding of URLs the simulator writes into bodies and headers, and the two timestamp
//! formats the forges print.

use actix_web::http::header::HeaderMap;
use actix_web::http::{Method, StatusCode};
use actix_web::HttpResponse;
use bytes::Bytes;
use percent_encoding::{percent_decode_str, utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use serde_json::Value;

/// Characters left as they are in a query value or a single path segment (RFC 3986
/// unreserved); everything else, `/` included, is percent-encoded.
const COMPONENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// Like [`COMPONENT`] but keeps `/`: a file path inside a URL.
const PATH: &AsciiSet = &COMPONENT.remove(b'/');

/// One request as the forge handlers see it.
pub(crate) struct Incoming {
    pub method: Method,
    /// The path exactly as sent (still percent-encoded), forge prefix included.
    pub path: String,
    /// The query string exactly as sent, without `?`.
    pub query: String,
    /// Path segments after the forge prefix, each percent-decoded on its own, so an encoded
    /// `%2F` stays inside its segment (GitLab project paths, GitHub branch names).
    pub segments: Vec<String>,
    /// Decoded query pairs in order; keys may repeat (`refs[]=a&refs[]=b`).
    pub params: Vec<(String, String)>,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Incoming {
    pub fn new(
        method: Method,
        path: String,
        query: String,
        rest: &str,
        headers: HeaderMap,
        body: Bytes,
    ) -> Self {
        let segments = rest
            .strip_prefix('/')
            .unwrap_or(rest)
            .split('/')
            .filter(|s| !s.is_empty())
            .map(decode)
            .collect();
        let params = parse_query(&query);
        Self {
            method,
            path,
            query,
            segments,
            params,
            headers,
            body,
        }
    }

    /// The first value of a query parameter.
    pub fn param(&self, name: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// Every value of a repeated query parameter.
    pub fn params_named<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.params
            .iter()
            .filter(move |(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// Path and query, as a fault's `path_contains` is matched against.
    pub fn target(&self) -> String {
        if self.query.is_empty() {
            self.path.clone()
        } else {
            format!("{}?{}", self.path, self.query)
        }
    }
}

/// A response under construction; turned into an actix response only after it is recorded.
pub(crate) struct Reply {
    pub status: StatusCode,
    pub headers: Vec<(&'static str, String)>,
    pub content_type: Option<&'static str>,
    pub body: Vec<u8>,
}

impl Reply {
    pub fn json(status: StatusCode, value: &Value) -> Self {
        Self {
            status,
            headers: Vec::new(),
            content_type: Some("application/json; charset=utf-8"),
            body: serde_json::to_vec(value).unwrap_or_default(),
        }
    }

    pub fn bytes(status: StatusCode, content_type: &'static str, body: Vec<u8>) -> Self {
        Self {
            status,
            headers: Vec::new(),
            content_type: Some(content_type),
            body,
        }
    }

    pub fn empty(status: StatusCode) -> Self {
        Self {
            status,
            headers: Vec::new(),
            content_type: None,
            body: Vec::new(),
        }
    }

    pub fn with_header(mut self, name: &'static str, value: impl Into<String>) -> Self {
        self.headers.push((name, value.into()));
        self
    }

    /// The value of a header this reply already carries.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn has_header(&self, name: &str) -> bool {
        self.headers
            .iter()
            .any(|(n, _)| n.eq_ignore_ascii_case(name))
    }

    pub fn into_response(self) -> HttpResponse {
        let mut builder = HttpResponse::build(self.status);
        if let Some(ct) = self.content_type {
            builder.insert_header(("content-type", ct));
        }
        for (name, value) in self.headers {
            builder.append_header((name, value));
        }
        builder.body(self.body)
    }
}

/// Decodes one URL component (a path segment or a query key or value before `+` handling).
pub(crate) fn decode(s: &str) -> String {
    percent_decode_str(s).decode_utf8_lossy().into_owned()
}

/// Parses `a=1&b=x+y&refs%5B%5D=c` into decoded pairs, keeping order and repeats; `+` is a
/// space, as in HTML forms.
pub(crate) fn parse_query(query: &str) -> Vec<(String, String)> {
    query
        .split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (decode(&k.replace('+', " ")), decode(&v.replace('+', " ")))
        })
        .collect()
}

/// Encodes a query value or a single path segment.
pub(crate) fn encode_component(s: &str) -> String {
    utf8_percent_encode(s, COMPONENT).to_string()
}

/// Encodes a file path for a URL, keeping its slashes.
pub(crate) fn encode_path(s: &str) -> String {
    utf8_percent_encode(s, PATH).to_string()
}

/// Builds `a=1&b=2` from pairs, encoding each key and value.
pub(crate) fn build_query(pairs: &[(String, String)]) -> String {
    pairs
        .iter()
        .map(|(k, v)| format!("{}={}", encode_component(k), encode_component(v)))
        .collect::<Vec<_>>()
        .join("&")
}

/// The URL of the same request with some query parameters replaced or added: the target of
/// a `Link` header or a next-page hint.
pub(crate) fn page_url(base_url: &str, req: &Incoming, set: &[(&str, String)]) -> String {
    let mut pairs: Vec<(String, String)> = req
        .params
        .iter()
        .filter(|(k, _)| !set.iter().any(|(name, _)| name == k))
        .cloned()
        .collect();
    pairs.extend(set.iter().map(|(k, v)| (k.to_string(), v.clone())));
    format!("{base_url}{}?{}", req.path, build_query(&pairs))
}

/// Seconds since the Unix epoch, now.
pub(crate) fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// `2011-04-14T16:00:49Z`, as GitHub prints times.
pub(crate) fn rfc3339(unix: i64) -> String {
    let (y, mo, d, h, mi, s) = civil(unix);
    format!("{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}Z")
}

/// `2012-10-12T17:04:47.000Z`, as GitLab prints times.
pub(crate) fn rfc3339_millis(unix: i64) -> String {
    let (y, mo, d, h, mi, s) = civil(unix);
    format!("{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}.000Z")
}

/// UTC calendar fields of a Unix time (Howard Hinnant's `civil_from_days`).
fn civil(unix: i64) -> (i64, i64, i64, i64, i64, i64) {
    let days = unix.div_euclid(86_400);
    let secs = unix.rem_euclid(86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day, secs / 3600, secs % 3600 / 60, secs % 60)
}

/// A random identifier in the 8-4-4-4-12 form of a version 4 UUID, like the forges' delivery
/// and request ids.
pub(crate) fn random_uuid() -> String {
    let r: u128 = rand::random();
    let hex = format!("{r:032x}");
    format!(
        "{}-{}-4{}-a{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[13..16],
        &hex[17..20],
        &hex[20..32]
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_302_796_849), "2011-04-14T16:00:49Z");
        assert_eq!(rfc3339_millis(1_350_061_487), "2012-10-12T17:04:47.000Z");
        assert_eq!(rfc3339(-1), "1969-12-31T23:59:59Z");
    }

    #[test]
    fn query_keeps_repeats_and_decodes() {
        assert_eq!(
            parse_query("refs%5B%5D=main&refs[]=feature%2Fx&q=a+b&flag"),
            vec![
                ("refs[]".to_string(), "main".to_string()),
                ("refs[]".to_string(), "feature/x".to_string()),
                ("q".to_string(), "a b".to_string()),
                ("flag".to_string(), String::new()),
            ]
        );
        let pairs = vec![("page_token".to_string(), "a/b c".to_string())];
        assert_eq!(build_query(&pairs), "page_token=a%2Fb%20c");
        assert_eq!(parse_query(&build_query(&pairs)), pairs);
    }

    #[test]
    fn segments_decode_one_by_one() {
        let req = Incoming::new(
            Method::GET,
            String::new(),
            String::new(),
            "/projects/acme%2Fplatform%2Fdeploy/repository/tree",
            HeaderMap::new(),
            Bytes::new(),
        );
        assert_eq!(
            req.segments,
            ["projects", "acme/platform/deploy", "repository", "tree"]
        );
    }

    #[test]
    fn uuid_shape() {
        let id = random_uuid();
        let parts: Vec<_> = id.split('-').map(str::len).collect();
        assert_eq!(parts, [8, 4, 4, 4, 12], "{id}");
    }
}
