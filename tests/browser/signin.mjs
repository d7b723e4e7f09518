// Drives fhirgate's sign-in page (/oauth2/authorize) in Debian's chromium, as a person would:
// keyboard only on the sign-in form, a wrong password first (the inline error must show), then
// the right one, the TOTP code (RFC 6238, computed here with node's crypto), the scope consent
// (unticking the scopes named in `untick`), and finally the client's redirect URI, which a
// local HTTP listener catches. Page JavaScript is disabled: the page must work without it.
//
// An invited person starts one step earlier: with `setPasswordUrl` (the link of their invitation
// e-mail), the script first sets the password on that page; and a user whose MFA is required
// but not yet set up gets the enrolment page, whose key the script reads (as a person would type
// it into an authenticator app) to compute the code.
//
// With `mailDir` (an SMTP sink's folder), codes come by e-mail instead: an enrolment chooses
// "codes sent by e-mail", and each code is read from the newest verification e-mail.
//
// Input: one JSON argument {authorizeUrl, email, password, wrongPassword?, totpSecret?,
// setPasswordUrl?, mailDir?, callbackPort, screenshotDir, untick}. Output: one JSON line on stdout
// {callback: {code, state, error}, pages: [...], inlineError, focusOrder, screenshots,
// enrolledSecret}.
// Exit code 0 when the flow reached the callback, 1 otherwise (the Rust test asserts on the
// JSON either way).

