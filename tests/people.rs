//! People (docs/medplum-compat.md §12 cases 48–53 and 73–75, docs/contract.md §2): invitations, the admin API, passwords,
//! one-time links and self-registration, through a real gateway in front of the real FHIR
//! upstream, with Medplum's exact texts. Also: an invite never leaves anything half-made.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::gateway::{ADMIN_CLIENT_ID, TestGateway};
use common::http::{outcome_expression, outcome_text, rt};
use common::mail;
use common::people::{super_admin_token, token_request};
use common::upstream::FhirUpstream;
use fhirgate::config::ConfigFile;
use fhirgate::store::{BatchWrite, SecurityRequest};
use serde_json::{Value, json};

async fn invite(gw: &TestGateway, token: &str, project: &str, body: Value) -> (u16, Value) {
    gw.post(
        &format!("admin/projects/{project}/invite"),
        Some(token),
        body,
    )
    .await
}

fn practitioner(email: &str) -> Value {
    json!({"resourceType": "Practitioner", "firstName": "Ada", "lastName": "Lovelace", "email": email, "sendEmail": false})
}

fn patient(email: &str) -> Value {
    json!({"resourceType": "Patient", "firstName": "Pat", "lastName": "Ient", "email": email, "sendEmail": false})
}

/// `/auth/login` with a plain PKCE challenge.
async fn login(gw: &TestGateway, email: &str, password: &str) -> (u16, Value) {
    gw.post(
        "auth/login",
        None,
        json!({"email": email, "password": password, "codeChallenge": "verifier-0123456789", "codeChallengeMethod": "plain"}),
    )
    .await
}

/// Exchanges a code of a Login made with [`login`]'s challenge.
async fn exchange(gw: &TestGateway, code: &str) -> (u16, Value) {
    token_request(
        gw,
        &[
            ("grant_type", "authorization_code"),
            ("code", code),
            ("code_verifier", "verifier-0123456789"),
        ],
    )
    .await
}

/// Signs a user in and returns the access token.
async fn user_token(gw: &TestGateway, email: &str, password: &str) -> String {
    let (status, body) = login(gw, email, password).await;
    assert_eq!(status, 200, "{body}");
    let code = body["code"]
        .as_str()
        .unwrap_or_else(|| panic!("no code: {body}"));
    let (status, tokens) = exchange(gw, code).await;
    assert_eq!(status, 200, "{tokens}");
    tokens["access_token"].as_str().unwrap().to_string()
}

fn start(upstream: &FhirUpstream, tweak: impl FnOnce(&mut ConfigFile)) -> TestGateway {
    TestGateway::start_with(&upstream.base_url, tweak)
}

fn user_id(membership: &Value) -> String {
    membership["user"]["reference"]
        .as_str()
        .unwrap()
        .strip_prefix("User/")
        .unwrap()
        .to_string()
}

/// A non-admin client of the admin's project: a caller without admin rights.
async fn non_admin_token(gw: &TestGateway, admin: &str) -> String {
    let (id, secret) = gw.client_with_policy(admin, None).await;
    gw.token(&id, &secret, None).await
}

async fn memberships_of_user(gw: &TestGateway, user: &str) -> Vec<fhirgate::store::StoredResource> {
    gw.running()
        .state
        .store
        .search(
            "ProjectMembership",
            &[("user".into(), vec![format!("User/{user}")])],
            None,
            100,
        )
        .await
        .unwrap()
}

async fn users_with_email(gw: &TestGateway, email: &str) -> usize {
    gw.running()
        .state
        .store
        .search("User", &[("email".into(), vec![email.into()])], None, 100)
        .await
        .unwrap()
        .len()
}

