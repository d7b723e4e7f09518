//! The byte-level path of [`super::filter_bytes`] for searchset-like Bundles.
//!
//! Parsing a whole Bundle into `serde_json::Value` (an `IndexMap` and a `String` per object and
//! string) and serialising it again costs ten times more than the policy checks. Here the Bundle,
//! each entry and each entry's resource are only split into their members, as borrowed raw JSON
//! (`&RawValue`), in one pass of serde_json's parser; what the policy looks at is materialised,
//! what it does not change is copied to the output as it came (an unchanged entry as one slice of
//! the input).
//!
//! Per resource, only the members its criteria can read become a `Value` (see [`KeySet`]); the
//! policy's own `satisfied` decides on that pruned resource (debug builds check that the whole
//! resource gets the same answer). In a surviving resource, a member a hiddenFields path may
//! reach is redacted with the policy's own `redact` on a one-member object (the removal works
//! member by member) and re-serialised; the other members are copied.
//!
//! Anything unusual (duplicate member names in the Bundle or an entry, entries or resources that
//! are not objects, batch or transaction responses, a body that is not a Bundle, any error) stops
//! this path: the caller then runs the `Value` path on the whole body, which decides. A resource
//! with duplicate member names, or a nested Bundle, goes through the `Value` path on its own.

use std::borrow::Cow;
use std::fmt;
use std::ops::Range;

use serde::de::{self, DeserializeSeed, Deserializer as _, MapAccess, SeqAccess, Visitor};
use serde_json::value::RawValue;
use serde_json::{Map, Value};

use crate::fhir::request::Interaction;
use crate::fhir::searchparam;
use crate::policy::EffectivePolicy;
use crate::policy::compiled::CompiledEntry;

use super::UrlRewrite;

/// The fast path does not apply: the `Value` path must decide. Never shown to anyone.
#[derive(Debug)]
pub(super) struct GiveUp;

impl From<serde_json::Error> for GiveUp {
    fn from(_: serde_json::Error) -> GiveUp {
        GiveUp
    }
}

fn give_up<E: de::Error>() -> E {
    E::custom("fast path does not apply")
}

const JSON_WS: [char; 4] = [' ', '\t', '\n', '\r'];

/// Filters `text`, a Bundle that is neither a batch nor a transaction response, with the
/// semantics of [`super::filter_value`]. `Err` for anything else or anything unusual.
pub(super) fn filter(
    policy: &EffectivePolicy,
    text: &str,
    drop_total: bool,
    rewrite: Option<UrlRewrite<'_>>,
) -> Result<Vec<u8>, GiveUp> {
    if !text.trim_start_matches(JSON_WS).starts_with('{') {
        return Err(GiveUp);
    }
    let rewriter = match rewrite {
        Some(r) => Some(Rewriter::new(r, text)?),
        None => None,
    };
    let mut ctx = Ctx::new(policy, Io { text, rewriter });
    ctx.out.push(b'{');
    let mut de = serde_json::Deserializer::from_str(text);
    let mut bundle = de.deserialize_map(BundleVisitor { ctx: &mut ctx })?;
    de.end()?;
    if has_duplicates(&bundle.members) {
        return Err(GiveUp);
    }
    let str_member = |name: &str| {
        bundle
            .members
            .iter()
            .find_map(|(k, m)| match m {
                Member::Raw(raw) if k.0 == name => Some(raw_str(raw)),
                _ => None,
            })
            .transpose()
            .map(Option::flatten)
    };
    if str_member("resourceType")?.as_deref() != Some("Bundle") {
        return Err(GiveUp);
    }
    if let Some("batch-response" | "transaction-response") = str_member("type")?.as_deref() {
        return Err(GiveUp);
    }
    // What is not written yet: everything after the entries, or everything when `entry` came
    // before `resourceType` (then it was kept raw and is filtered now).
    for (key, member) in bundle.members.get(bundle.written..).unwrap_or_default() {
        let Member::Raw(raw) = member else {
            continue;
        };
        if key.0 == "entry" && raw.get().starts_with('[') {
            ctx.put_key(key)?;
            let mut de = serde_json::Deserializer::from_str(raw.get());
            bundle.dropped |= de.deserialize_seq(EntriesVisitor { ctx: &mut ctx })?;
        } else {
            ctx.put_member(key, raw)?;
        }
    }
    ctx.finish(bundle.dropped || drop_total)
}

