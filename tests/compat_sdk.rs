//! The unmodified `@medplum/core` `MedplumClient` (npm, the version of tests/upstream's Medplum
//! packages) against a real fhirgate in front of the real FHIR upstream:
//! `tests/compat/medplum-sdk.mjs` drives the SDK and prints one JSON object, and this test
//! asserts on every field of it.
//!
//! Covered: client credentials (body and Basic header), Basic auth, invitations of a
//! Practitioner and a Patient, `startLogin` + `processCode` with the SDK's own PKCE (`plain` in
//! node) and with S256, `getProfile`, FHIR reads governed by the membership's AccessPolicy,
//! refresh with rotation, code replay, an AccessPolicy created with `createResource` and attached
//! through the admin members API taking effect on the next request, `searchResources(
//! 'ProjectMembership', 'profile-type=Patient')`, and `signOut` after which the old tokens are
//! refused.
//!
//! Needs `tests/compat/node_modules` and `tests/upstream/node_modules` (`scripts/setup`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::compat::run_script;
use common::gateway::{ADMIN_CLIENT_ID, ADMIN_CLIENT_SECRET, TestGateway};
use common::people::default_project;
use common::upstream::FhirUpstream;
use serde_json::{Value, json};

/// The SDK error for a refusal with this OperationOutcome (id, issue code, text).
fn sdk_error(message: &str, id: Option<&str>, code: &str, text: &str) -> Value {
    json!({
        "sdkError": "OperationOutcomeError",
        "message": message,
        "outcomeId": id,
        "code": code,
        "text": text,
    })
}

fn forbidden() -> Value {
    sdk_error("Forbidden", Some("forbidden"), "forbidden", "Forbidden")
}

fn not_found() -> Value {
    sdk_error("Not found", Some("not-found"), "not-found", "Not found")
}

fn unauthorized_outcome() -> Value {
    json!({"resourceType": "OperationOutcome", "code": "login", "text": "Unauthorized"})
}

fn is_ref(v: &Value, ty: &str) -> bool {
    v.as_str()
        .and_then(|s| s.strip_prefix(ty))
        .and_then(|s| s.strip_prefix('/'))
        .is_some_and(|id| !id.is_empty())
}

