//! Validation of the request path after `/fhir/R4/` (still percent-encoded, without the query).
//!
//! Only clean FHIR paths pass: `Type`, `Type/id`, `Type/id/_history/vid`, `$op`, … A path that an
//! upstream or an intermediary could normalise into something else (dot segments, empty segments,
//! encoded slashes or backslashes, double encoding, `;` path parameters) is refused outright, so
//! what the gateway authorizes is exactly what the upstream serves.

use std::borrow::Cow;

use smallvec::SmallVec;

use super::request::Unclassifiable;

/// Longest raw path accepted, in bytes. Real FHIR paths are far shorter (an id is at most 64
/// characters).
pub const MAX_PATH_LEN: usize = 1024;

/// Longest FHIR id (`[A-Za-z0-9\-\.]{1,64}`).
pub const MAX_ID_LEN: usize = 64;

/// A path's decoded segments. A segment without an escape borrows the raw path, and a routable
/// path has at most four: classifying one allocates nothing.
pub type Segments<'a> = SmallVec<[Cow<'a, str>; 4]>;

/// Splits and decodes a raw path. `""` (the base) gives no segments.
///
/// Refused with [`Unclassifiable::BadPath`]:
/// - longer than [`MAX_PATH_LEN`];
/// - a raw byte outside RFC 3986 `pchar` (unreserved, sub-delims, `:`, `@`, `%`) or `/`, or a raw
///   `;` (servlet containers treat it as a path parameter);
/// - an empty segment (leading, trailing or double `/`);
/// - an invalid percent escape, or a decoded segment that is not UTF-8;
/// - a decoded segment that is `.` or `..`, contains `..`, or contains `/`, `\`, `%`, `;` or a
///   control character.
pub fn parse_path(raw: &str) -> Result<Segments<'_>, Unclassifiable> {
    if raw.len() > MAX_PATH_LEN {
        return Err(Unclassifiable::BadPath);
    }
    if raw.is_empty() {
        return Ok(Segments::new());
    }
    if !raw.bytes().all(|b| b == b'/' || is_raw_segment_byte(b)) {
        return Err(Unclassifiable::BadPath);
    }
    raw.split('/').map(decode_segment).collect()
}

/// Bytes allowed unencoded in a path segment: RFC 3986 `pchar` without `;`.
fn is_raw_segment_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric()
        || matches!(
            b,
            b'-' | b'.'
                | b'_'
                | b'~'
                | b'!'
                | b'$'
                | b'&'
                | b'\''
                | b'('
                | b')'
                | b'*'
                | b'+'
                | b','
                | b'='
                | b':'
                | b'@'
                | b'%'
        )
}

fn decode_segment(raw: &str) -> Result<Cow<'_, str>, Unclassifiable> {
    if raw.is_empty() {
        return Err(Unclassifiable::BadPath);
    }
    // Without an escape the segment is its raw bytes, which `is_raw_segment_byte` already
    // limited to characters none of the checks below refuses: only the dots remain.
    // Byte scans: a substring search sets up more than these short segments cost to walk.
    let bytes = raw.as_bytes();
    if !bytes.contains(&b'%') {
        if raw == "." || bytes.windows(2).any(|w| w == b"..") {
            return Err(Unclassifiable::BadPath);
        }
        return Ok(Cow::Borrowed(raw));
    }
    decode_escaped(raw).map(Cow::Owned)
}

/// A segment with escapes: decoded, then checked whole.
fn decode_escaped(raw: &str) -> Result<String, Unclassifiable> {
    let bytes = percent_decode_strict(raw.as_bytes()).ok_or(Unclassifiable::BadPath)?;
    let segment = String::from_utf8(bytes).map_err(|_| Unclassifiable::BadPath)?;
    if segment == "."
        || segment.contains("..")
        || segment
            .chars()
            .any(|c| matches!(c, '/' | '\\' | '%' | ';') || c.is_control())
    {
        return Err(Unclassifiable::BadPath);
    }
    Ok(segment)
}

/// Decodes `%XX` escapes; `None` when a `%` is not followed by two hex digits. `+` is kept.
pub(crate) fn percent_decode_strict(input: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(input.len());
    let mut i = 0;
    while i < input.len() {
        let b = input[i];
        if b == b'%' {
            let hi = hex_value(*input.get(i + 1)?)?;
            let lo = hex_value(*input.get(i + 2)?)?;
            out.push(hi << 4 | lo);
            i += 3;
        } else {
            out.push(b);
            i += 1;
        }
    }
    Some(out)
}

fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// FHIR `id` syntax: `[A-Za-z0-9\-\.]{1,64}`.
pub fn is_valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
}