// ---- members -------------------------------------------------------------------------------

/// A member name, borrowed from the input unless it had escapes.
#[derive(Debug)]
struct Key<'de>(Cow<'de, str>);

impl<'de> de::Deserialize<'de> for Key<'de> {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct KeyVisitor;
        impl<'de> Visitor<'de> for KeyVisitor {
            type Value = Key<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a member name")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(v.to_string())))
            }
        }
        d.deserialize_str(KeyVisitor)
    }
}

type Fields<'de> = Vec<(Key<'de>, &'de RawValue)>;

/// An object's members in order, as raw JSON.
struct FieldsVisitor;

impl<'de> Visitor<'de> for FieldsVisitor {
    type Value = Fields<'de>;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON object")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut fields = Vec::with_capacity(24);
        while let Some(key) = map.next_key::<Key<'de>>()? {
            fields.push((key, map.next_value::<&'de RawValue>()?));
        }
        Ok(fields)
    }
}

impl<'de> DeserializeSeed<'de> for FieldsVisitor {
    type Value = Fields<'de>;
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_map(self)
    }
}

/// Whether two members share a name. Names are first compared by length and leading bytes, so
/// the usual case (no duplicates, a few dozen members) costs no string comparison.
fn has_duplicates<T>(fields: &[(Key<'_>, T)]) -> bool {
    let tag = |k: &str| {
        let mut head = [0u8; 8];
        let n = k.len().min(8);
        head[..n].copy_from_slice(&k.as_bytes()[..n]);
        (k.len(), u64::from_le_bytes(head))
    };
    let mut tags = [(0usize, 0u64); 32];
    if fields.len() > tags.len() {
        return fields
            .iter()
            .enumerate()
            .any(|(i, (k, _))| fields[..i].iter().any(|(o, _)| o.0 == k.0));
    }
    for (i, (key, _)) in fields.iter().enumerate() {
        let t = tag(&key.0);
        for (j, other) in tags[..i].iter().enumerate() {
            if *other == t && fields[j].0.0 == key.0 {
                return true;
            }
        }
        tags[i] = t;
    }
    false
}

/// A raw JSON string's text; `None` when the value is not a string.
fn raw_str(raw: &RawValue) -> Result<Option<Cow<'_, str>>, GiveUp> {
    let s = raw.get();
    let Some(inner) = s.strip_prefix('"').and_then(|s| s.strip_suffix('"')) else {
        return Ok(None);
    };
    if inner.contains('\\') {
        return Ok(Some(Cow::Owned(serde_json::from_str::<String>(s)?)));
    }
    Ok(Some(Cow::Borrowed(inner)))
}

fn write_key(out: &mut Vec<u8>, key: &Key<'_>, first: &mut bool) -> Result<(), GiveUp> {
    if !std::mem::take(first) {
        out.push(b',');
    }
    match &key.0 {
        // Borrowed: the input spelled it without escapes, so it needs none.
        Cow::Borrowed(k) => {
            out.push(b'"');
            out.extend_from_slice(k.as_bytes());
            out.push(b'"');
        }
        Cow::Owned(k) => serde_json::to_writer(&mut *out, k)?,
    }
    out.push(b':');
    Ok(())
}

fn write_fields(io: &Io<'_>, out: &mut Vec<u8>, fields: &Fields<'_>) -> Result<(), GiveUp> {
    out.push(b'{');
    let mut first = true;
    for (key, raw) in fields {
        write_key(out, key, &mut first)?;
        io.copy(out, raw.get());
    }
    out.push(b'}');
    Ok(())
}

// ---- where things are in the input ---------------------------------------------------------

/// The position of `part`, a slice of `text`, in `text`.
fn offset(text: &str, part: &str) -> Option<usize> {
    let start = (part.as_ptr() as usize).checked_sub(text.as_ptr() as usize)?;
    (start.checked_add(part.len())? <= text.len()).then_some(start)
}

/// The whole object in `text` whose first member name is `first` and whose last member value
/// ends at `last_end`: from its `{` to after its `}`. `None` when the name had escapes (it is
/// not a slice of the input then).
fn object_span(text: &str, first: &Key<'_>, last_end: usize) -> Option<Range<usize>> {
    let Cow::Borrowed(name) = &first.0 else {
        return None;
    };
    let quote = offset(text, name)?.checked_sub(1)?;
    let open = text
        .get(..quote)?
        .trim_end_matches(JSON_WS)
        .len()
        .checked_sub(1)?;
    let after = text.get(last_end..)?;
    let close = last_end + (after.len() - after.trim_start_matches(JSON_WS).len());
    (text.as_bytes().get(open) == Some(&b'{') && text.as_bytes().get(close) == Some(&b'}'))
        .then_some(open..close + 1)
}

fn raw_end(text: &str, raw: &RawValue) -> Option<usize> {
    Some(offset(text, raw.get())? + raw.get().len())
}

fn fields_span(text: &str, fields: &Fields<'_>) -> Option<Range<usize>> {
    let ((first, _), (_, last)) = (fields.first()?, fields.last()?);
    object_span(text, first, raw_end(text, last)?)
}

// ---- what the policy reads -----------------------------------------------------------------

/// The top-level members of a resource that the policy's instance check can read. The check
/// (`CompiledPolicy::satisfied`) reads `resourceType`, `meta` (an entry's `compartment`), `id`
/// (`_compartment` on a Patient) and, through each criteria parameter's FHIRPath expression,
/// members named in that expression (a choice element `value` is found as `valueQuantity`, …).
/// Every identifier of the expression counts, so this is a superset; a criteria whose
/// parameters cannot be looked up keeps everything.
#[derive(Debug, Default)]
struct KeySet {
    all: bool,
    names: Vec<String>,
}

impl KeySet {
    fn for_type(policy: &EffectivePolicy, resource_type: &str) -> KeySet {
        let mut set = KeySet {
            all: false,
            names: vec!["resourceType".to_string()],
        };
        if policy.isolates(resource_type) {
            set.add("meta");
        }
        for entry in policy.entries_for(resource_type, Interaction::Read) {
            if entry.compartment.is_some() {
                set.add("meta");
            }
            if entry.criteria.is_some() {
                let raw = policy
                    .access_policy()
                    .resource
                    .get(entry.index)
                    .and_then(|r| r.criteria.as_deref());
                match raw.and_then(|c| c.split_once('?')) {
                    Some((_, query)) => set.add_criteria(resource_type, query),
                    None => set.all = true,
                }
            }
        }
        set
    }

    fn add(&mut self, name: &str) {
        if !self.names.iter().any(|n| n == name) {
            self.names.push(name.to_string());
        }
    }

    fn add_expression(&mut self, expression: &str) {
        for word in expression.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
            if word.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_') {
                self.add(word);
            }
        }
    }

    fn add_param(&mut self, resource_type: &str, code: &str) {
        // A `*` criteria compiles common parameters for `Resource`, others for the type.
        let defs = [
            searchparam::lookup(resource_type, code),
            searchparam::lookup("Resource", code),
        ];
        if defs.iter().all(Option::is_none) {
            self.all = true;
        }
        for def in defs.into_iter().flatten() {
            self.add_expression(&def.expression);
        }
    }

    fn add_criteria(&mut self, resource_type: &str, query: &str) {
        for (name, _) in form_urlencoded::parse(query.as_bytes()) {
            let code = name.split(':').next().unwrap_or_default();
            self.add_param(resource_type, code);
            if code == "_compartment" {
                self.add("id");
                self.add("meta");
                for param in searchparam::patient_compartment_params(resource_type) {
                    self.add_param(resource_type, param);
                }
            }
        }
    }

    fn keeps(&self, key: &str) -> bool {
        self.all || prefixed_by_any(key, &self.names)
    }
}

