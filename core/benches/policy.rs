//! Criterion benchmarks of the pure request path: classification, effective policy, decisions,
//! criteria, and response filtering (docs/contract.md §5: a decision ≤ 2 µs, filtering ≥ 200 MB/s).
//!
//! Run: `CARGO_TARGET_DIR=/work/target-bench cargo bench -p fhirgate-core --bench policy`
//! (quick pass: append `-- --warm-up-time 1 --measurement-time 3`). These measure; they never
//! assert a timing.

use std::collections::HashMap;
use std::hint::black_box;
use std::time::Duration;

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use fhirgate_core::fhir::classify::classify;
use fhirgate_core::fhir::request::{FhirRequest, RequestParts};
use fhirgate_core::policy::EffectivePolicy;
use fhirgate_core::policy::criteria::Criteria;
use fhirgate_core::policy::decide::{Decision, decide};
use fhirgate_core::policy::effective::{EffectiveInputs, effective};
use fhirgate_core::policy::filter::{
    Filtered, UrlRewrite, filter_bytes, filter_bytes_value, filter_value,
};
use fhirgate_core::policy::model::{AccessPolicy, ProjectMembership};
use serde_json::{Value, json};

// === fixtures ===

/// The patient-compartment policy (as in `policies/patient-compartment.json`, kept inline so the
/// benchmark does not move when the example changes).
fn patient_policy() -> AccessPolicy {
    serde_json::from_value(json!({
        "resourceType": "AccessPolicy",
        "id": "patient-compartment",
        "resource": [
            { "resourceType": "Patient", "criteria": "Patient?_id=%patient.id", "readonlyFields": ["identifier", "managingOrganization"] },
            { "resourceType": "Observation", "criteria": "Observation?subject=%patient", "readonly": true },
            { "resourceType": "Condition", "criteria": "Condition?subject=%patient", "readonly": true },
            { "resourceType": "MedicationRequest", "criteria": "MedicationRequest?subject=%patient", "readonly": true },
            { "resourceType": "AllergyIntolerance", "criteria": "AllergyIntolerance?patient=%patient", "readonly": true },
            { "resourceType": "Encounter", "criteria": "Encounter?subject=%patient", "readonly": true }
        ]
    }))
    .expect("policy")
}

/// A wildcard read-only policy with hidden fields (redaction on every resource).
fn auditor_policy() -> AccessPolicy {
    serde_json::from_value(json!({
        "resourceType": "AccessPolicy",
        "id": "readonly-auditor",
        "resource": [
            { "resourceType": "*", "readonly": true, "hiddenFields": ["identifier", "performer"] }
        ]
    }))
    .expect("policy")
}

fn membership(policy_id: &str) -> ProjectMembership {
    serde_json::from_value(json!({
        "resourceType": "ProjectMembership",
        "id": "m1",
        "project": {"reference": "Project/proj"},
        "user": {"reference": "User/u1"},
        "profile": {"reference": "Patient/p1"},
        "access": [{"policy": {"reference": format!("AccessPolicy/{policy_id}")}}]
    }))
    .expect("membership")
}

fn policies() -> HashMap<String, AccessPolicy> {
    let mut m = HashMap::new();
    for p in [patient_policy(), auditor_policy()] {
        m.insert(p.id.clone().expect("id"), p);
    }
    m
}

fn effective_for(policy_id: &str, scope: Option<&str>) -> EffectivePolicy {
    let m = membership(policy_id);
    let ps = policies();
    let e = effective(&EffectiveInputs {
        membership: &m,
        policies: &ps,
        project_id: "proj",
        project_super_admin: false,
        linked_projects: &[],
        scope,
        patient_in_context: None,
    });
    assert!(e.failure().is_none(), "{:?}", e.failure());
    assert!(e.compile_errors().is_empty(), "{:?}", e.compile_errors());
    e
}