/// Operation name after `$`: a letter, then letters, digits, `-` or `_`, at most 64 characters.
pub fn is_valid_operation_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    matches!(bytes.next(), Some(b) if b.is_ascii_alphabetic())
        && name.len() <= MAX_ID_LEN
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(raw: &str, expected: Result<&[&str], Unclassifiable>) {
        let got =
            parse_path(raw).map(|segs| segs.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        let expected = expected.map(|segs| segs.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        assert_eq!(got, expected, "path {raw:?}");
    }

    #[test]
    fn path_table() {
        use Unclassifiable::BadPath;
        let long_ok = format!("Patient/{}", "a".repeat(64));
        let too_long = format!("Patient/{}", "a".repeat(MAX_PATH_LEN));
        let table: Vec<(&str, Result<&[&str], Unclassifiable>)> = vec![
            ("", Ok(&[])),
            ("Patient", Ok(&["Patient"])),
            ("Patient/p1", Ok(&["Patient", "p1"])),
            (
                "Patient/p1/_history/2",
                Ok(&["Patient", "p1", "_history", "2"]),
            ),
            (
                "Patient/p1/$everything",
                Ok(&["Patient", "p1", "$everything"]),
            ),
            ("metadata", Ok(&["metadata"])),
            ("%50atient/p1", Ok(&["Patient", "p1"])),
            ("Patient/p1.v2", Ok(&["Patient", "p1.v2"])),
            ("Patient/p1/*", Ok(&["Patient", "p1", "*"])),
            (
                long_ok.as_str(),
                Ok(&[
                    "Patient",
                    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
                ]),
            ),
            (too_long.as_str(), Err(BadPath)),
            ("Patient/../AccessPolicy", Err(BadPath)),
            ("Patient/./p1", Err(BadPath)),
            ("..", Err(BadPath)),
            (".", Err(BadPath)),
            ("Patient/%2e%2e/AccessPolicy", Err(BadPath)),
            ("Patient/%2E%2E/AccessPolicy", Err(BadPath)),
            ("Patient/.%2e/AccessPolicy", Err(BadPath)),
            ("Patient/%2e", Err(BadPath)),
            ("Patient/p1..x", Err(BadPath)),
            ("Patient%2Fp1", Err(BadPath)),
            ("Patient%2fp1", Err(BadPath)),
            ("Observation%2F..%2FPatient%2Fp1", Err(BadPath)),
            ("Patient%5Cp1", Err(BadPath)),
            ("Patient%5cp1", Err(BadPath)),
            ("Patient\\p1", Err(BadPath)),
            ("//Patient", Err(BadPath)),
            ("/Patient", Err(BadPath)),
            ("Patient//p1", Err(BadPath)),
            ("Patient/p1/", Err(BadPath)),
            ("Patient/", Err(BadPath)),
            ("/", Err(BadPath)),
            ("Patient/p1%00", Err(BadPath)),
            ("Patient/p1\0", Err(BadPath)),
            ("Patient/p1%0a", Err(BadPath)),
            ("Patient/p1\n", Err(BadPath)),
            ("Patient/p1%7f", Err(BadPath)),
            ("Patient/p%", Err(BadPath)),
            ("Patient/p%4", Err(BadPath)),
            ("Patient/p%zz", Err(BadPath)),
            ("Patient/p%ff", Err(BadPath)),
            ("Patient/p%C3%A9", Ok(&["Patient", "p\u{e9}"])),
            ("Patient/p\u{e9}", Err(BadPath)),
            ("Patient/p%252F", Err(BadPath)),
            ("Patient/p1;jsessionid=x", Err(BadPath)),
            ("Patient/..;/AccessPolicy", Err(BadPath)),
            ("Patient/p1%3Bx", Err(BadPath)),
            ("Patient/p 1", Err(BadPath)),
            ("Patient/p1?x", Err(BadPath)),
            ("Patient/p1#x", Err(BadPath)),
        ];
        for (raw, expected) in table {
            check(raw, expected);
        }
    }

    proptest::proptest! {
        /// The fast path of an unescaped segment answers what decoding and checking it would.
        #[test]
        fn unescaped_segments_take_the_fast_path_to_the_same_answer(
            raw in "[A-Za-z0-9._~!$&'()*+,=:@-]{1,12}"
        ) {
            proptest::prop_assert_eq!(
                decode_segment(&raw).map(Cow::into_owned),
                decode_escaped(&raw)
            );
        }
    }

    #[test]
    fn id_syntax() {
        let table: &[(&str, bool)] = &[
            ("p1", true),
            ("a-b.c", true),
            ("0", true),
            ("", false),
            ("a_b", false),
            ("a b", false),
            ("a/b", false),
            ("\u{e9}", false),
        ];
        for &(id, ok) in table {
            assert_eq!(is_valid_id(id), ok, "{id:?}");
        }
        assert!(is_valid_id(&"x".repeat(64)));
        assert!(!is_valid_id(&"x".repeat(65)));
    }

    #[test]
    fn operation_name_syntax() {
        let table: &[(&str, bool)] = &[
            ("everything", true),
            ("validate-code", true),
            ("meta_add", true),
            ("graphql", true),
            ("", false),
            ("1x", false),
            ("-x", false),
            ("a.b", false),
            ("a$b", false),
        ];
        for &(name, ok) in table {
            assert_eq!(is_valid_operation_name(name), ok, "{name:?}");
        }
    }
}