/// `key` (or `key` without a leading `_`) starts with one of `names`: a superset of every way a
/// name can designate a member (exact, choice element, primitive sibling `_name`).
fn prefixed_by_any(key: &str, names: &[String]) -> bool {
    let bare = key.strip_prefix('_').unwrap_or(key);
    // Comparing first bytes first spares a memcmp call for almost every pair.
    let starts = |k: &str, n: &str| match n.as_bytes().first() {
        None => true,
        Some(b) => k.as_bytes().first() == Some(b) && k.starts_with(n),
    };
    names.iter().any(|n| starts(key, n) || starts(bare, n))
}

/// The members a policy entry's hiddenFields paths may reach, by the paths' first segments.
#[derive(Debug, Default)]
struct Heads {
    /// Of single-segment paths: they remove members by name, whatever the value.
    leaf: Vec<String>,
    /// Of longer paths: they reach into the value.
    deep: Vec<String>,
}

impl Heads {
    fn of(entry: &CompiledEntry) -> Heads {
        let mut heads = Heads::default();
        for path in &entry.hidden_fields {
            let segments = path.segments();
            if let Some(first) = segments.first() {
                let name = first.trim_end_matches("[x]").to_string();
                if segments.len() == 1 {
                    heads.leaf.push(name);
                } else {
                    heads.deep.push(name);
                }
            }
        }
        heads
    }
}

