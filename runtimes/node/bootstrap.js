'use strict';
// gust built-in Node.js 20 runtime bootstrap.
//
// gust starts `node bootstrap.js` (cwd = the function's code directory) once per
// function instance. This file loads the user's handler and then loops on the AWS
// Lambda Runtime API (GET /next -> run handler -> POST /response|/error) exposed by
// gust at $AWS_LAMBDA_RUNTIME_API.
//
// With GUST_PREWARM=1 the process is a generic pre-warmed sandbox: it starts without
// any function, loads what does not depend on one, and blocks on
// GET /runtime/gust/specialize until gust assigns a function (see specialize()). It
// then takes that function's environment and code directory and starts like above.
//
// Layout of this file:
//   1. configuration read once from the environment (again after specialize())
//   2. console patching (AWS log line format)
//   3. RuntimeClient: a minimal HTTP/1.1 client on ONE keep-alive TCP socket
//   4. error serialisation helpers
//   5. handler loading (CJS / ESM, init error classification)
//   6. Lambda-style invocation (async / callback / context.done)
//   7. plain-module style (`{ func(req, res), config }`) request/response adapter
//   8. crash handling (uncaught exceptions / unhandled rejections)
//   9. main(): optional GET /runtime/gust/specialize, init, optional POST
//      /runtime/gust/config, the invoke loop
//
// Performance notes: the hot loop is the reason this does not use node:http. Node's
// http client costs several allocations, closures and event-loop turns per request
// (measured ~1.4k invokes/s vs ~3.7k+ for a raw socket). Here a request is a single
// string written with a single write(), the response is parsed straight out of the
// socket's Buffer, and the POST of a result is pipelined with the GET of the next
// event (one write, one round trip per invocation instead of two). HTTP/1.1
// guarantees in-order responses on a connection, so pipelining is safe as long as
// the server is a conforming HTTP/1.1 server (hyper is).
//
// No dependencies beyond Node built-ins.

const net = require('node:net');
const path = require('node:path');
const fs = require('node:fs');
const util = require('node:util');
const { pathToFileURL } = require('node:url');

// ---------------------------------------------------------------------------
// 1. Configuration (read once; process.env access is comparatively slow)
// ---------------------------------------------------------------------------

const env = process.env;
const PREWARM = env.GUST_PREWARM === '1';
// True while a pre-warmed sandbox waits to be assigned a function.
let specializing = false;

let RUNTIME_API;
let RUNTIME_API_SOCKET;
let HANDLER;
let TASK_ROOT;
let FUNCTION_NAME;
let FUNCTION_VERSION;
let MEMORY_SIZE;
let LOG_GROUP;
let LOG_STREAM;

// Called once at start, and once more after specialize() replaced the environment.
function readConfig() {
  RUNTIME_API = env.AWS_LAMBDA_RUNTIME_API;
  // gust's built-in runtimes reach the same Runtime API over a Unix socket when one is
  // offered: loopback TCP costs several times more per request in both processes. The
  // variable is removed so the function's own code never sees it.
  RUNTIME_API_SOCKET = env.GUST_RUNTIME_API_SOCKET;
  delete env.GUST_RUNTIME_API_SOCKET;
  HANDLER = env._HANDLER || '';
  TASK_ROOT = env.LAMBDA_TASK_ROOT || process.cwd();
  FUNCTION_NAME = env.AWS_LAMBDA_FUNCTION_NAME;
  FUNCTION_VERSION = env.AWS_LAMBDA_FUNCTION_VERSION;
  // AWS exposes the memory size as a string on the context object, keep that.
  MEMORY_SIZE = env.AWS_LAMBDA_FUNCTION_MEMORY_SIZE;
  LOG_GROUP = env.AWS_LAMBDA_LOG_GROUP_NAME;
  LOG_STREAM = env.AWS_LAMBDA_LOG_STREAM_NAME;
}

readConfig();

const API = '/2018-06-01/runtime';

// If the Runtime API cannot be reached for this long, gust is gone (instance shut
// down, gust restarted): exit quietly instead of spinning.
const SERVER_GONE_MS = 2000;
const RECONNECT_DELAY_MS = 25;

// ---------------------------------------------------------------------------
// 2. Logging
// ---------------------------------------------------------------------------

// Request id printed on every log line; the string "undefined" outside an
// invocation, exactly like AWS does.
let currentRequestId;

// Each console call becomes exactly ONE write() so lines from concurrent async code
// never interleave mid-line. process.stdout/stderr writes to pipes and files are
// synchronous on Linux; gust relies on that (it drains the pipe when the invocation
// response arrives, so every line logged before the response must already be in the
// pipe). Do not add buffering here.
function makeLogger(stream, level) {
  return function log(...args) {
    stream.write(
      `${new Date().toISOString()}\t${currentRequestId}\t${level}\t${util.format(...args)}\n`,
    );
  };
}

