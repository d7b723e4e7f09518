//! `writeConstraint` evaluation (docs/medplum-compat.md §4.5) with a small, exact FHIRPath subset.
//!
//! Every expression must yield exactly one `true` for the new version, with `%before` (the
//! current version; the empty collection on create) and `%after` / `%resource` (the new version)
//! bound. An error or any other result (empty, `false`, several items, a non-boolean) means the
//! constraint does not hold.
//!
//! Anything outside the subset is refused when the expression is parsed, so an unsupported
//! constraint is reported when the policy is saved and breaks its entry when the policy is
//! compiled (fail closed). No I/O, no `resolve()`.
//!
//! # Grammar
//!
//! ```text
//! expression := implies
//! implies    := orxor ('implies' orxor)*                    lowest precedence, left-associative
//! orxor      := and (('or' | 'xor') and)*
//! and        := membership ('and' membership)*
//! membership := equality (('in' | 'contains') equality)*
//! equality   := comparison (('=' | '!=') comparison)*
//! comparison := path (('<' | '<=' | '>' | '>=') path)*
//! path       := term ('.' invocation)*
//! term       := literal | '%before' | '%after' | '%resource' | '$this'
//!             | invocation | '(' expression ')'
//! invocation := name | function '(' arguments ')'
//! function   := 'exists' ( '(' ')' | '(' expression ')' ) | 'where' '(' expression ')'
//!             | 'empty()' | 'not()' | 'count()' | 'first()' | 'hasValue()'
//! literal    := '{}' | 'true' | 'false' | '-'? NUMBER | STRING
//! name       := [A-Za-z_][A-Za-z0-9_]* | '`' delimited '`'
//! NUMBER     := [0-9]+ ('.' [0-9]+)?
//! STRING     := "'" (char | '\' ['"`\/fnrt] | '\u' hex{4})* "'"
//! ```
//!
//! Everything else is refused: other functions (`resolve`, `ofType`, `iif`, string and math
//! functions…), `is`/`as`, arithmetic, `|`, `&`, `~`, indexers, date/time and quantity literals,
//! other environment variables and `$index`/`$total`.
//!
//! # Semantics
//!
//! - Values are FHIR JSON: a path step reads the property of every object in its input and
//!   flattens arrays; `null` is absent. A choice element is reached by its base name (`value`
//!   finds `valueQuantity`, …). A step naming the resource type of an item (`Observation.status`)
//!   selects the item itself. `$this` is the focus: the resource at the top level, the current
//!   item inside `where(…)` / `exists(…)`.
//! - Numbers are exact decimals (`1 = 1.0`); dates are compared as strings.
//! - `=` / `!=`: empty if either side is empty; `false` (resp. `true`) if the sizes differ;
//!   otherwise item-wise, in order (objects compare deeply).
//! - `<`, `<=`, `>`, `>=`: empty if either side is empty; both sides must be single strings or
//!   single numbers, anything else is an error.
//! - `x in c` / `c contains x`: empty if `x` is empty, an error if `x` has several items, else
//!   whether some item of `c` equals `x` (`false` when `c` is empty).
//! - `and`, `or`, `xor`, `implies` use three-valued logic. Each operand must be empty or a single
//!   boolean; anything else is an error (as in Medplum). `implies` is `true` when the left side is
//!   `false` or the right side is `true`, `false` when true implies false, and empty otherwise.
//! - `not()`: empty stays empty; a single boolean is negated; anything else is an error.
//! - `where(c)` keeps the items for which `c` is `true` (empty drops the item; a non-boolean is an
//!   error); `exists(c)` is `where(c).exists()`.
//! - `exists()`, `empty()`, `count()`, `first()` as in the specification. `hasValue()` is
//!   `true` for any non-empty input, as in Medplum (the specification restricts it to a single
//!   primitive).

use std::cmp::Ordering;
use std::fmt;

use serde_json::{Map, Value};

/// True when every constraint holds for `after` (with `before` the current version, `None` on
/// create). A constraint that does not parse never holds.
pub fn write_constraints_hold(
    constraints: &[String],
    after: &Value,
    before: Option<&Value>,
) -> bool {
    constraints
        .iter()
        .all(|c| Expression::parse(c).is_ok_and(|e| e.holds(after, before)))
}

/// Why an expression is not in the supported FHIRPath subset.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("FHIRPath at offset {offset}: {message}")]
pub struct FhirPathError {
    /// Byte offset in the expression.
    pub offset: usize,
    pub message: String,
}

