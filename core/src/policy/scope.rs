//! SMART-on-FHIR resource scopes (docs/medplum-compat.md §5): parsing of v1 (`read`, `write`, `*`) and
//! v2 (`cruds`) scopes with optional granular `?query`. Pure parsing: intersecting scopes with an
//! AccessPolicy is `effective.rs`'s job.

use crate::fhir::request::Interaction;
use crate::policy::compiled::InteractionSet;

/// The `patient/`, `user/` or `system/` prefix. It makes no difference to enforcement
/// (docs/medplum-compat.md §5); it matters for consent subset checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ScopeContext {
    Patient,
    User,
    System,
}

impl ScopeContext {
    pub fn as_str(self) -> &'static str {
        match self {
            ScopeContext::Patient => "patient",
            ScopeContext::User => "user",
            ScopeContext::System => "system",
        }
    }

    fn parse(s: &str) -> Option<ScopeContext> {
        match s {
            "patient" => Some(ScopeContext::Patient),
            "user" => Some(ScopeContext::User),
            "system" => Some(ScopeContext::System),
            _ => None,
        }
    }
}

/// One SMART resource scope, with v1 forms normalised to letters (`read` → `rs`, `write` → `cud`,
/// `*` → `cruds`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SmartScope {
    pub context: ScopeContext,
    /// A resource type name or `*`.
    pub resource_type: String,
    pub create: bool,
    pub read: bool,
    pub update: bool,
    pub delete: bool,
    pub search: bool,
    /// The granular query (without `?`), normalised as Medplum does: empty pieces dropped,
    /// repeated names grouped in first-appearance order, `+` kept as `%20`, no decoding.
    pub criteria: Option<String>,
}

impl SmartScope {
    /// Parses one scope word. Returns `None` for anything that is not a SMART resource scope
    /// (`openid`, `launch/patient`, `fhircast/…`, malformed letters, empty letters).
    pub fn parse(term: &str) -> Option<SmartScope> {
        let (base, query) = match term.split_once('?') {
            Some((base, query)) => (base, Some(query)),
            None => (term, None),
        };
        let (context, rest) = base.split_once('/')?;
        let context = ScopeContext::parse(context)?;
        // The type is `\w+` or `*`, so it never contains a dot: the last dot splits.
        let (resource_type, letters) = rest.split_once('.')?;
        if !(resource_type == "*" || is_word(resource_type)) {
            return None;
        }
        let [create, read, update, delete, search] = parse_letters(letters)?;
        let criteria = query.map(normalise_query).filter(|q| !q.is_empty());
        Some(SmartScope {
            context,
            resource_type: resource_type.to_string(),
            create,
            read,
            update,
            delete,
            search,
            criteria,
        })
    }

    /// The letters in canonical order, e.g. `"rs"`.
    pub fn letters(&self) -> String {
        let mut out = String::with_capacity(5);
        for (on, c) in [
            (self.create, 'c'),
            (self.read, 'r'),
            (self.update, 'u'),
            (self.delete, 'd'),
            (self.search, 's'),
        ] {
            if on {
                out.push(c);
            }
        }
        out
    }

    /// Medplum's read-only case: the letters are only `r` and/or `s`.
    pub fn is_read_only(&self) -> bool {
        !(self.create || self.update || self.delete) && (self.read || self.search)
    }

    /// The interactions these letters permit: `c` create; `r` read, vread and history;
    /// `u` update (and patch); `d` delete; `s` search.
    pub fn interactions(&self) -> InteractionSet {
        let mut set = InteractionSet::EMPTY;
        if self.create {
            set = set.with(Interaction::Create);
        }
        if self.read {
            set = set
                .with(Interaction::Read)
                .with(Interaction::Vread)
                .with(Interaction::History);
        }
        if self.update {
            set = set.with(Interaction::Update);
        }
        if self.delete {
            set = set.with(Interaction::Delete);
        }
        if self.search {
            set = set.with(Interaction::Search);
        }
        set
    }

    /// Consent check of `/auth/scope` (docs/medplum-compat.md §5): same prefix and type, a subset of the
    /// letters, and the same criteria unless `requested` has none.
    pub fn is_subset_of(&self, requested: &SmartScope) -> bool {
        self.context == requested.context
            && self.resource_type == requested.resource_type
            && (!self.create || requested.create)
            && (!self.read || requested.read)
            && (!self.update || requested.update)
            && (!self.delete || requested.delete)
            && (!self.search || requested.search)
            && (requested.criteria.is_none() || requested.criteria == self.criteria)
    }
}

/// Does the space-separated `scope` contain `word`?
pub fn has_word(scope: &str, word: &str) -> bool {
    scope.split_ascii_whitespace().any(|w| w == word)
}

/// Parses a space-separated OAuth scope string and keeps only the SMART resource scopes, in order.
pub fn parse_scopes(scope: &str) -> Vec<SmartScope> {
    scope
        .split_ascii_whitespace()
        .filter_map(SmartScope::parse)
        .collect()
}

/// `\w+`: ASCII letters, digits and `_`, at least one.
fn is_word(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// `[create, read, update, delete, search]`, or `None` when the letters are malformed. v2 letters
/// appear in the order `c r u d s`, each at most once; the empty string is refused (Medplum's
/// regex accepts it by accident).
fn parse_letters(letters: &str) -> Option<[bool; 5]> {
    match letters {
        "read" => return Some([false, true, false, false, true]),
        "write" => return Some([true, false, true, true, false]),
        "*" => return Some([true; 5]),
        "" => return None,
        _ => {}
    }
    const ORDER: [u8; 5] = *b"cruds";
    let mut out = [false; 5];
    let mut next = 0;
    for b in letters.bytes() {
        let pos = ORDER[next..].iter().position(|&c| c == b)? + next;
        out[pos] = true;
        next = pos + 1;
    }
    Some(out)
}

/// Medplum parses the granular query with Node's `querystring` (no decoding) and joins it again:
/// empty pieces vanish, a piece without `=` gets one, `+` becomes `%20`, and repeated names are
/// grouped at the position of their first appearance.
fn normalise_query(query: &str) -> String {
    let mut groups: Vec<(String, Vec<String>)> = Vec::new();
    for piece in query.split('&').filter(|p| !p.is_empty()) {
        let (name, value) = piece.split_once('=').unwrap_or((piece, ""));
        let name = name.replace('+', "%20");
        let value = value.replace('+', "%20");
        match groups.iter_mut().find(|(n, _)| *n == name) {
            Some((_, values)) => values.push(value),
            None => groups.push((name, vec![value])),
        }
    }
    let mut out = String::with_capacity(query.len());
    for (name, values) in &groups {
        for value in values {
            if !out.is_empty() {
                out.push('&');
            }
            out.push_str(name);
            out.push('=');
            out.push_str(value);
        }
    }
    out
}

#[cfg(test)]
mod tests;