function installLogging() {
  const out = process.stdout;
  const err = process.stderr;
  // A closed log pipe must not turn into an uncaught exception loop.
  out.on('error', noop);
  err.on('error', noop);
  // Back-pressure: libuv makes the pipes non-blocking, and a write that finds a pipe full is
  // then queued in memory, where a flooding function piles up hundreds of MB that reach gust
  // late or never (lost with the instance). Blocking writes wait for gust to read instead:
  // every line is delivered, a flood runs at the speed gust stores it, and the invocation's
  // lines are all in the pipe before its response is posted.
  for (const s of [out, err]) {
    if (s._handle && typeof s._handle.setBlocking === 'function') s._handle.setBlocking(true);
  }
  console.log = makeLogger(out, 'INFO');
  console.info = makeLogger(out, 'INFO');
  console.debug = makeLogger(out, 'DEBUG');
  // AWS prints TRACE as a plain message on stdout (no stack dump).
  console.trace = makeLogger(out, 'TRACE');
  console.warn = makeLogger(err, 'WARN');
  console.error = makeLogger(err, 'ERROR');
}

function noop() {}

// ---------------------------------------------------------------------------
// 3. Runtime API client
// ---------------------------------------------------------------------------

const CRLF = Buffer.from('\r\n');
const CRLFCRLF = Buffer.from('\r\n\r\n');

const MODE_LENGTH = 0; // body delimited by Content-Length
const MODE_CHUNKED = 1; // Transfer-Encoding: chunked
const MODE_CLOSE = 2; // no framing: body runs until the server closes

function parseHostPort(spec) {
  const i = spec.lastIndexOf(':');
  let host = i > 0 ? spec.slice(0, i) : spec;
  const port = i > 0 ? Number(spec.slice(i + 1)) : 80;
  if (host.charCodeAt(0) === 91 /* [ */) host = host.slice(1, -1); // [::1]:9001
  return { host, port };
}

// Parses the status line and headers in buf[0, end). Returns the response "head",
// which later also carries the body (it is handed to the caller as the response, so
// no second object is allocated).
function parseHead(buf, end) {
  if (end < 12 || buf[0] !== 0x48 /* H */ || buf[4] !== 0x2f /* / */) {
    throw new Error('malformed HTTP status line');
  }
  const status = (buf[9] - 48) * 100 + (buf[10] - 48) * 10 + (buf[11] - 48);
  if (!(status >= 100 && status <= 999)) throw new Error('malformed HTTP status code');
  // utf8, not latin1: Lambda-Runtime-Client-Context may carry non-ASCII JSON.
  const str = buf.toString('utf8', 0, end);
  const headers = {};
  let pos = str.indexOf('\r\n');
  pos = pos < 0 ? str.length : pos + 2;
  while (pos < str.length) {
    let eol = str.indexOf('\r\n', pos);
    if (eol < 0) eol = str.length;
    const colon = str.indexOf(':', pos);
    if (colon > pos && colon < eol) {
      // Header names are case-insensitive: store them lower-cased.
      const name = str.slice(pos, colon).toLowerCase();
      const value = str.slice(colon + 1, eol).trim();
      const prev = headers[name];
      headers[name] = prev === undefined ? value : `${prev}, ${value}`;
    }
    pos = eol + 2;
  }
  const head = {
    status,
    headers,
    body: null,
    bodyStart: end + 4,
    mode: MODE_LENGTH,
    length: 0,
    close: false,
  };
  const conn = headers.connection;
  head.close = conn !== undefined && conn.toLowerCase().includes('close');
  const te = headers['transfer-encoding'];
  const cl = headers['content-length'];
  if (te !== undefined && te.toLowerCase().includes('chunked')) {
    head.mode = MODE_CHUNKED;
  } else if (cl !== undefined) {
    const n = Number(cl);
    if (!Number.isSafeInteger(n) || n < 0) throw new Error(`bad Content-Length: ${cl}`);
    head.length = n;
  } else if (status < 200 || status === 204 || status === 304) {
    head.length = 0;
  } else {
    head.mode = MODE_CLOSE;
    head.close = true;
  }
  return head;
}

// Decodes a chunked body starting at `pos`. Returns null while incomplete. Re-parses
// from the start on every call: fine, chunked responses are the rare robustness path.
function parseChunked(buf, pos) {
  const parts = [];
  let total = 0;
  for (;;) {
    const eol = buf.indexOf(CRLF, pos);
    if (eol < 0) return null;
    // parseInt stops at ';', so chunk extensions are ignored.
    const size = parseInt(buf.toString('latin1', pos, eol), 16);
    if (Number.isNaN(size) || size < 0) throw new Error('malformed chunk size');
    pos = eol + 2;
    if (size === 0) {
      // Skip optional trailers up to the terminating empty line.
      for (;;) {
        const e = buf.indexOf(CRLF, pos);
        if (e < 0) return null;
        const empty = e === pos;
        pos = e + 2;
        if (empty) break;
      }
      return { body: parts.length === 1 ? parts[0] : Buffer.concat(parts, total), end: pos };
    }
    if (buf.length < pos + size + 2) return null;
    parts.push(buf.subarray(pos, pos + size));
    total += size;
    pos += size + 2;
  }
}

