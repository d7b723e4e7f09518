// The unmodified @medplum/core MedplumClient against a running fhirgate (tests/compat_sdk.rs runs
// it). Every call below is the SDK's own: its token requests, its PKCE, its /auth/me, its error
// handling. Where the SDK has no call for a check (a token that must now be refused), a plain
// fetch with the token the SDK holds asks the gateway directly.
//
// Input: one JSON argument {baseUrl, adminClientId, adminClientSecret, practitioner: {email,
// password, firstName, lastName}, patient: {...}}. Output: one JSON line on stdout with one field
// per check (the Rust test asserts on each). Steps that throw are recorded as `failure` with the
// step name, and the script exits 1; otherwise 0.

// @medplum/core 5.x reads the global WebSocket when it loads: node 22+ has one, node 20 with
// --experimental-websocket (tests/common/compat.rs passes it there). No stand-in: the SDK runs as
// shipped.
if (typeof globalThis.WebSocket === 'undefined') {
  process.stdout.write(JSON.stringify({ failure: { step: 'load', message: 'no global WebSocket: run node 22+, or node 20 with --experimental-websocket' } }) + '\n');
  process.exit(1);
}
const { ClientStorage, MedplumClient, MemoryStorage, OperationOutcomeError, getReferenceString } = await import(
  '@medplum/core'
);
const { createHash, randomBytes } = await import('node:crypto');

const input = JSON.parse(process.argv[2] ?? '{}');
const result = {};
let step = 'start';
// The whole suite takes a few seconds; a hang anywhere ends it with what it had.
const DEADLINE_MS = 120_000;
setTimeout(() => {
  result.failure = { step, message: `no answer within ${DEADLINE_MS} ms` };
  process.stdout.write(JSON.stringify(result) + '\n');
  process.exit(1);
}, DEADLINE_MS).unref();

/** What the SDK sent to the auth endpoints, seen through the `fetch` option (the SDK's own
 * requests, passed on unchanged to node's fetch). */
const sent = [];
function recordingFetch(url, init = {}) {
  const path = new URL(url).pathname;
  if (path === '/auth/login' || path === '/oauth2/token') {
    const body = String(init.body ?? '');
    sent.push({
      path,
      authorization: (init.headers?.Authorization ?? init.headers?.authorization ?? '').split(' ')[0] || null,
      body: path === '/auth/login' ? JSON.parse(body) : Object.fromEntries(new URLSearchParams(body)),
    });
  }
  return fetch(url, init);
}
/** The requests sent since `mark` to `path`. */
const sentSince = (mark, path) => sent.slice(mark).filter((r) => r.path === path);

/** A fresh client on the gateway, with its own in-memory storage (Node has no localStorage). */
function client(options = {}) {
  return new MedplumClient({ baseUrl: input.baseUrl, fetch: recordingFetch, ...options });
}

/** What the SDK threw, reduced to what a test compares: the OperationOutcome's first issue. */
function failureOf(err) {
  if (err instanceof OperationOutcomeError) {
    const issue = err.outcome.issue?.[0] ?? {};
    return {
      sdkError: 'OperationOutcomeError',
      message: err.message,
      outcomeId: err.outcome.id ?? null,
      code: issue.code ?? null,
      text: issue.details?.text ?? null,
    };
  }
  return { sdkError: err?.name ?? typeof err, message: String(err?.message ?? err) };
}

/** Runs `fn`; `{ok: value}` or `{error: failureOf(err)}`. */
async function attempt(fn) {
  try {
    return { ok: await fn() };
  } catch (err) {
    return { error: failureOf(err) };
  }
}

/** A raw request to the gateway with a bearer token the SDK held: status and JSON body. */
async function raw(path, token, init = {}) {
  const response = await fetch(new URL(path, input.baseUrl), {
    ...init,
    headers: { ...(init.headers ?? {}), ...(token ? { Authorization: `Bearer ${token}` } : {}) },
  });
  const text = await response.text();
  let body = null;
  try {
    body = JSON.parse(text);
  } catch {
    body = text;
  }
  return { status: response.status, body };
}

/** The first issue of an OperationOutcome body, for comparisons. */
function issueOf(body) {
  const issue = body?.issue?.[0] ?? {};
  return { resourceType: body?.resourceType ?? null, code: issue.code ?? null, text: issue.details?.text ?? null };
}

