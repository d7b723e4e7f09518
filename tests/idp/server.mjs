// A real OpenID provider (panva's oidc-provider, a certified OP) that plays the external
// identity provider in fhirgate's tests (tests/external_idp.rs).
//
// It serves the standard endpoints (discovery, /auth, /token, /me for userinfo, /jwks) and its
// own small interaction pages: a sign-in form (login + password, checked against the configured
// accounts) and a consent step that grants what the client asked for. ID tokens carry the
// scope claims (`conformIdTokenClaims: false`), which is what Medplum and fhirgate read.
//
// Usage: node server.mjs --config '<json>' [--port N] [--exit-on-stdin-close]
//   config: {"clients": [oidc-provider client metadata…],
//            "accounts": [{"sub", "email"?, "password", "login"?}]}
//   A client defaults to grant_types ["authorization_code"], response_types ["code"] and
//   client_secret_basic. An account signs in with `login` (default: its email, else its sub).
// When listening, prints exactly one line to stdout: `LISTENING <port>` (logs go to stderr).

import http from 'node:http';

import Provider from 'oidc-provider';

// stdout carries only the LISTENING line: oidc-provider's notices go to stderr.
for (const level of ['log', 'info', 'debug']) {
  console[level] = (...args) => console.error(...args);
}

function fail(message) {
  process.stderr.write(`idp: ${message}\n`);
  process.exit(2);
}

function parseArgs(argv) {
  const opts = { port: '0', config: undefined, exitOnStdinClose: false };
  for (let i = 0; i < argv.length; i++) {
    const name = argv[i];
    const value = () => {
      i++;
      if (i >= argv.length) {
        fail(`missing value for ${name}`);
      }
      return argv[i];
    };
    switch (name) {
      case '--port':
        opts.port = value();
        break;
      case '--config':
        opts.config = value();
        break;
      case '--exit-on-stdin-close':
        opts.exitOnStdinClose = true;
        break;
      default:
        fail(`unknown argument ${name}`);
    }
  }
  if (!opts.config) {
    fail('--config is required');
  }
  return opts;
}

const opts = parseArgs(process.argv.slice(2));
let config;
try {
  config = JSON.parse(opts.config);
} catch (err) {
  fail(`--config is not JSON: ${err.message}`);
}
const accounts = new Map((config.accounts ?? []).map((a) => [a.sub, a]));
const loginName = (a) => a.login ?? a.email ?? a.sub;

const escapeHtml = (s) =>
  String(s).replace(/[&<>"']/g, (c) => ({ '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;' })[c]);

function signInPage(uid, error) {
  return `<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Test IdP sign-in</title></head>
<body>
<h1>Test IdP</h1>
${error ? `<p role="alert">${escapeHtml(error)}</p>` : ''}
<form method="post" action="/interaction/${escapeHtml(uid)}/login">
<label>Login <input name="login" autocomplete="username" required></label>
<label>Password <input name="password" type="password" autocomplete="current-password" required></label>
<button type="submit">Sign in</button>
</form>
</body></html>`;
}

async function readForm(req) {
  const chunks = [];
  let size = 0;
  for await (const chunk of req) {
    size += chunk.length;
    if (size > 64 * 1024) {
      throw new Error('form too large');
    }
    chunks.push(chunk);
  }
  return Object.fromEntries(new URLSearchParams(Buffer.concat(chunks).toString('utf8')));
}

const server = http.createServer();
await new Promise((resolve, reject) => {
  server.once('error', reject);
  server.listen(Number.parseInt(opts.port, 10), '127.0.0.1', resolve);
});
const { port } = server.address();
const issuer = `http://127.0.0.1:${port}`;

const provider = new Provider(issuer, {
  clients: (config.clients ?? []).map((c) => ({
    grant_types: ['authorization_code'],
    response_types: ['code'],
    token_endpoint_auth_method: 'client_secret_basic',
    ...c,
  })),
  cookies: { keys: ['fhirgate-test-idp-cookie-signing-key'] },
  claims: {
    openid: ['sub'],
    email: ['email', 'email_verified'],
    profile: ['name', 'given_name', 'family_name'],
  },
  conformIdTokenClaims: false,
  features: { devInteractions: { enabled: false } },
  interactions: { url: (ctx, interaction) => `/interaction/${interaction.uid}` },
  // Confidential clients only here; a client that sends code_challenge still gets it checked.
  pkce: { required: () => false },
  ttl: {
    AccessToken: 3600,
    AuthorizationCode: 600,
    Grant: 3600,
    IdToken: 3600,
    Interaction: 600,
    Session: 3600,
  },
  async findAccount(ctx, sub) {
    const account = accounts.get(sub);
    if (!account) {
      return undefined;
    }
    return {
      accountId: sub,
      async claims() {
        const claims = { sub };
        if (account.email) {
          claims.email = account.email;
          claims.email_verified = true;
        }
        if (account.given_name || account.family_name) {
          claims.given_name = account.given_name;
          claims.family_name = account.family_name;
          claims.name = [account.given_name, account.family_name].filter(Boolean).join(' ');
        }
        return claims;
      },
    };
  },
});

// The interaction pages: GET shows the sign-in form (or grants consent), POST …/login checks
// the form against the accounts.
provider.use(async (ctx, next) => {
  const match = /^\/interaction\/([^/]+)(\/login)?$/.exec(ctx.path);
  if (!match) {
    return next();
  }
  ctx.set('Cache-Control', 'no-store');
  const details = await provider.interactionDetails(ctx.req, ctx.res);
  const { uid, prompt, params, session, grantId } = details;
  if (ctx.method === 'GET' && !match[2]) {
    if (prompt.name === 'login') {
      ctx.type = 'html';
      ctx.body = signInPage(uid);
      return undefined;
    }
    if (prompt.name === 'consent') {
      const grant = grantId
        ? await provider.Grant.find(grantId)
        : new provider.Grant({ accountId: session.accountId, clientId: params.client_id });
      if (prompt.details.missingOIDCScope) {
        grant.addOIDCScope(prompt.details.missingOIDCScope.join(' '));
      }
      if (prompt.details.missingOIDCClaims) {
        grant.addOIDCClaims(prompt.details.missingOIDCClaims);
      }
      await provider.interactionFinished(
        ctx.req,
        ctx.res,
        { consent: { grantId: await grant.save() } },
        { mergeWithLastSubmission: true },
      );
      return undefined;
    }
    ctx.throw(501, `prompt ${prompt.name} not implemented`);
  }
  if (ctx.method === 'POST' && match[2] && prompt.name === 'login') {
    const form = await readForm(ctx.req);
    const account = [...accounts.values()].find(
      (a) => loginName(a) === form.login && a.password === form.password,
    );
    if (!account) {
      ctx.status = 401;
      ctx.type = 'html';
      ctx.body = signInPage(uid, 'Invalid login or password');
      return undefined;
    }
    await provider.interactionFinished(
      ctx.req,
      ctx.res,
      { login: { accountId: account.sub } },
      { mergeWithLastSubmission: false },
    );
    return undefined;
  }
  ctx.throw(405);
  return undefined;
});

server.on('request', provider.callback());
process.stdout.write(`LISTENING ${port}\n`);

if (opts.exitOnStdinClose) {
  process.stdin.on('end', () => process.exit(0));
  process.stdin.on('close', () => process.exit(0));
  process.stdin.resume();
}