struct Ctx<'p, 't> {
    policy: &'p EffectivePolicy,
    io: Io<'t>,
    /// Per resource type, what its check reads.
    keys: Vec<(String, KeySet)>,
    /// Per policy entry index, what its hiddenFields reach.
    heads: Vec<(usize, Heads)>,
    /// The filtered Bundle so far.
    out: Vec<u8>,
    /// No Bundle member written yet.
    first: bool,
    /// `total`, held back until the entries tell whether it stays.
    total: Option<TotalSlot<'t>>,
}

/// Where `total` goes back if it stays.
struct TotalSlot<'t> {
    at: usize,
    first: bool,
    raw: &'t RawValue,
}

impl<'p, 't> Ctx<'p, 't> {
    fn new(policy: &'p EffectivePolicy, io: Io<'t>) -> Ctx<'p, 't> {
        Ctx {
            policy,
            out: Vec::with_capacity(io.text.len()),
            io,
            keys: Vec::new(),
            heads: Vec::new(),
            first: true,
            total: None,
        }
    }

    fn put_key(&mut self, key: &Key<'_>) -> Result<(), GiveUp> {
        write_key(&mut self.out, key, &mut self.first)
    }

    fn put_member(&mut self, key: &Key<'_>, raw: &'t RawValue) -> Result<(), GiveUp> {
        if key.0 == "total" {
            self.total = Some(TotalSlot {
                at: self.out.len(),
                first: self.first,
                raw,
            });
            return Ok(());
        }
        self.put_key(key)?;
        self.io.copy(&mut self.out, raw.get());
        Ok(())
    }