/// Profiles of `type` upstream whose invite identifier names `email`.
fn upstream_profiles(upstream: &FhirUpstream, ty: &str, email: &str) -> Vec<Value> {
    let resp = upstream.fhir("GET", &format!("{ty}?email={email}"), None);
    resp.json()["entry"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .map(|e| e["resource"].clone())
        .collect()
}

// === case 73: invite ===

#[test]
fn case_73_invite_creates_the_profile_upstream_then_user_and_membership() {
    let upstream = FhirUpstream::start();
    let gw = start(&upstream, |_| {});
    rt().block_on(async {
        let admin = gw.admin_token().await;
        let project = gw.project_of(&admin).await;

        // A non-admin may not invite.
        let plain = non_admin_token(&gw, &admin).await;
        let (status, body) = invite(&gw, &plain, &project, practitioner("x@example.com")).await;
        assert_eq!(status, 403, "{body}");
        assert_eq!(outcome_text(&body), "Forbidden");

        // Invalid bodies: 400 with Medplum's texts, nothing created.
        for (body, want) in [
            (json!({"firstName": "A", "lastName": "B", "email": "a@example.com"}), "Resource type is required"),
            (json!({"resourceType": "Practitioner", "lastName": "B", "email": "a@example.com"}), "First name is required"),
            (json!({"resourceType": "Practitioner", "firstName": "A", "email": "a@example.com"}), "Last name is required"),
            (json!({"resourceType": "Practitioner", "firstName": "A", "lastName": "B"}), "Either email or externalId is required"),
        ] {
            let (status, out) = invite(&gw, &admin, &project, body).await;
            assert_eq!(status, 400, "{out}");
            assert_eq!(outcome_text(&out), want);
        }
        assert!(upstream_profiles(&upstream, "Practitioner", "a@example.com").is_empty());

        // Upper-case e-mails are stored lower-case; the profile exists upstream.
        let (status, m1) = invite(&gw, &admin, &project, practitioner("Grace.Hopper@Example.COM")).await;
        assert_eq!(status, 200, "{m1}");
        assert_eq!(m1["resourceType"], "ProjectMembership");
        assert_eq!(m1["project"]["reference"], format!("Project/{project}"));
        let profile = m1["profile"]["reference"].as_str().unwrap().to_string();
        assert!(profile.starts_with("Practitioner/"), "{profile}");
        let upstream_profile = upstream.fhir("GET", &profile, None);
        assert_eq!(upstream_profile.status, 200);
        let p = upstream_profile.json();
        assert_eq!(p["name"][0]["family"], "Lovelace");
        assert_eq!(p["telecom"][0]["value"], "grace.hopper@example.com");
        let user = gw.running().state.store.read("User", &user_id(&m1)).await.unwrap().unwrap();
        assert_eq!(user.content["email"], "grace.hopper@example.com");
        assert!(user.project_id.is_none(), "an invited Practitioner is server-scoped");
        // The User resource never shows its secrets, not even to the admin.
        let (_, me) = gw.get(&format!("fhir/R4/User/{}", user_id(&m1)), Some(&admin)).await;
        assert!(me.get("passwordHash").is_none(), "{me}");

        // The same e-mail again: 409; with upsert: 200 and the same membership.
        let (status, body) = invite(&gw, &admin, &project, practitioner("grace.hopper@example.com")).await;
        assert_eq!(status, 409, "{body}");
        assert_eq!(outcome_text(&body), "User is already a member of this project");
        let mut up = practitioner("grace.hopper@example.com");
        up["upsert"] = json!(true);
        up["membership"] = json!({"admin": true});
        let (status, m2) = invite(&gw, &admin, &project, up.clone()).await;
        assert_eq!(status, 200, "{m2}");
        assert_eq!(m2["id"], m1["id"]);
        assert_eq!(m2["admin"], true);
        // upsert with another profile: 409.
        // (A profile that does not exist, or is another project's, is a 400 first.)
        up["membership"] = json!({"profile": {"reference": "Practitioner/someone-else"}});
        let (status, body) = invite(&gw, &admin, &project, up.clone()).await;
        assert_eq!(status, 400, "{body}");
        assert_eq!(outcome_text(&body), "Profile does not belong to project");
        let mut wrong_type = up.clone();
        wrong_type["membership"] = json!({"profile": {"reference": "Patient/someone-else"}});
        let (status, body) = invite(&gw, &admin, &project, wrong_type).await;
        assert_eq!(status, 400, "{body}");
        assert_eq!(outcome_text(&body), "Profile resourceType does not match request");
        let (status, other) = gw.post(
            "fhir/R4/Practitioner",
            Some(&admin),
            json!({"resourceType": "Practitioner", "name": [{"family": "Other"}]}),
        )
        .await;
        assert_eq!(status, 201, "{other}");
        up["membership"] = json!({"profile": {"reference": format!("Practitioner/{}", other["id"].as_str().unwrap())}});
        let (status, body) = invite(&gw, &admin, &project, up).await;
        assert_eq!(status, 409, "{body}");
        assert_eq!(outcome_text(&body), "User is already a member of this project with a different profile");
        // forceNewMembership: a new membership, with the same profile (no duplicate upstream).
        let mut force = practitioner("grace.hopper@example.com");
        force["forceNewMembership"] = json!(true);
        let (status, m3) = invite(&gw, &admin, &project, force).await;
        assert_eq!(status, 200, "{m3}");
        assert_ne!(m3["id"], m1["id"]);
        assert_eq!(m3["profile"], m1["profile"]);
        assert_eq!(upstream_profiles(&upstream, "Practitioner", "grace.hopper@example.com").len(), 1);
        assert_eq!(users_with_email(&gw, "grace.hopper@example.com").await, 1);

        // externalId: a project-scoped user; the same external id again is a conflict.
        let ext = json!({"resourceType": "Practitioner", "firstName": "E", "lastName": "X", "externalId": "ext-42"});
        let (status, mx) = invite(&gw, &admin, &project, ext.clone()).await;
        assert_eq!(status, 200, "{mx}");
        assert_eq!(mx["externalId"], "ext-42");
        let (status, body) = invite(&gw, &admin, &project, ext).await;
        assert_eq!(status, 409, "{body}");
        assert!(outcome_text(&body).contains("already exists"), "{body}");

        // A Patient invite makes a project-scoped user, with the membership template applied.
        let policy = gw.post("fhir/R4/AccessPolicy", Some(&admin), json!({"resourceType": "AccessPolicy", "name": "patients", "resource": [{"resourceType": "Patient"}]})).await.1;
        let mut pat = patient("pat@example.com");
        pat["membership"] = json!({"accessPolicy": {"reference": format!("AccessPolicy/{}", policy["id"].as_str().unwrap())}});
        let (status, mp) = invite(&gw, &admin, &project, pat).await;
        assert_eq!(status, 200, "{mp}");
        assert_eq!(mp["accessPolicy"]["reference"], format!("AccessPolicy/{}", policy["id"].as_str().unwrap()));
        assert!(mp["profile"]["reference"].as_str().unwrap().starts_with("Patient/"));
        let pu = gw.running().state.store.read("User", &user_id(&mp)).await.unwrap().unwrap();
        assert_eq!(pu.project_id.as_deref(), Some(project.as_str()));
        // An unknown policy in the template is refused before anything is made.
        let mut bad = patient("nobody@example.com");
        bad["membership"] = json!({"accessPolicy": {"reference": "AccessPolicy/missing"}});
        let (status, body) = invite(&gw, &admin, &project, bad).await;
        assert_eq!(status, 400, "{body}");
        assert!(upstream_profiles(&upstream, "Patient", "nobody@example.com").is_empty());
        assert_eq!(users_with_email(&gw, "nobody@example.com").await, 0);

        // A non-super-admin's :projectId is ignored: its own project is used.
        let (status, other) = invite(&gw, &admin, "some-other-project", practitioner("own@example.com")).await;
        assert_eq!(status, 200, "{other}");
        assert_eq!(other["project"]["reference"], format!("Project/{project}"));

        // A super admin can invite into any project it names.
        let sup = super_admin_token(&gw).await;
        let (status, ms) = invite(&gw, &sup, &project, practitioner("by-super@example.com")).await;
        assert_eq!(status, 200, "{ms}");
        assert_eq!(ms["project"]["reference"], format!("Project/{project}"));

        // mfaRequired: the user must enrol before any code; the secret is never shown.
        let mut mfa = practitioner("mfa@example.com");
        mfa["password"] = json!("mfa-password-1");
        mfa["mfaRequired"] = json!(true);
        let (status, mm) = invite(&gw, &admin, &project, mfa).await;
        assert_eq!(status, 200, "{mm}");
        let stored = gw.running().state.store.read("User", &user_id(&mm)).await.unwrap().unwrap();
        assert_eq!(stored.content["mfaRequired"], true);
        assert!(stored.content["mfaSecret"].as_str().is_some_and(|s| s.len() >= 16));
        let (status, out) = login(&gw, "mfa@example.com", "mfa-password-1").await;
        assert_eq!(status, 200, "{out}");
        assert_eq!(out["mfaEnrollRequired"], true, "{out}");
        assert!(out.get("code").is_none(), "{out}");
        let (status, read) = gw.get(&format!("fhir/R4/User/{}", user_id(&mm)), Some(&sup)).await;
        assert_eq!(status, 200, "{read}");
        assert_eq!(read["email"], "mfa@example.com");
        assert!(read.get("mfaSecret").is_none() && read.get("passwordHash").is_none(), "{read}");
    });
}

#[test]
fn case_73_a_failed_send_answers_200_with_the_reference_text() {
    let upstream = FhirUpstream::start();
    // An SMTP server that is not there.
    let dead = common::gateway::free_port();
    let gw = start(&upstream, |f| {
        f.smtp_host = Some("127.0.0.1".into());
        f.smtp_port = Some(dead);
        f.smtp_tls = Some("none".into());
    });
    rt().block_on(async {
        let admin = gw.admin_token().await;
        let project = gw.project_of(&admin).await;
        let mut body = practitioner("mail-fails@example.com");
        body["sendEmail"] = json!(true);
        let (status, out) = invite(&gw, &admin, &project, body).await;
        assert_eq!(status, 200, "{out}");
        assert_eq!(out["resourceType"], "OperationOutcome");
        assert_eq!(out["id"], "ok");
        assert_eq!(out["issue"][0]["code"], "exception");
        assert_eq!(
            outcome_text(&out),
            "Could not send email. Make sure you have SMTP set up."
        );
        // The invite itself stands.
        assert_eq!(users_with_email(&gw, "mail-fails@example.com").await, 1);
    });
}

#[test]
fn a_failed_invite_leaves_nothing_behind() {
    let upstream = FhirUpstream::start();
    let gw = start(&upstream, |_| {});
    rt().block_on(async {
        let admin = gw.admin_token().await;
        let project = gw.project_of(&admin).await;
        // A malformed membership template: refused before anything is written, upstream too.
        let mut body = practitioner("half@example.com");
        body["membership"] = json!({"active": "not a boolean"});
        let (status, out) = invite(&gw, &admin, &project, body).await;
        assert_eq!(status, 400, "{out}");
        assert_eq!(outcome_text(&out), "Invalid membership");
        assert_eq!(users_with_email(&gw, "half@example.com").await, 0);
        let posts = |upstream: &FhirUpstream| {
            upstream
                .requests()
                .iter()
                .filter(|r| r["method"] == "POST")
                .count()
        };
        assert_eq!(posts(&upstream), 0, "nothing reached the upstream");

        // The store transaction fails after the profile was made upstream (here: the e-mail's
        // unique key is held by something else): the profile is deleted again.
        let store = &gw.running().state.store;
        store
            .write_batch(vec![BatchWrite::Claim {
                key: format!("user-email::{}", "held@example.com"),
                resource_type: "Project".into(),
                id: project.clone(),
            }])
            .await
            .unwrap();
        let (status, out) = invite(&gw, &admin, &project, practitioner("held@example.com")).await;
        assert_eq!(status, 409, "{out}");
        assert_eq!(users_with_email(&gw, "held@example.com").await, 0);
        assert!(upstream_profiles(&upstream, "Practitioner", "held@example.com").is_empty());
        let deletes = upstream
            .requests()
            .iter()
            .filter(|r| {
                r["method"] == "DELETE" && r["url"].as_str().unwrap_or("").contains("Practitioner/")
            })
            .count();
        assert!(
            posts(&upstream) >= 1 && deletes >= 1,
            "created, then deleted"
        );

        // Concurrent invites of one person: one wins, the others get 409; one User, one
        // membership, one profile.
        let mut tasks = Vec::new();
        for _ in 0..5 {
            let (base, admin, project) = (gw.base.clone(), admin.clone(), project.clone());
            tasks.push(tokio::spawn(async move {
                let resp = TestGateway::client()
                    .post(format!("{base}admin/projects/{project}/invite"))
                    .bearer_auth(&admin)
                    .json(&practitioner("race@example.com"))
                    .send()
                    .await
                    .unwrap();
                resp.status().as_u16()
            }));
        }
        let mut statuses = Vec::new();
        for t in tasks {
            statuses.push(t.await.unwrap());
        }
        statuses.sort();
        assert_eq!(statuses, vec![200, 409, 409, 409, 409]);
        assert_eq!(users_with_email(&gw, "race@example.com").await, 1);
        assert_eq!(
            upstream_profiles(&upstream, "Practitioner", "race@example.com").len(),
            1
        );
        let users = gw
            .running()
            .state
            .store
            .users_by_email("race@example.com", None)
            .await
            .unwrap();
        assert_eq!(memberships_of_user(&gw, &users[0].id).await.len(), 1);

        // A membership deleted and the person invited again: the first profile is reused.
        let first = memberships_of_user(&gw, &users[0].id).await.remove(0);
        let (status, _) = gw
            .delete(
                &format!("admin/projects/{project}/members/{}", first.id),
                Some(&admin),
            )
            .await;
        assert_eq!(status, 200);
        let (status, again) = invite(&gw, &admin, &project, practitioner("race@example.com")).await;
        assert_eq!(status, 200, "{again}");
        assert_eq!(again["profile"], first.content["profile"]);
        assert_eq!(
            upstream_profiles(&upstream, "Practitioner", "race@example.com").len(),
            1
        );
    });
}

#[test]
fn an_invite_with_the_upstream_down_creates_nothing() {
    let upstream = FhirUpstream::start();
    let gw = start(&upstream, |_| {});
    rt().block_on(async {
        let admin = gw.admin_token().await;
        let project = gw.project_of(&admin).await;
        drop(upstream);
        let (status, out) = invite(&gw, &admin, &project, practitioner("down@example.com")).await;
        assert_eq!(status, 502, "{out}");
        assert_eq!(users_with_email(&gw, "down@example.com").await, 0);
        let memberships = gw
            .running()
            .state
            .store
            .search(
                "ProjectMembership",
                &[("profile-type".into(), vec!["Practitioner".into()])],
                None,
                100,
            )
            .await
            .unwrap();
        // The operator's own membership (super-admin project) is the only Practitioner one.
        let super_admin = &gw.running().bootstrap.super_admin_project_id;
        let made: Vec<_> = memberships
            .iter()
            .filter(|m| m.project_id.as_ref() != Some(super_admin))
            .collect();
        assert!(made.is_empty(), "{made:?}");
    });
}

// === case 74: members and project ===

#[test]
fn case_74_members_and_project_admin_api() {
    let upstream = FhirUpstream::start();
    let gw = start(&upstream, |_| {});
    rt().block_on(async {
        let admin = gw.admin_token().await;
        let project = gw.project_of(&admin).await;
        let plain = non_admin_token(&gw, &admin).await;
        let (_, m) = invite(&gw, &admin, &project, practitioner("member@example.com")).await;
        let mid = m["id"].as_str().unwrap().to_string();
        let member_path = format!("admin/projects/{project}/members/{mid}");

        let (status, _) = gw
            .get(&format!("admin/projects/{project}"), Some(&plain))
            .await;
        assert_eq!(status, 403);
        let (status, p) = gw
            .get(&format!("admin/projects/{project}"), Some(&admin))
            .await;
        assert_eq!(status, 200, "{p}");
        assert_eq!(p["project"]["id"], project.as_str());
        assert_eq!(p["project"]["name"], "Default");

        assert_eq!(gw.get(&member_path, Some(&plain)).await.0, 403);
        assert_eq!(gw.post(&member_path, Some(&plain), m.clone()).await.0, 403);
        assert_eq!(gw.delete(&member_path, Some(&plain)).await.0, 403);

        let (status, read) = gw.get(&member_path, Some(&admin)).await;
        assert_eq!(status, 200);
        assert_eq!(read["id"], mid.as_str());

        let mut wrong_type = m.clone();
        wrong_type["resourceType"] = json!("Patient");
        assert_eq!(gw.post(&member_path, Some(&admin), wrong_type).await.0, 403);
        let mut wrong_id = m.clone();
        wrong_id["id"] = json!("another-id");
        assert_eq!(gw.post(&member_path, Some(&admin), wrong_id).await.0, 403);

        let mut promoted = read.clone();
        promoted["admin"] = json!(true);
        let (status, updated) = gw.post(&member_path, Some(&admin), promoted).await;
        assert_eq!(status, 200, "{updated}");
        assert_eq!(updated["admin"], true);
        assert_eq!(
            updated["meta"]["author"]["reference"],
            format!("ClientApplication/{ADMIN_CLIENT_ID}")
        );

        // The owner's membership cannot be deleted.
        let owner = gw.running().bootstrap.admin_email.clone();
        let (status, om) = invite(&gw, &admin, &project, practitioner(&owner)).await;
        assert_eq!(status, 200, "{om}");
        let (status, body) = gw
            .delete(
                &format!(
                    "admin/projects/{project}/members/{}",
                    om["id"].as_str().unwrap()
                ),
                Some(&admin),
            )
            .await;
        assert_eq!(status, 400, "{body}");
        assert_eq!(
            outcome_text(&body),
            "Cannot delete the owner of the project"
        );
        let (status, _) = gw
            .delete(
                &format!("admin/projects/{project}/members/00000000-0000-4000-8000-000000000000"),
                Some(&admin),
            )
            .await;
        assert_eq!(status, 404);

        // Deleting: 200 All OK; a project-scoped user goes with its last membership.
        let (_, pm) = invite(&gw, &admin, &project, patient("leaving@example.com")).await;
        let (status, body) = gw
            .delete(
                &format!(
                    "admin/projects/{project}/members/{}",
                    pm["id"].as_str().unwrap()
                ),
                Some(&admin),
            )
            .await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(outcome_text(&body), "All OK");
        assert!(
            gw.running()
                .state
                .store
                .read("User", &user_id(&pm))
                .await
                .unwrap()
                .is_none()
        );
        let (status, _) = gw.delete(&member_path, Some(&admin)).await;
        assert_eq!(status, 200);
        // A server-scoped user stays.
        assert!(
            gw.running()
                .state
                .store
                .read("User", &user_id(&m))
                .await
                .unwrap()
                .is_some()
        );
    });
}

// === case 75: admin setpassword ===

#[test]
fn case_75_admin_setpassword() {
    let upstream = FhirUpstream::start();
    let gw = start(&upstream, |_| {});
    rt().block_on(async {
        let admin = gw.admin_token().await;
        let project = gw.project_of(&admin).await;
        let plain = non_admin_token(&gw, &admin).await;
        invite(&gw, &admin, &project, practitioner("server@example.com")).await;
        invite(&gw, &admin, &project, patient("scoped@example.com")).await;
        let set = |email: &str, password: &str| json!({"email": email, "password": password});

        let (status, _) = gw.post(
            "admin/projects/setpassword",
            Some(&plain),
            set("scoped@example.com", "long-enough-1"),
        )
        .await;
        assert_eq!(status, 403);
        let (status, body) = gw.post(
            "admin/projects/setpassword",
            Some(&admin),
            set("scoped@example.com", "short"),
        )
        .await;
        assert_eq!(status, 400);
        assert_eq!(
            outcome_text(&body),
            "Invalid password, must be at least 8 characters"
        );
        assert_eq!(outcome_expression(&body), "password");
        // A server-scoped user, nobody, and a project-scoped user of another project: not found.
        let sup = super_admin_token(&gw).await;
        let other = gw.running().bootstrap.super_admin_project_id.clone();
        let (status, _) = invite(&gw, &sup, &other, patient("elsewhere@example.com")).await;
        assert_eq!(status, 200);
        for email in ["server@example.com", "nobody@example.com", "elsewhere@example.com"] {
            let (status, body) = gw
                .post(
                    "admin/projects/setpassword",
                    Some(&admin),
                    set(email, "long-enough-1"),
                )
                .await;
            assert_eq!(status, 400);
            assert_eq!(outcome_text(&body), "User not found");
        }

        let (status, body) = gw.post(
            "admin/projects/setpassword",
            Some(&admin),
            set("Scoped@Example.com", "long-enough-1"),
        )
        .await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(outcome_text(&body), "All OK");
        let (status, body) = gw.post(
            "auth/login",
            None,
            json!({"email": "scoped@example.com", "password": "long-enough-1", "projectId": project}),
        )
        .await;
        assert_eq!(status, 200, "{body}");
        assert!(body["code"].is_string(), "{body}");
    });
}

// === cases 51–53: passwords ===

#[test]
fn case_51_setpassword_through_an_invite_link() {
    let upstream = FhirUpstream::start();
    // No SMTP: the invite e-mail lands in the outbox.
    let gw = start(&upstream, |_| {});
    rt().block_on(async {
        let admin = gw.admin_token().await;
        let project = gw.project_of(&admin).await;
        let mut body = practitioner("linked@example.com");
        body["sendEmail"] = json!(true);
        let (status, m) = invite(&gw, &admin, &project, body).await;
        assert_eq!(status, 200, "{m}");
        let messages = mail::wait_for_outbox(&gw.data_dir, 1);
        assert_eq!(mail::header(&messages[0], "Subject").as_deref(), Some("Welcome to fhirgate"));
        assert_eq!(mail::header(&messages[0], "To").as_deref(), Some("linked@example.com"));
        let link = mail::link(&messages[0], "/auth/setpassword/").expect("a set-password link");
        assert!(link.starts_with(&gw.base), "{link}");
        let rest = link.strip_prefix(&format!("{}auth/setpassword/", gw.base)).unwrap();
        let (id, secret) = rest.split_once('/').unwrap();

        let set = |id: &str, secret: &str, password: &str| json!({"id": id, "secret": secret, "password": password});
        for (body, want, expr) in [
            (set("not-a-uuid", secret, "long-enough-1"), "Invalid request ID", "id"),
            (json!({"id": id, "password": "long-enough-1"}), "Missing secret", "secret"),
            (set(id, secret, "seven77"), "Invalid password, must be at least 8 characters", "password"),
        ] {
            let (status, out) = gw.post("auth/setpassword", None, body).await;
            assert_eq!(status, 400, "{out}");
            assert_eq!(outcome_text(&out), want);
            assert_eq!(outcome_expression(&out), expr);
        }
        let (status, _) = gw.post("auth/setpassword", None, set("00000000-0000-4000-8000-000000000000", secret, "long-enough-1")).await;
        assert_eq!(status, 404);
        let (status, out) = gw.post("auth/setpassword", None, set(id, "0123456789abcdef0123456789abcdef", "long-enough-1")).await;
        assert_eq!(status, 400);
        assert_eq!(outcome_text(&out), "Incorrect secret");
        // Before the password is set, the invited user cannot sign in with any guess.
        assert_eq!(login(&gw, "linked@example.com", "long-enough-1").await.0, 400);

        let (status, out) = gw.post("auth/setpassword", None, set(id, secret, "long-enough-1")).await;
        assert_eq!(status, 200, "{out}");
        assert_eq!(outcome_text(&out), "All OK");
        let user = gw.running().state.store.read("User", &user_id(&m)).await.unwrap().unwrap();
        assert_eq!(user.content["emailVerified"], true);
        let (status, out) = login(&gw, "linked@example.com", "long-enough-1").await;
        assert_eq!(status, 200, "{out}");
        let (status, out) = gw.post("auth/setpassword", None, set(id, secret, "another-one-2")).await;
        assert_eq!(status, 400);
        assert_eq!(outcome_text(&out), "Already used");
        assert_eq!(login(&gw, "linked@example.com", "another-one-2").await.0, 400);

        // A verify-email request cannot set a password; an expired link is refused.
        let store = &gw.running().state.store;
        let now = fhirgate::store::now_unix();
        let seeded = |rid: &str, kind: &str, expires_at: i64| SecurityRequest {
            id: rid.into(),
            kind: kind.into(),
            user_id: user_id(&m),
            secret_hash: gw.running().state.hash_secret("seeded-secret"),
            redirect_uri: None,
            created_at: now,
            expires_at,
            used: false,
        };
        let verify_id = "11111111-1111-4111-8111-111111111111";
        let expired_id = "22222222-2222-4222-8222-222222222222";
        store
            .write_batch(vec![
                BatchWrite::NewSecurityRequest(seeded(verify_id, "verify-email", now + 60)),
                BatchWrite::NewSecurityRequest(seeded(expired_id, "reset", now - 1)),
            ])
            .await
            .unwrap();
        let (status, out) = gw.post("auth/setpassword", None, set(verify_id, "seeded-secret", "long-enough-1")).await;
        assert_eq!(status, 400);
        assert_eq!(outcome_text(&out), "Invalid request type");
        let (status, out) = gw.post("auth/setpassword", None, set(expired_id, "seeded-secret", "long-enough-1")).await;
        assert_eq!(status, 400);
        assert_eq!(outcome_text(&out), "Security request expired");
        // The verify-email link verifies, once.
        let (status, out) = gw.post("auth/verifyemail", None, json!({"id": verify_id, "secret": "seeded-secret"})).await;
        assert_eq!(status, 200, "{out}");
        let (status, out) = gw.post("auth/verifyemail", None, json!({"id": verify_id, "secret": "seeded-secret"})).await;
        assert_eq!(status, 400);
        assert_eq!(outcome_text(&out), "Already used");

        // One link, five simultaneous uses: exactly one sets the password.
        let (status, _) = gw.post("auth/resetpassword", None, json!({"email": "linked@example.com"})).await;
        assert_eq!(status, 200);
        let reset = mail::wait_for_outbox(&gw.data_dir, 2)[1].clone();
        let (rid, rsecret) = mail::set_password_ids(&reset, &gw.base);
        let mut tasks = Vec::new();
        for i in 0..5 {
            let url = format!("{}auth/setpassword", gw.base);
            let body = set(&rid, &rsecret, &format!("racing-password-{i}"));
            tasks.push(tokio::spawn(async move {
                let resp = TestGateway::client().post(url).json(&body).send().await.unwrap();
                let status = resp.status().as_u16();
                let out: Value = resp.json().await.unwrap();
                (status, outcome_text(&out).to_string(), i)
            }));
        }
        let mut results = Vec::new();
        for t in tasks {
            results.push(t.await.unwrap());
        }
        let winners: Vec<_> = results.iter().filter(|r| r.0 == 200).collect();
        assert_eq!(winners.len(), 1, "{results:?}");
        assert!(results.iter().all(|r| r.0 == 200 || (r.0 == 400 && r.1 == "Already used")), "{results:?}");
        let winner = winners[0].2;
        assert_eq!(login(&gw, "linked@example.com", &format!("racing-password-{winner}")).await.0, 200);
        for r in results.iter().filter(|r| r.2 != winner) {
            assert_eq!(login(&gw, "linked@example.com", &format!("racing-password-{}", r.2)).await.0, 400);
        }
    });
}

#[test]
fn case_52_resetpassword_never_reveals_an_account() {
    let upstream = FhirUpstream::start();
    let gw = start(&upstream, |_| {});
    rt().block_on(async {
        let admin = gw.admin_token().await;
        let project = gw.project_of(&admin).await;
        let mut body = practitioner("resets@example.com");
        body["password"] = json!("first-password-1");
        invite(&gw, &admin, &project, body).await;

        // A domain that signs in at an external identity provider has no password to reset.
        let sup = super_admin_token(&gw).await;
        let (status, out) = gw.post(
            "fhir/R4/DomainConfiguration",
            Some(&sup),
            json!({"resourceType": "DomainConfiguration", "domain": "idp.example", "identityProvider": {
                "authorizeUrl": "https://idp.example/authorize", "tokenUrl": "https://idp.example/token",
                "userInfoUrl": "https://idp.example/userinfo", "clientId": "c", "clientSecret": "s"}}),
        )
        .await;
        assert_eq!(status, 201, "{out}");
        let (status, out) = gw.post(
            "auth/resetpassword",
            None,
            json!({"email": "someone@IDP.example"}),
        )
        .await;
        assert_eq!(status, 400, "{out}");
        assert_eq!(
            outcome_text(&out),
            "Cannot reset password for external auth. Contact your system administrator."
        );

        let (status, out) = gw.post(
            "auth/resetpassword",
            None,
            json!({"email": "unknown@example.com"}),
        )
        .await;
        assert_eq!(status, 200, "{out}");
        assert_eq!(outcome_text(&out), "All OK");
        for blank in [
            json!({"email": ""}),
            json!({}),
            json!({"email": "not-an-email"}),
        ] {
            let (status, out) = gw.post("auth/resetpassword", None, blank).await;
            assert_eq!(status, 400);
            assert_eq!(
                outcome_text(&out),
                "Valid email address between 3 and 72 characters is required"
            );
        }
        let (status, out) = gw.post(
            "auth/resetpassword",
            None,
            json!({"email": "Resets@Example.com"}),
        )
        .await;
        assert_eq!(status, 200);
        assert_eq!(outcome_text(&out), "All OK");
        let messages = mail::wait_for_outbox(&gw.data_dir, 1);
        assert_eq!(messages.len(), 1, "only the known account got an e-mail");
        assert_eq!(
            mail::header(&messages[0], "Subject").as_deref(),
            Some("fhirgate Password Reset")
        );
        let (id, secret) = mail::set_password_ids(&messages[0], &gw.base);
        let (status, out) = gw.post(
            "auth/setpassword",
            None,
            json!({"id": id, "secret": secret, "password": "second-password-2"}),
        )
        .await;
        assert_eq!(status, 200, "{out}");
        assert_eq!(
            login(&gw, "resets@example.com", "second-password-2")
                .await
                .0,
            200
        );
        let (status, out) = login(&gw, "resets@example.com", "first-password-1").await;
        assert_eq!(status, 400);
        assert_eq!(outcome_text(&out), "Email or password is invalid");

        // A second reset supersedes the first link; sendEmail:false sends nothing.
        gw.post(
            "auth/resetpassword",
            None,
            json!({"email": "resets@example.com"}),
        )
        .await;
        let first = mail::wait_for_outbox(&gw.data_dir, 2)[1].clone();
        gw.post(
            "auth/resetpassword",
            None,
            json!({"email": "resets@example.com"}),
        )
        .await;
        let second = mail::wait_for_outbox(&gw.data_dir, 3)[2].clone();
        let (id1, s1) = mail::set_password_ids(&first, &gw.base);
        let (id2, s2) = mail::set_password_ids(&second, &gw.base);
        let (status, out) = gw.post(
            "auth/setpassword",
            None,
            json!({"id": id1, "secret": s1, "password": "third-password-3"}),
        )
        .await;
        assert_eq!(status, 400);
        assert_eq!(outcome_text(&out), "Already used");
        let (status, _) = gw.post(
            "auth/setpassword",
            None,
            json!({"id": id2, "secret": s2, "password": "third-password-3"}),
        )
        .await;
        assert_eq!(status, 200);
        gw.post(
            "auth/resetpassword",
            None,
            json!({"email": "resets@example.com", "sendEmail": false}),
        )
        .await;
        std::thread::sleep(std::time::Duration::from_millis(500));
        assert_eq!(mail::outbox(&gw.data_dir).len(), 3);
    });
}

#[test]
fn case_53_changepassword() {
    let upstream = FhirUpstream::start();
    let gw = start(&upstream, |_| {});
    rt().block_on(async {
        let admin = gw.admin_token().await;
        let project = gw.project_of(&admin).await;
        let mut body = practitioner("changer@example.com");
        body["password"] = json!("old-password-1");
        let (_, m) = invite(&gw, &admin, &project, body).await;
        let token = user_token(&gw, "changer@example.com", "old-password-1").await;

        let (status, _) = gw
            .post(
                "auth/changepassword",
                None,
                json!({"oldPassword": "old-password-1", "newPassword": "new-password-2"}),
            )
            .await;
        assert_eq!(status, 401);
        let (status, out) = gw
            .post(
                "auth/changepassword",
                Some(&token),
                json!({"newPassword": "new-password-2"}),
            )
            .await;
        assert_eq!(status, 400);
        assert_eq!(outcome_text(&out), "Missing oldPassword");
        let (status, out) = gw
            .post(
                "auth/changepassword",
                Some(&token),
                json!({"oldPassword": "old-password-1", "newPassword": "short"}),
            )
            .await;
        assert_eq!(status, 400);
        assert_eq!(
            outcome_text(&out),
            "Invalid password, must be at least 8 characters"
        );
        assert_eq!(outcome_expression(&out), "newPassword");
        let (status, out) = gw
            .post(
                "auth/changepassword",
                Some(&token),
                json!({"oldPassword": "wrong-password", "newPassword": "new-password-2"}),
            )
            .await;
        assert_eq!(status, 400);
        assert_eq!(outcome_text(&out), "Incorrect password");
        assert_eq!(outcome_expression(&out), "oldPassword");
        let (status, out) = gw
            .post(
                "auth/changepassword",
                Some(&token),
                json!({"oldPassword": "old-password-1", "newPassword": "new-password-2"}),
            )
            .await;
        assert_eq!(status, 200, "{out}");
        assert_eq!(outcome_text(&out), "All OK");
        assert_eq!(
            login(&gw, "changer@example.com", "new-password-2").await.0,
            200
        );
        assert_eq!(
            login(&gw, "changer@example.com", "old-password-1").await.0,
            400
        );
        // Issue 10: the change ended every session, the one that made it included.
        let (status, _) = gw.get("auth/me", Some(&token)).await;
        assert_eq!(status, 401);
        let token = user_token(&gw, "changer@example.com", "new-password-2").await;

        // A user without a password hash.
        let store = &gw.running().state.store;
        let mut user = store.read("User", &user_id(&m)).await.unwrap().unwrap();
        user.content.as_object_mut().unwrap().remove("passwordHash");
        let index = fhirgate::control::index::index_rows(&user.content);
        store
            .put(
                user.content.clone(),
                None,
                &index,
                Some(&user.version_id),
                false,
            )
            .await
            .unwrap();
        let (status, out) = gw
            .post(
                "auth/changepassword",
                Some(&token),
                json!({"oldPassword": "new-password-2", "newPassword": "third-password-3"}),
            )
            .await;
        assert_eq!(status, 400);
        assert_eq!(outcome_text(&out), "Existing password not set");
        assert_eq!(outcome_expression(&out), "oldPassword");
    });
}

// === cases 48–50: registration ===

#[test]
fn case_48_newuser_is_closed_by_default() {
    let upstream = FhirUpstream::start();
    let gw = start(&upstream, |_| {});
    rt().block_on(async {
        let (status, out) = gw.post("auth/newuser", None, json!({"firstName": "A", "lastName": "B", "email": "new@example.com", "password": "long-enough-1"})).await;
        assert_eq!(status, 400, "{out}");
        assert_eq!(outcome_text(&out), "Registration is disabled");
        let (status, out) = gw.post("auth/newproject", None, json!({"login": "00000000-0000-4000-8000-000000000000", "projectName": "My Project"})).await;
        assert_eq!(status, 400, "{out}");
        assert_eq!(outcome_text(&out), "Registration is disabled");
        assert_eq!(users_with_email(&gw, "new@example.com").await, 0);
    });
}

fn registration_open(f: &mut ConfigFile) {
    f.register_enabled = Some(true);
}

#[test]
fn case_48_49_newuser_then_newproject() {
    let upstream = FhirUpstream::start();
    let gw = start(&upstream, registration_open);
    rt().block_on(async {
        let new_user = |password: &str| json!({"firstName": "Reg", "lastName": "Istrant", "email": "Reg@Example.com", "password": password, "codeChallenge": "verifier-0123456789", "codeChallengeMethod": "plain"});
        for bad in ["seven77", &"x".repeat(73), &"€".repeat(25)] {
            let (status, out) = gw.post("auth/newuser", None, new_user(bad)).await;
            assert_eq!(status, 400, "{out}");
            assert_eq!(outcome_text(&out), "Password must be between 8 and 72 characters");
        }
        let (status, out) = gw.post("auth/newuser", None, json!({"firstName": "A", "lastName": "B", "email": "", "password": "long-enough-1"})).await;
        assert_eq!(status, 400);
        assert_eq!(outcome_text(&out), "Valid email address between 3 and 72 characters is required");

        let (status, out) = gw.post("auth/newuser", None, new_user("long-enough-1")).await;
        assert_eq!(status, 200, "{out}");
        let login_id = out["login"].as_str().unwrap().to_string();
        assert!(out.get("code").is_none(), "{out}");
        let (status, out) = gw.post("auth/newuser", None, new_user("long-enough-1")).await;
        assert_eq!(status, 400);
        assert_eq!(outcome_text(&out), "Email already registered");
        assert_eq!(outcome_expression(&out), "email");

        let (status, out) = gw.post("auth/newproject", None, json!({"projectName": "My Project"})).await;
        assert_eq!(status, 400);
        assert_eq!(outcome_text(&out), "Login ID is required.");
        let (status, out) = gw.post("auth/newproject", None, json!({"login": login_id, "projectName": "My Project"})).await;
        assert_eq!(status, 200, "{out}");
        assert_eq!(out["login"], login_id.as_str());
        let code = out["code"].as_str().unwrap().to_string();
        let (status, out) = gw.post("auth/newproject", None, json!({"login": login_id, "projectName": "Second Project"})).await;
        assert_eq!(status, 400);
        assert_eq!(outcome_text(&out), "Login already has a membership");

        let (status, tokens) = exchange(&gw, &code).await;
        assert_eq!(status, 200, "{tokens}");
        let token = tokens["access_token"].as_str().unwrap();
        let profile = tokens["profile"]["reference"].as_str().unwrap().to_string();
        assert!(profile.starts_with("Practitioner/"), "{profile}");
        let (status, read) = gw.get(&format!("fhir/R4/{profile}"), Some(token)).await;
        assert_eq!(status, 200, "{read}");
        assert_eq!(read["name"][0]["family"], "Istrant");
        // The new user owns the new project and is its admin.
        let (status, me) = gw.get("auth/me", Some(token)).await;
        assert_eq!(status, 200, "{me}");
        assert_eq!(me["project"]["name"], "My Project");
        assert_eq!(me["membership"]["admin"], true);
    });
}

#[test]
fn case_50_newpatient_needs_a_default_patient_policy() {
    let upstream = FhirUpstream::start();
    let gw = start(&upstream, registration_open);
    rt().block_on(async {
        let admin = gw.admin_token().await;
        let project = gw.project_of(&admin).await;
        let reg = json!({"firstName": "Open", "lastName": "Patient", "email": "open@example.com", "password": "long-enough-1", "projectId": project, "codeChallenge": "verifier-0123456789", "codeChallengeMethod": "plain"});
        let (status, out) = gw.post("auth/newuser", None, reg.clone()).await;
        assert_eq!(status, 400, "{out}");
        assert_eq!(outcome_text(&out), "Project does not allow open registration");

        // The admin creates a policy and sets it as the project's default for patients.
        let (status, policy) = gw.post("fhir/R4/AccessPolicy", Some(&admin), json!({"resourceType": "AccessPolicy", "name": "self-registered", "resource": [{"resourceType": "Patient"}]})).await;
        assert_eq!(status, 201, "{policy}");
        let (_, mut p) = gw.get(&format!("fhir/R4/Project/{project}"), Some(&admin)).await;
        p["defaultPatientAccessPolicy"] = json!({"reference": format!("AccessPolicy/{}", policy["id"].as_str().unwrap())});
        let (status, out) = gw.put(&format!("fhir/R4/Project/{project}"), Some(&admin), p).await;
        assert_eq!(status, 200, "{out}");

        let (status, out) = gw.post("auth/newuser", None, reg).await;
        assert_eq!(status, 200, "{out}");
        let login_id = out["login"].as_str().unwrap().to_string();
        let (status, out) = gw.post("auth/newpatient", None, json!({"login": login_id})).await;
        assert_eq!(status, 400);
        assert_eq!(outcome_text(&out), "Project ID is required");
        let (status, out) = gw.post("auth/newpatient", None, json!({"login": login_id, "projectId": project})).await;
        assert_eq!(status, 200, "{out}");
        let code = out["code"].as_str().unwrap().to_string();
        let (status, tokens) = exchange(&gw, &code).await;
        assert_eq!(status, 200, "{tokens}");
        let profile = tokens["profile"]["reference"].as_str().unwrap();
        assert!(profile.starts_with("Patient/"), "{profile}");
        assert_eq!(upstream.fhir("GET", profile, None).status, 200);
        let (_, me) = gw.get("auth/me", Some(tokens["access_token"].as_str().unwrap())).await;
        assert_eq!(me["membership"]["admin"], Value::Null);
        let (status, out) = gw.post("auth/newpatient", None, json!({"login": login_id, "projectId": project})).await;
        assert_eq!(status, 400, "{out}");
    });
}

/// The forms a local service received.
type Received = std::sync::Arc<std::sync::Mutex<Vec<Vec<(String, String)>>>>;

/// A local stand-in for Google's reCAPTCHA `siteverify`: a token is valid for a secret when it
/// is `good-for-<secret>`. Every form it received is kept.
async fn serve_siteverify() -> (String, Received) {
    let seen = Received::default();
    let record = seen.clone();
    let app = axum::Router::new().route(
        "/siteverify",
        axum::routing::post(move |form: axum::extract::Form<Vec<(String, String)>>| {
            let record = record.clone();
            async move {
                let get = |k: &str| form.0.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
                let ok = get("response") == get("secret").map(|s| format!("good-for-{s}"));
                record.lock().unwrap().push(form.0.clone());
                axum::Json(json!({"success": ok}))
            }
        }),
    );
    let port = common::http::serve(app).await;
    (format!("http://127.0.0.1:{port}/siteverify"), seen)
}

/// A local breached-password range service (HaveIBeenPwned's protocol) that lists `breached`
/// among padding lines; every prefix it was asked for is kept.
async fn serve_pwned_range(
    breached: &'static str,
) -> (String, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
    use sha1::Digest;
    use std::sync::{Arc, Mutex};
    let digest = hex::encode_upper(sha1::Sha1::digest(breached.as_bytes()));
    let asked: Arc<Mutex<Vec<String>>> = Arc::default();
    let record = asked.clone();
    let app = axum::Router::new().route(
        "/range/{prefix}",
        axum::routing::get(
            move |axum::extract::Path(prefix): axum::extract::Path<String>| {
                let record = record.clone();
                let digest = digest.clone();
                async move {
                    record.lock().unwrap().push(prefix.clone());
                    let mut lines = vec!["0000000000000000000000000000000000A:0".to_string()];
                    if digest.starts_with(&prefix) {
                        lines.push(format!("{}:3861493", &digest[5..]));
                    }
                    lines.join("\r\n")
                }
            },
        ),
    );
    let port = common::http::serve(app).await;
    (format!("http://127.0.0.1:{port}"), asked)
}

#[test]
fn case_48_recaptcha_and_breached_passwords_on_self_service() {
    let upstream = FhirUpstream::start();
    let runtime = rt();
    let ((verify_url, verified), (range_url, asked)) = runtime.block_on(async {
        (
            serve_siteverify().await,
            serve_pwned_range("correct horse battery staple").await,
        )
    });
    let gw = start(&upstream, |f| {
        f.register_enabled = Some(true);
        f.recaptcha_site_key = Some("server-site-key".into());
        f.recaptcha_secret_key = Some("server-secret".into());
        f.recaptcha_verify_url = Some(verify_url);
        f.pwned_passwords_url = Some(range_url);
    });
    common::people::seed_project(
        &gw,
        json!({"name": "Clinic with a site", "site": [
            {"name": "portal", "domain": ["portal.example.com"], "recaptchaSiteKey": "portal-key", "recaptchaSecretKey": "portal-secret"},
            {"name": "kiosk", "domain": ["kiosk.example.com"], "recaptchaSiteKey": "kiosk-key"},
        ]}),
    );
    runtime.block_on(async {
        let user = |extra: Value| {
            let mut body = json!({"firstName": "Rec", "lastName": "Aptcha", "email": "recaptcha@example.com", "password": "a-long-fine-passphrase"});
            for (k, v) in extra.as_object().unwrap() {
                body[k] = v.clone();
            }
            body
        };
        let refused = |text: &'static str| move |(status, out): (u16, Value)| {
            assert_eq!(status, 400, "{out}");
            assert_eq!(outcome_text(&out), text, "{out}");
        };
        refused("Recaptcha token is required")(gw.post("auth/newuser", None, user(json!({}))).await);
        refused("Recaptcha failed")(
            gw.post("auth/newuser", None, user(json!({"recaptchaToken": "forged"}))).await,
        );
        refused("Invalid recaptchaSiteKey")(
            gw.post("auth/newuser", None, user(json!({"recaptchaSiteKey": "nobody", "recaptchaToken": "x"}))).await,
        );
        refused("Invalid recaptchaSecretKey")(
            gw.post("auth/newuser", None, user(json!({"recaptchaSiteKey": "kiosk-key", "recaptchaToken": "x"}))).await,
        );
        // A project site's key is verified with that site's secret; then the password is
        // checked against the breach list (only a 5-digit prefix leaves).
        let (status, out) = gw
            .post("auth/newuser", None, user(json!({"recaptchaSiteKey": "portal-key", "recaptchaToken": "good-for-portal-secret", "password": "correct horse battery staple"})))
            .await;
        assert_eq!(status, 400, "{out}");
        assert_eq!(outcome_text(&out), "Password found in breach database");
        assert_eq!(outcome_expression(&out), "password");
        assert_eq!(asked.lock().unwrap().as_slice(), ["ABF7A"]);
        assert_eq!(users_with_email(&gw, "recaptcha@example.com").await, 0);
        let (status, out) = gw
            .post("auth/newuser", None, user(json!({"recaptchaToken": "good-for-server-secret"})))
            .await;
        assert_eq!(status, 200, "{out}");
        assert_eq!(users_with_email(&gw, "recaptcha@example.com").await, 1);
        let forms = verified.lock().unwrap().clone();
        let secrets: Vec<&str> = forms
            .iter()
            .filter_map(|f| f.iter().find(|(k, _)| k == "secret").map(|(_, v)| v.as_str()))
            .collect();
        assert_eq!(secrets, ["server-secret", "portal-secret", "server-secret"]);
        assert!(forms.iter().all(|f| f.iter().any(|(k, v)| k == "remoteip" && v == "127.0.0.1")));

        // Reset is guarded the same way, and still reveals nothing about the account.
        refused("Recaptcha token is required")(
            gw.post("auth/resetpassword", None, json!({"email": "recaptcha@example.com"})).await,
        );
        for email in ["recaptcha@example.com", "nobody@example.com"] {
            let (status, out) = gw
                .post("auth/resetpassword", None, json!({"email": email, "sendEmail": false, "recaptchaToken": "good-for-server-secret"}))
                .await;
            assert_eq!((status, outcome_text(&out)), (200, "All OK"), "{out}");
        }
    });

    // A breach service that cannot be reached refuses new passwords (503), never skips the check.
    // Port 1 (tcpmux): nothing listens there on a test machine, and no test takes it.
    let closed = "http://127.0.0.1:1".to_string();
    let gw = start(&upstream, |f| {
        f.register_enabled = Some(true);
        f.pwned_passwords_url = Some(closed);
    });
    runtime.block_on(async {
        let (status, out) = gw
            .post("auth/newuser", None, json!({"firstName": "A", "lastName": "B", "email": "down@example.com", "password": "a-long-fine-passphrase"}))
            .await;
        assert_eq!(status, 503, "{out}");
        assert_eq!(users_with_email(&gw, "down@example.com").await, 0);
    });
}