fn error(offset: usize, message: impl Into<String>) -> FhirPathError {
    FhirPathError {
        offset,
        message: message.into(),
    }
}

/// A parsed `writeConstraint` expression.
#[derive(Debug, Clone)]
pub struct Expression {
    root: Expr,
}

impl Expression {
    /// Parses `source`, refusing anything outside the supported subset. Never panics.
    pub fn parse(source: &str) -> Result<Self, FhirPathError> {
        let tokens = lex(source)?;
        let mut parser = Parser {
            tokens,
            pos: 0,
            nesting: 0,
            end: source.len(),
        };
        let (root, _) = parser.expression()?;
        if let Some(token) = parser.tokens.get(parser.pos) {
            let message = match &token.tok {
                Tok::Ident(w) if UNSUPPORTED_OPERATORS.contains(&w.as_str()) => {
                    format!("operator `{w}` is not supported")
                }
                Tok::Minus => "arithmetic is not supported".to_string(),
                other => format!("unexpected {}", describe(other)),
            };
            return Err(error(token.at, message));
        }
        Ok(Self { root })
    }

    /// True when the expression yields exactly one `true` for `after` (with `%before` bound to
    /// `before`, empty when `None`).
    pub fn holds(&self, after: &Value, before: Option<&Value>) -> bool {
        matches!(
            self.evaluate(after, before).as_deref(),
            Ok([Item::Bool(true)])
        )
    }

    fn evaluate<'a>(
        &'a self,
        after: &'a Value,
        before: Option<&'a Value>,
    ) -> Result<Vec<Item<'a>>, EvalError> {
        let env = Env { after, before };
        let mut focus = Vec::new();
        push_json(after, &mut focus)?;
        eval(&self.root, &focus, &env)
    }
}

// === Lexer ===

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    /// A plain identifier, possibly a keyword.
    Ident(String),
    /// A `` `delimited` `` identifier, never a keyword.
    Delimited(String),
    Str(String),
    /// Digits, optionally with a fraction.
    Num(String),
    /// `%name`.
    Var(String),
    This,
    LParen,
    RParen,
    LBrace,
    RBrace,
    Dot,
    Comma,
    Minus,
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

#[derive(Debug, Clone)]
struct Token {
    tok: Tok,
    at: usize,
}

fn describe(tok: &Tok) -> String {
    match tok {
        Tok::Ident(w) => format!("`{w}`"),
        Tok::Delimited(w) => format!("`` `{w}` ``"),
        Tok::Str(_) => "string literal".into(),
        Tok::Num(n) => format!("number `{n}`"),
        Tok::Var(v) => format!("`%{v}`"),
        Tok::This => "`$this`".into(),
        Tok::LParen => "`(`".into(),
        Tok::RParen => "`)`".into(),
        Tok::LBrace => "`{`".into(),
        Tok::RBrace => "`}`".into(),
        Tok::Dot => "`.`".into(),
        Tok::Comma => "`,`".into(),
        Tok::Minus => "`-`".into(),
        Tok::Eq => "`=`".into(),
        Tok::Ne => "`!=`".into(),
        Tok::Lt => "`<`".into(),
        Tok::Le => "`<=`".into(),
        Tok::Gt => "`>`".into(),
        Tok::Ge => "`>=`".into(),
    }
}

type Chars<'s> = std::iter::Peekable<std::str::CharIndices<'s>>;