// One keep-alive TCP connection to the Runtime API with a FIFO of in-flight
// requests. Requests are pre-serialised strings, so a dropped connection is handled
// by reconnecting and re-sending every request that has not been answered yet.
class RuntimeClient {
  constructor(host, port, path) {
    this.host = host;
    this.port = port;
    this.path = path; // Unix socket path, or undefined for TCP
    this.sock = null;
    this.queue = []; // in-flight: { payload, resolve }, answered in order
    this.buf = null; // received, not yet consumed bytes
    this.extra = []; // chunks held back until `need` bytes are available
    this.extraLen = 0;
    this.need = 0; // total bytes needed before re-parsing makes sense (0 = unknown)
    this.head = null; // head of the response being received
    this.scanFrom = 0; // where to resume the search for the end of the head
    this.downSince = 0; // when the server was last seen failing (0 = healthy)
    this.retryTimer = null;
    this.onData = this.onData.bind(this);
    this.connect = this.connect.bind(this);
  }

  // Queues a request; `resolve(head)` is called with the response.
  send(payload, resolve) {
    this.queue.push({ payload, resolve });
    if (this.sock !== null) this.sock.write(payload);
    else if (this.retryTimer === null) this.connect();
    // else: a reconnect is scheduled and will send the whole queue.
  }

  request(payload) {
    return new Promise((resolve) => this.send(payload, resolve));
  }

  // Two pipelined requests written with a single write() (one syscall, and with
  // small bodies one TCP segment).
  sendPair(payload1, resolve1, payload2, resolve2) {
    this.queue.push({ payload: payload1, resolve: resolve1 }, { payload: payload2, resolve: resolve2 });
    if (this.sock !== null) this.sock.write(payload1 + payload2);
    else if (this.retryTimer === null) this.connect();
  }

  connect() {
    this.retryTimer = null;
    const sock = this.path
      ? net.connect({ path: this.path })
      : net.connect({ host: this.host, port: this.port, noDelay: true });
    if (!this.path) sock.setNoDelay(true);
    this.sock = sock;
    this.resetParser();
    sock.on('data', this.onData);
    sock.on('error', noop); // 'close' follows and drives the retry logic
    sock.on('close', () => this.onClose(sock));
    // net.Socket buffers writes until connected.
    const q = this.queue;
    for (let i = 0; i < q.length; i++) sock.write(q[i].payload);
  }

  resetParser() {
    this.buf = null;
    this.extra = [];
    this.extraLen = 0;
    this.need = 0;
    this.head = null;
    this.scanFrom = 0;
  }

  onClose(sock) {
    if (this.sock !== sock) return; // an old socket we already gave up on
    const head = this.head;
    if (head !== null && head.mode === MODE_CLOSE) {
      // Close-delimited body: the close is the end of the response.
      this.flushExtra();
      const b = this.buf;
      const body = b === null ? Buffer.alloc(0) : b.subarray(head.bodyStart);
      this.sock = null;
      this.resetParser();
      this.complete(head, body);
      if (this.queue.length > 0 && this.sock === null && this.retryTimer === null) this.connect();
      return;
    }
    this.sock = null;
    this.resetParser();
    // A pre-warmed sandbox that loses gust before being assigned a function is being
    // discarded.
    if (specializing) process.exit(1);
    if (this.queue.length > 0) this.scheduleRetry();
    // With nothing in flight we reconnect lazily on the next send().
  }

  scheduleRetry() {
    const now = Date.now();
    if (this.downSince === 0) this.downSince = now;
    else if (now - this.downSince > SERVER_GONE_MS) {
      // The Runtime API has been unreachable for a while: gust is gone.
      process.exit(0);
    }
    if (this.retryTimer === null) this.retryTimer = setTimeout(this.connect, RECONNECT_DELAY_MS);
  }

  flushExtra() {
    if (this.extraLen === 0) return;
    const parts = this.extra;
    if (this.buf !== null) parts.unshift(this.buf);
    this.buf = Buffer.concat(parts);
    this.extra = [];
    this.extraLen = 0;
  }

  onData(chunk) {
    if (this.buf === null) {
      this.buf = chunk;
    } else if (this.need > 0) {
      // A large body arriving in pieces: collect and concat once, instead of
      // re-concatenating (quadratically) on every chunk.
      this.extra.push(chunk);
      this.extraLen += chunk.length;
      if (this.buf.length + this.extraLen < this.need) return;
      this.flushExtra();
    } else {
      this.buf = Buffer.concat([this.buf, chunk]);
    }
    this.need = 0;
    try {
      this.parse();
    } catch (e) {
      // Protocol error: drop the connection; unanswered requests are re-sent on a
      // fresh one (and if this keeps happening, the 2 s "server gone" rule applies).
      process.stderr.write(`gust runtime: bad response from Runtime API: ${e.message}\n`);
      const sock = this.sock;
      if (sock !== null) sock.destroy();
    }
  }