#[test]
fn the_medplum_sdk_works_end_to_end() {
    let upstream = FhirUpstream::start();
    let gw = TestGateway::start(&upstream.base_url);
    let project = default_project(&gw);
    let tag = uuid::Uuid::new_v4().simple().to_string();
    let input = json!({
        "baseUrl": gw.base,
        "adminClientId": ADMIN_CLIENT_ID,
        "adminClientSecret": ADMIN_CLIENT_SECRET,
        "practitioner": {
            "email": format!("dora-{tag}@example.com"),
            "password": "a long practitioner password",
            "firstName": "Dora",
            "lastName": "Doctor",
        },
        "patient": {
            "email": format!("Paul-{tag}@Example.com"),
            "password": "a long patient password",
            "firstName": "Paul",
            "lastName": "Patient",
        },
    });
    let run = run_script("medplum-sdk.mjs", &input);
    let r = &run.result;
    assert!(
        r.get("failure").is_none(),
        "the SDK suite failed: {}\n{}",
        r["failure"],
        run.stderr
    );
    assert!(run.success, "{r}\n{}", run.stderr);

    // Client credentials: the SDK's token request, then its /auth/me.
    assert_eq!(
        r["clientCredentials"],
        json!({
            "profile": format!("ClientApplication/{ADMIN_CLIENT_ID}"),
            "project": project,
            "isProjectAdmin": true,
            "tokenClientId": ADMIN_CLIENT_ID,
            "patientSearch": {"ok": "Bundle"},
        }),
        "{r}"
    );
    assert_eq!(
        r["clientCredentialsBasicHeader"],
        json!({
            "profile": format!("ClientApplication/{ADMIN_CLIENT_ID}"),
            "authorization": "Basic",
            "bodyHasSecret": false,
        })
    );
    assert_eq!(
        r["clientCredentialsWrongSecret"],
        sdk_error(
            "Failed to fetch tokens: Invalid secret",
            None,
            "invalid",
            "Invalid secret"
        )
    );

    // Basic auth on every request.
    assert_eq!(
        r["basicAuth"],
        json!({
            "profile": format!("ClientApplication/{ADMIN_CLIENT_ID}"),
            "project": project,
            "patientSearch": {"ok": "Bundle"},
        })
    );
    // The gateway answers 401; the SDK then retries once through the token endpoint with the
    // same credentials, and reports that refusal.
    assert_eq!(
        r["basicAuthWrongSecretAtGateway"],
        json!({"status": 401, "resourceType": "OperationOutcome", "code": "login", "text": "Unauthorized"})
    );
    assert_eq!(
        r["basicAuthWrongSecret"],
        sdk_error(
            "Failed to fetch tokens: Invalid secret",
            None,
            "invalid",
            "Invalid secret"
        )
    );

    // AccessPolicies through createResource, invitations through invite() and post().
    assert_eq!(
        r["policiesCreated"],
        json!({"patient": true, "practitioner": true})
    );
    let invites = &r["invites"];
    assert!(
        is_ref(&invites["practitionerPolicy"], "AccessPolicy"),
        "{invites}"
    );
    assert!(
        is_ref(&invites["patientPolicy"], "AccessPolicy"),
        "{invites}"
    );
    assert_ne!(invites["practitionerPolicy"], invites["patientPolicy"]);
    assert_eq!(
        invites["practitioner"],
        json!({
            "resourceType": "ProjectMembership",
            "profileType": "Practitioner",
            "accessPolicy": invites["practitionerPolicy"],
        })
    );
    assert_eq!(
        invites["patient"],
        json!({
            "resourceType": "ProjectMembership",
            "profileType": "Patient",
            "accessPolicy": invites["patientPolicy"],
        })
    );

    // The practitioner signs in with the SDK's own PKCE: `plain` in node, verifier sent, no
    // client and an empty redirect_uri (a code from /auth/login has none).
    assert_eq!(
        r["practitionerLogin"],
        json!({"hasLogin": true, "hasCode": true})
    );
    assert_eq!(
        r["practitionerPkce"],
        json!({
            "method": "plain",
            "challengeSent": true,
            "verifierSent": true,
            "redirectUri": "",
            "clientId": "",
        })
    );
    let profile = &r["practitionerProfile"];
    assert!(is_ref(&profile["reference"], "Practitioner"), "{profile}");
    assert_eq!(profile["reference"], profile["invitedReference"]);
    assert_eq!(
        profile["name"],
        json!({"given": ["Dora"], "family": "Doctor"})
    );
    assert!(profile["membership"].is_string(), "{profile}");
    assert_eq!(profile["membership"], profile["invitedMembership"]);
    assert_eq!(profile["hasRefreshToken"], true);

    // A replayed code is refused and revokes the Login it came from.
    assert_eq!(
        r["codeReplay"],
        sdk_error(
            "Failed to fetch tokens: Token already granted",
            None,
            "invalid",
            "Token already granted"
        )
    );
    assert_eq!(r["firstLoginAfterReplayStatus"], 401);
    assert_eq!(r["firstLoginAfterReplay"], unauthorized_outcome());

    // The membership's policy (Patient, read-only) governs the practitioner's reads.
    let reads = &r["practitionerReads"];
    assert!(is_ref(&reads["expectedPatient"], "Patient"), "{reads}");
    assert_eq!(reads["patient"], reads["expectedPatient"]);
    assert_eq!(reads["observation"], forbidden());

    // refreshIfExpired with a grace period longer than the token's life: new tokens for the
    // same Login, the old refresh token refused (rotation), and its reuse ends the family.
    assert_eq!(
        r["refresh"],
        json!({
            "accessTokenChanged": true,
            "refreshTokenRotated": true,
            "sameLogin": true,
            "profileAfter": profile["reference"],
            "readAfter": reads["expectedPatient"],
            "oldRefreshTokenStatus": 400,
            "oldRefreshTokenError": {"error": "invalid_request", "error_description": "Invalid token"},
            "familyEndedStatus": 401,
        })
    );

    // A new policy attached through the admin members API: the very next request of the same
    // token obeys it (Observation now allowed, Patient now refused), and /auth/me shows it.
    let attached = &r["attachedPolicy"];
    assert!(
        is_ref(&attached["expectedPolicy"], "AccessPolicy"),
        "{attached}"
    );
    assert_eq!(attached["membershipPolicy"], attached["expectedPolicy"]);
    assert!(
        is_ref(&attached["expectedObservation"], "Observation"),
        "{attached}"
    );
    assert_eq!(attached["observation"], attached["expectedObservation"]);
    assert_eq!(attached["patient"], forbidden());
    assert_eq!(attached["meAccessPolicy"][0], "Observation", "{attached}");
    assert!(
        !attached["meAccessPolicy"]
            .as_array()
            .unwrap()
            .contains(&json!("Patient")),
        "{attached}"
    );

    // The patient signs in through a ClientApplication with S256; the compartment policy keeps
    // them to their own Patient and Observations (others are 404, as Medplum answers reads a
    // policy's criteria exclude), read-only.
    let patient = &r["patient"];
    assert_eq!(
        r["patientPkce"],
        json!({"method": "S256", "verifierSent": true, "clientId": patient["appId"]})
    );
    assert!(is_ref(&patient["profile"], "Patient"), "{patient}");
    assert_eq!(patient["profile"], patient["invitedProfile"]);
    assert!(patient["appId"].is_string(), "{patient}");
    assert_eq!(patient["tokenClientId"], patient["appId"]);
    assert_eq!(patient["ownPatient"], patient["profile"]);
    assert_eq!(patient["otherPatient"], not_found());
    assert!(is_ref(&patient["expectedOwnObservation"], "Observation"));
    assert_eq!(patient["ownObservation"], patient["expectedOwnObservation"]);
    assert_eq!(patient["otherObservation"], not_found());
    assert_eq!(
        patient["observationSearch"],
        json!([patient["expectedOwnObservation"]])
    );
    assert_eq!(patient["write"], forbidden());

    // searchResources('ProjectMembership', 'profile-type=Patient') as admin: the patient's
    // membership, no practitioner's. A patient may not search memberships.
    let search = &r["membershipSearch"];
    assert_eq!(search["profileTypes"], json!(["Patient"]), "{search}");
    assert_eq!(search["includesPatient"], true, "{search}");
    assert_eq!(search["includesPractitioner"], false, "{search}");
    assert_eq!(search["ids"].as_array().unwrap().len(), 1, "{search}");
    assert_eq!(r["membershipSearchAsPatient"], forbidden());

    // signOut: the SDK forgets its tokens, the gateway refuses the old access token (FHIR and
    // /auth/me) and the old refresh token; the practitioner's session is untouched.
    assert_eq!(
        r["signOut"],
        json!({
            "statusBefore": 200,
            "statusAfter": 401,
            "outcomeAfter": unauthorized_outcome(),
            "meStatusAfter": 401,
            "sdkForgotToken": true,
            "refreshAfter": {
                "status": 400,
                "body": {"error": "invalid_grant", "error_description": "Token revoked"},
            },
            "otherSessionStatus": 200,
        })
    );
}