fn lex(source: &str) -> Result<Vec<Token>, FhirPathError> {
    let mut out = Vec::new();
    let mut chars = source.char_indices().peekable();
    while let Some(&(at, c)) = chars.peek() {
        if matches!(c, ' ' | '\t' | '\r' | '\n') {
            chars.next();
            continue;
        }
        let tok = match c {
            'A'..='Z' | 'a'..='z' | '_' => Tok::Ident(take_word(&mut chars)),
            '0'..='9' => Tok::Num(take_number(&mut chars)),
            '\'' => {
                chars.next();
                Tok::Str(take_quoted(&mut chars, '\'', at)?)
            }
            '`' => {
                chars.next();
                let name = take_quoted(&mut chars, '`', at)?;
                if name.is_empty() {
                    return Err(error(at, "empty delimited identifier"));
                }
                Tok::Delimited(name)
            }
            '%' => {
                chars.next();
                let name = take_word(&mut chars);
                if name.is_empty() {
                    return Err(error(
                        at,
                        "only %before, %after and %resource are supported",
                    ));
                }
                Tok::Var(name)
            }
            '$' => {
                chars.next();
                let name = take_word(&mut chars);
                if name != "this" {
                    return Err(error(at, format!("`${name}` is not supported")));
                }
                Tok::This
            }
            '!' => {
                chars.next();
                if chars.next_if(|&(_, c)| c == '=').is_none() {
                    return Err(error(at, "`!` is only supported in `!=`"));
                }
                Tok::Ne
            }
            '<' | '>' => {
                chars.next();
                let or_equal = chars.next_if(|&(_, c)| c == '=').is_some();
                match (c, or_equal) {
                    ('<', false) => Tok::Lt,
                    ('<', true) => Tok::Le,
                    (_, false) => Tok::Gt,
                    (_, true) => Tok::Ge,
                }
            }
            _ => {
                chars.next();
                match c {
                    '(' => Tok::LParen,
                    ')' => Tok::RParen,
                    '{' => Tok::LBrace,
                    '}' => Tok::RBrace,
                    '.' => Tok::Dot,
                    ',' => Tok::Comma,
                    '-' => Tok::Minus,
                    '=' => Tok::Eq,
                    '@' => return Err(error(at, "date/time literals are not supported")),
                    _ => return Err(error(at, format!("`{c}` is not supported"))),
                }
            }
        };
        out.push(Token { tok, at });
    }
    Ok(out)
}

fn take_word(chars: &mut Chars<'_>) -> String {
    let mut word = String::new();
    while let Some((_, c)) = chars.next_if(|&(_, c)| c.is_ascii_alphanumeric() || c == '_') {
        word.push(c);
    }
    word
}

fn take_number(chars: &mut Chars<'_>) -> String {
    let mut text = String::new();
    while let Some((_, c)) = chars.next_if(|&(_, c)| c.is_ascii_digit()) {
        text.push(c);
    }
    // A fraction needs a digit after the dot; otherwise the dot is an invocation (`1.exists()`).
    let mut ahead = chars.clone();
    if ahead.next().is_some_and(|(_, c)| c == '.')
        && ahead.peek().is_some_and(|&(_, c)| c.is_ascii_digit())
    {
        chars.next();
        text.push('.');
        while let Some((_, c)) = chars.next_if(|&(_, c)| c.is_ascii_digit()) {
            text.push(c);
        }
    }
    text
}

/// Reads up to the closing `quote` (the opening one is consumed), decoding escapes.
fn take_quoted(chars: &mut Chars<'_>, quote: char, start: usize) -> Result<String, FhirPathError> {
    let mut out = String::new();
    loop {
        let Some((at, c)) = chars.next() else {
            return Err(error(start, "unterminated literal"));
        };
        if c == quote {
            return Ok(out);
        }
        if c != '\\' {
            out.push(c);
            continue;
        }
        let escaped = match chars.next() {
            Some((_, c @ ('\'' | '"' | '`' | '\\' | '/'))) => c,
            Some((_, 'f')) => '\u{c}',
            Some((_, 'n')) => '\n',
            Some((_, 'r')) => '\r',
            Some((_, 't')) => '\t',
            Some((_, 'u')) => {
                let unit = take_hex4(chars).ok_or_else(|| error(at, "bad \\u escape"))?;
                let code = if (0xD800..0xDC00).contains(&unit) {
                    // A high surrogate must be followed by an escaped low surrogate.
                    let low = match (chars.next(), chars.next()) {
                        (Some((_, '\\')), Some((_, 'u'))) => take_hex4(chars),
                        _ => None,
                    }
                    .filter(|low| (0xDC00..0xE000).contains(low))
                    .ok_or_else(|| error(at, "unpaired surrogate in \\u escape"))?;
                    0x10000 + ((unit - 0xD800) << 10) + (low - 0xDC00)
                } else {
                    unit
                };
                char::from_u32(code).ok_or_else(|| error(at, "bad \\u escape"))?
            }
            _ => return Err(error(at, "unsupported escape sequence")),
        };
        out.push(escaped);
    }
}

fn take_hex4(chars: &mut Chars<'_>) -> Option<u32> {
    let mut value = 0;
    for _ in 0..4 {
        let (_, c) = chars.next()?;
        value = value * 16 + c.to_digit(16)?;
    }
    Some(value)
}

// === Parser ===