  parse() {
    for (;;) {
      const buf = this.buf;
      if (buf === null) return;
      let head = this.head;
      if (head === null) {
        const idx = buf.indexOf(CRLFCRLF, this.scanFrom);
        if (idx < 0) {
          this.scanFrom = buf.length > 3 ? buf.length - 3 : 0;
          return;
        }
        this.scanFrom = 0;
        head = this.head = parseHead(buf, idx);
        if (head.status < 200) {
          // 1xx interim response (e.g. 100 Continue): skip it.
          this.head = null;
          this.buf = head.bodyStart < buf.length ? buf.subarray(head.bodyStart) : null;
          continue;
        }
      }
      let body;
      let end;
      if (head.mode === MODE_LENGTH) {
        end = head.bodyStart + head.length;
        if (buf.length < end) {
          this.need = end;
          return;
        }
        body = buf.subarray(head.bodyStart, end);
      } else if (head.mode === MODE_CHUNKED) {
        const r = parseChunked(buf, head.bodyStart);
        if (r === null) return;
        body = r.body;
        end = r.end;
      } else {
        // MODE_CLOSE: completed in onClose.
        this.need = Number.MAX_SAFE_INTEGER;
        return;
      }
      this.buf = end < buf.length ? buf.subarray(end) : null;
      this.head = null;
      if (head.close) {
        // Server announced it closes this connection: do not reuse it. Anything
        // still in flight is re-sent on a new connection.
        const sock = this.sock;
        this.sock = null;
        this.resetParser();
        if (sock !== null) sock.destroy();
        this.complete(head, body);
        if (this.queue.length > 0 && this.sock === null && this.retryTimer === null) this.connect();
        return;
      }
      this.complete(head, body);
    }
  }

  complete(head, body) {
    this.downSince = 0;
    head.body = body;
    const entry = this.queue.shift();
    if (entry !== undefined) entry.resolve(head);
  }
}

let client;
let HOST_LINE;
let NEXT_REQUEST;

function createClient() {
  if (!RUNTIME_API) {
    process.stderr.write('gust runtime: AWS_LAMBDA_RUNTIME_API is not set\n');
    process.exit(1);
  }
  const { host, port } = parseHostPort(RUNTIME_API);
  client = new RuntimeClient(host, port, RUNTIME_API_SOCKET || undefined);
  HOST_LINE = `Host: ${RUNTIME_API}\r\n`;
  NEXT_REQUEST = `GET ${API}/invocation/next HTTP/1.1\r\n${HOST_LINE}\r\n`;
}

createClient();

// Builds a complete POST as one string (one write, one TCP segment for small
// bodies). `extraHeaders` must be complete "Name: value\r\n" lines.
function postRequest(urlPath, body, extraHeaders) {
  return (
    `POST ${urlPath} HTTP/1.1\r\n${HOST_LINE}${extraHeaders}` +
    `Content-Type: application/json\r\nContent-Length: ${Buffer.byteLength(body)}\r\n\r\n${body}`
  );
}

// Resolve callback for POST /response and /error: their answer (202) carries no
// information we need, but a rejection (e.g. 413 payload too large) is worth a log
// line in the function's logs.
function onPostReply(res) {
  if (res.status >= 300) {
    process.stderr.write(
      `gust runtime: Runtime API rejected the invocation result: HTTP ${res.status} ${res.body.toString()}\n`,
    );
  }
}

// ---------------------------------------------------------------------------
// 4. Errors
// ---------------------------------------------------------------------------

function isErrorLike(v) {
  return (
    v instanceof Error ||
    (v !== null && typeof v === 'object' && typeof v.message === 'string' &&
      (typeof v.name === 'string' || typeof v.stack === 'string'))
  );
}

// err.stack minus its header ("Name: message", which may span lines).
function stackLines(err) {
  const stack = err.stack;
  if (typeof stack !== 'string') return [];
  let rest;
  const headLine = `${err.name}: ${err.message}`;
  if (stack.startsWith(headLine)) rest = stack.slice(headLine.length);
  else {
    const nl = stack.indexOf('\n');
    rest = nl < 0 ? '' : stack.slice(nl + 1);
  }
  const out = [];
  for (const line of rest.split('\n')) if (line.trim() !== '') out.push(line);
  return out;
}

// -> { errorType, errorMessage, stackTrace } as the Runtime API error body.
function errorInfo(err) {
  if (isErrorLike(err)) {
    const name = typeof err.name === 'string' && err.name !== '' ? err.name : 'Error';
    return { errorType: name, errorMessage: err.message, stackTrace: stackLines(err) };
  }
  // Non-Error throws (`throw "x"`, `callback({code: 1})`): AWS reports the typeof.
  let type = 'Error';
  let message;
  if (err !== null && err !== undefined) type = typeof err;
  if (err !== null && typeof err === 'object') {
    try {
      message = JSON.stringify(err);
    } catch {
      message = undefined;
    }
  }
  if (message === undefined) message = String(err);
  return { errorType: type, errorMessage: message, stackTrace: [] };
}

// Header values must not contain CR/LF or non-ASCII (would break the framing).
function headerSafe(s) {
  const v = String(s).replace(/[^\x20-\x7e]/g, '');
  return v === '' ? 'Error' : v.slice(0, 256);
}

function errorRequest(urlPath, info) {
  let body;
  try {
    body = JSON.stringify(info);
  } catch {
    body = JSON.stringify({ errorType: 'Error', errorMessage: 'unserialisable error', stackTrace: [] });
  }
  return postRequest(urlPath, body, `Lambda-Runtime-Function-Error-Type: ${headerSafe(info.errorType)}\r\n`);
}

// Thrown by the loader with an already-classified AWS error type.
class InitError extends Error {
  constructor(errorType, errorMessage, stackTrace) {
    super(errorMessage);
    this.errorType = errorType;
    this.stackTrace = stackTrace || [];
  }
}

// ---------------------------------------------------------------------------
// 5. Handler loading
// ---------------------------------------------------------------------------

