//! `date` parameters: prefixes over partial dates, dateTimes, instants, Periods and Timings.

use serde_json::Value;

use super::{CriteriaError, unsupported};
use crate::fhir::searchparam::Node;

/// `[start, end)` in milliseconds since the epoch, UTC.
pub(super) type Range = (i64, i64);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Prefix {
    Eq,
    Ne,
    Gt,
    Lt,
    Ge,
    Le,
    Sa,
    Eb,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct DateValue {
    pub(super) prefix: Prefix,
    pub(super) range: Range,
}

impl DateValue {
    pub(super) fn parse(v: &str) -> Result<DateValue, CriteriaError> {
        let starts_alpha = v.chars().next().is_some_and(|c| c.is_ascii_alphabetic());
        let (prefix, rest) = match v.get(..2) {
            Some(p) if starts_alpha => {
                let prefix = match p {
                    "eq" => Prefix::Eq,
                    "ne" => Prefix::Ne,
                    "gt" => Prefix::Gt,
                    "lt" => Prefix::Lt,
                    "ge" => Prefix::Ge,
                    "le" => Prefix::Le,
                    "sa" => Prefix::Sa,
                    "eb" => Prefix::Eb,
                    "ap" => return Err(unsupported("the `ap` date prefix is not supported")),
                    _ => return Err(unsupported(format!("unknown date prefix in `{v}`"))),
                };
                (prefix, &v[2..])
            }
            _ => (Prefix::Eq, v),
        };
        let range =
            parse_date(rest, true).ok_or_else(|| unsupported(format!("invalid date `{v}`")))?;
        Ok(DateValue { prefix, range })
    }

    pub(super) fn matches(&self, (start, end): Range) -> bool {
        let (ps, pe) = self.range;
        let contained = ps <= start && end <= pe;
        match self.prefix {
            Prefix::Eq => contained,
            Prefix::Ne => !contained,
            Prefix::Gt => end > pe,
            Prefix::Lt => start < ps,
            Prefix::Ge => end > pe || contained,
            Prefix::Le => start < ps || contained,
            Prefix::Sa => start >= pe,
            Prefix::Eb => end <= ps,
        }
    }
}

/// The range a date-typed node covers.
pub(super) fn node_range(node: &Node<'_>) -> Option<Range> {
    match node.value {
        Value::String(s) => parse_date(s, false),
        Value::Object(map) => {
            let is_timing = node.type_name == Some("Timing")
                || (node.type_name.is_none()
                    && (map.contains_key("event") || map.contains_key("repeat")));
            if is_timing {
                timing_range(map)
            } else if map.contains_key("start") || map.contains_key("end") {
                period_range(map)
            } else {
                None
            }
        }
        _ => None,
    }
}

pub(super) fn period_range(map: &serde_json::Map<String, Value>) -> Option<Range> {
    let bound = |key: &str| match map.get(key) {
        None | Some(Value::Null) => Some(None),
        Some(Value::String(s)) => parse_date(s, false).map(Some),
        Some(_) => None,
    };
    let start = bound("start")?.map_or(i64::MIN, |r| r.0);
    let end = bound("end")?.map_or(i64::MAX, |r| r.1);
    Some((start, end))
}

/// A Timing's outer limits: its events and `repeat.boundsPeriod`.
pub(super) fn timing_range(map: &serde_json::Map<String, Value>) -> Option<Range> {
    let mut hull: Option<Range> = None;
    let mut add = |r: Range| {
        hull = Some(match hull {
            Some((s, e)) => (s.min(r.0), e.max(r.1)),
            None => r,
        });
    };
    if let Some(events) = map.get("event") {
        let items = match events {
            Value::Array(items) => items.as_slice(),
            other => std::slice::from_ref(other),
        };
        for e in items.iter().filter_map(Value::as_str) {
            add(parse_date(e, false)?);
        }
    }
    if let Some(Value::Object(bounds)) = map.get("repeat").and_then(|r| r.get("boundsPeriod")) {
        add(period_range(bounds)?);
    }
    hull
}

pub(super) fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

pub(super) fn days_in_month(y: i64, m: i64) -> i64 {
    match m {
        2 if (y % 4 == 0 && y % 100 != 0) || y % 400 == 0 => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

pub(super) const MS_PER_DAY: i64 = 86_400_000;

/// Parses a FHIR date / dateTime / instant (also minute precision) into the range it covers.
/// A time without a timezone is UTC unless `require_tz`, where it is refused.
pub(super) fn parse_date(s: &str, require_tz: bool) -> Option<Range> {
    let b = s.as_bytes();
    let num = |from: usize, len: usize| -> Option<i64> {
        let digits = b.get(from..from + len)?;
        if !digits.iter().all(u8::is_ascii_digit) {
            return None;
        }
        digits
            .iter()
            .try_fold(0i64, |acc, d| Some(acc * 10 + i64::from(d - b'0')))
    };
    let year = num(0, 4)?;
    if b.len() == 4 {
        return Some((
            days_from_civil(year, 1, 1) * MS_PER_DAY,
            days_from_civil(year + 1, 1, 1) * MS_PER_DAY,
        ));
    }
    if b.get(4) != Some(&b'-') {
        return None;
    }
    let month = num(5, 2)?;
    if !(1..=12).contains(&month) {
        return None;
    }
    if b.len() == 7 {
        let (ny, nm) = if month == 12 {
            (year + 1, 1)
        } else {
            (year, month + 1)
        };
        return Some((
            days_from_civil(year, month, 1) * MS_PER_DAY,
            days_from_civil(ny, nm, 1) * MS_PER_DAY,
        ));
    }
    if b.get(7) != Some(&b'-') {
        return None;
    }
    let day = num(8, 2)?;
    if day < 1 || day > days_in_month(year, month) {
        return None;
    }
    let day_start = days_from_civil(year, month, day) * MS_PER_DAY;
    if b.len() == 10 {
        return Some((day_start, day_start + MS_PER_DAY));
    }
    if b.get(10) != Some(&b'T') {
        return None;
    }
    let hour = num(11, 2)?;
    let minute = (b.get(13) == Some(&b':')).then(|| num(14, 2)).flatten()?;
    if hour > 23 || minute > 59 {
        return None;
    }
    let mut pos = 16;
    let mut ms = (hour * 3600 + minute * 60) * 1000;
    let mut width = 60_000;
    if b.get(pos) == Some(&b':') {
        let second = num(pos + 1, 2)?;
        if second > 60 {
            return None;
        }
        ms += second * 1000;
        width = 1000;
        pos += 3;
        if b.get(pos) == Some(&b'.') {
            let digits = b
                .get(pos + 1..)?
                .iter()
                .take_while(|c| c.is_ascii_digit())
                .count();
            if digits == 0 {
                return None;
            }
            let frac = num(pos + 1, digits.min(3))?;
            let scale = 10i64.pow(3 - digits.min(3) as u32);
            ms += frac * scale;
            width = scale;
            pos += 1 + digits;
        }
    }
    let offset_ms = match b.get(pos) {
        None if require_tz => return None,
        None => 0,
        Some(b'Z') if pos + 1 == b.len() => 0,
        Some(&sign @ (b'+' | b'-')) if b.len() == pos + 6 && b.get(pos + 3) == Some(&b':') => {
            let oh = num(pos + 1, 2)?;
            let om = num(pos + 4, 2)?;
            if oh > 14 || om > 59 {
                return None;
            }
            let off = (oh * 60 + om) * 60_000;
            if sign == b'+' { off } else { -off }
        }
        _ => return None,
    };
    let start = day_start + ms - offset_ms;
    Some((start, start + width))
}
