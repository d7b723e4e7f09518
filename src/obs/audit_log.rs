//! The audit record's own writer, for JSON logs: the request hands over a small typed value
//! (`Record`) and a writer thread formats it, as the same JSON line tracing's formatter wrote
//! (`{"timestamp", "level", "fields": {"message": "decision", …}, "target": "fhirgate::audit"}`).
//! Formatting through tracing cost about 26,000 instructions on the request thread, more than
//! the rest of fhirgate's work on a request together.
//!
//! While records keep coming, the writer sleeps between batches (`GATHER`) instead of waiting
//! on the queue, so no request ever has to wake it, and it takes the CPU from the proxy's
//! threads about a hundred times a second rather than once per batch of a few records. An idle
//! writer waits on the queue and is woken by the first record. When the queue is full,
//! requests wait: audit records are never dropped. The guard writes out what is queued when
//! the process stops.

use std::fmt::Write as _;
use std::io::Write;
use std::net::IpAddr;
use std::sync::mpsc::{Receiver, SyncSender, TryRecvError, sync_channel};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime};

use super::RequestId;
use crate::state::Identity;

/// Records waiting to be written, at most (then requests wait): 16,384 slots of a record each
/// (about 3 MB), some sixty batches at 25,000 requests a second.
const QUEUE: usize = 16 * 1024;

/// How long a busy writer lets records gather before it writes them out. Each wake-up of the
/// writer preempts a proxy thread on a busy machine; at 1 ms they cost the proxy more context
/// switches than its own requests did.
const GATHER: Duration = Duration::from_millis(10);

/// One audit record, as handed over: owned, nothing formatted yet.
pub struct Record {
    pub at: SystemTime,
    pub request_id: RequestId,
    pub route: &'static str,
    pub method: http::Method,
    pub resource_type: Option<String>,
    /// The caller (its profile is written).
    pub identity: Option<Arc<Identity>>,
    pub on_behalf_of: Option<String>,
    pub client_ip: Option<IpAddr>,
    pub decision: &'static str,
    pub status: u16,
}

enum Message {
    /// By value: a box would be allocated on a proxy thread and freed on the writer's, which
    /// mimalloc handles on a slower path than a free on the thread that allocated.
    Record(Record),
    /// Write out everything before this, then answer.
    Flush(SyncSender<()>),
}

static QUEUE_IN: OnceLock<SyncSender<Message>> = OnceLock::new();

/// Hands a record to the writer; it comes back when there is no writer (text logs), for the
/// caller to write through tracing instead.
pub fn submit(record: Record) -> Option<Record> {
    let Some(queue) = QUEUE_IN.get() else {
        return Some(record);
    };
    match queue.send(Message::Record(record)) {
        Ok(()) => None,
        Err(std::sync::mpsc::SendError(Message::Record(r))) => Some(r),
        Err(_) => None,
    }
}

/// Keeps the writer; dropping it writes out what is queued (for up to a second).
pub struct Guard(());

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(queue) = QUEUE_IN.get() {
            let (done, wait) = sync_channel(1);
            if queue.send(Message::Flush(done)).is_ok() {
                let _ = wait.recv_timeout(Duration::from_secs(1));
            }
        }
    }
}

/// Starts the writer (once per process), writing to `out`.
pub fn start(out: impl Write + Send + 'static) -> Option<Guard> {
    let (queue, records) = sync_channel(QUEUE);
    QUEUE_IN.set(queue).ok()?;
    std::thread::Builder::new()
        .name("fhirgate-audit".into())
        .spawn(move || write_records(records, std::io::BufWriter::with_capacity(64 * 1024, out)))
        .ok()?;
    Some(Guard(()))
}

fn write_records(records: Receiver<Message>, mut out: impl Write) {
    let mut line = String::with_capacity(512);
    let mut format = Formatter::default();
    // Idle: wait for a record. A queue closed and empty ends the writer.
    while let Ok(first) = records.recv() {
        // Busy: write out what is queued, then sleep while more gathers; nothing gathered,
        // idle again.
        let mut next = Some(first);
        while let Some(message) = next {
            match message {
                Message::Record(r) => {
                    line.clear();
                    format.record(&r, &mut line);
                    let _ = out.write_all(line.as_bytes());
                }
                Message::Flush(done) => {
                    let _ = out.flush();
                    let _ = done.send(());
                }
            }
            next = match records.try_recv() {
                Ok(m) => Some(m),
                Err(TryRecvError::Empty) => {
                    let _ = out.flush();
                    std::thread::sleep(GATHER);
                    records.try_recv().ok()
                }
                Err(TryRecvError::Disconnected) => None,
            };
        }
    }
    let _ = out.flush();
}