// Nearest package.json decides whether a .js file is ESM ("type": "module").
function isEsmJs(file) {
  let dir = path.dirname(file);
  for (;;) {
    let text = null;
    try {
      text = fs.readFileSync(path.join(dir, 'package.json'), 'utf8');
    } catch {
      text = null;
    }
    if (text !== null) {
      try {
        return JSON.parse(text).type === 'module';
      } catch {
        return false;
      }
    }
    const parent = path.dirname(dir);
    if (parent === dir) return false;
    dir = parent;
  }
}

function isFile(p) {
  try {
    return fs.statSync(p).isFile();
  } catch {
    return false;
  }
}

async function loadModule(file) {
  const ext = path.extname(file);
  if (ext === '.mjs' || (ext === '.js' && isEsmJs(file))) return import(pathToFileURL(file).href);
  try {
    return require(file);
  } catch (e) {
    // ESM that require() cannot load (ERR_REQUIRE_ESM; with require(esm) in newer
    // Node 20.x also ERR_REQUIRE_ASYNC_MODULE for top-level await): use import().
    if (e !== null && typeof e === 'object' && (e.code === 'ERR_REQUIRE_ESM' || e.code === 'ERR_REQUIRE_ASYNC_MODULE')) {
      return import(pathToFileURL(file).href);
    }
    throw e;
  }
}

// Turns an exception from loading user code into the AWS init error.
function classifyLoadError(e, file) {
  const info = errorInfo(e);
  if (isErrorLike(e) && e.name === 'SyntaxError') {
    // For parse errors V8 puts the location ("/path/file.js:3" or a file:// URL)
    // on the first line of the stack, before the "SyntaxError: ..." line.
    let where = file;
    if (typeof e.stack === 'string') {
      const first = e.stack.slice(0, e.stack.indexOf('\n') >>> 0);
      if (first !== '' && !first.startsWith('SyntaxError')) where = first;
    }
    return new InitError(
      'Runtime.UserCodeSyntaxError',
      `SyntaxError: ${e.message} (${where})`,
      info.stackTrace,
    );
  }
  if (e !== null && typeof e === 'object' && (e.code === 'MODULE_NOT_FOUND' || e.code === 'ERR_MODULE_NOT_FOUND')) {
    // A dependency of the handler module is missing.
    return new InitError('Runtime.ImportModuleError', `${info.errorType}: ${info.errorMessage}`, info.stackTrace);
  }
  // Exception thrown by the module's top-level code: report it with its own type
  // (as AWS does), so the user sees e.g. "TypeError: x is not a function".
  return new InitError(info.errorType, info.errorMessage, info.stackTrace);
}

// Resolves and loads _HANDLER. Returns either
//   { plain: false, fn }                       Lambda style
//   { plain: true, obj, config }               plain-module style
async function loadHandler() {
  const dot = HANDLER.lastIndexOf('.');
  if (dot <= 0 || dot === HANDLER.length - 1) {
    throw new InitError('Runtime.MalformedHandlerName', `Bad handler ${HANDLER}`);
  }
  const modName = HANDLER.slice(0, dot);
  const exportName = HANDLER.slice(dot + 1);
  const base = path.resolve(TASK_ROOT, modName);
  const candidates = [
    `${base}.js`, `${base}.mjs`, `${base}.cjs`,
    path.join(base, 'index.js'), path.join(base, 'index.mjs'), path.join(base, 'index.cjs'),
  ];
  const file = candidates.find(isFile);
  if (file === undefined) {
    throw new InitError(
      'Runtime.ImportModuleError',
      `Error: Cannot find module '${modName}'\nLooked for: ${candidates.join(', ')}`,
    );
  }

  let mod;
  try {
    mod = await loadModule(file);
  } catch (e) {
    throw classifyLoadError(e, file);
  }

  // CJS: module.exports. ESM: the namespace, plus `default` for
  // `export default {...}` and for CJS modules that went through import().
  const containers = [mod];
  if (mod !== null && typeof mod === 'object' && mod.default !== null &&
      (typeof mod.default === 'object' || typeof mod.default === 'function')) {
    containers.push(mod.default);
  }
  let exp;
  for (const c of containers) {
    if (c !== null && c !== undefined && c[exportName] !== undefined) {
      exp = c[exportName];
      break;
    }
  }
  if (typeof exp === 'function') return { plain: false, fn: exp };
  if (isPlainModule(exp)) return { plain: true, obj: exp, config: exp.config };
  if (exp === undefined) {
    // Plain-module style may export `{ func, config }` as the module itself.
    for (const c of containers) {
      if (isPlainModule(c)) return { plain: true, obj: c, config: c.config };
    }
    throw new InitError('Runtime.HandlerNotFound', `${modName}.${exportName} is undefined or not exported`);
  }
  throw new InitError('Runtime.HandlerNotFound', `${modName}.${exportName} is not a function`);
}

function isPlainModule(v) {
  return v !== null && typeof v === 'object' && typeof v.func === 'function';
}

