// Browser apps against fhirgate, in Debian's chromium with JavaScript on (tests/browser_smart.rs
// runs it). A small static app is served on its own origin (127.0.0.1:appPort): SMART's own
// JavaScript library `fhirclient` (launch.html → the gateway's sign-in page → index.html), and
// the unmodified Medplum SDK (medplum.html). Every call the apps make to the gateway is
// cross-origin, so CORS is part of what is tested.
//
// Input: one JSON argument {appPort, openUrl, email, password, patient?, patientSearch?,
// screenshotDir}. `openUrl` is the first page (an app page; for an EHR launch, the app's launch
// URI as the EHR's `$smart-launch` redirect gave it). With `patient`, the sign-in page's patient
// picker is expected: the script searches `patientSearch` and picks `patient`.
// Output: one JSON line on stdout {result, pages, screenshots, failure?}; `result` is what the
// app page reported (its `data-result`).

import { createServer } from 'node:http';
import { mkdirSync, readFileSync } from 'node:fs';
import { join, dirname } from 'node:path';
import { fileURLToPath } from 'node:url';
import { launchChromium } from './chromium.mjs';

const input = JSON.parse(process.argv[2] ?? '{}');
const STEP_TIMEOUT = 20000;
const here = dirname(fileURLToPath(import.meta.url));

const FILES = {
  '/launch.html': [join(here, 'smart-app/launch.html'), 'text/html; charset=utf-8'],
  '/index.html': [join(here, 'smart-app/index.html'), 'text/html; charset=utf-8'],
  '/medplum.html': [join(here, 'smart-app/medplum.html'), 'text/html; charset=utf-8'],
  '/fhir-client.js': [join(here, 'node_modules/fhirclient/build/fhir-client.js'), 'text/javascript'],
  '/medplum-core.mjs': [join(here, 'node_modules/@medplum/core/dist/esm/index.mjs'), 'text/javascript'],
};

function serveApp(port) {
  const server = createServer((req, res) => {
    const path = new URL(req.url, `http://127.0.0.1:${port}`).pathname;
    const file = FILES[path];
    if (!file) {
      res.writeHead(404).end();
      return;
    }
    res.writeHead(200, { 'content-type': file[1], 'cache-control': 'no-store' });
    res.end(readFileSync(file[0]));
  });
  return new Promise((ready, fail) => {
    server.once('error', fail);
    server.listen(port, '127.0.0.1', () => ready(server));
  });
}

async function main() {
  const result = { pages: [], screenshots: [], result: null };
  mkdirSync(input.screenshotDir, { recursive: true });
  const server = await serveApp(input.appPort);
  const browser = await launchChromium();
  try {
    const context = await browser.newContext();
    const page = await context.newPage();
    page.setDefaultTimeout(STEP_TIMEOUT);
    const consoleLines = [];
    page.on('console', (m) => consoleLines.push(`${m.type()}: ${m.text()}`));
    result.console = consoleLines;
    const shot = async (name) => {
      const path = join(input.screenshotDir, `${String(result.screenshots.length + 1).padStart(2, '0')}-${name}.png`);
      await page.screenshot({ path, fullPage: true });
      result.screenshots.push(path);
    };
    const heading = async () => (await page.locator('h1').first().innerText()).trim();
    const appOrigin = `http://127.0.0.1:${input.appPort}`;
    const onApp = () => page.url().startsWith(appOrigin);
    // The app's pages report by setting data-result on <body>.
    const appResult = async () => {
      await page.waitForSelector('body[data-result]', { state: 'attached' });
      return JSON.parse(await page.locator('body').getAttribute('data-result'));
    };

    await page.goto(input.openUrl);
    if (input.openUrl.includes('/medplum.html')) {
      result.result = await appResult();
      await shot('medplum-app');
      return result;
    }
    // fhirclient sends the browser to the gateway's sign-in page (or reports an error).
    await page.waitForURL((u) => !u.href.startsWith(appOrigin)).catch(() => {});
    if (onApp()) {
      result.result = await appResult();
      throw new Error(`the app did not reach the sign-in page: ${JSON.stringify(result.result)}`);
    }
    await page.waitForSelector('h1');
    result.pages.push(await heading());
    await shot('signin');
    await page.getByLabel('Email').fill(input.email);
    await page.getByLabel('Password').fill(input.password);
    await Promise.all([page.waitForNavigation(), page.getByRole('button', { name: 'Sign in' }).click()]);
    result.pages.push(await heading());
    if ((await heading()) === 'Allow access') {
      await shot('consent');
      await Promise.all([page.waitForNavigation(), page.getByRole('button', { name: 'Allow' }).click()]);
      if (!onApp()) result.pages.push(await heading());
    }
    if (!onApp() && (await heading()) === 'Choose a patient') {
      if (input.patientSearch) {
        await page.getByLabel('Find a patient by name').fill(input.patientSearch);
        await Promise.all([page.waitForNavigation(), page.getByRole('button', { name: 'Search' }).click()]);
      }
      await shot('patient-picker');
      await page.locator(`input[type=radio][value="${input.patient}"]`).check();
      await Promise.all([page.waitForNavigation(), page.getByRole('button', { name: 'Continue' }).click()]);
    }
    await page.waitForURL((u) => u.href.startsWith(appOrigin));
    result.result = await appResult();
    await shot('app');
  } catch (e) {
    result.failure = String(e?.stack ?? e);
  } finally {
    await browser.close();
    server.close();
  }
  return result;
}

const result = await main();
process.stdout.write(JSON.stringify(result) + '\n');
process.exit(result.failure ? 1 : 0);
