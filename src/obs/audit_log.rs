//! The audit record's own writer, for JSON logs: the request hands over a small typed value
//! (`Record`) and a writer thread formats it, as the same JSON line tracing's formatter wrote
//! (`{"timestamp", "level", "fields": {"message": "decision", …}, "target": "fhirgate::audit"}`).
//! Formatting through tracing cost about 26,000 instructions on the request thread, more than
//! the rest of fhirgate's work on a request together.
//!
//! While records keep coming, the writer drains the queue about once a millisecond instead of
//! waiting on it, so a request wakes no thread; an idle writer waits and is woken by the first
//! record. When the queue is full, requests wait: audit records are never dropped. The guard
//! writes out what is queued when the process stops.

use std::io::Write;
use std::net::IpAddr;
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TryRecvError, sync_channel};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime};

use super::RequestId;
use crate::state::Identity;

/// Records waiting to be written, at most (then requests wait).
const QUEUE: usize = 64 * 1024;

/// How long a busy writer lets records gather before it writes them out.
const GATHER: Duration = Duration::from_millis(1);

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
    Record(Box<Record>),
    /// Write out everything before this, then answer.
    Flush(SyncSender<()>),
}

static QUEUE_IN: OnceLock<SyncSender<Message>> = OnceLock::new();

/// Hands a record to the writer; it comes back when there is no writer (text logs), for the
/// caller to write through tracing instead.
pub fn submit(record: Box<Record>) -> Result<(), Box<Record>> {
    let Some(queue) = QUEUE_IN.get() else {
        return Err(record);
    };
    match queue.send(Message::Record(record)) {
        Ok(()) => Ok(()),
        Err(std::sync::mpsc::SendError(Message::Record(r))) => Err(r),
        Err(_) => Ok(()),
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
    let mut line = Vec::with_capacity(512);
    loop {
        // Idle: wait for the first record.
        let Ok(first) = records.recv() else { return };
        let mut next = Some(first);
        loop {
            while let Some(message) = next.take() {
                match message {
                    Message::Record(r) => {
                        line.clear();
                        format_record(&r, &mut line);
                        let _ = out.write_all(&line);
                    }
                    Message::Flush(done) => {
                        let _ = out.flush();
                        let _ = done.send(());
                    }
                }
                next = match records.try_recv() {
                    Ok(m) => Some(m),
                    Err(TryRecvError::Empty) => None,
                    Err(TryRecvError::Disconnected) => {
                        let _ = out.flush();
                        return;
                    }
                };
            }
            let _ = out.flush();
            // Busy: let records gather, without anyone having to wake this thread.
            next = match records.recv_timeout(GATHER) {
                Ok(m) => {
                    std::thread::sleep(GATHER);
                    Some(m)
                }
                Err(RecvTimeoutError::Timeout) => break,
                Err(RecvTimeoutError::Disconnected) => return,
            };
        }
    }
}

/// The record as tracing's JSON formatter writes an event: a timestamp with microseconds, the
/// level, the fields (absent ones left out), the target; one line.
pub fn format_record(r: &Record, out: &mut Vec<u8>) {
    out.extend_from_slice(b"{\"timestamp\":\"");
    timestamp(r.at, out);
    out.extend_from_slice(b"\",\"level\":\"INFO\",\"fields\":{\"message\":\"decision\"");
    let field = |out: &mut Vec<u8>, name: &str, value: &str| {
        out.extend_from_slice(b",\"");
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(b"\":");
        let _ = serde_json::to_writer(&mut *out, value);
    };
    field(out, "request_id", &r.request_id.to_string());
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
        field(out, "client_ip", &ip.to_string());
    }
    field(out, "decision", r.decision);
    out.extend_from_slice(b",\"status\":");
    out.extend_from_slice(r.status.to_string().as_bytes());
    out.extend_from_slice(b"},\"target\":\"fhirgate::audit\"}\n");
}

/// `2026-12-06T02:53:46.385012Z`.
fn timestamp(at: SystemTime, out: &mut Vec<u8>) {
    let t = time::OffsetDateTime::from(at);
    let _ = write!(
        out,
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:06}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second(),
        t.microsecond()
    );
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
        let mut line = Vec::new();
        format_record(&record(), &mut line);
        let text = String::from_utf8(line).unwrap();
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
            assert!(submit(Box::new(record())).is_ok());
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