/** A refresh-token grant sent by hand (the SDK only ever sends its current one). */
async function refreshGrant(refreshToken, clientId) {
  const response = await fetch(new URL('oauth2/token', input.baseUrl), {
    method: 'POST',
    headers: { 'Content-Type': 'application/x-www-form-urlencoded' },
    body: new URLSearchParams({ grant_type: 'refresh_token', refresh_token: refreshToken, client_id: clientId ?? '' }),
  });
  return { status: response.status, body: await response.json() };
}

function jwtClaims(token) {
  return JSON.parse(Buffer.from(token.split('.')[1], 'base64url').toString('utf8'));
}

async function main() {
  // --- Client credentials: startClientLogin, then /auth/me through the SDK. ---
  step = 'client credentials';
  const admin = client();
  const adminProfile = await admin.startClientLogin(input.adminClientId, input.adminClientSecret);
  const projectId = admin.getProject()?.id;
  result.clientCredentials = {
    profile: getReferenceString(adminProfile),
    project: projectId ?? null,
    isProjectAdmin: admin.isProjectAdmin(),
    tokenClientId: jwtClaims(admin.getAccessToken()).client_id ?? null,
    patientSearch: (await attempt(async () => (await admin.search('Patient', '_count=1')).resourceType)),
  };
  const headerMark = sent.length;
  const inHeader = client({ authCredentialsMethod: 'header' });
  const inHeaderProfile = await inHeader.startClientLogin(input.adminClientId, input.adminClientSecret);
  const headerRequest = sentSince(headerMark, '/oauth2/token')[0];
  result.clientCredentialsBasicHeader = {
    profile: getReferenceString(inHeaderProfile),
    authorization: headerRequest?.authorization ?? null,
    bodyHasSecret: 'client_secret' in (headerRequest?.body ?? {}),
  };
  const badSecret = client();
  result.clientCredentialsWrongSecret = (await attempt(() => badSecret.startClientLogin(input.adminClientId, 'not-the-secret'))).error ?? null;

  // --- Basic auth: setBasicAuth, every request carries the client's credentials. ---
  step = 'basic auth';
  const basic = client();
  basic.setBasicAuth(input.adminClientId, input.adminClientSecret);
  const basicMe = await basic.get('auth/me');
  result.basicAuth = {
    profile: basicMe.profile ? getReferenceString(basicMe.profile) : null,
    project: basicMe.project?.id ?? null,
    patientSearch: (await attempt(async () => (await basic.search('Patient', '_count=1')).resourceType)),
  };
  const basicWrong = client();
  basicWrong.setBasicAuth(input.adminClientId, 'not-the-secret');
  // On a 401 the SDK tries once to get a token with the same credentials, which the token
  // endpoint refuses: that refusal is what the caller sees.
  result.basicAuthWrongSecret = (await attempt(() => basicWrong.search('Patient', '_count=1'))).error ?? null;
  const wrongBasic = await raw('fhir/R4/Patient?_count=1', null, {
    headers: { Authorization: `Basic ${Buffer.from(`${input.adminClientId}:not-the-secret`).toString('base64')}` },
  });
  result.basicAuthWrongSecretAtGateway = { status: wrongBasic.status, ...issueOf(wrongBasic.body) };

  // --- Fixtures in the upstream, written through the gateway as the admin client. ---
  step = 'fixtures';
  const other = await admin.createResource({ resourceType: 'Patient', name: [{ given: ['Olga'], family: 'Other' }] });
  const otherObservation = await admin.createResource({
    resourceType: 'Observation',
    status: 'final',
    code: { text: 'heart rate' },
    subject: { reference: getReferenceString(other) },
  });

  // AccessPolicies are identity resources: createResource goes to fhirgate's own store.
  step = 'policies';
  const patientPolicy = await admin.createResource({
    resourceType: 'AccessPolicy',
    name: 'SDK patient: own compartment',
    resource: [
      { resourceType: 'Patient', criteria: 'Patient?_id=%patient.id', readonly: true },
      { resourceType: 'Observation', criteria: 'Observation?subject=%patient', readonly: true },
    ],
  });
  const practitionerPolicy = await admin.createResource({
    resourceType: 'AccessPolicy',
    name: 'SDK practitioner: patients only',
    resource: [{ resourceType: 'Patient', readonly: true }],
  });
  result.policiesCreated = {
    patient: patientPolicy.resourceType === 'AccessPolicy' && typeof patientPolicy.id === 'string',
    practitioner: practitionerPolicy.resourceType === 'AccessPolicy' && typeof practitionerPolicy.id === 'string',
  };

  // --- Invitations as admin: the SDK's invite() posts admin/projects/:id/invite. ---
  step = 'invite';
  const pr = input.practitioner;
  const practitionerMembership = await admin.invite(projectId, {
    resourceType: 'Practitioner',
    firstName: pr.firstName,
    lastName: pr.lastName,
    email: pr.email,
    password: pr.password,
    sendEmail: false,
    membership: { accessPolicy: { reference: getReferenceString(practitionerPolicy) } },
  });
  const pa = input.patient;
  const patientMembership = await admin.post(`admin/projects/${projectId}/invite`, {
    resourceType: 'Patient',
    firstName: pa.firstName,
    lastName: pa.lastName,
    email: pa.email,
    password: pa.password,
    sendEmail: false,
    membership: { accessPolicy: { reference: getReferenceString(patientPolicy) } },
  });
  result.invites = {
    practitioner: {
      resourceType: practitionerMembership.resourceType,
      profileType: practitionerMembership.profile?.reference?.split('/')[0] ?? null,
      accessPolicy: practitionerMembership.accessPolicy?.reference ?? null,
    },
    patient: {
      resourceType: patientMembership.resourceType,
      profileType: patientMembership.profile?.reference?.split('/')[0] ?? null,
      accessPolicy: patientMembership.accessPolicy?.reference ?? null,
    },
    practitionerPolicy: getReferenceString(practitionerPolicy),
    patientPolicy: getReferenceString(patientPolicy),
  };
  const patientRef = patientMembership.profile.reference;
  const ownObservation = await admin.createResource({
    resourceType: 'Observation',
    status: 'final',
    code: { text: 'heart rate' },
    subject: { reference: patientRef },
  });

  // --- The practitioner signs in: startLogin (the SDK's own PKCE), processCode, getProfile. ---
  step = 'practitioner sign-in';
  const doctor = client();
  const loginMark = sent.length;
  const login = await doctor.startLogin({ email: pr.email, password: pr.password, scope: 'openid offline' });
  result.practitionerLogin = { hasLogin: typeof login.login === 'string', hasCode: typeof login.code === 'string' };
  const doctorProfile = await doctor.processCode(login.code);
  // In node the SDK's PKCE falls back to `plain` (its base64 helper needs a browser's window):
  // fhirgate must accept what the SDK really sends, verifier included.
  const loginBody = sentSince(loginMark, '/auth/login')[0]?.body ?? {};
  const codeBody = sentSince(loginMark, '/oauth2/token')[0]?.body ?? {};
  result.practitionerPkce = {
    method: loginBody.codeChallengeMethod ?? null,
    challengeSent: typeof loginBody.codeChallenge === 'string' && loginBody.codeChallenge.length >= 43,
    verifierSent: typeof codeBody.code_verifier === 'string' && codeBody.code_verifier.length >= 43,
    redirectUri: codeBody.redirect_uri ?? null,
    clientId: codeBody.client_id ?? null,
  };
  result.practitionerProfile = {
    reference: getReferenceString(doctorProfile),
    invitedReference: practitionerMembership.profile.reference,
    name: doctor.getProfile()?.name?.[0] ?? null,
    membership: doctor.getProjectMembership()?.id ?? null,
    invitedMembership: practitionerMembership.id,
    hasRefreshToken: typeof doctor.getActiveLogin()?.refreshToken === 'string',
  };
  // A replayed code is refused (and revokes that Login: Medplum's rule).
  const replay = client();
  result.codeReplay = (await attempt(() => replay.processCode(login.code))).error ?? null;

  // Sign in again after the replay revoked the first Login.
  step = 'practitioner sign-in again';
  let doctor2 = client();
  const login2 = await doctor2.startLogin({ email: pr.email, password: pr.password, scope: 'openid offline' });
  await doctor2.processCode(login2.code);
  result.firstLoginAfterReplay = issueOf((await raw('fhir/R4/Patient?_count=1', doctor.getAccessToken())).body);
  result.firstLoginAfterReplayStatus = (await raw('fhir/R4/Patient?_count=1', doctor.getAccessToken())).status;

  // --- FHIR reads as the practitioner, governed by the membership's policy. ---
  step = 'practitioner reads';
  const doctorPatient = await attempt(() => doctor2.readResource('Patient', other.id));
  const doctorObservation = await attempt(() => doctor2.readResource('Observation', otherObservation.id));
  result.practitionerReads = {
    patient: doctorPatient.ok ? getReferenceString(doctorPatient.ok) : doctorPatient.error,
    observation: doctorObservation.error ?? { unexpected: getReferenceString(doctorObservation.ok) },
    expectedPatient: getReferenceString(other),
  };

  // --- Refresh: refreshIfExpired with a grace period longer than the token's life forces it. ---
  step = 'refresh';
  const beforeAccess = doctor2.getAccessToken();
  const beforeRefresh = doctor2.getActiveLogin()?.refreshToken;
  await doctor2.refreshIfExpired(24 * 60 * 60 * 1000);
  const afterAccess = doctor2.getAccessToken();
  const afterRefresh = doctor2.getActiveLogin()?.refreshToken;
  const readAfter = (await attempt(async () => getReferenceString(await doctor2.readResource('Patient', other.id)))).ok ?? null;
  const oldRefresh = await refreshGrant(beforeRefresh, '');
  result.refresh = {
    accessTokenChanged: typeof afterAccess === 'string' && afterAccess !== beforeAccess,
    refreshTokenRotated: typeof afterRefresh === 'string' && afterRefresh !== beforeRefresh,
    sameLogin: jwtClaims(afterAccess).login_id === jwtClaims(beforeAccess).login_id,
    profileAfter: doctor2.getProfile() ? getReferenceString(doctor2.getProfile()) : null,
    readAfter,
    oldRefreshTokenStatus: oldRefresh.status,
    oldRefreshTokenError: oldRefresh.body,
  };
  // Reusing a rotated refresh token ends its whole family (OAuth 2.0 Security BCP, stricter than
  // Medplum): that session is over, so the practitioner signs in again.
  result.refresh.familyEndedStatus = (await raw('fhir/R4/Patient?_count=1', doctor2.getAccessToken())).status;
  doctor2 = client();
  const login3 = await doctor2.startLogin({ email: pr.email, password: pr.password, scope: 'openid offline' });
  await doctor2.processCode(login3.code);

  // --- AccessPolicy created with createResource, attached with the admin members API: the
  // practitioner's very next request obeys it (same token, no new sign-in). ---
  step = 'attach policy';
  const observationsOnly = await admin.createResource({
    resourceType: 'AccessPolicy',
    name: 'SDK practitioner: observations only',
    resource: [{ resourceType: 'Observation', readonly: true }],
  });
  const current = await admin.get(`admin/projects/${projectId}/members/${practitionerMembership.id}`);
  const updated = await admin.post(`admin/projects/${projectId}/members/${practitionerMembership.id}`, {
    ...current,
    accessPolicy: { reference: getReferenceString(observationsOnly) },
  });
  const nowObservation = await attempt(() => doctor2.readResource('Observation', otherObservation.id));
  const nowPatient = await attempt(() => doctor2.readResource('Patient', other.id));
  result.attachedPolicy = {
    membershipPolicy: updated.accessPolicy?.reference ?? null,
    expectedPolicy: getReferenceString(observationsOnly),
    observation: nowObservation.ok ? getReferenceString(nowObservation.ok) : nowObservation.error,
    expectedObservation: getReferenceString(otherObservation),
    patient: nowPatient.error ?? { unexpected: getReferenceString(nowPatient.ok) },
    meAccessPolicy: (await doctor2.get('auth/me', { cache: 'no-cache' })).accessPolicy?.resource?.map((r) => r.resourceType) ?? null,
  };

  // --- The patient signs in with a ClientApplication (client_id bound to the Login and checked
  // by the SDK against the token's client_id claim). ---
  step = 'patient sign-in';
  const app = await admin.post(`admin/projects/${projectId}/client`, { name: 'SDK patient app' });
  // S256 this time: the caller hands startLogin its challenge (a documented LoginRequest
  // field) and puts the verifier where processCode reads it, the client's storage.
  const storage = new ClientStorage(new MemoryStorage());
  const patient = client({ clientId: app.id, storage });
  const verifier = randomBytes(48).toString('base64url');
  storage.setString('codeVerifier', verifier);
  const s256Mark = sent.length;
  const patientLogin = await patient.startLogin({
    email: pa.email,
    password: pa.password,
    scope: 'openid offline',
    codeChallengeMethod: 'S256',
    codeChallenge: createHash('sha256').update(verifier).digest('base64url'),
  });
  const patientProfile = await patient.processCode(patientLogin.code);
  const s256Body = sentSince(s256Mark, '/oauth2/token')[0]?.body ?? {};
  result.patientPkce = {
    method: sentSince(s256Mark, '/auth/login')[0]?.body?.codeChallengeMethod ?? null,
    verifierSent: s256Body.code_verifier === verifier,
    clientId: s256Body.client_id ?? null,
  };
  const ownPatient = await attempt(() => patient.readResource('Patient', patientProfile.id));
  const otherPatient = await attempt(() => patient.readResource('Patient', other.id));
  const ownObs = await attempt(() => patient.readResource('Observation', ownObservation.id));
  const otherObs = await attempt(() => patient.readResource('Observation', otherObservation.id));
  const obsSearch = await attempt(() => patient.searchResources('Observation', '_count=50'));
  result.patient = {
    profile: getReferenceString(patientProfile),
    invitedProfile: patientRef,
    tokenClientId: jwtClaims(patient.getAccessToken()).client_id ?? null,
    appId: app.id,
    ownPatient: ownPatient.ok ? getReferenceString(ownPatient.ok) : ownPatient.error,
    otherPatient: otherPatient.error ?? { unexpected: getReferenceString(otherPatient.ok) },
    ownObservation: ownObs.ok ? getReferenceString(ownObs.ok) : ownObs.error,
    expectedOwnObservation: getReferenceString(ownObservation),
    otherObservation: otherObs.error ?? { unexpected: getReferenceString(otherObs.ok) },
    observationSearch: obsSearch.ok ? obsSearch.ok.map((o) => getReferenceString(o)) : obsSearch.error,
    write: (await attempt(() => patient.createResource({ resourceType: 'Observation', status: 'final', code: { text: 'x' }, subject: { reference: patientRef } }))).error ?? { unexpected: 'created' },
  };

  // --- searchResources('ProjectMembership', 'profile-type=Patient') as admin. ---
  step = 'membership search';
  const patientMemberships = await admin.searchResources('ProjectMembership', 'profile-type=Patient');
  result.membershipSearch = {
    ids: patientMemberships.map((m) => m.id),
    profileTypes: [...new Set(patientMemberships.map((m) => m.profile?.reference?.split('/')[0]))],
    includesPatient: patientMemberships.some((m) => m.id === patientMembership.id),
    includesPractitioner: patientMemberships.some((m) => m.id === practitionerMembership.id),
  };
  result.membershipSearchAsPatient = (await attempt(() => patient.searchResources('ProjectMembership', 'profile-type=Patient'))).error ?? { unexpected: 'allowed' };

  // --- signOut: the SDK posts oauth2/logout and forgets its tokens; the gateway then refuses
  // the old access token and the old refresh token. ---
  step = 'sign out';
  const patientToken = patient.getAccessToken();
  const patientRefresh = patient.getActiveLogin()?.refreshToken;
  const beforeSignOut = await raw(`fhir/R4/Patient/${patientProfile.id}`, patientToken);
  await patient.signOut();
  const afterSignOut = await raw(`fhir/R4/Patient/${patientProfile.id}`, patientToken);
  const meAfter = await raw('auth/me', patientToken);
  const refreshAfter = await refreshGrant(patientRefresh, app.id);
  result.signOut = {
    statusBefore: beforeSignOut.status,
    statusAfter: afterSignOut.status,
    outcomeAfter: issueOf(afterSignOut.body),
    meStatusAfter: meAfter.status,
    sdkForgotToken: patient.getAccessToken() === undefined && patient.getProfile() === undefined,
    refreshAfter,
    // The other signed-in session (the practitioner) is untouched.
    otherSessionStatus: (await raw('fhir/R4/Observation?_count=1', doctor2.getAccessToken())).status,
  };
}

try {
  await main();
} catch (err) {
  result.failure = { step, ...failureOf(err), stack: String(err?.stack ?? '') };
}
process.stdout.write(JSON.stringify(result) + '\n');
process.exit(result.failure ? 1 : 0);