// === the password policy (issue 17): every path that sets a password ===

const COMMON: &str = "Password is too common";
const PERSONAL: &str = "Password must not be based on your name, e-mail address or project name";
const GUESSABLE: &str =
    "Password is too easy to guess; a longer phrase of unrelated words is stronger";

/// A refusal of the policy: 400, the text, the field.
fn refused(status: u16, out: &Value, text: &str, field: &str) {
    assert_eq!(status, 400, "{out}");
    assert_eq!(outcome_text(out), text, "{out}");
    assert_eq!(outcome_expression(out), field, "{out}");
}

#[test]
fn the_password_policy_holds_on_every_path_that_sets_a_password() {
    let upstream = FhirUpstream::start();
    let gw = start(&upstream, registration_open);
    rt().block_on(async {
        let admin = gw.admin_token().await;
        let project = gw.project_of(&admin).await;
        let grace = |password: Option<&str>| {
            let mut body = json!({"resourceType": "Practitioner", "firstName": "Grace", "lastName": "Hopper",
                "email": "grace.hopper@example.com", "sendEmail": password.is_none()});
            if let Some(p) = password {
                body["password"] = json!(p);
            }
            body
        };

        // An invite with a password: common, personal, guessable; nothing is created.
        for (password, text) in [
            ("password123", COMMON),
            ("gracehopper1", PERSONAL),
            ("Hopper1906!", PERSONAL),
            ("aaaaaaaaaaaa", GUESSABLE),
        ] {
            let (status, out) = invite(&gw, &admin, &project, grace(Some(password))).await;
            refused(status, &out, text, "password");
        }
        assert_eq!(users_with_email(&gw, "grace.hopper@example.com").await, 0);

        // The invite link, through the API and through the page's form.
        let (status, m) = invite(&gw, &admin, &project, grace(None)).await;
        assert_eq!(status, 200, "{m}");
        let messages = mail::wait_for_outbox(&gw.data_dir, 1);
        let (id, secret) = mail::set_password_ids(&messages[0], &gw.base);
        let set = |password: &str| json!({"id": id, "secret": secret, "password": password});
        let (status, out) = gw.post("auth/setpassword", None, set("Hopper1906!")).await;
        refused(status, &out, PERSONAL, "password");
        let (status, out) = gw.post("auth/setpassword", None, set("qwertyuiop")).await;
        refused(status, &out, COMMON, "password");
        let resp = TestGateway::client()
            .post(format!("{}auth/setpassword", gw.base))
            .header("accept", "text/html")
            .form(&[("id", id.as_str()), ("secret", &secret), ("password", "grace-hopper"), ("confirmPassword", "grace-hopper")])
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 400);
        let html = resp.text().await.unwrap();
        assert!(html.contains(PERSONAL), "{html}");
        assert_eq!(login(&gw, "grace.hopper@example.com", "Hopper1906!").await.0, 400);
        let (status, out) = gw.post("auth/setpassword", None, set("harbour kettle violin")).await;
        assert_eq!(status, 200, "{out}");

        // Her own change of password.
        let token = user_token(&gw, "grace.hopper@example.com", "harbour kettle violin").await;
        let change = |new: &str| json!({"oldPassword": "harbour kettle violin", "newPassword": new});
        for (password, text) in [("gracehopper1", PERSONAL), ("password123", COMMON), ("Default2024!", PERSONAL)] {
            let (status, out) = gw.post("auth/changepassword", Some(&token), change(password)).await;
            refused(status, &out, text, "newPassword");
        }
        assert_eq!(login(&gw, "grace.hopper@example.com", "harbour kettle violin").await.0, 200);

        // The admins' set-password: the project's name counts as hers too.
        let (status, _) = invite(&gw, &admin, &project, patient("pat.ient@example.com")).await;
        assert_eq!(status, 200);
        let set_by = |password: &str| json!({"email": "pat.ient@example.com", "password": password, "projectId": project});
        let (status, out) = gw.post("admin/projects/setpassword", Some(&admin), set_by("Default2024!")).await;
        refused(status, &out, PERSONAL, "password");
        let sup = super_admin_token(&gw).await;
        let (status, out) = gw.post("admin/super/setpassword", Some(&sup), set_by("password123")).await;
        refused(status, &out, COMMON, "password");
        let (status, out) = gw.post("admin/super/setpassword", Some(&sup), set_by("patient ient 1")).await;
        refused(status, &out, PERSONAL, "password");
        assert_eq!(login(&gw, "pat.ient@example.com", "Default2024!").await.0, 400);

        // Self-registration; nobody is created by a refused one.
        let new_user = |password: &str| json!({"firstName": "Florence", "lastName": "Nightingale",
            "email": "florence.nightingale@example.com", "password": password,
            "codeChallenge": "verifier-0123456789", "codeChallengeMethod": "plain"});
        for (password, text) in [("nightingale1820", PERSONAL), ("Florence-1820", PERSONAL), ("iloveyou1", COMMON)] {
            let (status, out) = gw.post("auth/newuser", None, new_user(password)).await;
            refused(status, &out, text, "password");
        }
        assert_eq!(users_with_email(&gw, "florence.nightingale@example.com").await, 0);
        let (status, out) = gw.post("auth/newuser", None, new_user("lamp ward scutari night")).await;
        assert_eq!(status, 200, "{out}");
    });
}

