#!/usr/bin/env python3
"""gust built-in Python runtime bootstrap (AWS Lambda Runtime API client).

gust runs ``python3 -u <runtime dir>/bootstrap.py`` once per function
instance, with the function's code directory as the working directory.
This process:

  1. sets up ``sys.path`` and the root logger the way the AWS Python runtime
     (awslambdaric) does, so code written for Lambda behaves the same here;
  2. imports the handler module once (its globals survive across invokes),
     reporting failures to ``/runtime/init/error`` and exiting 1;
  3. loops forever: ``GET /invocation/next`` -> ``handler(event, context)``
     -> ``POST /invocation/{id}/response`` (or ``/error``).

With ``GUST_PREWARM=1`` the process is a generic pre-warmed sandbox: it
starts without any function, loads what does not depend on one, and blocks
on ``GET /runtime/gust/specialize`` until gust assigns a function (see
``_specialize``). It then takes that function's environment and code
directory and carries on with step 1.

Layout (top to bottom): constants; JSON on the C accelerator; the HTTP/1.1
keep-alive client (``RuntimeAPIClient``); error helpers; context objects;
logging setup (lazy, see below); handler loading; the invoke loop; ``main``.

Standard library only (no awslambdaric, no simplejson), Python 3.8+.

Cold start: everything imported here is paid before the first invoke, so the
file imports only os, sys, time, _socket and _json (a few ms in total).
``json`` (through ``re`` and ``enum``), ``logging`` (plus ``traceback``,
``threading``, ``string``, ...) and ``traceback`` used to cost ~35-50 ms of
every cold start under ``-X importtime``, whether the function used them or
not. Instead:

  * JSON goes straight to the C scanner/encoder in ``_json`` with exactly
    the settings ``json.loads``/``json.dumps`` give them; anything unusual
    (errors included) is handed to the real ``json`` module.
  * The root logger is configured when ``logging`` is first imported, by
    anyone, through a ``sys.meta_path`` finder (``_StdlibFinder``), so user
    code sees the same handler, format and level as if it had been set up
    at startup.
  * The same finder keeps resolving the stdlib modules that the runtime used
    to load before the code directory was put on ``sys.path`` from the
    stdlib, as before: a user file named ``token.py`` or ``string.py`` must
    not start shadowing ``tokenize``'s or ``logging``'s imports.
  * ``traceback`` is imported only to format an error.

Why a hand-written HTTP client instead of http.client: the Runtime API is a
fixed, tiny protocol spoken to one trusted local server, and its two round
trips are pure overhead on every invocation. http.client parses every
response's headers through email.parser and reads through a buffered file
object. Measured against a C mock Runtime API (16 B echo event, a shared
2-vCPU Firecracker VM, so the absolute numbers are noisy), the raw client
sustained ~2,400-8,600 sequential invokes/s versus ~1,000-2,700 for
http.client in interleaved runs, and burned ~70-90 us of user CPU per
invoke versus ~300-370 us. Run back to back with it, a bare Python GET+POST
ping-pong with no parsing at all was only slightly faster than the raw
client, so the rest is the kernel's loopback round trips. HTTP pipelining
(POST /response and GET /next in one write) was also tried. It was not
faster, and it depends on the server handling pipelined requests, so it is
not used.
"""

import os
import sys
import time

try:
    # The C module directly: socket.py's wrapper adds ~5 ms of import time
    # (IntEnum conversion of every constant, selectors, array) to every cold
    # start, and we use none of what it adds.
    import _socket as _sock
except ImportError:  # non-CPython
    import socket as _sock

try:
    # json's C accelerator without the json package: json.decoder and
    # json.encoder import re (and re imports enum, functools, collections),
    # ~15-25 ms per cold start, only for their pure-Python fallbacks.
    from _json import encode_basestring as _c_encode_basestring
    from _json import encode_basestring_ascii as _c_encode_basestring_ascii
    from _json import make_encoder as _c_make_encoder
    from _json import make_scanner as _c_make_scanner
except ImportError:  # non-CPython
    _c_make_scanner = None

# The module search path before _setup_sys_path() puts the code directory
# first: where the modules the runtime used to preload came from. See
# _StdlibFinder.
_STARTUP_PATH = list(sys.path)

# --------------------------------------------------------------------------
# Constants
# --------------------------------------------------------------------------

_RUNTIME_PREFIX = "/2018-06-01/runtime"

# How long the Runtime API may stay unreachable before we assume gust has
# torn the instance down and quietly exit. Exiting 0 (not 1) because this is
# the normal way an instance dies when gust goes away first.
_RECONNECT_WINDOW_S = 2.0

# recv() size: large enough that a typical event (headers + body) arrives in
# one syscall; small enough to stay below glibc's mmap threshold (128 KiB) so
# the per-call buffer allocation stays cheap.
_RECV_SIZE = 65536

# A response head larger than this means we are desynchronised or talking to
# the wrong thing; drop the connection rather than buffer without bound.
_MAX_HEAD = 1 << 20

# Below this size, head and body are concatenated into one sendall(): one
# syscall and one TCP segment. Above it the copy costs more than the extra
# syscall, so they are sent separately.
_COALESCE_LIMIT = 1 << 16

_THIS_FILE = os.path.abspath(__file__)

# Request id of the invocation in progress; read by the logging filter so
# every log line carries it (AWS keeps the last id between invokes, so do we).
_request_id = ""
_tenant_id = None


# --------------------------------------------------------------------------
# JSON without importing json (see the module docstring)
# --------------------------------------------------------------------------

_JSON_WS = " \t\n\r"  # JSON's whitespace (json.decoder.WHITESPACE_STR)


class _JSONDecoderSettings:
    """What ``json.JSONDecoder()`` hands the C scanner: json.loads' defaults."""

    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_float = float
    parse_int = int
    parse_constant = {
        "-Infinity": float("-inf"),
        "Infinity": float("inf"),
        "NaN": float("nan"),
    }.__getitem__


def _json_loads_slow(s):
    import json  # resolved from the stdlib by _StdlibFinder

    return json.loads(s)


def _json_dumps_slow(obj, default=None, ensure_ascii=True):
    import json

    return json.dumps(obj, default=default, ensure_ascii=ensure_ascii)