/// Maximum depth of the expression tree (and of parenthesis / argument nesting), so that
/// neither parsing nor evaluation can exhaust the stack.
const MAX_DEPTH: usize = 64;

/// Keywords that are FHIRPath operators outside the subset.
const UNSUPPORTED_OPERATORS: &[&str] = &["is", "as", "div", "mod"];

/// Keywords that cannot start a term.
const OPERATOR_WORDS: &[&str] = &[
    "and", "or", "xor", "implies", "in", "contains", "is", "as", "div", "mod",
];

#[derive(Debug, Clone)]
enum Expr {
    Empty,
    Str(String),
    Num(Num),
    Bool(bool),
    Before,
    After,
    This,
    /// A path step; `None` navigates from the focus.
    Member(Option<Box<Expr>>, String),
    /// A function call; `None` applies to the focus.
    Call(Option<Box<Expr>>, Func),
    Binary(Op, Box<Expr>, Box<Expr>),
}

#[derive(Debug, Clone)]
enum Func {
    Exists(Option<Box<Expr>>),
    Empty,
    Not,
    Count,
    First,
    Where(Box<Expr>),
    HasValue,
}

impl Func {
    fn new(name: &str, args: Vec<Expr>) -> Result<Self, String> {
        let mut args = args.into_iter();
        let (first, extra) = (args.next().map(Box::new), args.next().is_some());
        let func = match (name, first, extra) {
            ("exists", criteria, false) => Self::Exists(criteria),
            ("where", Some(criteria), false) => Self::Where(criteria),
            ("empty", None, _) => Self::Empty,
            ("not", None, _) => Self::Not,
            ("count", None, _) => Self::Count,
            ("first", None, _) => Self::First,
            ("hasValue", None, _) => Self::HasValue,
            ("exists", ..) => return Err("`exists()` takes at most one argument".into()),
            ("where", ..) => return Err("`where()` takes exactly one argument".into()),
            ("empty" | "not" | "count" | "first" | "hasValue", ..) => {
                return Err(format!("`{name}()` takes no argument"));
            }
            _ => return Err(format!("function `{name}()` is not supported")),
        };
        Ok(func)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Implies,
    Or,
    Xor,
    And,
    In,
    Contains,
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

impl Op {
    /// Binding level, 0 = loosest.
    fn level(self) -> usize {
        match self {
            Op::Implies => 0,
            Op::Or | Op::Xor => 1,
            Op::And => 2,
            Op::In | Op::Contains => 3,
            Op::Eq | Op::Ne => 4,
            Op::Lt | Op::Le | Op::Gt | Op::Ge => 5,
        }
    }
}

const LEVELS: usize = 6;

/// An expression and the depth of its tree.
type Parsed = (Expr, usize);

struct Parser {
    tokens: Vec<Token>,
    pos: usize,
    nesting: usize,
    end: usize,
}

impl Parser {
    fn peek(&self) -> Option<&Tok> {
        self.tokens.get(self.pos).map(|t| &t.tok)
    }

    fn offset(&self) -> usize {
        self.tokens.get(self.pos).map_or(self.end, |t| t.at)
    }

    fn bump(&mut self) -> Option<Tok> {
        let tok = self.tokens.get(self.pos)?.tok.clone();
        self.pos += 1;
        Some(tok)
    }

    fn expect(&mut self, want: &Tok) -> Result<(), FhirPathError> {
        let at = self.offset();
        match self.bump() {
            Some(tok) if tok == *want => Ok(()),
            Some(tok) => Err(error(
                at,
                format!("expected {}, found {}", describe(want), describe(&tok)),
            )),
            None => Err(error(at, format!("expected {}", describe(want)))),
        }
    }

    fn check_depth(&self, depth: usize) -> Result<(), FhirPathError> {
        if depth > MAX_DEPTH {
            return Err(error(self.offset(), "expression is too deeply nested"));
        }
        Ok(())
    }

    fn expression(&mut self) -> Result<Parsed, FhirPathError> {
        self.nesting += 1;
        self.check_depth(self.nesting)?;
        let parsed = self.binary(0);
        self.nesting -= 1;
        parsed
    }

    fn operator(&self, level: usize) -> Option<Op> {
        let op = match self.peek()? {
            Tok::Eq => Op::Eq,
            Tok::Ne => Op::Ne,
            Tok::Lt => Op::Lt,
            Tok::Le => Op::Le,
            Tok::Gt => Op::Gt,
            Tok::Ge => Op::Ge,
            Tok::Ident(w) => match w.as_str() {
                "implies" => Op::Implies,
                "or" => Op::Or,
                "xor" => Op::Xor,
                "and" => Op::And,
                "in" => Op::In,
                "contains" => Op::Contains,
                _ => return None,
            },
            _ => return None,
        };
        (op.level() == level).then_some(op)
    }

    fn binary(&mut self, level: usize) -> Result<Parsed, FhirPathError> {
        if level == LEVELS {
            return self.path();
        }
        let (mut lhs, mut depth) = self.binary(level + 1)?;
        while let Some(op) = self.operator(level) {
            self.pos += 1;
            let (rhs, rhs_depth) = self.binary(level + 1)?;
            depth = depth.max(rhs_depth) + 1;
            self.check_depth(depth)?;
            lhs = Expr::Binary(op, Box::new(lhs), Box::new(rhs));
        }
        Ok((lhs, depth))
    }

    fn path(&mut self) -> Result<Parsed, FhirPathError> {
        let mut parsed = self.term()?;
        while self.peek() == Some(&Tok::Dot) {
            self.pos += 1;
            let at = self.offset();
            let name = match self.bump() {
                Some(Tok::Ident(w)) if !matches!(w.as_str(), "true" | "false") => {
                    if matches!(w.as_str(), "and" | "or" | "xor" | "implies" | "div" | "mod") {
                        return Err(error(at, format!("expected a name after `.`, found `{w}`")));
                    }
                    w
                }
                Some(Tok::Delimited(w)) => w,
                Some(tok) => {
                    return Err(error(
                        at,
                        format!("expected a name after `.`, found {}", describe(&tok)),
                    ));
                }
                None => return Err(error(at, "expected a name after `.`")),
            };
            parsed = self.invocation(Some(parsed), name, at)?;
        }
        Ok(parsed)
    }

    fn invocation(
        &mut self,
        target: Option<Parsed>,
        name: String,
        at: usize,
    ) -> Result<Parsed, FhirPathError> {
        let (target, target_depth) = match target {
            Some((e, d)) => (Some(Box::new(e)), d),
            None => (None, 0),
        };
        if self.peek() != Some(&Tok::LParen) {
            let depth = target_depth + 1;
            self.check_depth(depth)?;
            return Ok((Expr::Member(target, name), depth));
        }
        self.pos += 1;
        let mut args = Vec::new();
        let mut depth = target_depth;
        if self.peek() != Some(&Tok::RParen) {
            loop {
                let (arg, arg_depth) = self.expression()?;
                depth = depth.max(arg_depth);
                args.push(arg);
                if self.peek() != Some(&Tok::Comma) {
                    break;
                }
                self.pos += 1;
            }
        }
        self.expect(&Tok::RParen)?;
        let depth = depth + 1;
        self.check_depth(depth)?;
        let func = Func::new(&name, args).map_err(|m| error(at, m))?;
        Ok((Expr::Call(target, func), depth))
    }

    fn term(&mut self) -> Result<Parsed, FhirPathError> {
        let at = self.offset();
        let Some(tok) = self.bump() else {
            return Err(error(at, "unexpected end of expression"));
        };
        let expr = match tok {
            Tok::Str(s) => Expr::Str(s),
            Tok::Num(text) => Expr::Num(number_literal(&text, at)?),
            Tok::Minus => match self.bump() {
                Some(Tok::Num(text)) => Expr::Num(number_literal(&format!("-{text}"), at)?),
                _ => return Err(error(at, "`-` is only supported before a number literal")),
            },
            Tok::LBrace => {
                if self.peek() != Some(&Tok::RBrace) {
                    return Err(error(at, "only the empty collection `{}` is supported"));
                }
                self.pos += 1;
                Expr::Empty
            }
            Tok::LParen => {
                let parsed = self.expression()?;
                self.expect(&Tok::RParen)?;
                return Ok(parsed);
            }
            Tok::This => Expr::This,
            Tok::Var(name) => match name.as_str() {
                "before" => Expr::Before,
                "after" | "resource" => Expr::After,
                _ => {
                    return Err(error(
                        at,
                        format!("environment variable `%{name}` is not supported"),
                    ));
                }
            },
            Tok::Ident(word) => match word.as_str() {
                "true" => Expr::Bool(true),
                "false" => Expr::Bool(false),
                w if OPERATOR_WORDS.contains(&w) => {
                    return Err(error(at, format!("unexpected `{w}`")));
                }
                _ => return self.invocation(None, word, at),
            },
            Tok::Delimited(word) => return self.invocation(None, word, at),
            other => return Err(error(at, format!("unexpected {}", describe(&other)))),
        };
        Ok((expr, 1))
    }
}

fn number_literal(text: &str, at: usize) -> Result<Num, FhirPathError> {
    Num::parse(text).ok_or_else(|| error(at, "bad number literal"))
}

// === Values ===

/// An exact decimal: `±0.d₁d₂… × 10^exp`, with no leading or trailing zero digit (zero has no
/// digits and is never negative).
#[derive(Debug, Clone)]
struct Num {
    neg: bool,
    digits: Vec<u8>,
    exp: i64,
}

impl Num {
    const ZERO: Num = Num {
        neg: false,
        digits: Vec::new(),
        exp: 0,
    };

    /// Parses `[-+]digits[.digits][(e|E)[-+]digits]` (JSON and FHIRPath numbers).
    fn parse(text: &str) -> Option<Num> {
        let (neg, rest) = match text.strip_prefix('-') {
            Some(rest) => (true, rest),
            None => (false, text.strip_prefix('+').unwrap_or(text)),
        };
        let (mantissa, exp10) = match rest.split_once(['e', 'E']) {
            Some((m, e)) => (m, e.parse::<i32>().ok()?),
            None => (rest, 0),
        };
        let (int, frac) = match mantissa.split_once('.') {
            Some((_, "")) => return None,
            Some(parts) => parts,
            None => (mantissa, ""),
        };
        let all_digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
        if int.is_empty() || !all_digits(int) || !all_digits(frac) {
            return None;
        }
        let mut digits: Vec<u8> = int.bytes().chain(frac.bytes()).map(|b| b - b'0').collect();
        let leading = digits.iter().take_while(|&&d| d == 0).count();
        digits.drain(..leading);
        while digits.last() == Some(&0) {
            digits.pop();
        }
        if digits.is_empty() {
            return Some(Num::ZERO);
        }
        let exp = i64::try_from(int.len())
            .ok()?
            .checked_sub(i64::try_from(leading).ok()?)?
            .checked_add(i64::from(exp10))?;
        Some(Num { neg, digits, exp })
    }

    fn from_count(n: usize) -> Num {
        Num::parse(&n.to_string()).unwrap_or(Num::ZERO)
    }

    fn from_json(n: &serde_json::Number) -> Result<Num, EvalError> {
        Num::parse(&n.to_string()).ok_or(EvalError("unreadable JSON number"))
    }

    fn signum(&self) -> i8 {
        match (self.digits.is_empty(), self.neg) {
            (true, _) => 0,
            (false, true) => -1,
            (false, false) => 1,
        }
    }
}

impl Ord for Num {
    fn cmp(&self, other: &Self) -> Ordering {
        let sign = self.signum();
        if sign != other.signum() {
            return sign.cmp(&other.signum());
        }
        let magnitude = self
            .exp
            .cmp(&other.exp)
            .then_with(|| self.digits.cmp(&other.digits));
        match sign {
            1 => magnitude,
            -1 => magnitude.reverse(),
            _ => Ordering::Equal,
        }
    }
}

impl PartialOrd for Num {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl PartialEq for Num {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Num {}

impl fmt::Display for Num {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.digits.is_empty() {
            return f.write_str("0");
        }
        if self.neg {
            f.write_str("-")?;
        }
        let digits: String = self.digits.iter().map(|d| char::from(b'0' + d)).collect();
        let len = i64::try_from(digits.len()).unwrap_or(i64::MAX);
        let zeros = |n: i64| "0".repeat(usize::try_from(n).unwrap_or(0));
        if self.exp <= 0 {
            write!(f, "0.{}{digits}", zeros(-self.exp))
        } else if self.exp >= len {
            write!(f, "{digits}{}", zeros(self.exp - len))
        } else {
            let (int, frac) = digits.split_at(usize::try_from(self.exp).unwrap_or(0));
            write!(f, "{int}.{frac}")
        }
    }
}

/// One item of a FHIRPath collection, borrowed from the resources or from the expression.
#[derive(Debug, Clone)]
enum Item<'a> {
    Str(&'a str),
    Num(Num),
    Bool(bool),
    /// A resource or complex element.
    Node(&'a Map<String, Value>),
}

/// A run-time error: the constraint does not hold.
#[derive(Debug)]
struct EvalError(&'static str);

impl fmt::Display for EvalError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }
}

struct Env<'a> {
    after: &'a Value,
    before: Option<&'a Value>,
}

/// Appends `value` as items: arrays are flattened, `null` is absent.
fn push_json<'a>(value: &'a Value, out: &mut Vec<Item<'a>>) -> Result<(), EvalError> {
    match value {
        Value::Null => {}
        Value::Bool(b) => out.push(Item::Bool(*b)),
        Value::Number(n) => out.push(Item::Num(Num::from_json(n)?)),
        Value::String(s) => out.push(Item::Str(s)),
        Value::Array(items) => {
            for item in items {
                push_json(item, out)?;
            }
        }
        Value::Object(map) => out.push(Item::Node(map)),
    }
    Ok(())
}

fn navigate<'a>(input: &[Item<'a>], name: &str) -> Result<Vec<Item<'a>>, EvalError> {
    let mut out = Vec::new();
    for item in input {
        let Item::Node(map) = item else { continue };
        if map.get("resourceType").and_then(Value::as_str) == Some(name) {
            out.push(Item::Node(map));
        } else if let Some(value) = map.get(name) {
            push_json(value, &mut out)?;
        } else if let Some((_, value)) = map.iter().find(|(key, _)| {
            key.strip_prefix(name)
                .is_some_and(|suffix| crate::fhir::types::CHOICE_TYPES.contains(&suffix))
        }) {
            push_json(value, &mut out)?;
        }
    }
    Ok(out)
}

