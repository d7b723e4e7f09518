// SAML sign-in in Debian's chromium, as a person would do it: fhirgate's sign-in page, its
// single sign-on form (a work e-mail address) or its "Sign in with <IdP>" button, the IdP's own
// login page (Keycloak's: username and password), the IdP's form posting the Response back to
// fhirgate's assertion consumer service, then fhirgate's next steps (consent), and finally the
// client's redirect URI, which a local HTTP listener catches. JavaScript stays on: the IdP's
// pages are the IdP's (Keycloak's POST binding page submits itself by script); fhirgate's
// pages use none.
//
// Input: one JSON argument {authorizeUrl, email?, idpButton?, username, password, callbackPort,
// screenshotDir}. With `email`, the single sign-on form is used; with `idpButton`, the button of
// that name. Output: one JSON line on stdout {callback: {code, state}, pages: [...], idpUrl,
// screenshots}. Exit code 0 when the flow reached the callback, 1 otherwise.

import { mkdirSync } from 'node:fs';
import { join } from 'node:path';
import { launchChromium, listenForCallback } from './chromium.mjs';

const input = JSON.parse(process.argv[2] ?? '{}');
const STEP_TIMEOUT = 20000;

async function main() {
  const result = { pages: [], screenshots: [], callback: null };
  mkdirSync(input.screenshotDir, { recursive: true });
  const { server, received } = await listenForCallback(input.callbackPort);
  const browser = await launchChromium();
  try {
    const context = await browser.newContext();
    const page = await context.newPage();
    page.setDefaultTimeout(STEP_TIMEOUT);
    const shot = async (name) => {
      const path = join(input.screenshotDir, `${String(result.screenshots.length + 1).padStart(2, '0')}-${name}.png`);
      await page.screenshot({ path, fullPage: true });
      result.screenshots.push(path);
    };
    const heading = async () => (await page.locator('h1').first().innerText()).trim();
    const origin = new URL(input.authorizeUrl).origin;

    await page.goto(input.authorizeUrl);
    result.pages.push(await heading());
    await shot('signin');

    // fhirgate's page sends the browser on to the IdP (a refresh), where its login form waits.
    const atIdp = page.waitForURL((u) => u.origin !== origin, { waitUntil: 'load' });
    if (input.idpButton) {
      await page.getByRole('button', { name: input.idpButton }).click();
    } else {
      await page.getByLabel('Work email, for single sign-on').fill(input.email);
      await page.getByRole('button', { name: 'Continue with single sign-on' }).click();
    }
    await atIdp;
    result.idpUrl = page.url();
    await page.locator('#username').waitFor();
    await shot('idp-login');
    await page.locator('#username').fill(input.username);
    await page.locator('#password').fill(input.password);

    // The IdP posts the Response to fhirgate, which continues with its own steps.
    const back = page.waitForURL((u) => u.origin === origin && u.pathname.endsWith('/oauth2/authorize'), {
      waitUntil: 'load',
    });
    await page.locator('#kc-login').click();
    await back;
    result.pages.push(await heading());
    await shot('after-idp');
    if (result.pages.at(-1) !== 'Allow access') {
      throw new Error(`expected the consent page, got ${result.pages.at(-1)}: ${await page.locator('main, body').first().innerText()}`);
    }
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