/// One Observation of about 1 KB, for `patient` (a realistic vital-sign shape).
fn observation(i: usize, patient: &str) -> Value {
    json!({
        "resourceType": "Observation",
        "id": format!("obs-{i}"),
        "meta": {"versionId": "1", "lastUpdated": "2024-05-01T10:00:00.000Z"},
        "identifier": [{"system": "urn:example:lab", "value": format!("L-{i:08}")}],
        "status": "final",
        "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": "vital-signs", "display": "Vital Signs"}]}],
        "code": {"coding": [{"system": "http://loinc.org", "code": "85354-9", "display": "Blood pressure panel with all children optional"}], "text": "Blood pressure"},
        "subject": {"reference": patient},
        "encounter": {"reference": format!("Encounter/enc-{}", i % 97)},
        "effectiveDateTime": "2024-04-30T09:30:00+02:00",
        "issued": "2024-04-30T09:31:00.000+02:00",
        "performer": [{"reference": "Practitioner/pr1", "display": "Dr. Example"}],
        "component": [
            {"code": {"coding": [{"system": "http://loinc.org", "code": "8480-6", "display": "Systolic blood pressure"}]},
             "valueQuantity": {"value": 100 + (i % 40), "unit": "mmHg", "system": "http://unitsofmeasure.org", "code": "mm[Hg]"}},
            {"code": {"coding": [{"system": "http://loinc.org", "code": "8462-4", "display": "Diastolic blood pressure"}]},
             "valueQuantity": {"value": 60 + (i % 30), "unit": "mmHg", "system": "http://unitsofmeasure.org", "code": "mm[Hg]"}}
        ]
    })
}

/// A searchset Bundle of Observations of about `target` bytes of JSON; every `keep_every`-th
/// entry belongs to Patient/p1, the rest to other patients.
const UPSTREAM_BASE: &str = "http://upstream.example/fhir/R4";

fn searchset(target: usize, keep_every: usize) -> (Value, usize) {
    let base = UPSTREAM_BASE;
    let mut entries = Vec::new();
    let mut size = 0;
    let mut i = 0;
    while size < target {
        let patient = if i % keep_every == 0 {
            "Patient/p1".to_string()
        } else {
            format!("Patient/other-{}", i % 50)
        };
        let e = json!({
            "fullUrl": format!("{base}/Observation/obs-{i}"),
            "resource": observation(i, &patient),
            "search": {"mode": "match"}
        });
        size += serde_json::to_vec(&e).expect("json").len() + 1;
        entries.push(e);
        i += 1;
    }
    let bundle = json!({
        "resourceType": "Bundle",
        "id": "search-1",
        "type": "searchset",
        "total": entries.len(),
        "link": [{"relation": "self", "url": format!("{base}/Observation?_count={}", entries.len())}],
        "entry": entries
    });
    let len = serde_json::to_vec(&bundle).expect("json").len();
    (bundle, len)
}

fn parts<'a>(
    method: &'a str,
    path: &'a str,
    query: Option<&'a str>,
    headers: &'a [(&'a str, &'a str)],
    body: Option<&'a [u8]>,
) -> RequestParts<'a> {
    RequestParts {
        method,
        path,
        query,
        headers,
        body,
    }
}

const GET_HEADERS: [(&str, &str); 4] = [
    ("host", "localhost:8080"),
    ("user-agent", "wrk/4.1"),
    ("accept", "application/fhir+json"),
    (
        "authorization",
        "Bearer eyJhbGciOiJFUzI1NiIsImtpZCI6IjEyMyJ9.e30.sig",
    ),
];
const POST_HEADERS: [(&str, &str); 5] = [
    ("host", "localhost:8080"),
    ("user-agent", "wrk/4.1"),
    ("accept", "application/fhir+json"),
    ("content-type", "application/fhir+json"),
    (
        "authorization",
        "Bearer eyJhbGciOiJFUzI1NiIsImtpZCI6IjEyMyJ9.e30.sig",
    ),
];
const SEARCH_QUERY: &str =
    "subject=Patient/p1&code=http://loinc.org|85354-9&date=ge2024-01-01&_count=50&_sort=-date";

fn classify_ok(p: &RequestParts) -> FhirRequest {
    classify(p).expect("classifiable")
}

// === benches ===

fn bench_classify(c: &mut Criterion) {
    let body = serde_json::to_vec(&observation(1, "Patient/p1")).expect("json");
    let mut g = c.benchmark_group("classify");
    g.bench_function("read Patient/p1", |b| {
        let p = parts("GET", "Patient/p1", None, &GET_HEADERS, None);
        b.iter(|| classify(black_box(&p)))
    });
    g.bench_function("search Observation (5 params)", |b| {
        let p = parts("GET", "Observation", Some(SEARCH_QUERY), &GET_HEADERS, None);
        b.iter(|| classify(black_box(&p)))
    });
    g.bench_function(format!("create Observation ({} B body)", body.len()), |b| {
        let p = parts("POST", "Observation", None, &POST_HEADERS, Some(&body));
        b.iter(|| classify(black_box(&p)))
    });
    g.finish();
}