    /// Closes the Bundle; `total` goes back in its place unless `drop_total`.
    fn finish(mut self, drop_total: bool) -> Result<Vec<u8>, GiveUp> {
        if let (Some(slot), false) = (self.total.take(), drop_total) {
            let mut member = Vec::new();
            if !slot.first {
                member.push(b',');
            }
            member.extend_from_slice(b"\"total\":");
            self.io.copy(&mut member, slot.raw.get());
            if slot.first && self.out.len() > slot.at {
                member.push(b',');
            }
            self.out.splice(slot.at..slot.at, member);
        }
        self.out.push(b'}');
        Ok(self.out)
    }
}

fn key_set<'k>(
    cache: &'k mut Vec<(String, KeySet)>,
    policy: &EffectivePolicy,
    resource_type: &str,
) -> &'k KeySet {
    let i = match cache.iter().position(|(t, _)| t == resource_type) {
        Some(i) => i,
        None => {
            cache.push((
                resource_type.to_string(),
                KeySet::for_type(policy, resource_type),
            ));
            cache.len() - 1
        }
    };
    &cache[i].1
}

fn heads_of<'h>(cache: &'h mut Vec<(usize, Heads)>, entry: &CompiledEntry) -> &'h Heads {
    let i = match cache.iter().position(|(i, _)| *i == entry.index) {
        Some(i) => i,
        None => {
            cache.push((entry.index, Heads::of(entry)));
            cache.len() - 1
        }
    };
    &cache[i].1
}

/// Reading and writing raw JSON.
struct Io<'t> {
    /// The whole body: every borrowed name and raw value is a slice of it.
    text: &'t str,
    rewriter: Option<Rewriter<'t>>,
}

impl Io<'_> {
    /// Copies raw JSON to the output, upstream URLs rewritten.
    fn copy(&self, out: &mut Vec<u8>, raw: &str) {
        match &self.rewriter {
            Some(r) => r.copy(out, raw),
            None => out.extend_from_slice(raw.as_bytes()),
        }
    }

    /// Parses raw JSON into a `Value`, upstream URLs rewritten.
    fn parse(&self, raw: &RawValue) -> Result<Value, GiveUp> {
        let mut value = serde_json::from_str(raw.get())?;
        if let Some(r) = &self.rewriter {
            super::rewrite_urls(&mut value, &r.rewrite);
        }
        Ok(value)
    }
}

// ---- the Bundle ----------------------------------------------------------------------------

/// A member of the Bundle: raw, or its entry array (filtered into the output as it was read).
enum Member<'t> {
    Raw(&'t RawValue),
    Entries,
}

/// The Bundle's members; the first `written` of them are in the output already.
struct Bundle<'t> {
    members: Vec<(Key<'t>, Member<'t>)>,
    written: usize,
    /// An entry was dropped.
    dropped: bool,
}

/// Splits the Bundle into members. When `resourceType` came first (as FHIR servers write it),
/// the entry array is filtered straight into the output as it is read: the entries are parsed
/// once and never held.
struct BundleVisitor<'c, 'p, 't> {
    ctx: &'c mut Ctx<'p, 't>,
}

impl<'t> Visitor<'t> for BundleVisitor<'_, '_, 't> {
    type Value = Bundle<'t>;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a Bundle")
    }
    fn visit_map<A: MapAccess<'t>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut bundle = Bundle {
            members: Vec::with_capacity(8),
            written: 0,
            dropped: false,
        };
        let mut is_bundle = false;
        while let Some(key) = map.next_key::<Key<'t>>()? {
            if key.0 == "entry" && is_bundle {
                for (k, m) in bundle.members.get(bundle.written..).unwrap_or_default() {
                    if let Member::Raw(raw) = m {
                        self.ctx.put_member(k, raw).map_err(|_| give_up())?;
                    }
                }
                self.ctx.put_key(&key).map_err(|_| give_up())?;
                // Not an array: an error here, and the Value path decides.
                bundle.dropped |= map.next_value_seed(EntriesVisitor {
                    ctx: &mut *self.ctx,
                })?;
                bundle.members.push((key, Member::Entries));
                bundle.written = bundle.members.len();
            } else {
                let raw = map.next_value::<&'t RawValue>()?;
                if key.0 == "resourceType" {
                    is_bundle = raw.get() == "\"Bundle\"";
                }
                bundle.members.push((key, Member::Raw(raw)));
            }
        }
        Ok(bundle)
    }
}