/// Writes records as tracing's JSON formatter writes an event: a timestamp with microseconds,
/// the level, the fields (absent ones left out), the target; one line.
///
/// Written piece by piece rather than through `fmt` and serde: a record through them cost about
/// 6,700 instructions, a third of what fhirgate adds to a forwarded request. The date and time
/// to the second are kept, as the records of one second share them.
#[derive(Default)]
pub struct Formatter {
    /// The second `date_time` was written for, since the Unix epoch.
    second: Option<u64>,
    /// `2026-12-06T02:53:46.`
    date_time: String,
}

impl Formatter {
    pub fn record(&mut self, r: &Record, out: &mut String) {
        out.push_str("{\"timestamp\":\"");
        self.timestamp(r.at, out);
        out.push_str(
            "\",\"level\":\"INFO\",\"fields\":{\"message\":\"decision\",\"request_id\":\"",
        );
        r.request_id.push_to(out);
        out.push('"');
        field(out, "route", r.route);
        field(out, "method", r.method.as_str());
        if let Some(t) = &r.resource_type {
            field(out, "resource_type", t);
        }
        if let Some(identity) = &r.identity {
            field(out, "profile", &identity.profile);
        }
        if let Some(p) = &r.on_behalf_of {
            field(out, "on_behalf_of", p);
        }
        if let Some(ip) = r.client_ip {
            out.push_str(",\"client_ip\":\"");
            crate::net::push_ip(out, ip);
            out.push('"');
        }
        field(out, "decision", r.decision);
        out.push_str(",\"status\":");
        out.push_str(itoa::Buffer::new().format(r.status));
        out.push_str("},\"target\":\"fhirgate::audit\"}\n");
    }

    /// `2026-12-06T02:53:46.385012Z`.
    fn timestamp(&mut self, at: SystemTime, out: &mut String) {
        let Ok(since) = at.duration_since(SystemTime::UNIX_EPOCH) else {
            // Before 1970: not a clock this runs on; written in full, not kept.
            let t = time::OffsetDateTime::from(at);
            push_date_time(t, out);
            push_micros(t.microsecond(), out);
            return;
        };
        if self.second != Some(since.as_secs()) {
            self.date_time.clear();
            push_date_time(time::OffsetDateTime::from(at), &mut self.date_time);
            self.second = Some(since.as_secs());
        }
        out.push_str(&self.date_time);
        push_micros(since.subsec_micros(), out);
    }
}

/// `2026-12-06T02:53:46.`
fn push_date_time(t: time::OffsetDateTime, out: &mut String) {
    let _ = write!(
        out,
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    );
}

/// `385012Z`: six digits of microseconds, then the zone.
fn push_micros(micros: u32, out: &mut String) {
    for place in [100_000, 10_000, 1_000, 100, 10, 1] {
        out.push(char::from(b'0' + (micros / place % 10) as u8));
    }
    out.push('Z');
}

