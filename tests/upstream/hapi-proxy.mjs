// The HAPI side of the end-to-end tests' second pass: a recording reverse proxy in front of one
// partition of a real HAPI FHIR server, speaking the same test-control protocol as server.mjs
// (`LISTENING <port>` on stdout, `GET /__requests`, `POST /__reset`), so every test written
// against Medplum's router runs unchanged against HAPI.
//
// Requests to `/fhir/R4/...` go to `<hapi>/fhir/<partition>/...` as they are; HAPI's answers come
// back as they are, except that its base URL (`<hapi>/fhir/<partition>`) is spelled as this
// proxy's (`http://<Host>/fhir/R4`) in headers and bodies — the one difference a partition
// binding makes, and a plain string replacement (the partition name is 16 random hex digits).
// `POST /__reset` forgets the recorded requests and moves to a fresh, empty partition.
//
// Usage: node hapi-proxy.mjs --hapi http://127.0.0.1:PORT [--port N] [--exit-on-stdin-close]
// No dependencies beyond node itself.

import http from 'node:http';
import { randomBytes } from 'node:crypto';

const BASE_PATH = '/fhir/R4';

function parseArgs(argv) {
  const opts = { port: 0, hapi: null, exitOnStdinClose: false };
  for (let i = 0; i < argv.length; i++) {
    switch (argv[i]) {
      case '--port':
        opts.port = Number(argv[++i]);
        break;
      case '--hapi':
        opts.hapi = new URL(argv[++i]);
        break;
      case '--exit-on-stdin-close':
        opts.exitOnStdinClose = true;
        break;
      default:
        fail(`unknown argument: ${argv[i]}`);
    }
  }
  if (!opts.hapi) {
    fail('--hapi http://host:port is required');
  }
  return opts;
}

function fail(message) {
  process.stderr.write(`hapi-proxy: ${message}\n`);
  process.exit(2);
}

const opts = parseArgs(process.argv.slice(2));
const agent = new http.Agent({ keepAlive: true, maxSockets: 32 });

/** One HTTP exchange with HAPI; the whole answer, buffered. */
function toHapi(method, path, headers, body) {
  return new Promise((resolve, reject) => {
    const req = http.request(
      { host: opts.hapi.hostname, port: opts.hapi.port, method, path, headers, agent },
      (res) => {
        const chunks = [];
        res.on('data', (c) => chunks.push(c));
        res.on('end', () => resolve({ status: res.statusCode, headers: res.headers, body: Buffer.concat(chunks) }));
        res.on('error', reject);
      }
    );
    req.on('error', reject);
    req.setTimeout(60_000, () => req.destroy(new Error('HAPI did not answer within 60 s')));
    req.end(body);
  });
}

let partition = null;

async function newPartition() {
  const name = `t${randomBytes(8).toString('hex')}`;
  const body = JSON.stringify({
    resourceType: 'Parameters',
    parameter: [{ name: 'name', valueCode: name }],
  });
  const res = await toHapi(
    'POST',
    '/fhir/DEFAULT/$partition-management-create-partition',
    { 'content-type': 'application/fhir+json', 'content-length': Buffer.byteLength(body) },
    body
  );
  if (res.status >= 300) {
    throw new Error(`creating partition ${name}: ${res.status} ${res.body.toString('utf8')}`);
  }
  partition = name;
}

let recorded = [];
let seq = 0;

function readBody(req) {
  return new Promise((resolve, reject) => {
    const chunks = [];
    req.on('data', (c) => chunks.push(c));
    req.on('end', () => resolve(Buffer.concat(chunks)));
    req.on('error', reject);
  });
}

function sendJson(res, status, value) {
  const text = JSON.stringify(value);
  res.writeHead(status, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(text) });
  res.end(text);
}

const HOP_BY_HOP = ['connection', 'keep-alive', 'transfer-encoding', 'upgrade', 'proxy-connection', 'te', 'trailer'];

async function handle(req, res) {
  const body = await readBody(req);
  const url = req.url ?? '/';
  if (url === '/__requests' && req.method === 'GET') {
    sendJson(res, 200, recorded);
    return;
  }
  if (url === '/__reset' && req.method === 'POST') {
    recorded = [];
    await newPartition();
    sendJson(res, 200, { ok: true, partition });
    return;
  }
  seq++;
  const entry = { seq, time: new Date().toISOString(), method: req.method, url, headers: { ...req.headers } };
  if (body.length > 0) {
    entry.body = body.toString('utf8');
  }
  recorded.push(entry);
  if (url !== BASE_PATH && !url.startsWith(`${BASE_PATH}/`) && !url.startsWith(`${BASE_PATH}?`)) {
    sendJson(res, 404, {
      resourceType: 'OperationOutcome',
      issue: [{ severity: 'error', code: 'not-found', details: { text: `No route for ${url}` } }],
    });
    return;
  }

  const hapiBase = `${opts.hapi.origin}/fhir/${partition}`;
  const ownBase = `http://${req.headers.host}${BASE_PATH}`;
  const headers = {};
  for (const [name, value] of Object.entries(req.headers)) {
    if (!HOP_BY_HOP.includes(name) && name !== 'host' && name !== 'accept-encoding') {
      headers[name] = value;
    }
  }
  headers['accept-encoding'] = 'identity';
  if (body.length > 0) {
    headers['content-length'] = body.length;
  }
  const upstream = await toHapi(req.method, `/fhir/${partition}${url.slice(BASE_PATH.length)}`, headers, body);

  const out = {};
  for (const [name, value] of Object.entries(upstream.headers)) {
    if (HOP_BY_HOP.includes(name) || name === 'content-length') {
      continue;
    }
    out[name] = typeof value === 'string' ? value.split(hapiBase).join(ownBase) : value;
  }
  let answer = upstream.body;
  if (answer.length > 0 && answer.includes(hapiBase)) {
    answer = Buffer.from(answer.toString('utf8').split(hapiBase).join(ownBase), 'utf8');
  }
  if (req.method !== 'HEAD') {
    out['content-length'] = answer.length;
  }
  res.writeHead(upstream.status, out);
  res.end(req.method === 'HEAD' ? undefined : answer);
}

const server = http.createServer((req, res) => {
  handle(req, res).catch((err) => {
    process.stderr.write(`hapi-proxy: ${req.method} ${req.url}: ${err?.stack ?? err}\n`);
    if (!res.headersSent) {
      sendJson(res, 502, {
        resourceType: 'OperationOutcome',
        issue: [{ severity: 'error', code: 'exception', details: { text: 'HAPI unreachable' } }],
      });
    } else {
      res.destroy();
    }
  });
});
server.keepAliveTimeout = 75_000;
server.headersTimeout = 80_000;
server.requestTimeout = 0;

if (opts.exitOnStdinClose) {
  process.stdin.on('end', () => process.exit(0));
  process.stdin.on('error', () => process.exit(0));
  process.stdin.resume();
}

try {
  await newPartition();
} catch (err) {
  fail(String(err?.message ?? err));
}
server.on('error', (err) => fail(`cannot listen: ${err.message}`));
server.listen(opts.port, '127.0.0.1', () => {
  process.stdout.write(`LISTENING ${server.address().port}\n`);
});