// gust-specific: tell gust about the plain module's `config` before the first
// /next. `timeout` (ms) is sent as `timeout_ms`; every other key passes through.
async function postConfig(config) {
  const body = {};
  if (config.timeout !== undefined) body.timeout_ms = config.timeout;
  for (const k of Object.keys(config)) if (k !== 'timeout') body[k] = config[k];
  const res = await client.request(postRequest(`${API}/gust/config`, JSON.stringify(body), ''));
  // 202 expected; 404 = a gust without this endpoint, fine. Other failures only
  // warn: the function still works with gust's defaults.
  if (res.status >= 300 && res.status !== 404) {
    console.warn(`gust runtime: POST /runtime/gust/config answered HTTP ${res.status}: ${res.body.toString()}`);
  }
}

// ---------------------------------------------------------------------------
// 6. Lambda-style invocation
// ---------------------------------------------------------------------------

class Context {
  constructor(requestId, headers) {
    this.awsRequestId = requestId;
    this.functionName = FUNCTION_NAME;
    this.functionVersion = FUNCTION_VERSION;
    this.invokedFunctionArn = headers['lambda-runtime-invoked-function-arn'];
    this.memoryLimitInMB = MEMORY_SIZE;
    this.logGroupName = LOG_GROUP;
    this.logStreamName = LOG_STREAM;
    this.clientContext = parseJsonHeader(headers['lambda-runtime-client-context']);
    this.identity = parseJsonHeader(headers['lambda-runtime-cognito-identity']);
    this.callbackWaitsForEmptyEventLoop = true; // accepted, has no effect here
    this._deadline = Number(headers['lambda-runtime-deadline-ms']);
    // Settlement through context.done/succeed/fail: the callback in callback
    // style, otherwise recorded for the synchronous case.
    this._cb = null;
    this._settled = 0; // 0 = no, 1 = result, 2 = error
    this._value = undefined;
  }

  getRemainingTimeInMillis() {
    return this._deadline - Date.now();
  }

  done(err, result) {
    if (this._cb !== null) return this._cb(err, result);
    if (this._settled !== 0) return undefined;
    if (err !== null && err !== undefined) {
      this._settled = 2;
      this._value = err;
    } else {
      this._settled = 1;
      this._value = result;
    }
    return undefined;
  }

  succeed(result) {
    return this.done(null, result);
  }

  fail(err) {
    return this.done(err === null || err === undefined ? new Error('handled') : err);
  }
}

function parseJsonHeader(v) {
  if (v === undefined || v === '') return undefined;
  try {
    return JSON.parse(v);
  } catch {
    return v; // be lenient: hand over the raw string rather than fail the invoke
  }
}

function isThenable(v) {
  return v !== null && (typeof v === 'object' || typeof v === 'function') && typeof v.then === 'function';
}

function runLambda(fn, event, ctx) {
  if (fn.length >= 3) return runCallbackStyle(fn, event, ctx);
  const r = fn(event, ctx);
  if (isThenable(r)) return r;
  // Synchronous handler that used context.succeed/fail/done before returning.
  if (ctx._settled === 2) throw ctx._value;
  if (ctx._settled === 1) return ctx._value;
  return r;
}

// (event, context, callback): wait for whichever comes first of callback(),
// context.done/succeed/fail, or a returned thenable.
function runCallbackStyle(fn, event, ctx) {
  return new Promise((resolve, reject) => {
    let settled = false;
    const callback = (err, result) => {
      if (settled) return;
      settled = true;
      if (err !== null && err !== undefined) reject(err);
      else resolve(result);
    };
    ctx._cb = callback;
    const r = fn(event, ctx, callback); // a synchronous throw rejects this promise
    if (isThenable(r)) {
      r.then(
        (v) => callback(null, v),
        (e) => {
          if (!settled) {
            settled = true;
            reject(e);
          }
        },
      );
    }
  });
}

// Event body -> handler argument. JSON unless the invoke said otherwise.
function decodeEvent(body, contentType) {
  if (
    contentType === undefined ||
    contentType === 'application/json' ||
    contentType.toLowerCase().startsWith('application/json')
  ) {
    // An invoke without payload is `{}` on AWS.
    if (body.length === 0) return {};
    try {
      return JSON.parse(body.toString('utf8'));
    } catch (e) {
      const err = new Error(`Could not parse event payload as JSON: ${e.message}`);
      err.name = 'Runtime.UnmarshalError';
      throw err;
    }
  }
  return body.toString('utf8');
}

// ---------------------------------------------------------------------------
// 7. Plain-module style: func(req, res) -> API Gateway v2 (HTTP API) response
// ---------------------------------------------------------------------------

function isHttpV2Event(ev) {
  return (
    ev !== null && typeof ev === 'object' && ev.version === '2.0' &&
    ev.requestContext !== null && typeof ev.requestContext === 'object' &&
    ev.requestContext.http !== null && typeof ev.requestContext.http === 'object'
  );
}