fn bench_effective(c: &mut Criterion) {
    let m = membership("patient-compartment");
    let ps = policies();
    let mut g = c.benchmark_group("effective");
    for (name, scope) in [
        ("patient-compartment, no scope", None),
        (
            "patient-compartment, scope patient/*.rs",
            Some("openid patient/*.rs"),
        ),
    ] {
        g.bench_function(name, |b| {
            b.iter(|| {
                effective(black_box(&EffectiveInputs {
                    membership: &m,
                    policies: &ps,
                    project_id: "proj",
                    project_super_admin: false,
                    linked_projects: &[],
                    scope,
                    patient_in_context: None,
                }))
            })
        });
    }
    g.finish();
}

fn bench_decide(c: &mut Criterion) {
    let policy = effective_for("patient-compartment", None);
    let read = classify_ok(&parts("GET", "Patient/p1", None, &GET_HEADERS, None));
    let search = classify_ok(&parts(
        "GET",
        "Observation",
        Some(SEARCH_QUERY),
        &GET_HEADERS,
        None,
    ));
    let denied = classify_ok(&parts("GET", "Practitioner/pr1", None, &GET_HEADERS, None));
    assert!(matches!(decide(&policy, &read, false), Decision::Allow(_)));
    assert!(matches!(
        decide(&policy, &search, false),
        Decision::Allow(_)
    ));
    assert!(matches!(decide(&policy, &denied, false), Decision::Deny(_)));
    let mut g = c.benchmark_group("decide (patient-compartment)");
    g.bench_function("read Patient/p1", |b| {
        b.iter(|| decide(black_box(&policy), black_box(&read), false))
    });
    g.bench_function("search Observation", |b| {
        b.iter(|| decide(black_box(&policy), black_box(&search), false))
    });
    g.bench_function("read Practitioner (denied)", |b| {
        b.iter(|| decide(black_box(&policy), black_box(&denied), false))
    });
    g.finish();

    // classify + decide, the per-request pure CPU of a forwarded search.
    let mut g = c.benchmark_group("classify+decide");
    g.bench_function("search Observation", |b| {
        let p = parts("GET", "Observation", Some(SEARCH_QUERY), &GET_HEADERS, None);
        b.iter(|| {
            let r = classify_ok(black_box(&p));
            decide(&policy, &r, false)
        })
    });
    g.finish();
}

fn bench_criteria(c: &mut Criterion) {
    let simple = "Observation?subject=Patient/p1";
    let complex = "Observation?subject=Patient/p1&category=vital-signs&code=http://loinc.org|85354-9&date=ge2024-01-01&status:not=cancelled";
    let obs = observation(7, "Patient/p1");
    let other = observation(8, "Patient/p2");
    let mut g = c.benchmark_group("criteria");
    g.bench_function("parse subject", |b| {
        b.iter(|| Criteria::parse("Observation", black_box(simple)))
    });
    g.bench_function("parse 5 filters", |b| {
        b.iter(|| Criteria::parse("Observation", black_box(complex)))
    });
    let cs = Criteria::parse("Observation", simple).expect("criteria");
    let cc = Criteria::parse("Observation", complex).expect("criteria");
    assert!(cs.matches(&obs) && !cs.matches(&other) && cc.matches(&obs));
    g.bench_function("matches subject (hit)", |b| {
        b.iter(|| cs.matches(black_box(&obs)))
    });
    g.bench_function("matches subject (miss)", |b| {
        b.iter(|| cs.matches(black_box(&other)))
    });
    g.bench_function("matches 5 filters (hit)", |b| {
        b.iter(|| cc.matches(black_box(&obs)))
    });
    let compartment = Criteria::parse("*", "*?_compartment=Patient/p1").expect("criteria");
    assert!(compartment.matches(&obs));
    g.bench_function("matches *?_compartment (hit)", |b| {
        b.iter(|| compartment.matches(black_box(&obs)))
    });
    g.finish();
}

