// openid-client (a certified OpenID Connect relying party) against a running fhirgate
// (tests/compat_oidc.rs runs it): discovery, the authorization code flow with PKCE through
// fhirgate's sign-in page, the ID token verified against the JWKS (signature, iss, aud, nonce),
// refresh, userinfo, introspection and revocation.
//
// The sign-in page is driven as a browser without JavaScript would: GET the authorization URL,
// read each page's form (hidden fields, checkboxes), POST it back with the cookies the gateway
// set, until the 302 to the client's redirect URI. The page itself is tested in a real browser
// by tests/browser_signin.rs.
//
// Input: one JSON argument {issuer, clientId, clientSecret, redirectUri, email, password, scope,
// fhirBase}. Output: one JSON line on stdout, one field per check. A step that throws is
// recorded as `failure` (with the step) and the exit code is 1.

import * as client from 'openid-client';

const input = JSON.parse(process.argv[2] ?? '{}');
const result = {};
let step = 'start';
const DEADLINE_MS = 120_000;
setTimeout(() => {
  result.failure = { step, message: `no answer within ${DEADLINE_MS} ms` };
  process.stdout.write(JSON.stringify(result) + '\n');
  process.exit(1);
}, DEADLINE_MS).unref();

// === a minimal browser: cookies and HTML forms ===

const jar = new Map();

function storeCookies(response) {
  for (const line of response.headers.getSetCookie()) {
    const [pair, ...attrs] = line.split(';');
    const eq = pair.indexOf('=');
    const name = pair.slice(0, eq).trim();
    const value = pair.slice(eq + 1).trim();
    const expired = attrs.some((a) => /^\s*max-age\s*=\s*(0|-)/i.test(a));
    if (expired || value === '') jar.delete(name);
    else jar.set(name, value);
  }
}

const cookieHeader = () => [...jar].map(([k, v]) => `${k}=${v}`).join('; ');

async function browse(url, init = {}) {
  const response = await fetch(url, {
    ...init,
    redirect: 'manual',
    headers: { ...(init.headers ?? {}), cookie: cookieHeader(), accept: 'text/html' },
  });
  storeCookies(response);
  return response;
}