def _json_loads_fast(s):
    """``json.loads(s)`` for str or bytes, same result, same exceptions.

    Does what json.loads and JSONDecoder.decode do around the C scanner:
    bytes are decoded as UTF-8 (anything json.detect_encoding would not call
    UTF-8 goes the slow way), surrounding JSON whitespace is allowed.
    Everything else, errors above all, is left to the real json module, so
    its exception types and messages are preserved exactly.
    """
    try:
        text = s
        if text.__class__ is not str:
            # A BOM or a NUL among the first two bytes means UTF-16/32 or
            # utf-8-sig to json.detect_encoding; valid JSON text starts with
            # an ASCII character otherwise.
            if len(text) < 2 or not 0 < text[0] < 0xEF or not text[1]:
                return _json_loads_slow(s)
            text = text.decode("utf-8", "surrogatepass")
        idx = 0
        if text and text[0] in _JSON_WS:
            idx = len(text) - len(text.lstrip(_JSON_WS))
        obj, end = _json_scan_once(text, idx)
        if end == len(text) or not text[end:].strip(_JSON_WS):
            return obj
    except Exception:
        # StopIteration (no value), JSONDecodeError, UnicodeDecodeError,
        # RecursionError, ...: let json raise its own.
        pass
    return _json_loads_slow(s)


def _json_dumps_fast(obj, default=None, ensure_ascii=True):
    """``json.dumps(obj, default=default, ensure_ascii=ensure_ascii)``.

    The same C encoder call JSONEncoder.encode/iterencode make in that case
    (a fresh circular-reference ``markers`` dict every time: after a failed
    encode the C encoder leaves stale ids behind in it).
    """
    encode_str = _c_encode_basestring_ascii if ensure_ascii else _c_encode_basestring
    if isinstance(obj, str):
        return encode_str(obj)
    encoder = _c_make_encoder(
        {},
        _json_not_serializable if default is None else default,
        encode_str,
        None,  # indent
        ": ",
        ", ",
        False,  # sort_keys
        False,  # skipkeys
        True,  # allow_nan
    )
    return "".join(encoder(obj, 0))


def _json_not_serializable(obj):
    # json.JSONEncoder.default
    raise TypeError("Object of type %s is not JSON serializable" % obj.__class__.__name__)


def _json_fast_path_works():
    # A future CPython could change _json's internal interface; check the
    # round trip once (a few microseconds) rather than trust it blindly.
    global _json_scan_once
    try:
        _json_scan_once = _c_make_scanner(_JSONDecoderSettings)
        text = '{"a": [1, -2.5, "\\u00e9\\ud83d\\ude00", true, false, null, NaN], "b": {}} \n'
        value = _json_loads_fast(text)
        expect = {"a": [1, -2.5, "\u00e9\U0001F600", True, False, None], "b": {}}
        nan = value["a"].pop()
        return (
            value == expect
            and nan != nan
            and _json_loads_fast(text.encode()) == {"a": expect["a"] + [nan], "b": {}}
            and _json_dumps_fast(value) == text[:text.index(", NaN")] + '], "b": {}}'
            and _json_dumps_fast(["\u00e9"], ensure_ascii=False) == '["\u00e9"]'
            and _json_dumps_fast({1.5: object()}, default=repr).startswith('{"1.5": "<object')
        )
    except Exception:
        return False


_json_scan_once = None
if _c_make_scanner is not None and _json_fast_path_works():
    _json_loads, _json_dumps = _json_loads_fast, _json_dumps_fast
else:
    _json_loads, _json_dumps = _json_loads_slow, _json_dumps_slow


# --------------------------------------------------------------------------
# Runtime API client: one persistent HTTP/1.1 connection over a raw socket
# --------------------------------------------------------------------------


class _RuntimeAPIGone(BaseException):
    """The Runtime API stayed unreachable for _RECONNECT_WINDOW_S.

    A BaseException so that no ``except Exception`` on the way up can
    swallow it; main() turns it into the process exit.
    """


class _ConnectionLost(Exception):
    """The connection died or the byte stream is no longer in sync.

    Either way the only safe recovery is a fresh connection and a retry of the
    whole request (the server never saw it, or will reject a duplicate post
    with 400, which is harmless).
    """


def _path_segment(value):
    # Request ids are UUIDs in practice; only pay for quoting (and the
    # urllib import) when something unusual shows up, and never let a CR/LF
    # reach the request line.
    if value.isascii() and value.replace("-", "").replace("_", "").isalnum():
        return value
    from urllib.parse import quote

    return quote(value, safe="")


