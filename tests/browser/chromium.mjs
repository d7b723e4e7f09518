// What the browser scripts share: Debian's chromium, started as the tests run it, and the
// client's redirect URI, which a local HTTP listener catches.

import { createServer } from 'node:http';
import { chromium } from 'playwright-core';

/** Debian's chromium, headless. */
export function launchChromium() {
  return chromium.launch({
    executablePath: '/usr/bin/chromium',
    headless: true,
    // Root in a container: chromium's own sandbox needs user namespaces it may not have.
    args: ['--no-sandbox'],
  });
}

/**
 * Listens on 127.0.0.1:`port` for the client's redirect to `/callback`; `received` resolves to
 * its query parameters.
 */
export function listenForCallback(port) {
  let resolve;
  const received = new Promise((r) => (resolve = r));
  const server = createServer((req, res) => {
    const url = new URL(req.url, `http://127.0.0.1:${port}`);
    if (url.pathname !== '/callback') {
      res.writeHead(404).end();
      return;
    }
    res.writeHead(200, { 'content-type': 'text/html; charset=utf-8' });
    res.end('<!doctype html><title>Signed in</title><h1>Signed in</h1>');
    resolve(Object.fromEntries(url.searchParams));
  });
  return new Promise((ready, fail) => {
    server.once('error', fail);
    server.listen(port, '127.0.0.1', () => ready({ server, received }));
  });
}