#[test]
fn the_password_policy_is_the_operators() {
    let upstream = FhirUpstream::start();
    // Longer, and the estimate off: length alone decides.
    let gw = start(&upstream, |f| {
        f.password_min_length = Some(12);
        f.password_min_strength = Some(0);
    });
    rt().block_on(async {
        let admin = gw.admin_token().await;
        let project = gw.project_of(&admin).await;
        let mut body = practitioner("lengthy@example.com");
        body["password"] = json!("elevenchars");
        let (status, out) = invite(&gw, &admin, &project, body.clone()).await;
        refused(
            status,
            &out,
            "Invalid password, must be at least 12 characters",
            "password",
        );
        body["password"] = json!("password1234");
        let (status, out) = invite(&gw, &admin, &project, body).await;
        assert_eq!(status, 200, "{out}");
        assert_eq!(
            login(&gw, "lengthy@example.com", "password1234").await.0,
            200
        );
    });
    drop(gw);

    // A weak first-run admin password stops the start, with the reason.
    let dir = tempfile::tempdir().unwrap();
    let err = match TestGateway::try_start_in(&upstream.base_url, dir.path(), |f| {
        f.admin_password = Some("password123".into());
    }) {
        Ok(_) => panic!("a gateway started with a common admin password"),
        Err(e) => e,
    };
    assert!(
        err.contains("admin_password: Password is too common"),
        "{err}"
    );
    // Out-of-range settings are refused.
    for (length, strength, key) in [
        (Some(7), None, "password_min_length"),
        (Some(73), None, "password_min_length"),
        (None, Some(5), "password_min_strength"),
    ] {
        let mut file = ConfigFile {
            password_min_length: length,
            password_min_strength: strength,
            ..ConfigFile::default()
        };
        file.data_dir = Some(dir.path().to_path_buf());
        let err = fhirgate::config::Config::from_file(file)
            .unwrap_err()
            .to_string();
        assert!(err.contains(key), "{err}");
    }
}
