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
mod tests {
    use super::*;

    /// Expected (context, type, letters, criteria) of a parsed scope.
    type Parsed<'a> = (ScopeContext, &'a str, &'a str, Option<&'a str>);

    /// `(scope word, expected)`; `None` = not a SMART scope.
    fn check(term: &str, expected: Option<Parsed<'_>>) {
        let got = SmartScope::parse(term);
        let got = got.as_ref().map(|s| {
            (
                s.context,
                s.resource_type.as_str(),
                s.letters(),
                s.criteria.as_deref(),
            )
        });
        let expected = expected.map(|(c, t, l, q)| (c, t, l.to_string(), q));
        assert_eq!(got, expected, "scope {term:?}");
    }

    #[test]
    fn parses_v1_and_v2_scopes() {
        use ScopeContext::*;
        let cases: &[(&str, Option<Parsed<'_>>)] = &[
            (
                "patient/Observation.rs",
                Some((Patient, "Observation", "rs", None)),
            ),
            ("patient/Patient.r", Some((Patient, "Patient", "r", None))),
            (
                "patient/Observation.c",
                Some((Patient, "Observation", "c", None)),
            ),
            ("patient/*.cruds", Some((Patient, "*", "cruds", None))),
            (
                "user/Appointment.cruds",
                Some((User, "Appointment", "cruds", None)),
            ),
            (
                "system/Encounter.cud",
                Some((System, "Encounter", "cud", None)),
            ),
            ("system/*.rs", Some((System, "*", "rs", None))),
            ("patient/*.read", Some((Patient, "*", "rs", None))),
            ("user/Patient.write", Some((User, "Patient", "cud", None))),
            ("system/Patient.*", Some((System, "Patient", "cruds", None))),
            (
                "patient/Practitioner.rus",
                Some((Patient, "Practitioner", "rus", None)),
            ),
            (
                "patient/Custom_Type1.s",
                Some((Patient, "Custom_Type1", "s", None)),
            ),
        ];
        for (term, expected) in cases {
            check(term, *expected);
        }
    }

    #[test]
    fn refuses_malformed_letters_and_non_resource_words() {
        for term in [
            "openid",
            "profile",
            "email",
            "fhirUser",
            "launch",
            "launch/patient",
            "offline_access",
            "online_access",
            "fhircast/Patient-open.read",
            "x/y.z",
            "patient/Patient.",
            "patient/Patient.sdurc",
            "patient/Patient.chum",
            "patient/Patient.c*",
            "patient/Patient.*c",
            "patient/Patient.rr",
            "patient/Patient.sr",
            "patient/Patient.READ",
            "Patient/Patient.rs",
            "admin/Patient.rs",
            "patient/.rs",
            "patient/Pat-ient.rs",
            "patient/Patient",
            "patient/Patient.rs.rs",
            "",
        ] {
            check(term, None);
        }
    }

    #[test]
    fn granular_queries_are_normalised() {
        use ScopeContext::*;
        let system = "http://terminology.hl7.org/CodeSystem/observation-category|laboratory";
        let lab = format!("patient/Observation.rs?category={system}");
        let want = format!("category={system}");
        check(
            &lab,
            Some((Patient, "Observation", "rs", Some(want.as_str()))),
        );
        check(
            "patient/Condition.rs?category=health-concern",
            Some((Patient, "Condition", "rs", Some("category=health-concern"))),
        );
        check(
            "user/Goal.rs?a=1&&b=2&a=3",
            Some((User, "Goal", "rs", Some("a=1&a=3&b=2"))),
        );
        check(
            "user/Goal.rs?flag",
            Some((User, "Goal", "rs", Some("flag="))),
        );
        check(
            "user/Goal.rs?x=a+b",
            Some((User, "Goal", "rs", Some("x=a%20b"))),
        );
        check(
            "user/Goal.rs?x=a%7Cb",
            Some((User, "Goal", "rs", Some("x=a%7Cb"))),
        );
        check("user/Goal.rs?", Some((User, "Goal", "rs", None)));
        check("user/Goal.rs?&", Some((User, "Goal", "rs", None)));
        check("user/Goal.rsx?a=1", None);
    }

    #[test]
    fn scope_string_keeps_resource_scopes_in_order() {
        let scopes =
            parse_scopes("openid profile  patient/Patient.rs offline_access\tuser/*.cud launch");
        let got: Vec<(String, String)> = scopes
            .iter()
            .map(|s| (s.resource_type.clone(), s.letters()))
            .collect();
        assert_eq!(
            got,
            vec![
                ("Patient".to_string(), "rs".to_string()),
                ("*".to_string(), "cud".to_string())
            ]
        );
        assert!(parse_scopes("").is_empty());
        assert!(parse_scopes("openid offline").is_empty());
    }

    #[test]
    fn letters_map_to_interactions() {
        use Interaction::*;
        let cases: &[(&str, &[Interaction])] = &[
            ("patient/Observation.c", &[Create]),
            ("patient/Observation.r", &[Read, Vread, History]),
            ("patient/Observation.u", &[Update]),
            ("patient/Observation.d", &[Delete]),
            ("patient/Observation.s", &[Search]),
            ("patient/Observation.rs", &[Read, Vread, History, Search]),
            ("patient/Observation.read", &[Read, Vread, History, Search]),
            ("patient/Observation.write", &[Create, Update, Delete]),
            (
                "patient/Observation.*",
                &[Read, Vread, Update, Delete, History, Create, Search],
            ),
        ];
        for (term, want) in cases {
            let scope = SmartScope::parse(term).expect(term);
            let got: Vec<Interaction> = scope.interactions().iter().collect();
            let mut want = want.to_vec();
            want.sort_by_key(|i| Interaction::ALL.iter().position(|a| a == i));
            assert_eq!(got, want, "{term}");
        }
    }

    #[test]
    fn read_only_means_only_r_and_s() {
        for (term, ro) in [
            ("patient/Patient.rs", true),
            ("patient/Patient.r", true),
            ("patient/Patient.s", true),
            ("patient/Patient.read", true),
            ("patient/Patient.rus", false),
            ("patient/Patient.c", false),
            ("patient/Patient.*", false),
        ] {
            assert_eq!(
                SmartScope::parse(term).expect(term).is_read_only(),
                ro,
                "{term}"
            );
        }
    }

    #[test]
    fn consent_subset() {
        let s = |t: &str| SmartScope::parse(t).expect(t);
        let cases = [
            ("patient/Condition.read", "patient/Condition.crs", true),
            (
                "patient/Condition.rs?category=x",
                "patient/Condition.rs",
                true,
            ),
            (
                "patient/Condition.rs?category=x",
                "patient/Condition.rs?encounter=y",
                false,
            ),
            (
                "patient/Condition.rs",
                "patient/Condition.rs?category=x",
                false,
            ),
            ("patient/Condition.rds", "patient/Condition.rs", false),
            ("user/Condition.rs", "patient/Condition.rs", false),
            ("patient/Observation.rs", "patient/Condition.rs", false),
        ];
        for (sub, sup, want) in cases {
            assert_eq!(s(sub).is_subset_of(&s(sup)), want, "{sub} ⊆ {sup}");
        }
    }
}