function buildRequest(event, ctx, rawEvent) {
  if (!isHttpV2Event(event)) {
    // Direct invoke: the event is the body. rawBody holds the invoke payload
    // bytes exactly as received (for a JSON event: its JSON text).
    return {
      method: 'POST',
      path: '/',
      query: {},
      params: {},
      headers: {},
      body: event,
      rawBody: Buffer.from(rawEvent),
      event,
      context: ctx,
    };
  }
  const headers = {};
  const src = event.headers;
  if (src !== null && typeof src === 'object') {
    for (const k of Object.keys(src)) headers[k.toLowerCase()] = src[k];
  }
  if (Array.isArray(event.cookies) && event.cookies.length > 0) {
    // HTTP API v2 moves the Cookie header into `cookies`; restore it.
    headers.cookie = event.cookies.join('; ');
  }
  const raw = event.body;
  const b64 = event.isBase64Encoded === true;
  const rawBody = typeof raw === 'string' ? Buffer.from(raw, b64 ? 'base64' : 'utf8') : Buffer.alloc(0);
  const ct = typeof headers['content-type'] === 'string' ? headers['content-type'].toLowerCase() : '';
  let body;
  if (ct.includes('json')) {
    const text = rawBody.toString('utf8');
    try {
      body = JSON.parse(text);
    } catch {
      body = text;
    }
  } else if (b64 && !ct.startsWith('text/') && !ct.includes('x-www-form-urlencoded')) {
    body = rawBody; // binary payload: keep the bytes
  } else {
    body = rawBody.toString('utf8');
  }
  return {
    method: event.requestContext.http.method,
    path: event.rawPath,
    query: event.queryStringParameters || {},
    params: event.pathParameters || {},
    headers,
    body,
    rawBody,
    event,
    context: ctx,
  };
}

class PlainResponse {
  constructor() {
    this.statusCode = 200;
    this.headers = {};
    this.body = '';
    this.isBase64Encoded = false;
    this.cookies = null;
    this.sent = false;
  }

  status(code) {
    this.statusCode = Number(code);
    return this;
  }

  // set(name, value) or set({ name: value, ... }). Names are kept as given; a
  // name differing only in case replaces the earlier one.
  set(name, value) {
    if (name !== null && typeof name === 'object') {
      for (const k of Object.keys(name)) this.setOne(k, name[k]);
    } else {
      this.setOne(String(name), value);
    }
    return this;
  }

  header(name, value) {
    return this.set(name, value);
  }

  get(name) {
    const k = this.findKey(name);
    return k === undefined ? undefined : this.headers[k];
  }

  findKey(name) {
    const lower = name.toLowerCase();
    for (const k in this.headers) if (k.toLowerCase() === lower) return k;
    return undefined;
  }

  setOne(name, value) {
    const old = this.findKey(name);
    if (old !== undefined) delete this.headers[old];
    if (Array.isArray(value)) {
      // v2 responses carry multiple Set-Cookie values in `cookies`.
      if (name.toLowerCase() === 'set-cookie') {
        this.cookies = value.map(String);
        return;
      }
      value = value.join(', ');
    }
    this.headers[name] = String(value);
  }

  send(body) {
    if (typeof body === 'string') {
      if (this.findKey('content-type') === undefined) this.headers['content-type'] = 'text/plain; charset=utf-8';
      this.body = body;
      this.isBase64Encoded = false;
    } else if (body instanceof Uint8Array) {
      if (this.findKey('content-type') === undefined) this.headers['content-type'] = 'application/octet-stream';
      this.body = Buffer.from(body.buffer, body.byteOffset, body.byteLength).toString('base64');
      this.isBase64Encoded = true;
    } else if (body === undefined || body === null) {
      this.body = '';
      this.isBase64Encoded = false;
    } else {
      return this.json(body);
    }
    this.sent = true;
    return this;
  }

  json(obj) {
    if (this.findKey('content-type') === undefined) this.headers['content-type'] = 'application/json';
    const s = JSON.stringify(obj);
    this.body = s === undefined ? '' : s;
    this.isBase64Encoded = false;
    this.sent = true;
    return this;
  }

  toResult() {
    const out = {
      statusCode: this.statusCode,
      headers: this.headers,
      body: this.body,
      isBase64Encoded: this.isBase64Encoded,
    };
    if (this.cookies !== null) out.cookies = this.cookies;
    return out;
  }
}

async function runPlain(obj, event, ctx, rawEvent) {
  const req = buildRequest(event, ctx, rawEvent);
  const res = new PlainResponse();
  let ret = obj.func(req, res);
  if (isThenable(ret)) ret = await ret;
  // `return res.status(201).json(x)` returns res itself: not a body.
  if (!res.sent && ret !== undefined && ret !== res) res.send(ret);
  return res.toResult();
}

// ---------------------------------------------------------------------------
// 8. Crash handling
// ---------------------------------------------------------------------------

let initDone = false;
let invocationOpen = false; // an invocation is running and has not been answered
let crashing = false;

function crash(err, isRejection) {
  if (crashing) return;
  crashing = true;
  let info = errorInfo(err);
  if (isRejection) {
    // AWS: {"errorType":"Runtime.UnhandledPromiseRejection","errorMessage":"Error: boom",...}
    info = {
      errorType: 'Runtime.UnhandledPromiseRejection',
      errorMessage: isErrorLike(err) ? `${info.errorType}: ${info.errorMessage}` : info.errorMessage,
      stackTrace: info.stackTrace,
    };
  }
  console.error(isRejection ? 'Unhandled Promise Rejection' : 'Uncaught Exception', JSON.stringify(info));
  let req = null;
  if (!initDone) {
    req = errorRequest(`${API}/init/error`, info);
  } else if (invocationOpen) {
    invocationOpen = false;
    req = errorRequest(`${API}/invocation/${currentRequestId}/error`, info);
  }
  // The process state is unknown now: exit so gust discards this instance.
  if (req === null) process.exit(1);
  client.send(req, exitFailure);
  setTimeout(exitFailure, 2000); // don't hang if the report cannot be delivered
}