fn eval<'a>(expr: &'a Expr, focus: &[Item<'a>], env: &Env<'a>) -> Result<Vec<Item<'a>>, EvalError> {
    let input = |target: &'a Option<Box<Expr>>| match target {
        Some(t) => eval(t, focus, env),
        None => Ok(focus.to_vec()),
    };
    Ok(match expr {
        Expr::Empty => Vec::new(),
        Expr::Str(s) => vec![Item::Str(s)],
        Expr::Num(n) => vec![Item::Num(n.clone())],
        Expr::Bool(b) => vec![Item::Bool(*b)],
        Expr::This => focus.to_vec(),
        Expr::Before => {
            let mut out = Vec::new();
            if let Some(before) = env.before {
                push_json(before, &mut out)?;
            }
            out
        }
        Expr::After => {
            let mut out = Vec::new();
            push_json(env.after, &mut out)?;
            out
        }
        Expr::Member(target, name) => navigate(&input(target)?, name)?,
        Expr::Call(target, func) => call(func, input(target)?, env)?,
        Expr::Binary(op, lhs, rhs) => binary(*op, eval(lhs, focus, env)?, eval(rhs, focus, env)?)?,
    })
}

fn call<'a>(
    func: &'a Func,
    input: Vec<Item<'a>>,
    env: &Env<'a>,
) -> Result<Vec<Item<'a>>, EvalError> {
    Ok(match func {
        Func::Exists(None) | Func::HasValue => vec![Item::Bool(!input.is_empty())],
        Func::Exists(Some(criteria)) => {
            vec![Item::Bool(!filter(criteria, input, env)?.is_empty())]
        }
        Func::Empty => vec![Item::Bool(input.is_empty())],
        Func::Not => boolean(to_bool(&input)?.map(|b| !b)),
        Func::Count => vec![Item::Num(Num::from_count(input.len()))],
        Func::First => input.into_iter().take(1).collect(),
        Func::Where(criteria) => filter(criteria, input, env)?,
    })
}