import { createHmac } from 'node:crypto';
import { mkdirSync, readdirSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { launchChromium, listenForCallback } from './chromium.mjs';

const input = JSON.parse(process.argv[2] ?? '{}');
const STEP_TIMEOUT = 15000;

/** RFC 4648 base32 to bytes. */
function base32Decode(text) {
  const alphabet = 'ABCDEFGHIJKLMNOPQRSTUVWXYZ234567';
  const clean = text.replace(/=+$/, '').toUpperCase();
  let bits = 0;
  let value = 0;
  const out = [];
  for (const ch of clean) {
    const idx = alphabet.indexOf(ch);
    if (idx < 0) throw new Error(`invalid base32 character ${ch}`);
    value = (value << 5) | idx;
    bits += 5;
    if (bits >= 8) {
      out.push((value >>> (bits - 8)) & 0xff);
      bits -= 8;
    }
  }
  return Buffer.from(out);
}

/** RFC 6238 TOTP: HMAC-SHA1, 30 s steps, 6 digits (RFC 4226 dynamic truncation). */
export function totp(secretBase32, unixSeconds) {
  const counter = Buffer.alloc(8);
  counter.writeBigUInt64BE(BigInt(Math.floor(unixSeconds / 30)));
  const mac = createHmac('sha1', base32Decode(secretBase32)).update(counter).digest();
  const offset = mac[mac.length - 1] & 0x0f;
  const binary =
    ((mac[offset] & 0x7f) << 24) |
    (mac[offset + 1] << 16) |
    (mac[offset + 2] << 8) |
    mac[offset + 3];
  return String(binary % 1_000_000).padStart(6, '0');
}

/** The code in the oldest verification e-mail of the SMTP sink's folder not yet in `seen`. */
async function emailedCode(dir, seen) {
  const deadline = Date.now() + STEP_TIMEOUT;
  while (Date.now() < deadline) {
    const files = readdirSync(dir).filter((f) => f.endsWith('.eml') && !seen.has(f)).sort();
    for (const f of files) {
      seen.add(f);
      const message = readFileSync(join(dir, f), 'utf8').replace(/\r\n/g, '\n');
      const code = /^Subject: Your fhirgate verification code/m.test(message) && message.match(/^(\d{6})$/m);
      if (code) return code[1];
    }
    await new Promise((r) => setTimeout(r, 100));
  }
  throw new Error(`no verification e-mail in ${dir}`);
}

async function main() {
  const result = { pages: [], screenshots: [], focusOrder: [], inlineError: null, callback: null };
  // Messages already in the mailbox belong to earlier sign-ins.
  const seen = new Set(input.mailDir ? readdirSync(input.mailDir) : []);
  mkdirSync(input.screenshotDir, { recursive: true });
  const { server, received } = await listenForCallback(input.callbackPort);
  const browser = await launchChromium();
  try {
    const context = await browser.newContext({ javaScriptEnabled: false });
    const page = await context.newPage();
    page.setDefaultTimeout(STEP_TIMEOUT);
    const shot = async (name) => {
      const path = join(input.screenshotDir, `${String(result.screenshots.length + 1).padStart(2, '0')}-${name}.png`);
      await page.screenshot({ path, fullPage: true });
      result.screenshots.push(path);
    };
    const heading = async () => (await page.locator('h1').innerText()).trim();
    // A form post: done when the next page has loaded (not when the current one had).
    const submit = async (act) => {
      await Promise.all([page.waitForNavigation({ waitUntil: 'load' }), act()]);
    };

    if (input.setPasswordUrl) {
      await page.goto(input.setPasswordUrl);
      result.pages.push(await heading());
      await page.getByLabel('New password', { exact: true }).fill(input.password);
      await page.getByLabel('Confirm new password').fill(input.password);
      await shot('set-password');
      await submit(() => page.getByRole('button', { name: 'Set password' }).click());
      result.pages.push(await heading());
      await shot('password-set');
    }

    await page.goto(input.authorizeUrl);
    result.pages.push(await heading());
    await shot('signin');

    // Keyboard only: the e-mail field has focus on load, Tab reaches the password, Enter submits.
    const focused = async () => page.locator('input:focus').getAttribute('id');
    result.focusOrder.push(await focused());
    await page.keyboard.type(input.email);
    await page.keyboard.press('Tab');
    result.focusOrder.push(await focused());
    if (input.wrongPassword) {
      await page.keyboard.type(input.wrongPassword);
      await submit(() => page.keyboard.press('Enter'));
      result.inlineError = (await page.getByRole('alert').innerText()).trim();
      await shot('signin-error');
      // The e-mail is kept; the password is typed again.
      await page.getByLabel('Password').fill(input.password);
      await submit(() => page.getByRole('button', { name: 'Sign in' }).click());
    } else {
      await page.keyboard.type(input.password);
      await submit(() => page.keyboard.press('Enter'));
    }
    const mfaPage = await heading();
    result.pages.push(mfaPage);
    if (mfaPage === 'Sign in') {
      await shot('signin-refused');
      throw new Error(`sign-in refused: ${(await page.getByRole('alert').innerText()).trim()}`);
    }

    // Without MFA the consent page comes next.
    if (mfaPage !== 'Allow access' && input.mailDir) {
      // Codes by e-mail: choose them when enrolling, then read each code from the mailbox.
      if (mfaPage === 'Set up two-step verification') {
        await shot('enroll');
        await submit(() => page.getByRole('button', { name: 'Use codes sent by e-mail instead' }).click());
        result.pages.push(await heading());
      }
      result.codeHint = (await page.locator('#token-hint').innerText()).trim();
      const code = await emailedCode(input.mailDir, seen);
      await page.getByLabel('Authentication code').fill(code);
      await shot('mfa');
      await submit(() => page.getByRole('button', { name: 'Verify' }).click());
      result.pages.push(await heading());
    } else if (mfaPage !== 'Allow access') {
      let secret = input.totpSecret;
      let button = 'Verify';
      if (mfaPage === 'Set up two-step verification') {
        secret = (await page.locator('.secret').innerText()).trim();
        result.enrolledSecret = secret;
        button = 'Turn on and continue';
      }
      const code = totp(secret, Date.now() / 1000);
      await page.getByLabel('Authentication code').fill(code);
      await shot('mfa');
      await submit(() => page.getByRole('button', { name: button }).click());
      result.pages.push(await heading());
    }

    for (const word of input.untick ?? []) {
      await page.locator(`input[type=checkbox][value="${word}"]`).uncheck();
    }
    await shot('consent');
    const [callback] = await Promise.all([
      Promise.race([
        received,
        new Promise((_, fail) => setTimeout(() => fail(new Error('no callback')), STEP_TIMEOUT)),
      ]),
      page.getByRole('button', { name: 'Allow' }).click(),
    ]);
    result.callback = callback;
    await page.waitForLoadState();
    await shot('callback');
  } catch (e) {
    result.failure = String(e?.stack ?? e);
  } finally {
    await browser.close();
    server.close();
  }
  process.stdout.write(JSON.stringify(result) + '\n');
  process.exit(result.callback?.code ? 0 : 1);
}

if (process.argv[2]) {
  await main();
}