function exitFailure() {
  process.exit(1);
}

// ---------------------------------------------------------------------------
// 9. Main
// ---------------------------------------------------------------------------

let traceSet = false;

// Runs one invocation; returns the serialised POST (/response or /error), or null
// when a crash report took over this invocation.
async function invoke(next) {
  const h = next.headers;
  const id = h['lambda-runtime-aws-request-id'];
  const trace = h['lambda-runtime-trace-id'];
  if (trace !== undefined) {
    env._X_AMZN_TRACE_ID = trace;
    traceSet = true;
  } else if (traceSet) {
    delete env._X_AMZN_TRACE_ID;
    traceSet = false;
  }
  currentRequestId = id;
  invocationOpen = true;
  let out;
  try {
    const ctx = new Context(id, h);
    const event = decodeEvent(next.body, h['content-type']);
    let result = target.plain ? runPlain(target.obj, event, ctx, next.body) : runLambda(target.fn, event, ctx);
    if (isThenable(result)) result = await result;
    let json = JSON.stringify(result);
    if (json === undefined) json = 'null';
    out = postRequest(`${API}/invocation/${id}/response`, json, '');
  } catch (err) {
    const info = errorInfo(err);
    console.error('Invoke Error', JSON.stringify(info));
    out = errorRequest(`${API}/invocation/${id}/error`, info);
  }
  if (!invocationOpen) return null; // crash() already reported this invocation
  invocationOpen = false;
  return out;
}

// GUST_PREWARM=1: everything that does not depend on a function is loaded by now.
// Wait (possibly forever) for gust to assign one, then become its runtime: its
// environment, its code directory, and everything above that was read from the
// environment read again. Exits 1 if gust discards the sandbox instead.
async function specialize() {
  // Initialises the ESM loader now rather than in an ESM handler's init (~3 ms).
  await import('node:url');
  specializing = true;
  const res = await client.request(`GET ${API}/gust/specialize HTTP/1.1\r\n${HOST_LINE}\r\n`);
  specializing = false;
  if (res.status !== 200) process.exit(1);
  let spec = null;
  try {
    spec = JSON.parse(res.body.toString('utf8'));
    if (spec === null || typeof spec !== 'object' || spec.env === null || typeof spec.env !== 'object') {
      throw new Error('no "env" object');
    }
    for (const k of Object.keys(env)) delete env[k];
    // Assigning TZ also resets Node's time zone cache.
    for (const k of Object.keys(spec.env)) env[k] = String(spec.env[k]);
    if (spec.task_root) process.chdir(spec.task_root);
  } catch (e) {
    process.stderr.write(`gust runtime: cannot specialize: ${e.message}\n`);
    process.exit(1);
  }
  // The global module paths ($NODE_PATH, $HOME/.node_modules) were computed at start.
  const Module = require('node:module');
  if (typeof Module._initPaths === 'function') Module._initPaths();
  const before = `${RUNTIME_API}\n${RUNTIME_API_SOCKET}`;
  readConfig();
  if (`${RUNTIME_API}\n${RUNTIME_API_SOCKET}` !== before) {
    // A different Runtime API (not expected: gust passes the same one again).
    if (client.sock !== null) client.sock.destroy();
    createClient();
  }
}

let target = null;

async function main() {
  installLogging();
  process.on('uncaughtException', (e) => crash(e, false));
  process.on('unhandledRejection', (r) => crash(r, true));
  if (PREWARM) await specialize();

  try {
    target = await loadHandler();
    if (target.plain && target.config !== null && typeof target.config === 'object') {
      await postConfig(target.config);
    }
  } catch (e) {
    if (crashing) return;
    crashing = true;
    const info = e instanceof InitError
      ? { errorType: e.errorType, errorMessage: e.message, stackTrace: e.stackTrace }
      : errorInfo(e);
    console.error(`Init error: ${info.errorType}: ${info.errorMessage}${info.stackTrace.length ? `\n${info.stackTrace.join('\n')}` : ''}`);
    await client.request(errorRequest(`${API}/init/error`, info));
    process.exit(1);
  }
  // A crash report (e.g. a timer started by module code threw) may be in flight:
  // it exits the process, do not ask for work meanwhile.
  if (crashing) return;
  initDone = true;

  let next = await client.request(NEXT_REQUEST);
  for (;;) {
    if (next.status !== 200) {
      if (next.status === 204) {
        // Nothing to do (keep-alive style answer): ask again.
        next = await client.request(NEXT_REQUEST);
        continue;
      }
      process.stderr.write(
        `gust runtime: GET /invocation/next answered HTTP ${next.status}: ${next.body.toString()}\n`,
      );
      process.exit(1);
    }
    const post = await invoke(next);
    if (post === null) return; // crash handler exits the process
    currentRequestId = undefined;
    // Pipeline: result POST and the next GET in one write / one round trip.
    next = await new Promise((resolve) => client.sendPair(post, onPostReply, NEXT_REQUEST, resolve));
  }
}

main();