class RuntimeAPIClient:
    """Minimal HTTP/1.1 client for the Runtime API.

    Supports exactly what the Runtime API needs and a bit of robustness on
    top: Content-Length, chunked and read-until-close response bodies, 1xx
    interim responses, ``Connection: close``, HTTP/1.0 servers. Requests are
    GET without a body or POST with Content-Length (never chunked: gust, like
    RIE, may not accept chunked uploads on buffered endpoints).
    """

    __slots__ = ("_addr", "_unix", "_host_line", "_sock", "_buf", "_next_request")

    def __init__(self, address, unix_path=None):
        # gust's built-in runtimes get the same API on a Unix socket too
        # (GUST_RUNTIME_API_SOCKET): cheaper than loopback TCP on every request.
        self._unix = unix_path
        host, sep, port = address.rpartition(":")
        if not sep or not port.isdigit():
            # aws-lambda-cpp's fallback when the port is missing.
            host, port = address, "9001"
        host = host.strip("[]") or "127.0.0.1"  # [::1]:9001 form
        if host.isascii():
            # getaddrinfo() IDNA-encodes a str host, and the first use of the
            # idna codec imports encodings.idna, stringprep and unicodedata
            # (~3-4 ms of cold start). An ASCII name needs none of that.
            host = host.encode("ascii")
        self._addr = (host, int(port))
        self._host_line = "Host: %s\r\n" % address
        self._sock = None
        self._buf = b""
        # The hot-path request never changes: build its bytes once.
        self._next_request = (
            "GET %s/invocation/next HTTP/1.1\r\n%s\r\n"
            % (_RUNTIME_PREFIX, self._host_line)
        ).encode("latin-1")

    # -- connection management ---------------------------------------------

    def _connect(self):
        if self._unix:
            sock = _sock.socket(_sock.AF_UNIX, _sock.SOCK_STREAM)
            try:
                sock.connect(self._unix)
            except OSError:
                sock.close()
                raise
            self._sock = sock
            self._buf = b""
            return
        # socket.create_connection() equivalent on the bare C socket type.
        host, port = self._addr
        error = None
        for family, socktype, proto, _name, sockaddr in _sock.getaddrinfo(
            host, port, 0, _sock.SOCK_STREAM
        ):
            sock = _sock.socket(family, socktype, proto)
            try:
                sock.connect(sockaddr)
            except OSError as e:
                sock.close()
                error = e
                continue
            # Requests go out in one send, but a body over _COALESCE_LIMIT is
            # a second one; without NODELAY, Nagle plus the server's delayed
            # ACK could stall that by up to ~40 ms.
            sock.setsockopt(_sock.IPPROTO_TCP, _sock.TCP_NODELAY, 1)
            self._sock = sock
            self._buf = b""
            return
        if isinstance(host, bytes):
            host = host.decode("ascii")
        raise error or OSError("cannot resolve Runtime API address %r" % (host,))

    def _close(self):
        sock, self._sock = self._sock, None
        self._buf = b""
        if sock is not None:
            try:
                sock.close()
            except OSError:
                pass

    def _request(self, head, body):
        """Send one request and return (status, headers, body).

        Reconnects and retries on any connection or protocol failure. The
        first retry is immediate (the usual cause is a keep-alive connection
        the server closed while the handler ran); after that it backs off,
        and once the server has been unreachable for _RECONNECT_WINDOW_S it
        raises _RuntimeAPIGone.
        """
        deadline = None
        delay = 0.01
        while True:
            try:
                if self._sock is None:
                    self._connect()
                return self._roundtrip(head, body)
            except (OSError, _ConnectionLost, ValueError):
                # ValueError = unparsable status line / length: the stream is
                # out of sync, so it is handled like a dropped connection.
                self._close()
                now = time.monotonic()
                if deadline is None:
                    deadline = now + _RECONNECT_WINDOW_S
                    continue
                if now >= deadline:
                    raise _RuntimeAPIGone()
                time.sleep(min(delay, deadline - now))
                delay = min(delay * 2, 0.25)

    def _roundtrip(self, head, body):
        sock = self._sock
        if not body:
            sock.sendall(head)
        elif len(body) <= _COALESCE_LIMIT:
            sock.sendall(head + body)
        else:
            sock.sendall(head)
            sock.sendall(body)
        return self._read_response()

    # -- response parsing ----------------------------------------------------

    def _recv(self):
        data = self._sock.recv(_RECV_SIZE)
        if not data:
            raise _ConnectionLost("connection closed by the Runtime API")
        return data

    def _read_until(self, delim):
        """Return the bytes before ``delim`` and consume both."""
        buf = self._buf
        start = 0
        while True:
            idx = buf.find(delim, start)
            if idx >= 0:
                self._buf = buf[idx + len(delim):]
                return buf[:idx]
            if len(buf) > _MAX_HEAD:
                raise _ConnectionLost("response head too large")
            # Only rescan the tail that could hold a split delimiter.
            start = max(0, len(buf) - len(delim) + 1)
            buf += self._recv()

    def _read_exact(self, n):
        buf = self._buf
        if len(buf) >= n:
            # Common case: the whole body came with the head in one recv().
            self._buf = buf[n:]
            return buf[:n]
        # Large body: receive straight into a preallocated buffer instead of
        # growing a bytes object (which would be quadratic in copies).
        out = bytearray(n)
        view = memoryview(out)
        have = len(buf)
        view[:have] = buf
        self._buf = b""
        recv_into = self._sock.recv_into
        try:
            while have < n:
                got = recv_into(view[have:])
                if not got:
                    raise _ConnectionLost("connection closed mid-body")
                have += got
        finally:
            view.release()
        return bytes(out)

    def _read_chunked(self):
        chunks = []
        while True:
            line = self._read_until(b"\r\n")
            size = int(line.split(b";", 1)[0].strip(), 16)
            if size == 0:
                break
            chunks.append(self._read_exact(size))
            if self._read_exact(2) != b"\r\n":
                raise _ConnectionLost("malformed chunk terminator")
        # Trailer section: header lines until an empty one. We do not use
        # trailers, but must consume them to stay in sync.
        while self._read_until(b"\r\n"):
            pass
        return b"".join(chunks)

    def _read_to_eof(self):
        parts = [self._buf]
        self._buf = b""
        while True:
            data = self._sock.recv(_RECV_SIZE)
            if not data:
                break
            parts.append(data)
        self._close()
        return b"".join(parts)

    def _read_response(self):
        while True:
            head = self._read_until(b"\r\n\r\n")
            # UTF-8 rather than latin-1: Client-Context is base64-decoded
            # user JSON and may carry non-ASCII text verbatim.
            lines = head.decode("utf-8", "replace").split("\r\n")
            status_parts = lines[0].split(None, 2)
            if len(status_parts) < 2 or not status_parts[0].startswith("HTTP/"):
                raise _ConnectionLost("malformed status line: %r" % lines[0][:200])
            status = int(status_parts[1])
            headers = {}
            for line in lines[1:]:
                name, sep, value = line.partition(":")
                if sep:
                    # No whitespace may precede the colon (RFC 9112 5.1).
                    headers[name.lower()] = value.strip()
            if status >= 200:
                break
            # 1xx interim response (e.g. 100 Continue): no body, the real
            # response follows on the same connection.

        keep_alive = status_parts[0] != "HTTP/1.0"
        connection = headers.get("connection")
        if connection is not None:
            tokens = connection.lower()
            if "close" in tokens:
                keep_alive = False
            elif "keep-alive" in tokens:
                keep_alive = True

        te = headers.get("transfer-encoding")
        if te is not None and "chunked" in te.lower():
            body = self._read_chunked()
        else:
            length = headers.get("content-length")
            if length is not None:
                body = self._read_exact(int(length))
            elif status == 204 or status == 304:
                body = b""
            else:
                # No framing at all: the body runs until the server closes.
                return status, headers, self._read_to_eof()

        if not keep_alive:
            self._close()
        return status, headers, body

    # -- Runtime API endpoints ----------------------------------------------

    def next_invocation(self):
        """Long-poll for the next event; returns (headers, body)."""
        while True:
            status, headers, body = self._request(self._next_request, None)
            if status == 200:
                return headers, body
            if status == 204:
                # Keep-alive "nothing yet" (tolerated by the Rust runtime too).
                continue
            # Anything else means gust considers this instance broken (the
            # docs say the runtime should exit on 5xx); let it be replaced.
            _stderr(
                "gust python runtime: /invocation/next returned HTTP %d: %s"
                % (status, body[:1000].decode("utf-8", "replace"))
            )
            _exit(1)

    def _post(self, path, body, extra_headers):
        head = (
            "POST %s%s HTTP/1.1\r\n%s%sContent-Length: %d\r\n\r\n"
            % (_RUNTIME_PREFIX, path, self._host_line, extra_headers, len(body))
        ).encode("utf-8")
        status, _headers, resp = self._request(head, body)
        if status >= 300:
            # e.g. 413 (response too large: gust reports that to the caller
            # itself) or 400 (duplicate post after a reconnect). Nothing the
            # runtime can do beyond making it visible.
            _stderr(
                "gust python runtime: POST %s returned HTTP %d: %s"
                % (path, status, resp[:1000].decode("utf-8", "replace"))
            )
        return status

    def post_response(self, request_id, body, content_type):
        return self._post(
            "/invocation/%s/response" % _path_segment(request_id),
            body,
            "Content-Type: %s\r\n" % content_type,
        )

    def post_error(self, request_id, error):
        return self._post(
            "/invocation/%s/error" % _path_segment(request_id),
            _error_body(error),
            _error_headers(error),
        )

    def post_init_error(self, error):
        return self._post("/init/error", _error_body(error), _error_headers(error))