fn bench_filter(c: &mut Criterion) {
    let patient = effective_for("patient-compartment", None);
    let auditor = effective_for("readonly-auditor", None);
    let mut g = c.benchmark_group("filter");
    g.sample_size(10);
    for target in [1 << 20, 10 << 20] {
        let (bundle, bytes) = searchset(target, 2);
        let raw = serde_json::to_vec(&bundle).expect("json");
        let n = bundle["entry"].as_array().map_or(0, Vec::len);
        let mb = target >> 20;
        g.throughput(Throughput::Bytes(bytes as u64));
        // Sanity: half the entries survive the patient policy; all survive the auditor's.
        let mut probe = bundle.clone();
        filter_value(&patient, &mut probe, false);
        let kept = probe["entry"].as_array().map_or(0, Vec::len);
        assert_eq!(
            kept,
            n.div_ceil(2),
            "patient policy keeps p1's entries only"
        );
        if mb == 1 {
            eprintln!(
                "filter: {mb} MB bundle = {bytes} bytes, {n} entries, {kept} kept by patient-compartment"
            );
        }
        g.bench_function(
            format!("filter_value {mb}MB patient-compartment (half dropped)"),
            |b| {
                b.iter_batched(
                    || bundle.clone(),
                    |mut v| {
                        filter_value(&patient, &mut v, false);
                        v
                    },
                    BatchSize::LargeInput,
                )
            },
        );
        g.bench_function(
            format!("filter_value {mb}MB auditor (hiddenFields on all)"),
            |b| {
                b.iter_batched(
                    || bundle.clone(),
                    |mut v| {
                        filter_value(&auditor, &mut v, false);
                        v
                    },
                    BatchSize::LargeInput,
                )
            },
        );
        // End to end, bytes in → bytes out (the docs/contract.md §5 target): `filter_bytes` is what the
        // gateway calls (with its upstream URL rewrite); parse+filter+serialize is the Value
        // path it replaced, which `filter_bytes` still falls back to for unusual bodies.
        g.bench_function(
            format!("parse+filter+serialize {mb}MB patient-compartment"),
            |b| {
                b.iter(|| {
                    let mut v: Value = serde_json::from_slice(black_box(&raw)).expect("json");
                    filter_value(&patient, &mut v, false);
                    serde_json::to_vec(&v).expect("json")
                })
            },
        );
        let expected = filter_bytes_value(&patient, &raw, false, None).expect("json");
        assert_eq!(
            reparse(&filter_bytes(&patient, &raw, false, None).expect("json")),
            reparse(&expected),
            "byte path = Value path"
        );
        g.bench_function(
            format!("filter_bytes {mb}MB patient-compartment (half dropped)"),
            |b| b.iter(|| filter_bytes(&patient, black_box(&raw), false, None).expect("json")),
        );
        g.bench_function(
            format!("filter_bytes {mb}MB auditor (hiddenFields on all)"),
            |b| b.iter(|| filter_bytes(&auditor, black_box(&raw), false, None).expect("json")),
        );
        let rewrite = Some(UrlRewrite {
            from: UPSTREAM_BASE,
            to: "https://gateway.example/fhir/R4",
        });
        assert_eq!(
            reparse(&filter_bytes(&patient, &raw, false, rewrite).expect("json")),
            reparse(&filter_bytes_value(&patient, &raw, false, rewrite).expect("json")),
            "byte path = Value path, URLs rewritten"
        );
        g.bench_function(
            format!("filter_bytes {mb}MB patient-compartment + URL rewrite (the gateway's call)"),
            |b| b.iter(|| filter_bytes(&patient, black_box(&raw), false, rewrite).expect("json")),
        );
        // Every entry passes unchanged: the byte path copies it all.
        let (mine, mine_bytes) = searchset(target, 1);
        let mine = serde_json::to_vec(&mine).expect("json");
        assert_eq!(
            reparse(&filter_bytes(&patient, &mine, false, None).expect("json")),
            serde_json::from_slice::<Value>(&mine).expect("json"),
            "nothing to change"
        );
        g.throughput(Throughput::Bytes(mine_bytes as u64));
        g.bench_function(
            format!("filter_bytes {mb}MB patient-compartment (nothing changes)"),
            |b| b.iter(|| filter_bytes(&patient, black_box(&mine), false, None).expect("json")),
        );
        g.bench_function(
            format!("parse+filter+serialize {mb}MB patient-compartment (nothing changes)"),
            |b| {
                b.iter(|| {
                    filter_bytes_value(&patient, black_box(&mine), false, None).expect("json")
                })
            },
        );
        g.throughput(Throughput::Bytes(bytes as u64));
        g.bench_function(
            format!("parse+serialize {mb}MB (no filter, baseline)"),
            |b| {
                b.iter(|| {
                    let v: Value = serde_json::from_slice(black_box(&raw)).expect("json");
                    serde_json::to_vec(&v).expect("json")
                })
            },
        );
    }
    g.finish();
}

fn reparse(filtered: &Filtered) -> Value {
    match filtered {
        Filtered::Visible(bytes) => serde_json::from_slice(bytes).expect("json"),
        Filtered::Hidden => Value::Null,
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default().warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(3));
    targets = bench_classify, bench_effective, bench_decide, bench_criteria, bench_filter
}
criterion_main!(benches);