function unescapeHtml(text) {
  return text
    .replace(/&#x([0-9a-f]+);/gi, (_, h) => String.fromCodePoint(Number.parseInt(h, 16)))
    .replace(/&#(\d+);/g, (_, d) => String.fromCodePoint(Number.parseInt(d, 10)))
    .replace(/&quot;/g, '"')
    .replace(/&lt;/g, '<')
    .replace(/&gt;/g, '>')
    .replace(/&amp;/g, '&');
}

function attributes(tag) {
  const attrs = {};
  for (const m of tag.matchAll(/([a-zA-Z_:-]+)(?:\s*=\s*"([^"]*)")?/g)) {
    attrs[m[1].toLowerCase()] = m[2] === undefined ? true : unescapeHtml(m[2]);
  }
  return attrs;
}

/** The page's heading, its alert (error) text, and its one POST form. */
function readPage(html) {
  const heading = unescapeHtml(html.match(/<h1[^>]*>([\s\S]*?)<\/h1>/)?.[1]?.replace(/<[^>]+>/g, '').trim() ?? '');
  const alert = html.match(/role="alert"[^>]*>([\s\S]*?)<\//)?.[1]?.replace(/<[^>]+>/g, '').trim() ?? null;
  const form = html.match(/<form\b([^>]*)>([\s\S]*?)<\/form>/);
  if (!form) return { heading, alert, form: null };
  const action = attributes(form[1]).action ?? '';
  const inputs = [...form[2].matchAll(/<input\b([^>]*)>/g)].map((m) => attributes(m[1]));
  const buttons = [...form[2].matchAll(/<button\b([^>]*)>([\s\S]*?)<\/button>/g)].map((m) => ({
    ...attributes(m[1]),
    text: m[2].replace(/<[^>]+>/g, '').trim(),
  }));
  return { heading, alert: alert ? unescapeHtml(alert) : null, form: { action, inputs, buttons } };
}

/** Signs in through the pages from `authorizationUrl` to the redirect URI; returns the
 * callback URL and the headings of the pages seen. */
async function signInThroughPages(authorizationUrl) {
  const pages = [];
  let response = await browse(authorizationUrl);
  let pageUrl = authorizationUrl;
  for (let hops = 0; hops < 12; hops++) {
    if (response.status >= 300 && response.status < 400) {
      const location = new URL(response.headers.get('location'), pageUrl);
      if (location.href.startsWith(input.redirectUri)) {
        return { callback: location, pages };
      }
      pageUrl = location;
      response = await browse(location);
      continue;
    }
    const html = await response.text();
    if (response.status !== 200) {
      throw new Error(`page answered ${response.status}: ${html.slice(0, 300)}`);
    }
    const page = readPage(html);
    pages.push(page.heading);
    if (!page.form) throw new Error(`page "${page.heading}" has no form (alert: ${page.alert})`);
    const fields = new URLSearchParams();
    for (const i of page.form.inputs) {
      if (!i.name) continue;
      if (i.type === 'hidden') fields.append(i.name, i.value ?? '');
      else if (i.type === 'checkbox' && i.checked) fields.append(i.name, i.value ?? 'on');
      else if (i.name === 'email') fields.append('email', input.email);
      else if (i.name === 'password') fields.append('password', input.password);
    }
    if (page.alert && page.heading === 'Sign in' && pages.filter((p) => p === 'Sign in').length > 1) {
      throw new Error(`sign-in refused: ${page.alert}`);
    }
    const allow = page.form.buttons.find((b) => b.name === 'decision' && b.value === 'allow');
    if (allow) fields.append('decision', 'allow');
    const target = new URL(page.form.action, pageUrl);
    pageUrl = target;
    response = await browse(target, {
      method: 'POST',
      headers: { 'content-type': 'application/x-www-form-urlencoded' },
      body: fields.toString(),
    });
  }
  throw new Error(`no redirect to the client after pages ${JSON.stringify(pages)}`);
}

// === helpers ===

function failureOf(err) {
  return {
    name: err?.name ?? typeof err,
    code: err?.code ?? null,
    error: err?.error ?? null,
    error_description: err?.error_description ?? null,
    status: err?.status ?? null,
    message: String(err?.message ?? err),
    // openid-client wraps oauth4webapi's precise error (e.g. which claim or check failed).
    cause: err?.cause instanceof Error ? { code: err.cause.code ?? null, message: err.cause.message } : null,
  };
}

async function attempt(fn) {
  try {
    return { ok: await fn() };
  } catch (err) {
    return { error: failureOf(err) };
  }
}

function jwtPart(token, index) {
  return JSON.parse(Buffer.from(token.split('.')[index], 'base64url').toString('utf8'));
}

async function gatewayStatus(url, token) {
  const response = await fetch(url, { headers: { authorization: `Bearer ${token}` } });
  await response.arrayBuffer();
  return response.status;
}

/** A PKCE authorization: returns what the code exchange needs. */
async function authorize(config, extra = {}) {
  const codeVerifier = client.randomPKCECodeVerifier();
  const state = client.randomState();
  const nonce = client.randomNonce();
  const url = client.buildAuthorizationUrl(config, {
    redirect_uri: input.redirectUri,
    scope: input.scope,
    code_challenge: await client.calculatePKCECodeChallenge(codeVerifier),
    code_challenge_method: 'S256',
    state,
    nonce,
    ...extra,
  });
  const { callback, pages } = await signInThroughPages(url);
  return { codeVerifier, state, nonce, callback, pages };
}

// === the suite ===

async function main() {
  step = 'discovery';
  const issuer = new URL(input.issuer);
  const config = await client.discovery(issuer, input.clientId, undefined, client.ClientSecretBasic(input.clientSecret), {
    execute: [client.allowInsecureRequests],
  });
  // Verify the ID token's signature against the JWKS too (openid-client skips it by default for
  // ID tokens straight from the token endpoint).
  client.enableNonRepudiationChecks(config);
  const meta = config.serverMetadata();
  result.discovery = {
    issuer: meta.issuer,
    authorizationEndpoint: meta.authorization_endpoint,
    tokenEndpoint: meta.token_endpoint,
    userinfoEndpoint: meta.userinfo_endpoint,
    jwksUri: meta.jwks_uri,
    introspectionEndpoint: meta.introspection_endpoint,
    revocationEndpoint: meta.revocation_endpoint,
    idTokenAlgs: meta.id_token_signing_alg_values_supported,
    pkce: meta.code_challenge_methods_supported,
    supportsPKCE: config.serverMetadata().supportsPKCE(),
  };

  step = 'authorization';
  const a = await authorize(config);
  result.pages = a.pages;
  result.callback = {
    hasCode: a.callback.searchParams.has('code'),
    stateEchoed: a.callback.searchParams.get('state') === a.state,
    iss: a.callback.searchParams.get('iss'),
    error: a.callback.searchParams.get('error'),
  };

  // openid-client refuses a callback whose state is not the one it sent (before any request).
  step = 'state check';
  result.wrongState = (await attempt(() => client.authorizationCodeGrant(config, a.callback, {
    pkceCodeVerifier: a.codeVerifier,
    expectedState: client.randomState(),
    expectedNonce: a.nonce,
    idTokenExpected: true,
  }))).error ?? { unexpected: 'accepted' };

  step = 'code exchange';
  const tokens = await client.authorizationCodeGrant(config, a.callback, {
    pkceCodeVerifier: a.codeVerifier,
    expectedState: a.state,
    expectedNonce: a.nonce,
    idTokenExpected: true,
  });
  const claims = tokens.claims();
  const header = jwtPart(tokens.id_token, 0);
  const jwks = await (await fetch(meta.jwks_uri)).json();
  result.tokens = {
    tokenType: tokens.token_type,
    hasAccessToken: typeof tokens.access_token === 'string',
    hasRefreshToken: typeof tokens.refresh_token === 'string',
    expiresIn: tokens.expires_in,
    scope: tokens.scope,
  };
  result.idToken = {
    alg: header.alg,
    kidInJwks: jwks.keys.some((k) => k.kid === header.kid),
    iss: claims.iss,
    aud: claims.aud,
    sub: claims.sub,
    nonceMatches: claims.nonce === a.nonce,
    fhirUser: claims.fhirUser ?? null,
    email: claims.email ?? null,
    authTimeIsNumber: typeof claims.auth_time === 'number',
  };
  const fhirStatus = await gatewayStatus(`${input.fhirBase}Patient?_count=1`, tokens.access_token);
  // The consented scope narrows access: `user/Patient.rs` grants no Observation.
  result.fhirObservationStatus = await gatewayStatus(`${input.fhirBase}Observation?_count=1`, tokens.access_token);

  step = 'userinfo';
  const userinfo = await attempt(() => client.fetchUserInfo(config, tokens.access_token, claims.sub));
  result.userinfo = userinfo.ok
    ? { sub: userinfo.ok.sub, email: userinfo.ok.email ?? null, given_name: userinfo.ok.given_name ?? null, family_name: userinfo.ok.family_name ?? null, profile: userinfo.ok.profile ?? null }
    : userinfo.error;

  step = 'introspection';
  const introspected = await client.tokenIntrospection(config, tokens.access_token);
  const introspectedRefresh = await client.tokenIntrospection(config, tokens.refresh_token);
  result.introspection = {
    active: introspected.active,
    sub: introspected.sub ?? null,
    clientId: introspected.client_id ?? null,
    scope: introspected.scope ?? null,
    iss: introspected.iss ?? null,
    refreshActive: introspectedRefresh.active,
  };
  const wrongSecret = await client.discovery(issuer, input.clientId, undefined, client.ClientSecretBasic('not-the-secret'), {
    execute: [client.allowInsecureRequests],
  });
  result.introspectionWrongSecret = (await attempt(() => client.tokenIntrospection(wrongSecret, tokens.access_token))).error ?? { unexpected: 'answered' };

  step = 'refresh';
  const refreshed = await client.refreshTokenGrant(config, tokens.refresh_token);
  const refreshedClaims = refreshed.claims();
  result.refresh = {
    newAccessToken: refreshed.access_token !== tokens.access_token,
    newRefreshToken: typeof refreshed.refresh_token === 'string' && refreshed.refresh_token !== tokens.refresh_token,
    idTokenSub: refreshedClaims?.sub ?? null,
    sameLogin: jwtPart(refreshed.access_token, 1).login_id === jwtPart(tokens.access_token, 1).login_id,
    fhirStatusBefore: fhirStatus,
    fhirStatusAfter: (await client.fetchProtectedResource(config, refreshed.access_token, new URL(`${input.fhirBase}Patient?_count=1`), 'GET')).status,
    oldRefresh: (await attempt(() => client.refreshTokenGrant(config, tokens.refresh_token))).error ?? { unexpected: 'accepted' },
    oldRefreshIntrospection: (await client.tokenIntrospection(config, tokens.refresh_token)).active,
  };

  step = 'revocation';
  await client.tokenRevocation(config, refreshed.refresh_token);
  result.revocation = {
    accessIntrospection: await client.tokenIntrospection(config, refreshed.access_token),
    refreshIntrospection: await client.tokenIntrospection(config, refreshed.refresh_token),
    fhirStatus: await gatewayStatus(`${input.fhirBase}Patient?_count=1`, refreshed.access_token),
    userinfo: (await attempt(() => client.fetchUserInfo(config, refreshed.access_token, claims.sub))).error ?? { unexpected: 'answered' },
    userinfoStatus: await gatewayStatus(meta.userinfo_endpoint, refreshed.access_token),
    refresh: (await attempt(() => client.refreshTokenGrant(config, refreshed.refresh_token))).error ?? { unexpected: 'accepted' },
    unknownToken: (await attempt(() => client.tokenRevocation(config, 'not-a-token'))).error ?? 'ok',
  };

  // A second sign-in (the browser session is reused: straight to consent) whose ID token
  // carries another nonce than the one the RP expects: refused.
  step = 'nonce check';
  const b = await authorize(config);
  result.secondPages = b.pages;
  result.wrongNonce = (await attempt(() => client.authorizationCodeGrant(config, b.callback, {
    pkceCodeVerifier: b.codeVerifier,
    expectedState: b.state,
    expectedNonce: client.randomNonce(),
    idTokenExpected: true,
  }))).error ?? { unexpected: 'accepted' };

  // A third whose ID token signature is altered on the way: the JWKS check refuses it.
  step = 'signature check';
  const c = await authorize(config);
  result.thirdPages = c.pages;
  const tampering = await client.discovery(issuer, input.clientId, undefined, client.ClientSecretBasic(input.clientSecret), {
    execute: [client.allowInsecureRequests, client.enableNonRepudiationChecks],
    [client.customFetch]: async (url, options) => {
      const response = await fetch(url, options);
      if (new URL(url).pathname !== '/oauth2/token') return response;
      const body = await response.json();
      const [h, p, s] = body.id_token.split('.');
      const sig = Buffer.from(s, 'base64url');
      sig[0] ^= 0xff;
      body.id_token = [h, p, sig.toString('base64url')].join('.');
      return new Response(JSON.stringify(body), { status: response.status, headers: response.headers });
    },
  });
  result.tamperedSignature = (await attempt(() => client.authorizationCodeGrant(tampering, c.callback, {
    pkceCodeVerifier: c.codeVerifier,
    expectedState: c.state,
    expectedNonce: c.nonce,
    idTokenExpected: true,
  }))).error ?? { unexpected: 'accepted' };
}

try {
  await main();
} catch (err) {
  result.failure = { step, ...failureOf(err), stack: String(err?.stack ?? '') };
}
process.stdout.write(JSON.stringify(result) + '\n');
process.exit(result.failure ? 1 : 0);