# --------------------------------------------------------------------------
# Errors (awslambdaric's shapes)
# --------------------------------------------------------------------------

_MARSHAL_ERROR = "Runtime.MarshalError"
_UNMARSHAL_ERROR = "Runtime.UnmarshalError"
_USER_CODE_SYNTAX_ERROR = "Runtime.UserCodeSyntaxError"
_HANDLER_NOT_FOUND = "Runtime.HandlerNotFound"
_IMPORT_MODULE_ERROR = "Runtime.ImportModuleError"
_BUILT_IN_MODULE_CONFLICT = "Runtime.BuiltInModuleConflict"
_MALFORMED_HANDLER_NAME = "Runtime.MalformedHandlerName"
_CONTEXT_UNMARSHAL_ERROR = "Runtime.LambdaContextUnmarshalError"


class _Fault(Exception):
    """A runtime-detected failure with an AWS ``Runtime.*`` error type."""

    def __init__(self, error_type, message, trace=None):
        Exception.__init__(self, message)
        self.error_type = error_type
        self.message = message
        self.trace = trace


def _make_error(message, error_type, stack_trace, request_id=""):
    return {
        "errorMessage": message or "",
        "errorType": error_type or "",
        "requestId": request_id or "",
        "stackTrace": stack_trace or [],
    }


def _user_stack(tb):
    """Traceback lines with this file's leading frames removed.

    Users should see their own frames only, as on AWS.
    """
    import importlib
    import traceback  # only ever needed here, on the error path

    # Import-time failures also start with importlib's own frames.
    importlib_dir = os.path.dirname(importlib.__file__) + os.sep
    frames = traceback.extract_tb(tb)
    i = 0
    while i < len(frames):
        filename = frames[i].filename
        if not (
            filename.startswith("<frozen ")
            or filename.startswith(importlib_dir)
            or os.path.abspath(filename) == _THIS_FILE
        ):
            break
        i += 1
    return traceback.format_list(frames[i:])


def _error_from_exception(exc, request_id=""):
    try:
        message = str(exc)
    except Exception:  # a broken __str__ must not kill the runtime
        message = "<unprintable %s object>" % type(exc).__name__
    return _make_error(message, type(exc).__name__, _user_stack(exc.__traceback__), request_id)


def _error_from_fault(fault, request_id=""):
    return _make_error(fault.message, fault.error_type, fault.trace, request_id)


def _error_body(error):
    # ensure_ascii (the default, as in awslambdaric) escapes everything,
    # lone surrogates included, so this cannot fail on odd messages.
    return _json_dumps(error).encode("ascii")


def _error_headers(error):
    # The header must be a single clean token; the full detail is in the body.
    etype = "".join(c for c in error.get("errorType", "") if 32 < ord(c) < 127)
    return "Lambda-Runtime-Function-Error-Type: %s\r\nContent-Type: application/json\r\n" % (
        etype or "Unhandled"
    )


# --------------------------------------------------------------------------
# Context object (mirrors awslambdaric's LambdaContext)
# --------------------------------------------------------------------------

# Read once: os.environ lookups on every invoke are measurable on the hot path
# and these never change for the life of the instance.
_FUNCTION_NAME = None
_FUNCTION_VERSION = None
_MEMORY_LIMIT_IN_MB = None
_LOG_GROUP_NAME = None
_LOG_STREAM_NAME = None