/// Filters an entry array into the output; returns whether an entry was dropped.
struct EntriesVisitor<'c, 'p, 't> {
    ctx: &'c mut Ctx<'p, 't>,
}

impl<'de> DeserializeSeed<'de> for EntriesVisitor<'_, '_, '_> {
    type Value = bool;
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for EntriesVisitor<'_, '_, '_> {
    type Value = bool;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an entry array")
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut dropped = false;
        let mut first = true;
        self.ctx.out.push(b'[');
        while let Some(parts) = seq.next_element_seed(EntrySeed)? {
            let start = self.ctx.out.len();
            if !first {
                self.ctx.out.push(b',');
            }
            match write_entry(self.ctx, &parts) {
                Ok(true) => first = false,
                Ok(false) => {
                    self.ctx.out.truncate(start);
                    dropped = true;
                }
                Err(GiveUp) => return Err(give_up()),
            }
        }
        self.ctx.out.push(b']');
        Ok(dropped)
    }
}

// ---- entries -------------------------------------------------------------------------------

/// An entry member: raw, or the resource split into its members.
enum Part<'de> {
    Raw(&'de RawValue),
    Resource(Fields<'de>),
}

struct EntrySeed;

impl<'de> DeserializeSeed<'de> for EntrySeed {
    type Value = Vec<(Key<'de>, Part<'de>)>;
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for EntrySeed {
    type Value = Vec<(Key<'de>, Part<'de>)>;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an entry object")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut parts = Vec::with_capacity(4);
        while let Some(key) = map.next_key::<Key<'de>>()? {
            // A resource that is not an object is an error here, and the Value path decides.
            let part = if key.0 == "resource" {
                Part::Resource(map.next_value_seed(FieldsVisitor)?)
            } else {
                Part::Raw(map.next_value::<&'de RawValue>()?)
            };
            parts.push((key, part));
        }
        if has_duplicates(&parts) {
            return Err(give_up());
        }
        Ok(parts)
    }
}

/// What becomes of an entry's resource.
enum Verdict<'e> {
    Drop,
    /// Copied as it came.
    Keep,
    /// Copied but for the members these hiddenFields reach.
    Redact(&'e CompiledEntry),
    /// Decided on the whole `Value` (duplicate names, nested Bundle): written from it.
    Whole(Value),
}

fn part_end(text: &str, part: &Part<'_>) -> Option<usize> {
    match part {
        Part::Raw(raw) => raw_end(text, raw),
        Part::Resource(fields) => fields_span(text, fields).map(|r| r.end),
    }
}

/// Writes one entry (filtered); false when it is dropped.
fn write_entry(ctx: &mut Ctx<'_, '_>, parts: &[(Key<'_>, Part<'_>)]) -> Result<bool, GiveUp> {
    let Ctx {
        policy,
        io,
        keys,
        heads,
        out,
        ..
    } = ctx;
    let resource = parts.iter().find_map(|(_, p)| match p {
        Part::Resource(fields) => Some(fields),
        Part::Raw(_) => None,
    });
    let verdict = match resource {
        Some(fields) => judge(policy, keys, io, fields)?,
        None => Verdict::Keep,
    };
    if let Verdict::Drop = verdict {
        return Ok(false);
    }
    let text = io.text;
    if let Verdict::Keep = verdict {
        let span = match (parts.first(), parts.last()) {
            (Some((first, _)), Some((_, last))) => {
                part_end(text, last).and_then(|end| object_span(text, first, end))
            }
            _ => None,
        };
        if let Some(entry) = span.and_then(|s| text.get(s)) {
            io.copy(out, entry);
            return Ok(true);
        }
    }
    out.push(b'{');
    let mut first = true;
    for (key, part) in parts {
        write_key(out, key, &mut first)?;
        match (part, &verdict) {
            (Part::Raw(raw), _) => io.copy(out, raw.get()),
            (Part::Resource(fields), Verdict::Redact(entry)) => {
                write_redacted(policy, heads, io, out, fields, entry)?;
            }
            (Part::Resource(_), Verdict::Whole(value)) => serde_json::to_writer(&mut *out, value)?,
            (Part::Resource(fields), _) => write_fields(io, out, fields)?,
        }
    }
    out.push(b'}');
    Ok(true)
}

/// The whole resource as a `Value`, members collapsed exactly as `serde_json` parses objects.
fn whole_value(io: &Io<'_>, fields: &Fields<'_>) -> Result<Value, GiveUp> {
    let mut map = Map::with_capacity(fields.len());
    for (key, raw) in fields {
        map.insert(key.0.to_string(), io.parse(raw)?);
    }
    Ok(Value::Object(map))
}

/// What `filter_value` does with an entry's resource, decided on as little of it as possible.
fn judge<'p>(
    policy: &'p EffectivePolicy,
    keys: &mut Vec<(String, KeySet)>,
    io: &Io<'_>,
    fields: &Fields<'_>,
) -> Result<Verdict<'p>, GiveUp> {
    let rtype = match fields.iter().find(|(k, _)| k.0 == "resourceType") {
        Some((_, raw)) => raw_str(raw)?,
        None => None,
    };
    if has_duplicates(fields) || rtype.as_deref() == Some("Bundle") {
        let mut value = whole_value(io, fields)?;
        return Ok(if super::keep_entry_resource(policy, &mut value) {
            Verdict::Whole(value)
        } else {
            Verdict::Drop
        });
    }
    let Some(rtype) = rtype else {
        // No resource type: no policy entry can be satisfied.
        return Ok(Verdict::Drop);
    };
    if rtype == "OperationOutcome" {
        return Ok(Verdict::Keep);
    }
    let keys = key_set(keys, policy, &rtype);
    let mut pruned = Map::new();
    for (key, raw) in fields.iter().filter(|(k, _)| keys.keeps(&k.0)) {
        pruned.insert(key.0.to_string(), io.parse(raw)?);
    }
    let pruned = Value::Object(pruned);
    let entry = policy.satisfied(&pruned, Interaction::Read);
    if cfg!(debug_assertions)
        && let Ok(whole) = whole_value(io, fields)
    {
        assert_eq!(
            entry.map(|e| e.index),
            policy.satisfied(&whole, Interaction::Read).map(|e| e.index),
            "the pruned resource must be decided as the whole one"
        );
    }
    Ok(match entry {
        None => Verdict::Drop,
        Some(entry) if entry.hidden_fields.is_empty() => Verdict::Keep,
        Some(entry) => Verdict::Redact(entry),
    })
}