/// `,"name":"value"`, the value escaped as JSON.
fn field(out: &mut String, name: &str, value: &str) {
    out.push_str(",\"");
    out.push_str(name);
    out.push_str("\":");
    // What JSON requires escaping (RFC 8259 §7), as serde_json escapes it; values almost never
    // hold any.
    if value.bytes().any(|b| b < 0x20 || b == b'"' || b == b'\\') {
        out.push_str(&serde_json::Value::from(value).to_string());
    } else {
        out.push('"');
        out.push_str(value);
        out.push('"');
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> Record {
        Record {
            at: SystemTime::UNIX_EPOCH + Duration::from_micros(1_796_000_000_385_012),
            request_id: RequestId(2),
            route: "fhir",
            method: http::Method::GET,
            resource_type: Some("Patient".into()),
            identity: None,
            on_behalf_of: Some("Practitioner/\"q\"".into()),
            client_ip: Some("127.0.0.1".parse().unwrap()),
            decision: "allow",
            status: 200,
        }
    }

    #[test]
    fn a_record_is_the_line_tracing_wrote() {
        let mut text = String::new();
        Formatter::default().record(&record(), &mut text);
        assert!(text.ends_with("}\n") && text.matches('\n').count() == 1);
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["timestamp"], "2026-11-30T00:53:20.385012Z");
        assert_eq!(v["level"], "INFO");
        assert_eq!(v["target"], "fhirgate::audit");
        let f = &v["fields"];
        assert_eq!(f["message"], "decision");
        assert_eq!(f["request_id"], RequestId(2).to_string());
        assert_eq!(f["method"], "GET");
        assert_eq!(f["resource_type"], "Patient");
        assert!(f.get("profile").is_none(), "absent fields are left out");
        assert_eq!(f["on_behalf_of"], "Practitioner/\"q\"");
        assert_eq!(f["client_ip"], "127.0.0.1");
        assert_eq!(f["status"], 200);
        let keys: Vec<&str> = f.as_object().unwrap().keys().map(String::as_str).collect();
        assert_eq!(
            keys,
            [
                "message",
                "request_id",
                "route",
                "method",
                "resource_type",
                "on_behalf_of",
                "client_ip",
                "decision",
                "status"
            ]
        );
    }

    /// The same time formatted by `time` itself: the kept second must not show.
    fn full_timestamp(at: SystemTime) -> String {
        let format = time::format_description::parse_borrowed::<1>(
            "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:6]Z",
        )
        .unwrap();
        time::OffsetDateTime::from(at).format(&format).unwrap()
    }

    #[test]
    fn each_timestamp_is_its_own_whatever_second_came_before() {
        let base = SystemTime::UNIX_EPOCH + Duration::from_secs(1_796_000_000);
        let times = [
            base + Duration::from_micros(999_999),
            base + Duration::from_micros(1_000_000),
            base + Duration::from_micros(1_000_001),
            base + Duration::from_micros(7),
            base + Duration::from_secs(86_400 * 400) + Duration::from_micros(120_000),
            SystemTime::UNIX_EPOCH,
            SystemTime::UNIX_EPOCH - Duration::from_micros(1_500_000),
            base + Duration::from_micros(999_999),
        ];
        let mut format = Formatter::default();
        for at in times {
            let mut text = String::new();
            format.record(&Record { at, ..record() }, &mut text);
            let v: serde_json::Value = serde_json::from_str(&text).unwrap();
            assert_eq!(v["timestamp"], full_timestamp(at), "{at:?}");
        }
    }

    #[test]
    fn values_are_escaped_as_serde_escapes_them() {
        let values = [
            "Practitioner/plain",
            "with \"quotes\"",
            "back\\slash",
            "new\nline\ttab\u{1}\u{1f}",
            "déjà vu ✓",
            "\u{7f} is not escaped",
            "",
        ];
        for value in values {
            let mut text = String::new();
            let r = Record {
                on_behalf_of: Some(value.into()),
                ..record()
            };
            Formatter::default().record(&r, &mut text);
            let expected = format!(
                ",\"on_behalf_of\":{},",
                serde_json::to_string(value).unwrap()
            );
            assert!(text.contains(&expected), "{text}");
            let v: serde_json::Value = serde_json::from_str(&text).unwrap();
            assert_eq!(v["fields"]["on_behalf_of"], value);
        }
    }

    #[test]
    fn request_ids_are_written_as_zero_padded_hex() {
        let zero = RequestId(0).to_string();
        let prefix = &zero[..zero.len() - 12];
        for n in [
            0,
            2,
            0xabc_def0_1234,
            0xffff_ffff_ffff,
            0x1_0000_0000_0000,
            u64::MAX,
        ] {
            assert_eq!(RequestId(n).to_string(), format!("{prefix}{n:012x}"));
        }
    }

    /// A shared buffer the writer thread writes to.
    #[derive(Clone, Default)]
    struct Shared(Arc<std::sync::Mutex<Vec<u8>>>);

    impl Write for Shared {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn every_record_is_written_and_the_guard_writes_out_the_rest() {
        let out = Shared::default();
        let guard = start(out.clone()).expect("the first writer of the process");
        assert!(start(Shared::default()).is_none(), "one writer per process");
        for _ in 0..2_000 {
            assert!(submit(record()).is_none());
        }
        drop(guard);
        let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
        // Only this test hands records over in this binary (no subscriber enables the audit
        // target elsewhere), but count at least, not exactly, to stay independent of that.
        assert!(text.lines().count() >= 2_000, "{}", text.lines().count());
        assert!(
            text.lines()
                .all(|l| serde_json::from_str::<serde_json::Value>(l).is_ok())
        );
    }
}