def _load_static_context():
    global _FUNCTION_NAME, _FUNCTION_VERSION, _MEMORY_LIMIT_IN_MB
    global _LOG_GROUP_NAME, _LOG_STREAM_NAME
    env = os.environ
    _FUNCTION_NAME = env.get("AWS_LAMBDA_FUNCTION_NAME")
    _FUNCTION_VERSION = env.get("AWS_LAMBDA_FUNCTION_VERSION")
    _LOG_GROUP_NAME = env.get("AWS_LAMBDA_LOG_GROUP_NAME")
    _LOG_STREAM_NAME = env.get("AWS_LAMBDA_LOG_STREAM_NAME")
    try:
        _MEMORY_LIMIT_IN_MB = int(env.get("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "128"))
    except ValueError:
        _MEMORY_LIMIT_IN_MB = 128


class CognitoIdentity(object):
    __slots__ = ("cognito_identity_id", "cognito_identity_pool_id")

    def __init__(self, cognito_identity_id=None, cognito_identity_pool_id=None):
        self.cognito_identity_id = cognito_identity_id
        self.cognito_identity_pool_id = cognito_identity_pool_id

    def __repr__(self):
        return "CognitoIdentity([cognito_identity_id=%s,cognito_identity_pool_id=%s])" % (
            self.cognito_identity_id,
            self.cognito_identity_pool_id,
        )


class Client(object):
    __slots__ = (
        "installation_id",
        "app_title",
        "app_version_name",
        "app_version_code",
        "app_package_name",
    )

    def __repr__(self):
        return "Client([%s])" % ",".join(
            "%s=%s" % (f, getattr(self, f, None)) for f in self.__slots__
        )


class ClientContext(object):
    __slots__ = ("custom", "env", "client")

    def __repr__(self):
        return "ClientContext([custom=%s,env=%s,client=%s])" % (
            self.custom,
            self.env,
            self.client,
        )


def _obj_from_dict(cls, data):
    # Same leniency as awslambdaric: unknown keys dropped, missing ones None.
    obj = cls()
    getter = data.get if isinstance(data, dict) else (lambda _k, _d=None: None)
    for field in cls.__slots__:
        setattr(obj, field, getter(field, None))
    return obj


def _parse_json_header(value, what):
    try:
        return _json_loads(value)
    except Exception as e:
        raise _Fault(_CONTEXT_UNMARSHAL_ERROR, "Unable to parse %s JSON: %s" % (what, e))


class LambdaContext(object):
    """The ``context`` argument passed to handlers."""

    def __init__(
        self,
        aws_request_id,
        deadline_ms,
        invoked_function_arn=None,
        client_context_json=None,
        cognito_identity_json=None,
        tenant_id=None,
    ):
        self.aws_request_id = aws_request_id
        self.log_group_name = _LOG_GROUP_NAME
        self.log_stream_name = _LOG_STREAM_NAME
        self.function_name = _FUNCTION_NAME
        self.memory_limit_in_mb = _MEMORY_LIMIT_IN_MB
        self.function_version = _FUNCTION_VERSION
        self.invoked_function_arn = invoked_function_arn
        self.tenant_id = tenant_id

        self.client_context = None
        if client_context_json:
            cc = _parse_json_header(client_context_json, "Client Context")
            if cc is not None:
                self.client_context = _obj_from_dict(ClientContext, cc)
                if self.client_context.client is not None:
                    self.client_context.client = _obj_from_dict(
                        Client, self.client_context.client
                    )

        # AWS always provides an identity object, with None fields when the
        # invoke carried no Cognito identity.
        if cognito_identity_json:
            ci = _parse_json_header(cognito_identity_json, "Cognito Identity")
            if not isinstance(ci, dict):
                ci = {}
            self.identity = CognitoIdentity(
                ci.get("cognitoIdentityId"), ci.get("cognitoIdentityPoolId")
            )
        else:
            self.identity = CognitoIdentity()

        self._epoch_deadline_time_in_ms = deadline_ms

    def get_remaining_time_in_millis(self):
        remaining = self._epoch_deadline_time_in_ms - int(time.time() * 1000)
        return remaining if remaining > 0 else 0

    def log(self, msg):
        sys.stdout.write(str(msg))

    def __repr__(self):
        return (
            "LambdaContext([aws_request_id=%s,log_group_name=%s,log_stream_name=%s,"
            "function_name=%s,memory_limit_in_mb=%s,function_version=%s,"
            "invoked_function_arn=%s,client_context=%s,identity=%s,tenant_id=%s])"
            % (
                self.aws_request_id,
                self.log_group_name,
                self.log_stream_name,
                self.function_name,
                self.memory_limit_in_mb,
                self.function_version,
                self.invoked_function_arn,
                self.client_context,
                self.identity,
                self.tenant_id,
            )
        )


# --------------------------------------------------------------------------
# Logging and output
# --------------------------------------------------------------------------

_DATETIME_FORMAT = "%Y-%m-%dT%H:%M:%S"
_ERROR_LINE_SEP = "\r"  # keeps a multi-line traceback on one log line (AWS)
_ERROR_INDENT = "\u00a0"  # AWS swaps leading spaces for NBSP in tracebacks
_json_log_format = False


def _stderr(msg):
    try:
        sys.stderr.write(msg + "\n")
        sys.stderr.flush()
    except Exception:
        pass


def _exit(code):
    # os._exit, not sys.exit: a non-daemon thread left behind by user code
    # would otherwise keep the interpreter (and the instance) alive forever.
    # Lambda does not run atexit handlers on shutdown either (SIGKILL).
    _flush_std_streams()
    os._exit(code)


def _flush_std_streams():
    # gust drains the instance's pipes as soon as it has the /response, so
    # anything still sitting in a Python-level buffer (possible if the user
    # swapped sys.stdout, or if we were started without -u) would be
    # attributed to the wrong invocation or lost. flush() is ~free otherwise.
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass


_JSON_RESERVED = frozenset(
    (
        "name", "msg", "args", "levelname", "levelno", "pathname", "filename",
        "module", "exc_info", "exc_text", "stack_info", "lineno", "funcName",
        "created", "msecs", "relativeCreated", "thread", "threadName",
        "processName", "process", "aws_request_id", "tenant_id", "taskName",
        "message", "asctime",
    )
)

_LOG_LEVELS = ("CRITICAL", "FATAL", "ERROR", "WARN", "WARNING", "INFO", "DEBUG", "NOTSET")
_log_level = None  # AWS_LAMBDA_LOG_LEVEL, validated; None = leave Python's default
_logging_configured = False


def _iso_utc_ms(created):
    return "%s.%03dZ" % (time.strftime(_DATETIME_FORMAT, time.gmtime(created)), int(created * 1000) % 1000)


def _setup_logging():
    """Read the log settings and arrange for the root logger to be configured.

    The environment is read now, before user code runs, as it always was.
    The configuration itself (_configure_logging) is applied the moment
    ``logging`` is first imported, by the function or any library it uses
    (the runtime itself never needs it), so a function that never logs
    never pays for the import.
    """
    global _json_log_format, _log_level
    _json_log_format = (os.environ.get("AWS_LAMBDA_LOG_FORMAT") or "").upper() == "JSON"
    level = (os.environ.get("AWS_LAMBDA_LOG_LEVEL") or "").upper()
    if level == "TRACE":
        level = "DEBUG"
    _log_level = level if level in _LOG_LEVELS else None

    logging = sys.modules.get("logging")
    if logging is not None:
        # Already imported (e.g. by a sitecustomize when run without -S).
        _configure_logging(logging)


def _configure_logging(logging):
    """Configure the root logger exactly like the AWS Python runtime.

    A single handler writing ``[LEVEL]\\t<UTC ISO-8601 ms>Z\\t<request id>\\t<msg>``
    to stdout. The root level is only changed when AWS_LAMBDA_LOG_LEVEL is
    set; otherwise it stays at Python's default WARNING, so
    ``logging.info()`` is dropped unless the function raises the level
    itself, which is what Lambda users expect.

    Called with the freshly executed ``logging`` module, once per process.
    """
    global _logging_configured
    if _logging_configured:
        return
    _logging_configured = True

    class _RequestIdFilter(logging.Filter):
        def filter(self, record):
            record.aws_request_id = _request_id
            record.tenant_id = _tenant_id
            return True

    class _StdoutHandler(logging.Handler):
        """Writes each formatted record with a single write to *current* stdout.

        sys.stdout is looked up per record (like awslambdaric) so redirection
        by the user or a test harness is honoured.
        """

        def emit(self, record):
            try:
                sys.stdout.write(self.format(record))
            except Exception:
                self.handleError(record)

    class _JsonFormatter(logging.Formatter):
        """AWS_LAMBDA_LOG_FORMAT=JSON: one JSON object per line, awslambdaric's keys."""

        def format(self, record):
            level = min(50, max(0, record.levelno)) // 10 * 10
            result = {
                "timestamp": _iso_utc_ms(record.created),
                "level": logging.getLevelName(level),
                "message": record.getMessage(),
                "logger": record.name,
                "requestId": getattr(record, "aws_request_id", None),
            }
            if record.exc_info:
                import traceback

                etype, evalue, etb = record.exc_info
                result["stackTrace"] = traceback.format_tb(etb)
                result["errorType"] = etype.__name__ if etype else None
                result["errorMessage"] = str(evalue)
                result["location"] = "%s:%s:%s" % (record.pathname, record.funcName, record.lineno)
            if getattr(record, "tenant_id", None) is not None:
                result["tenantId"] = record.tenant_id
            for key, value in record.__dict__.items():
                if key not in _JSON_RESERVED and key not in result and not key.startswith("_"):
                    result[key] = value
            result = {k: v for k, v in result.items() if v is not None}
            return _json_dumps(result, str, False) + "\n"

    for cls in (_RequestIdFilter, _StdoutHandler, _JsonFormatter):
        cls.__module__ = __name__
        cls.__qualname__ = cls.__name__

    # Global, as AWS does it: users' own formatters also print UTC.
    logging.Formatter.converter = time.gmtime
    handler = _StdoutHandler()
    if _json_log_format:
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(
            logging.Formatter(
                "[%(levelname)s]\t%(asctime)s.%(msecs)03dZ\t%(aws_request_id)s\t%(message)s\n",
                _DATETIME_FORMAT,
            )
        )
    handler.addFilter(_RequestIdFilter())
    root = logging.getLogger()
    root.addHandler(handler)
    if _log_level is not None:
        root.setLevel(_log_level)


class _LoggingLoader:
    """Loader for ``logging`` that configures the root logger after the module ran.

    Wraps the real (stdlib) loader only until the module starts executing:
    the module's ``__loader__`` and ``__spec__.loader`` are the real one by
    the time any of its code runs, so reloads and introspection see nothing
    unusual.
    """

    def __init__(self, loader):
        self._loader = loader

    def __getattr__(self, name):
        return getattr(self._loader, name)

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        loader = self._loader
        spec = getattr(module, "__spec__", None)
        if spec is not None and spec.loader is self:
            spec.loader = loader
        if getattr(module, "__loader__", None) is self:
            module.__loader__ = loader
        loader.exec_module(module)
        _configure_logging(module)


class _StdlibFinder:
    """``sys.meta_path`` hook (first in line) for the modules the runtime used to preload.

    Before the lazy imports, ``json`` and ``logging`` pulled these in at
    startup, before the code directory went first on ``sys.path``, so they
    always came from the stdlib, even when the function ships a same-named
    file (``token.py``, ``string.py``, ...), and the stdlib modules that
    import them kept working. This finder keeps it that way: it resolves
    exactly these top-level names against the startup search path and lets
    everything else through untouched. It also hooks ``logging`` so the
    AWS-style root logger is in place before the importer gets the module.

    It stays installed (one set lookup per module import that misses
    sys.modules) so that it is also right for an import that happens late,
    e.g. ``traceback`` on the first error.
    """

    # The source/extension modules (frozen and built-in ones cannot be
    # shadowed) that ``import json, logging`` loaded on CPython 3.11.
    _NAMES = frozenset(
        (
            "_weakrefset", "collections", "contextlib", "copyreg", "enum",
            "functools", "json", "keyword", "linecache", "logging", "operator",
            "re", "reprlib", "string", "textwrap", "threading", "token",
            "tokenize", "traceback", "types", "warnings", "weakref",
        )
    )

    def __init__(self, path, path_finder):
        self._path = path
        self._find_spec = path_finder.find_spec

    def find_spec(self, fullname, path=None, target=None):
        if path is not None or fullname not in self._NAMES:
            return None
        try:
            spec = self._find_spec(fullname, self._path, target)
        except Exception:
            return None
        if spec is None or spec.loader is None:
            return None
        if fullname == "logging" and not _logging_configured:
            spec.loader = _LoggingLoader(spec.loader)
        return spec

    def invalidate_caches(self):
        pass


def _install_stdlib_finder():
    path_finder = getattr(sys.modules.get("_frozen_importlib_external"), "PathFinder", None)
    if path_finder is None:  # not CPython
        from importlib.machinery import PathFinder as path_finder
    sys.meta_path.insert(0, _StdlibFinder(_STARTUP_PATH, path_finder))


def _format_error_log(error):
    """The ``[ERROR] Type: message\\rTraceback ...`` line AWS logs for failures."""
    if _json_log_format:
        entry = {"timestamp": _iso_utc_ms(time.time()), "level": "ERROR"}
        entry.update(error)
        return _json_dumps(entry) + "\n"
    desc = "[ERROR]"
    etype = error.get("errorType")
    emsg = error.get("errorMessage")
    if etype:
        desc += " " + etype
    if emsg:
        if etype:
            desc += ":"
        desc += " " + emsg
    lines = [desc, "Traceback (most recent call last):"]
    for element in error.get("stackTrace") or ():
        if element == "":
            lines.append("")
            continue
        for line in element.splitlines():
            stripped = line.lstrip(" ")
            lines.append(_ERROR_INDENT * (len(line) - len(stripped)) + stripped)
    return _ERROR_LINE_SEP.join(lines) + "\n"


# --------------------------------------------------------------------------
# Handler loading (init phase)
# --------------------------------------------------------------------------


def _import_module(name):
    """``importlib.import_module(name)`` without importing importlib (~0.5 ms).

    import_module() is a thin wrapper around importlib._bootstrap._gcd_import,
    which is already loaded as _frozen_importlib; only relative names need
    the wrapper's extra handling (they fail with its error message).
    """
    bootstrap = sys.modules.get("_frozen_importlib")
    gcd_import = getattr(bootstrap, "_gcd_import", None)
    if gcd_import is None or name.startswith("."):
        import importlib

        return importlib.import_module(name)
    return gcd_import(name)


def _load_handler(spec):
    """Resolve ``module.function`` to a callable, raising _Fault like AWS."""
    try:
        modname, fname = spec.rsplit(".", 1)
    except ValueError as e:
        raise _Fault(_MALFORMED_HANDLER_NAME, "Bad handler '%s': %s" % (spec, e))
    if not modname or not fname:
        raise _Fault(_MALFORMED_HANDLER_NAME, "Bad handler '%s': empty module or function name" % spec)

    import_name = modname.replace("/", ".")
    try:
        if import_name.split(".")[0] in sys.builtin_module_names:
            raise _Fault(
                _BUILT_IN_MODULE_CONFLICT,
                "Cannot use built-in module %s as a handler module" % modname,
            )
        module = _import_module(import_name)
    except _Fault:
        raise
    except ImportError as e:
        raise _Fault(_IMPORT_MODULE_ERROR, "Unable to import module '%s': %s" % (modname, e))
    except SyntaxError as e:
        trace = ['  File "%s" Line %s\n    %s' % (e.filename, e.lineno, e.text)]
        raise _Fault(
            _USER_CODE_SYNTAX_ERROR, "Syntax error in module '%s': %s" % (modname, e), trace
        )
    except Exception as e:
        # Any other exception raised while the module body runs. awslambdaric
        # would report the exception's own class name, but RIE/gust normalise
        # non-"Runtime.*" types to Runtime.Unknown, so a precise Runtime.*
        # type is more useful; the original class name stays in the message.
        raise _Fault(
            _IMPORT_MODULE_ERROR,
            "Unable to import module '%s': %s" % (modname, _exc_text(e)),
            _user_stack(e.__traceback__),
        )

    try:
        return getattr(module, fname)
    except AttributeError:
        raise _Fault(_HANDLER_NOT_FOUND, "Handler '%s' missing on module '%s'" % (fname, modname))


def _exc_text(e):
    try:
        text = str(e)
    except Exception:
        text = ""
    return text or type(e).__name__


# --------------------------------------------------------------------------
# Invocation loop
# --------------------------------------------------------------------------


def _json_default(obj):
    # boto3/DynamoDB hand out Decimal everywhere and AWS's encoder
    # (simplejson) serialises it as a number; match that without importing
    # decimal at startup: if obj is a Decimal, the module is already loaded.
    dec = sys.modules.get("decimal")
    if dec is not None and isinstance(obj, dec.Decimal):
        if obj.is_finite() and obj == obj.to_integral_value():
            return int(obj)
        return float(obj)
    raise TypeError("Object of type %s is not JSON serializable" % type(obj).__name__)


def _encode_json(result):
    return _json_dumps(result, _json_default)


def _decode_event(body, content_type):
    if content_type:
        media_type = content_type.split(";", 1)[0].strip().lower()
        if media_type != "application/json":
            return body  # raw bytes, as awslambdaric does
    if not body:
        # An invoke without a payload arrives as {} on AWS.
        return {}
    try:
        return _json_loads(body)
    except Exception as e:
        raise _Fault(_UNMARSHAL_ERROR, "Unable to unmarshal input: %s" % e)


def _report_invoke_error(client, request_id, error):
    try:
        sys.stdout.write(_format_error_log(error))
    except Exception:
        pass
    _flush_std_streams()
    client.post_error(request_id, error)


def _serve(client, handler):
    global _request_id, _tenant_id
    environ = os.environ
    next_invocation = client.next_invocation
    post_response = client.post_response

    while True:
        headers, body = next_invocation()
        get = headers.get

        request_id = get("lambda-runtime-aws-request-id")
        if not request_id:
            # Without an id nothing can be posted back; gust will time the
            # invoke out. Skip rather than crash the instance.
            _stderr("gust python runtime: /next response without Lambda-Runtime-Aws-Request-Id")
            continue
        _request_id = request_id
        tenant_id = get("lambda-runtime-aws-tenant-id")
        _tenant_id = tenant_id

        # The AWS X-Ray SDK (and others) read the trace header from the env.
        # Trace ids differ on every invoke, so set without comparing first.
        trace_id = get("lambda-runtime-trace-id")
        if trace_id:
            environ["_X_AMZN_TRACE_ID"] = trace_id
        elif "_X_AMZN_TRACE_ID" in environ:
            del environ["_X_AMZN_TRACE_ID"]

        try:
            try:
                deadline_ms = int(get("lambda-runtime-deadline-ms") or 0)
            except ValueError:
                deadline_ms = 0
            context = LambdaContext(
                request_id,
                deadline_ms,
                get("lambda-runtime-invoked-function-arn"),
                get("lambda-runtime-client-context"),
                get("lambda-runtime-cognito-identity"),
                tenant_id,
            )
            event = _decode_event(body, get("content-type"))
        except _Fault as fault:
            _report_invoke_error(client, request_id, _error_from_fault(fault, request_id))
            continue

        # Only Exception: SystemExit/KeyboardInterrupt from user code end the
        # process, which gust reports as Runtime.ExitError (as on AWS).
        try:
            result = handler(event, context)
        except Exception as exc:
            _report_invoke_error(client, request_id, _error_from_exception(exc, request_id))
            continue

        try:
            if isinstance(result, (bytes, bytearray, memoryview)):
                # awslambdaric returns bytes verbatim rather than failing.
                payload = bytes(result)
                content_type = "application/unknown"
            else:
                payload = _encode_json(result).encode("utf-8")
                content_type = "application/json"
        except Exception as exc:
            fault = _Fault(_MARSHAL_ERROR, "Unable to marshal response: %s" % _exc_text(exc))
            _report_invoke_error(client, request_id, _error_from_fault(fault, request_id))
            continue

        _flush_std_streams()
        post_response(request_id, payload, content_type)


# --------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------


def _setup_sys_path():
    # `python3 bootstrap.py` puts the runtime's own directory first on
    # sys.path; user modules must not resolve there (think a user module
    # named "bootstrap"), and the code directory must win over everything.
    here = os.path.dirname(_THIS_FILE)
    if sys.path:
        try:
            if os.path.realpath(sys.path[0] or ".") == os.path.realpath(here):
                del sys.path[0]
        except OSError:
            pass
    # gust starts the interpreter with -S: processing site-packages' .pth files
    # costs tens of ms per cold start on many hosts (pyenv, venvs with
    # editable installs). The installed packages stay importable: their
    # directories are appended here, after the code directory and the stdlib,
    # without running .pth files (Lambda functions bundle their own deps).
    if sys.flags.no_site:
        import site

        extra = list(site.getsitepackages())
        user = site.getusersitepackages()
        if isinstance(user, str):
            extra.append(user)
        for d in extra:
            if d not in sys.path and os.path.isdir(d):
                sys.path.append(d)
    task_root = os.environ.get("LAMBDA_TASK_ROOT") or os.getcwd()
    if task_root in sys.path:
        sys.path.remove(task_root)
    sys.path.insert(0, task_root)


def _runtime_client(warm=None):
    # Removed from the environment so the function's code never sees it.
    unix_path = os.environ.pop("GUST_RUNTIME_API_SOCKET", None)
    client = RuntimeAPIClient(os.environ.get("AWS_LAMBDA_RUNTIME_API") or "127.0.0.1:9001", unix_path)
    if warm is not None:
        # Keep the connection the specialize request used when the function's
        # environment names the same Runtime API (gust passes it again).
        if (warm._unix, warm._addr, warm._host_line) == (unix_path, client._addr, client._host_line):
            return warm
        warm._close()
    return client


def _specialize():
    """GUST_PREWARM=1: wait for gust to assign a function, then become its runtime.

    Everything that does not depend on the function is loaded first; the
    request then blocks (possibly forever). The answer is
    ``{"env": {...}, "task_root": "..."}``: the environment is replaced by
    ``env`` and the working directory becomes ``task_root``, so that main()
    reads everything else from the function's environment as a normal start
    does. Exits 1 if gust discards the sandbox instead. Returns the client
    the request went out on.
    """
    global _logging_configured
    # Imported now rather than lazily during the function's init (see the
    # module docstring). _setup_logging() configures the root logger later,
    # from the function's environment; the flag stops _StdlibFinder from
    # doing it now.
    _logging_configured = True
    import importlib
    import json
    import logging
    import site
    import traceback
    _logging_configured = False

    client = _runtime_client()
    head = (
        "GET %s/gust/specialize HTTP/1.1\r\n%s\r\n" % (_RUNTIME_PREFIX, client._host_line)
    ).encode("latin-1")
    try:
        client._connect()
        status, _headers, body = client._roundtrip(head, None)
    except (OSError, _ConnectionLost, ValueError):
        status = 0
    if status != 200:
        _exit(1)
    try:
        spec = _json_loads(body)
        env = spec["env"]
        os.environ.clear()
        os.environ.update(env)
        time.tzset()
        if spec.get("task_root"):
            os.chdir(spec["task_root"])
    except Exception as e:
        _stderr("gust python runtime: cannot specialize: %s" % _exc_text(e))
        _exit(1)
    # The interpreter read PYTHONPATH at startup, from the sandbox's
    # environment: put the function's entries where they would have gone
    # (after the runtime's directory, before the stdlib).
    pythonpath = os.environ.get("PYTHONPATH")
    if pythonpath:
        entries = [os.path.abspath(p) for p in pythonpath.split(os.pathsep)]
        sys.path[1:1] = entries
        _STARTUP_PATH[1:1] = entries
    return client


def _blocking_stdio():
    # Back-pressure: writes to a full pipe wait for gust to read (never EAGAIN, which
    # print() would raise and a logging handler would swallow). The pipes are blocking
    # unless something in the process changed them; make sure.
    for fd in (1, 2):
        try:
            os.set_blocking(fd, True)
        except OSError:
            pass


def main():
    _blocking_stdio()
    _install_stdlib_finder()
    warm = _specialize() if os.environ.get("GUST_PREWARM") == "1" else None
    _setup_sys_path()
    _load_static_context()
    _setup_logging()

    client = _runtime_client(warm)

    # awslambdaric takes the handler from argv[1]; accept that too.
    spec = sys.argv[1] if len(sys.argv) > 1 and sys.argv[1] else os.environ.get("_HANDLER", "")
    try:
        handler = _load_handler(spec)
    except _Fault as fault:
        error = _error_from_fault(fault)
    except Exception as exc:  # defensive: a bug in _load_handler itself
        error = _error_from_exception(exc)
    else:
        error = None

    if error is not None:
        _stderr(_format_error_log(error).rstrip("\n"))
        _flush_std_streams()
        try:
            client.post_init_error(error)
        except _RuntimeAPIGone:
            pass  # nobody to tell; the exit code still says "init failed"
        _exit(1)

    try:
        _serve(client, handler)
    except _RuntimeAPIGone:
        # gust went away (instance torn down, or gust itself stopped): this
        # is a normal end of life, not a crash.
        _exit(0)


if __name__ == "__main__":
    main()