fn filter<'a>(
    criteria: &'a Expr,
    input: Vec<Item<'a>>,
    env: &Env<'a>,
) -> Result<Vec<Item<'a>>, EvalError> {
    let mut out = Vec::new();
    for item in input {
        let verdict = eval(criteria, std::slice::from_ref(&item), env)?;
        if to_bool(&verdict)? == Some(true) {
            out.push(item);
        }
    }
    Ok(out)
}

fn boolean<'a>(value: Option<bool>) -> Vec<Item<'a>> {
    value.map(Item::Bool).into_iter().collect()
}

/// A collection where a boolean is expected: empty, or a single boolean.
fn to_bool(items: &[Item<'_>]) -> Result<Option<bool>, EvalError> {
    match items {
        [] => Ok(None),
        [Item::Bool(b)] => Ok(Some(*b)),
        [_] => Err(EvalError("expected a boolean")),
        _ => Err(EvalError("expected a single boolean, found several items")),
    }
}

fn binary<'a>(op: Op, lhs: Vec<Item<'a>>, rhs: Vec<Item<'a>>) -> Result<Vec<Item<'a>>, EvalError> {
    Ok(match op {
        Op::Eq => boolean(equals(&lhs, &rhs)),
        Op::Ne => boolean(equals(&lhs, &rhs).map(|b| !b)),
        Op::Lt | Op::Le | Op::Gt | Op::Ge => boolean(compare(&lhs, &rhs)?.map(|o| match op {
            Op::Lt => o.is_lt(),
            Op::Le => o.is_le(),
            Op::Gt => o.is_gt(),
            _ => o.is_ge(),
        })),
        Op::In => boolean(member(&lhs, &rhs)?),
        Op::Contains => boolean(member(&rhs, &lhs)?),
        Op::And | Op::Or | Op::Xor | Op::Implies => {
            let (l, r) = (to_bool(&lhs)?, to_bool(&rhs)?);
            boolean(match op {
                Op::And => match (l, r) {
                    (Some(false), _) | (_, Some(false)) => Some(false),
                    (Some(true), Some(true)) => Some(true),
                    _ => None,
                },
                Op::Or => match (l, r) {
                    (Some(true), _) | (_, Some(true)) => Some(true),
                    (Some(false), Some(false)) => Some(false),
                    _ => None,
                },
                Op::Xor => l.zip(r).map(|(l, r)| l != r),
                _ => match (l, r) {
                    (Some(false), _) | (_, Some(true)) => Some(true),
                    (Some(true), Some(false)) => Some(false),
                    _ => None,
                },
            })
        }
    })
}

/// `=`: empty when either side is empty; otherwise same size and item-wise equal, in order.
fn equals(lhs: &[Item<'_>], rhs: &[Item<'_>]) -> Option<bool> {
    if lhs.is_empty() || rhs.is_empty() {
        return None;
    }
    Some(lhs.len() == rhs.len() && lhs.iter().zip(rhs).all(|(l, r)| item_eq(l, r)))
}

/// `<` and friends: single strings or single numbers.
fn compare(lhs: &[Item<'_>], rhs: &[Item<'_>]) -> Result<Option<Ordering>, EvalError> {
    match (lhs, rhs) {
        ([], _) | (_, []) => Ok(None),
        ([Item::Str(l)], [Item::Str(r)]) => Ok(Some(l.cmp(r))),
        ([Item::Num(l)], [Item::Num(r)]) => Ok(Some(l.cmp(r))),
        ([_], [_]) => Err(EvalError("can only compare two strings or two numbers")),
        _ => Err(EvalError("cannot compare collections of several items")),
    }
}

/// `needle in haystack`.
fn member(needle: &[Item<'_>], haystack: &[Item<'_>]) -> Result<Option<bool>, EvalError> {
    match needle {
        [] => Ok(None),
        [item] => Ok(Some(haystack.iter().any(|h| item_eq(item, h)))),
        _ => Err(EvalError("membership needs a single item")),
    }
}

fn item_eq(lhs: &Item<'_>, rhs: &Item<'_>) -> bool {
    match (lhs, rhs) {
        (Item::Str(l), Item::Str(r)) => l == r,
        (Item::Num(l), Item::Num(r)) => l == r,
        (Item::Bool(l), Item::Bool(r)) => l == r,
        (Item::Node(l), Item::Node(r)) => map_eq(l, r),
        _ => false,
    }
}

fn map_eq(lhs: &Map<String, Value>, rhs: &Map<String, Value>) -> bool {
    lhs.len() == rhs.len()
        && lhs
            .iter()
            .all(|(key, l)| rhs.get(key).is_some_and(|r| json_eq(l, r)))
}

fn json_eq(lhs: &Value, rhs: &Value) -> bool {
    match (lhs, rhs) {
        (Value::Number(l), Value::Number(r)) => {
            matches!((Num::from_json(l), Num::from_json(r)), (Ok(l), Ok(r)) if l == r)
        }
        (Value::Array(l), Value::Array(r)) => {
            l.len() == r.len() && l.iter().zip(r).all(|(l, r)| json_eq(l, r))
        }
        (Value::Object(l), Value::Object(r)) => map_eq(l, r),
        _ => lhs == rhs,
    }
}

#[cfg(test)]
mod tests;