/// Writes a resource without what `entry`'s hiddenFields remove.
fn write_redacted(
    policy: &EffectivePolicy,
    heads: &mut Vec<(usize, Heads)>,
    io: &Io<'_>,
    out: &mut Vec<u8>,
    fields: &Fields<'_>,
    entry: &CompiledEntry,
) -> Result<(), GiveUp> {
    let heads = heads_of(heads, entry);
    out.push(b'{');
    let mut first = true;
    for (key, raw) in fields {
        let deep = prefixed_by_any(&key.0, &heads.deep);
        if !deep && !prefixed_by_any(&key.0, &heads.leaf) {
            write_key(out, key, &mut first)?;
            io.copy(out, raw.get());
            continue;
        }
        // hiddenFields removal treats each member on its own, so redacting a one-member
        // object gives exactly what redacting the whole resource leaves of that member. When
        // only single-segment paths can reach it, the value plays no part: null stands in.
        let value = if deep { io.parse(raw)? } else { Value::Null };
        let mut one = Value::Object(Map::from_iter([(key.0.to_string(), value)]));
        policy.redact(&mut one, entry);
        if let Some(value) = one.get(key.0.as_ref()) {
            write_key(out, key, &mut first)?;
            if deep {
                serde_json::to_writer(&mut *out, value)?;
            } else {
                io.copy(out, raw.get());
            }
        }
    }
    out.push(b'}');
    Ok(())
}

// ---- upstream URLs -------------------------------------------------------------------------

/// [`UrlRewrite`] on raw JSON. A string value starts with `from` exactly when its raw text does,
/// provided nothing in the body could spell `from` with escapes: `from` holds no quote,
/// backslash or control character, so only `\/` and `\uXXXX` could, and a body containing
/// either goes to the `Value` path. So the candidates are `"from` at an unescaped quote; the
/// quote cannot close a string (`from` starts with a letter or digit, which never follows a
/// closing quote), and a member name is told from a value by the `:` after it.
struct Rewriter<'a> {
    rewrite: UrlRewrite<'a>,
    /// `to` as it goes between quotes.
    to_json: Vec<u8>,
    /// `"from`.
    finder: memchr::memmem::Finder<'static>,
}

impl<'a> Rewriter<'a> {
    fn new(rewrite: UrlRewrite<'a>, text: &str) -> Result<Rewriter<'a>, GiveUp> {
        let plain = |c: char| !matches!(c, '"' | '\\') && !c.is_control();
        let starts_plain = rewrite
            .from
            .starts_with(|c: char| c.is_ascii_alphanumeric());
        let bytes = text.as_bytes();
        let escaped = memchr::memmem::find(bytes, b"\\/").is_some()
            || memchr::memmem::find(bytes, b"\\u").is_some();
        if !starts_plain || !rewrite.from.chars().all(plain) || escaped {
            return Err(GiveUp);
        }
        let quoted = serde_json::to_vec(rewrite.to)?;
        let to_json = quoted
            .get(1..quoted.len().saturating_sub(1))
            .ok_or(GiveUp)?
            .to_vec();
        let needle = [b"\"", rewrite.from.as_bytes()].concat();
        Ok(Rewriter {
            rewrite,
            to_json,
            finder: memchr::memmem::Finder::new(&needle).into_owned(),
        })
    }

    /// Copies `raw` (whole JSON values or members: it starts outside any string).
    fn copy(&self, out: &mut Vec<u8>, raw: &str) {
        let bytes = raw.as_bytes();
        let mut done = 0;
        for at in self.finder.find_iter(bytes) {
            if at < done || !is_string_start(bytes, at) || is_member_name(bytes, at) {
                continue;
            }
            let prefix_end = at + 1 + self.rewrite.from.len();
            out.extend_from_slice(&bytes[done..at + 1]);
            out.extend_from_slice(&self.to_json);
            done = prefix_end;
        }
        out.extend_from_slice(&bytes[done..]);
    }
}

/// The quote at `at` is not escaped (an even number of backslashes precedes it).
fn is_string_start(bytes: &[u8], at: usize) -> bool {
    let backslashes = bytes[..at]
        .iter()
        .rev()
        .take_while(|&&b| b == b'\\')
        .count();
    backslashes % 2 == 0
}

/// The string opening at `at` is followed by `:`.
fn is_member_name(bytes: &[u8], at: usize) -> bool {
    let mut i = at + 1;
    while let Some(j) = memchr::memchr2(b'"', b'\\', &bytes[i.min(bytes.len())..]) {
        let k = i + j;
        if bytes[k] == b'\\' {
            i = k + 2;
            continue;
        }
        let rest = &bytes[k + 1..];
        let next = rest
            .iter()
            .find(|b| !matches!(b, b' ' | b'\t' | b'\n' | b'\r'));
        return next == Some(&b':');
    }
    false
}
