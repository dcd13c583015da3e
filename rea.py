#!/usr/bin/env python3
"""rea.py — a governance gateway for the Model Context Protocol, in one stdlib-only file.

Point your MCP client at ``python rea.py serve`` instead of at your MCP servers. The
gateway starts the servers listed in ``.rea/registry.yaml``, shows the client all of
their tools as ``server__tool``, and puts every tool call through the policy of
``.rea/policy.yaml``, a per-server circuit breaker and a hash-chained audit log
(``.rea/audit.jsonl``). ``python rea.py status`` shows, from any other terminal, what
the running gateway and each server are doing. Python rebuild of the gateway of the
TypeScript tool ``rea`` (npm ``@bookedsolid/rea`` 0.9.x), file-compatible with it.

The file reads bottom-up: each section uses only the sections above it. Its map,
one line per banner:

    Prelude                 errors, the closed sets (StrEnums), logging to stderr, atomic writes
    Command line            the one argparse tree every command parses its words with
    YAML subset             the strict parser for .rea/*.yaml
    Configuration records   Registry, ServerSpec, Policy: frozen, validated once at load
    User regular expressions
                            load checks of redact.patterns (no nested quantifiers)
    Child environment       ${VAR} expansion and the allowlisted environment of a child
    Configuration loading   registry and policy files into records, errors as file:line:col;
                            the URL and header checks of a remote server
    Configuration as JSON   `check --json`
    Tiers and autonomy      a tool's tier from its name, annotations and overrides
    Blocked paths           PathGuard: every string argument read as a path, every way
    Secret redaction        built-in and user secret patterns over any JSON value
    Prompt injection        the phrase scan, NFKC-folded, inside base64 too
    Result size cap         max_result_kb with a visible notice
    Audit log               hash chain, flock, group commit, rotation, the head file
    Audit verify            walking the chain across files
    Audit command           `audit verify | rotate | tail`
    Breaker and session blocker
                            CircuitBreaker (tickets with epochs), SessionBlocker
    Live state              serve.state.json: debounced atomic writes, one owner
    Status command          DownstreamStatus, ServeState and `status`
    Trust on first use      fingerprints of servers and tools
    `rea.py trust`          showing what changed and re-pinning it
    Echo server, Bench client, Bench measurements, Bench command
                            `bench`: the gateway against a direct connection
    init                    `init` from .mcp.json and Claude Desktop configs
    Metrics                 the Prometheus endpoint
    Protocol                JSON-RPC, the two MCP eras, Timeouts
    Tool names              `server__tool`, shortened when too long
    Transports              Transport; ChildProcess (reader, writer, stderr threads); Deadlines
    Remote transport        StreamableHttpTransport: a remote server over Streamable HTTP (§13)
    OAuth                   discovery, `login` with PKCE, TokenStore, TokenSource, refresh, `logout`
    Downstream and supervisor
                            one server: start, era probe, tools, trust, restarts
    Call pipeline           CallView, the steps, CallLimiter, Permit, Outcome, result checks
    Configuration in force  ConfigWatch: policy, registry and HALT while serving
    Client wire             ClientWire: stdin framing, stdout, open requests, our requests
    Session and catalog     Session (eras per request), Catalog (one frozen view)
    Calls                   Call, AuditTrail, InputBridge, Calls: the one lifecycle and finish
    Relay                   a server's own notifications and requests to the client
    Gateway                 WorkerPool, Downstreams, TaskRequests (tasks/*), and the Gateway,
                            the composition root; health_report
    Commands                serve, check, freeze, unfreeze, login, logout, probing for trust
    main                    the dispatch of the command line

Threads, each with one job and a name: ``rea-stdin`` reads the client; per child
``rea-child-NAME`` reads its stdout, ``rea-write-NAME`` writes its stdin from a queue and
``rea-stderr-NAME`` drains its stderr; per remote server ``rea-http-NAME-N`` send its
requests (at most 8 at once), its notifications (one sender) and read its GET stream;
``rea-worker-N`` run requests that wait for servers or the client, ``rea-audit-N`` a
call's outcome under a durable audit mode; ``rea-timeouts`` expires every
deadline and looks for a `login` of a server that needs one; ``rea-start-NAME``,
``rea-restart-NAME`` and ``rea-stop-NAME`` start and stop servers; ``rea-state-timer``
writes the live state; ``rea-audit-head`` the audit head, and ``rea-audit-hold`` gives
back the audit log's lock a busy gateway keeps; ``login`` waits for the browser's redirect on
``rea-login-callback``, and ``rea-oauth-deadline`` ends an authorization server's answer
that is too slow. Every one is joined or idle at exit. stdout carries only JSON-RPC;
every log line goes to stderr as JSON.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import bisect
import collections
import contextlib
import dataclasses
import datetime as _dt
import errno
import fcntl
import fnmatch
import hashlib
import importlib
import itertools
import json
import math
import os
import queue
import random
import re
import secrets
import select
import signal
import stat
import subprocess
import sys
import threading
import time
import unicodedata
import urllib.parse
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, NoReturn, Protocol, TextIO, TypeVar
from urllib.parse import unquote

if TYPE_CHECKING:  # imported where used: a `serve` of local servers never loads them (~30 ms)
    import http.client
    import http.server
    import socket

# Prelude #######################################################################

VERSION = "0.1.0"
REA_DIR = ".rea"
ZERO_HASH = "0" * 64
SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")

# JSON values once parsed: the boundary type. Parse into typed records right there.
JSON = object


class ReaError(Exception):
    """An error the user can cause and fix. str(err) is one line: file, place, fix."""


# The closed sets every section shares. StrEnum members are their strings: they compare
# equal to them and are written to JSON as them.


class Tier(StrEnum):
    """What a tool may do (§6 step 4)."""

    READ = "read"
    WRITE = "write"
    DESTRUCTIVE = "destructive"


class AuditStatus(StrEnum):
    """The `status` of an audit record (§7)."""

    ALLOWED = "allowed"
    DENIED = "denied"
    ERROR = "error"


class FsyncMode(StrEnum):
    """`audit.fsync` (§7): durable before the answer, by group commit, or left to the OS."""

    ALWAYS = "always"
    BATCH = "batch"
    OFF = "off"


class CircuitState(StrEnum):
    """A server's circuit breaker (§9)."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half-open"


class BreakerVerdict(StrEnum):
    """What a finished call tells its server's circuit."""

    SUCCESS = "success"  # the server answered (an isError result included)
    FAILURE = "failure"  # an error, a timeout, a dead server
    UNUSED = "unused"  # the call never tested the server (refused, cancelled, stopped)


_log_lock = threading.Lock()  # guards: one whole line per write to stderr


LOG_LEVELS = {"debug": 10, "info": 20, "warn": 30, "warning": 30, "error": 40}
# REA_LOG_LEVEL: debug | info (default) | warn | error; lines below it are not written.
_LOG_THRESHOLD = LOG_LEVELS.get(os.environ.get("REA_LOG_LEVEL", "info").strip().lower(), 20)


def log(level: str, event: str, **fields: object) -> None:
    """Write one structured log line (a JSON object) to stderr. Never to stdout."""
    if LOG_LEVELS.get(level, 40) < _LOG_THRESHOLD:
        return
    line = json.dumps(
        {"ts": utc_now_iso(), "level": level, "event": event, **fields},
        ensure_ascii=False,
        default=str,
    )
    with _log_lock:
        try:
            sys.stderr.write(line + "\n")
            sys.stderr.flush()
        except (OSError, ValueError):
            pass  # a closed stderr must never break the gateway


def log_bug(where: str, exc: BaseException, **fields: object) -> None:
    """A bug caught so that a thread, a server or the session survives it: logged by the
    exception's type only, since its text can hold anything a call or a server carried."""
    log("error", "internal_error", where=where, error=type(exc).__name__, **fields)


_LONE_SURROGATE = re.compile("[\ud800-\udfff]")
# Encoders made once: json.dumps with options builds a new encoder at every call, and these
# run several times per call. Compact and raw UTF-8, as every line the gateway writes.
COMPACT_JSON = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))
SORTED_JSON = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), sort_keys=True)
_CANONICAL_JSON = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), default=str)


def escape_lone_surrogates(json_text: str) -> str:
    """JSON text with each lone surrogate (a JS string cut mid-emoji: it can only sit in
    a string) written as its \\uXXXX escape, so that the text is valid UTF-8."""
    if _LONE_SURROGATE.search(json_text) is None:
        return json_text
    return _LONE_SURROGATE.sub(lambda m: f"\\u{ord(m.group()):04x}", json_text)


def random_uuid() -> str:
    """A random (version 4) UUID as uuid.uuid4() prints it, without loading uuid (and
    platform): every gateway start makes one."""
    raw = bytearray(os.urandom(16))
    raw[6] = raw[6] & 0x0F | 0x40  # version 4
    raw[8] = raw[8] & 0x3F | 0x80  # RFC 4122 variant
    h = raw.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def utc_now_iso() -> str:
    """ISO-8601 UTC with milliseconds and a Z, as the audit log's `timestamp`."""
    now = time.time()  # gmtime and %-formatting: a third of datetime.strftime's cost
    t = time.gmtime(now)
    millis = int(now * 1000) % 1000
    return "%04d-%02d-%02dT%02d:%02d:%02d.%03dZ" % (  # noqa: UP031 (faster than format)
        t.tm_year,
        t.tm_mon,
        t.tm_mday,
        t.tm_hour,
        t.tm_min,
        t.tm_sec,
        millis,
    )


def fsync_dir(path: Path) -> None:
    """fsync a directory so that a rename inside it is durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Write a file so that a reader sees the old or the new bytes, never a part.

    Temp file in the same folder, mode, fsync, os.replace, fsync of the folder. A link
    planted at the temp file's name is not followed (OSError).
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, mode)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fsync_dir(path.parent)


class HeldOutput:
    """What a thread writes while it handles a burst of messages, held and written when
    the burst ends: the audit records of a child's burst of answers in one append, then
    the answers in one write to stdout, instead of one each per message (§12). Holders
    are flushed stage by stage (RECORDS, before the ANSWERS they record),
    each holder once with everything it held, in order. Outside a burst, nothing is held.

    Only a thread that never waits inside a burst may open one (a child's reader): held
    output must not be what it waits for. Work it hands to another thread is handed on
    after a `flush`: what that thread writes must not overtake what was held before."""

    RECORDS, ANSWERS = 0, 1  # the stages, in the order they are written
    _local = threading.local()

    @classmethod
    @contextlib.contextmanager
    def burst(cls) -> Iterator[None]:
        if getattr(cls._local, "held", None) is not None:
            yield  # nested: the outer burst writes
            return
        cls._local.held = []
        try:
            yield
        finally:
            held, cls._local.held = cls._local.held, None
            cls._write(held)

    @classmethod
    def flush(cls) -> None:
        """Write what this thread holds now; its burst goes on."""
        held = getattr(cls._local, "held", None)
        if held:
            cls._local.held = []
            cls._write(held)

    @staticmethod
    def _write(held: list[tuple[int, Callable[[list[Any]], None], object]]) -> None:
        groups: dict[tuple[int, Callable[[list[Any]], None]], list[object]] = {}
        for stage, flush, item in held:
            groups.setdefault((stage, flush), []).append(item)
        for (_, flush), items in sorted(groups.items(), key=lambda group: group[0][0]):
            try:
                flush(items)
            except Exception as exc:  # one holder's failure must not cost the others
                log_bug("held_output", exc)

    @classmethod
    def hold(cls, stage: int, flush: Callable[[list[Any]], None], item: object) -> bool:
        """Hold `item` for `flush` if this thread is in a burst; False (nothing held) if not."""
        held = getattr(cls._local, "held", None)
        if held is None:
            return False
        held.append((stage, flush, item))
        return True


def gateway_launch(rea_path: Path, root: Path) -> dict[str, object]:
    """How a client should start the gateway (its `.mcp.json` entry).

    `python3 rea.py` compiles the whole file at every start (~100 ms); importing it as
    a module loads the bytecode cached beside it instead, so the client's command
    imports rea from its folder. No PYTHONPATH: that would leak into every child. `-S`:
    rea needs nothing from site-packages, and not loading `site` saves ~40 ms a start.
    """
    code = f"import sys; sys.path.insert(0, {str(rea_path.parent)!r}); import rea; sys.exit(rea.main())"
    return {"command": "python3", "args": ["-S", "-c", code, "serve", "--root", str(root)]}


def warm_bytecode_cache(rea_path: Path) -> None:
    """Write rea.py's cached bytecode if missing or stale, so the next start is fast.

    Python does this itself on import unless PYTHONDONTWRITEBYTECODE is set; a folder
    we cannot write to just means slower starts.
    """
    import importlib.util
    import py_compile

    try:
        cache = Path(importlib.util.cache_from_source(str(rea_path)))
        if cache.exists() and cache.stat().st_mtime >= rea_path.stat().st_mtime:
            return
        py_compile.compile(str(rea_path), cfile=str(cache), doraise=True)
    except (OSError, py_compile.PyCompileError, ValueError):
        pass


# Command line ##################################################################
#
# Every command's words and options, in one argparse tree (§11). Each command parses
# its words with it; `main` at the bottom dispatches. A usage mistake is one ReaError
# line, never argparse's usage dump and exit.


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage mistake as one ReaError line."""

    def error(self, message: str) -> NoReturn:
        message = message.replace("unrecognized arguments:", "unknown argument")
        raise ReaError(f"{self.prog}: {message} (see `python {self.prog} --help`)")


def _count(least: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        if not text.isdigit() or int(text) < least:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number >= {least}")
        return int(text)

    return parse


def command_line() -> _Parser:
    """The one argparse tree that parses every command."""
    parser = _Parser(prog="rea.py", add_help=False, description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--version", action="store_true", help="print the version")
    parser.add_argument("-h", "--help", action="store_true", help="show this help")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser, metavar="COMMAND")

    def add(words: Any, name: str, text: str) -> _Parser:
        command: _Parser = words.add_parser(name, help=text, description=text)
        # after the command's own words, like any other option (§11)
        command.add_argument(
            "--root", metavar="DIR", default=argparse.SUPPRESS, help="the project root"
        )
        return command

    add(sub, "serve", "run the gateway on stdin/stdout (point your MCP client here)")
    status = add(sub, "status", "what the running gateway and each server are doing")
    status.add_argument("--json", action="store_true", help="one JSON object")
    status.add_argument("--watch", action="store_true", help="refresh every second")
    check = add(sub, "check", "validate .rea/ files and print the resolved registry and policy")
    check.add_argument("--json", action="store_true", help="one JSON object")
    init = add(sub, "init", "create .rea/ (policy, registry); import a client config")
    init.add_argument("--from", dest="source", metavar="PATH", help="a .mcp.json or Claude config")
    init.add_argument("--write", action="store_true", help="rewrite PATH to route through rea")
    audit = add(sub, "audit", "verify, rotate or show the audit log")
    audit_words = audit.add_subparsers(
        dest="audit_command", parser_class=_Parser, metavar="WORD", required=True
    )
    verify = add(audit_words, "verify", "check the hash chain across every file")
    verify.add_argument("--json", action="store_true", help="one JSON object")
    add(audit_words, "rotate", "start a new audit file now")
    tail = add(audit_words, "tail", "print the last records")
    tail.add_argument("-n", "--lines", type=_count(0), default=10, metavar="N", help="how many")
    freeze = add(sub, "freeze", "refuse every tool call (kill switch: .rea/HALT)")
    freeze.add_argument("--reason", metavar="TEXT", help="why; quoted in every refusal")
    add(sub, "unfreeze", "allow tool calls again")
    trust = add(sub, "trust", "accept a server's changed definition or tools (re-pin them)")
    trust.add_argument("server", nargs="?", metavar="SERVER")
    trust.add_argument("--tool", metavar="NAME", help="re-pin this one tool only")
    trust.add_argument("-y", "--yes", action="store_true", help="accepted for scripts")
    trust.add_argument("--dry-run", action="store_true", help="show what changed, pin nothing")
    trust.add_argument("--reason", metavar="TEXT", help="why; kept in the audit record")
    login = add(sub, "login", "log in to a remote server (OAuth) and save its tokens in .rea/")
    login.add_argument("server", metavar="SERVER")
    login.add_argument(
        "--no-browser", action="store_true", help="print the login URL instead of opening it"
    )
    logout = add(sub, "logout", "revoke a remote server's tokens and delete them from .rea/")
    logout.add_argument("server", metavar="SERVER")
    bench = add(sub, "bench", "measure the gateway's added latency and throughput here")
    bench.add_argument("--calls", type=_count(1), default=2000, metavar="N")
    bench.add_argument("--warmup", type=_count(0), default=200, metavar="N")
    bench.add_argument("--fsync", choices=[m.value for m in FsyncMode], default="off")
    bench.add_argument("--delay-ms", metavar="MS", default="0", help="the echo server's work")
    bench.add_argument("--server", metavar="NAME", help="bench a server of the registry")
    bench.add_argument("--tool", metavar="T")
    bench.add_argument("--args", metavar="JSON")
    bench.add_argument("--json", action="store_true", help="one JSON object")
    return parser


def parse_command(words: list[str]) -> argparse.Namespace:
    """Parse one command line (its first word is the command) with the one tree."""
    return command_line().parse_args(words)


# YAML subset ######################################################################
#
# The standard library has no YAML parser, so rea carries a small strict one for the
# subset that .rea/ files use (SPEC §2), resolving scalars by the YAML 1.2 core
# schema as the reference tool's parser does. Whatever lies outside the subset is
# refused with `file:line:column: what is wrong`, never guessed at: a config file
# that means something other than what its author thinks is a security problem.

_NULLS = frozenset({"~", "null", "Null", "NULL", ""})
_TRUES = frozenset({"true", "True", "TRUE"})
_FALSES = frozenset({"false", "False", "FALSE"})
_INT_DEC = re.compile(r"[-+]?[0-9]+")
_INT_OCT = re.compile(r"0o[0-7]+")
_INT_HEX = re.compile(r"0x[0-9a-fA-F]+")
_FLOAT = re.compile(r"[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?")
_INF = re.compile(r"[-+]?\.(?:inf|Inf|INF)")
_NAN = re.compile(r"\.(?:nan|NaN|NAN)")

_FLOW_INDICATORS = ",[]{}"
_SIMPLE_ESCAPES = {
    "0": "\0",
    "a": "\a",
    "b": "\b",
    "t": "\t",
    "\t": "\t",
    "n": "\n",
    "v": "\v",
    "f": "\f",
    "r": "\r",
    "e": "\x1b",
    " ": " ",
    '"': '"',
    "/": "/",
    "\\": "\\",
    "N": "\x85",
    "_": "\xa0",
    "L": "\u2028",
    "P": "\u2029",
}
_HEX_ESCAPES = {"x": 2, "u": 4, "U": 8}


def parse_yaml(text: str, filename: str) -> object:
    """Parse the YAML subset of SPEC §2 into dict / list / str / int / float / bool / None."""
    return parse_yaml_located(text, filename)[0]


def parse_yaml_located(text: str, filename: str) -> tuple[object, dict[str, tuple[int, int]]]:
    """Parse, and say where each block key and entry stands: `servers[1].name` -> (line, col).

    Validation errors name a key path; this lets them name the line and column too.
    """
    parser = _YamlParser(text, filename)
    try:
        value = parser.document()
    except RecursionError:
        raise ReaError(f"{filename}: nested too deeply to be a config file") from None
    located: dict[str, tuple[int, int]] = {}
    stack: list[tuple[object, str]] = [(value, "")]
    while stack:
        node, path = stack.pop()
        items: list[tuple[object, object, str]] = []
        if isinstance(node, dict):
            items = [(k, v, f"{path}.{k}" if path else str(k)) for k, v in node.items()]
        elif isinstance(node, list):
            items = [(i, v, f"{path}[{i}]") for i, v in enumerate(node)]
        for key, sub, sub_path in items:
            position = parser.positions.get((id(node), key))
            if position is not None:
                located[sub_path] = position
            stack.append((sub, sub_path))
    return value, located


_LAST_PLACE_STEP = re.compile(r"(\.[^.\[]+|\[\d+\])$")


def _locate(err: ReaError, filename: str, located: Mapping[str, tuple[int, int]]) -> ReaError:
    """`file: servers[1].name: …` becomes `file:LINE:COL: servers[1].name: …`, at the key
    itself or, when it is missing, at the nearest entry that holds it."""
    message = str(err)
    prefix = f"{filename}: "
    if not message.startswith(prefix):
        return err
    rest = message[len(prefix) :]
    place = rest.partition(": ")[0]
    while place:
        if place in located:
            line, col = located[place]
            return ReaError(f"{filename}:{line}:{col}: {rest}")
        shorter = _LAST_PLACE_STEP.sub("", place)
        if shorter == place:
            break
        place = shorter
    return err


def _resolve_plain(text: str) -> object:
    """Give a plain scalar its YAML 1.2 core-schema type (`yes`, `on`, dates stay str)."""
    if text in _NULLS:
        return None
    if text in _TRUES:
        return True
    if text in _FALSES:
        return False
    if _INT_DEC.fullmatch(text):
        return int(text, 10)
    if _INT_OCT.fullmatch(text):
        return int(text[2:], 8)
    if _INT_HEX.fullmatch(text):
        return int(text[2:], 16)
    if _FLOAT.fullmatch(text):
        return float(text)
    if _INF.fullmatch(text):
        return -math.inf if text.startswith("-") else math.inf
    if _NAN.fullmatch(text):
        return math.nan
    return text


class _YamlParser:
    """One pass over one document. Positions are (line index, column), both 0-based."""

    def __init__(self, text: str, filename: str) -> None:
        self.filename = filename
        if text.startswith("\ufeff"):
            text = text[1:]  # a byte-order mark is not content
        self.lines = [line.removesuffix("\r") for line in text.split("\n")]
        # where each block key / entry starts, by (id(container), key or index): 1-based
        self.positions: dict[tuple[int, object], tuple[int, int]] = {}

    # errors and line classification

    def error(self, i: int, col: int, what: str) -> ReaError:
        return ReaError(f"{self.filename}:{i + 1}:{col + 1}: {what}")

    def is_content(self, i: int) -> bool:
        stripped = self.lines[i].lstrip(" \t")
        return bool(stripped) and not stripped.startswith("#")

    def next_content(self, i: int) -> int:
        """The index of the first content line at or after i (len(lines) if none)."""
        while i < len(self.lines) and not self.is_content(i):
            i += 1
        return i

    def indent(self, i: int) -> int:
        """Indentation of content line i; -1 at the end or at a document marker."""
        if i >= len(self.lines) or self.is_doc_marker(i):
            return -1
        line = self.lines[i]
        n = len(line) - len(line.lstrip(" "))
        if line[n] == "\t":
            raise self.error(i, n, "tab in indentation; indent with spaces only")
        return n

    def is_doc_marker(self, i: int) -> bool:
        line = self.lines[i]
        return line[:3] in ("---", "...") and (len(line) == 3 or line[3] in " \t")

    def rest_is_blank(self, i: int, col: int) -> None:
        """After a value, only whitespace or a comment may follow on the line."""
        line = self.lines[i]
        j = col
        while j < len(line) and line[j] in " \t":
            j += 1
        if j == len(line):
            return
        if line[j] == "#" and j > col:
            return
        if line[j] == "#":
            raise self.error(i, j, "a comment needs a space before '#'")
        if line[j] == ":":
            raise self.error(i, j, "unexpected ':'; only plain or quoted scalars can be keys")
        raise self.error(i, j, f"unexpected text {line[j:].rstrip()!r} after the value")

    # document and block structure

    def document(self) -> object:
        i = self.next_content(0)
        if i < len(self.lines) and self.lines[i].startswith("---") and self.is_doc_marker(i):
            self.rest_is_blank(i, 3)
            i = self.next_content(i + 1)
        value: object = None
        if i < len(self.lines) and not self.is_doc_marker(i):
            start = self.indent(i)
            value, i = self.node(i, start, -1)
            i = self.next_content(i)
        if i < len(self.lines):
            if self.lines[i].startswith("..."):
                self.rest_is_blank(i, 3)
                i = self.next_content(i + 1)
                if i >= len(self.lines):
                    return value
            if self.lines[i].startswith("---") and self.is_doc_marker(i):
                raise self.error(i, 0, "a second document; only one document per file")
            raise self.error(i, self.indent(i), "unexpected content after the document's value")
        return value

    def node(self, i: int, col: int, parent: int) -> tuple[object, int]:
        """Parse the node starting at (i, col), inside a block whose indent is `parent`.

        Returns the value and the index of the line after the last consumed one.
        """
        if self.is_seq_entry(i, col):
            return self.block_sequence(i, col, under_key=False)
        if self.key_end(i, col) is not None:
            return self.block_mapping(i, col)
        value, i, end = self.inline_value(i, col, parent)
        self.rest_is_blank(i, end)
        nxt = self.next_content(i + 1)
        if self.indent(nxt) > parent:
            what = "unexpected indentation" if parent >= 0 else "unexpected content"
            raise self.error(
                nxt,
                self.indent(nxt),
                f"{what} (multi-line plain scalars are not supported; "
                "put the value on one line or quote it)",
            )
        return value, i + 1

    def is_seq_entry(self, i: int, col: int) -> bool:
        line = self.lines[i]
        return line[col] == "-" and (col + 1 == len(line) or line[col + 1] in " \t")

    def block_sequence(self, i: int, n: int, under_key: bool) -> tuple[list[object], int]:
        items: list[object] = []
        while True:
            self.positions[(id(items), len(items))] = (i + 1, n + 1)
            line = self.lines[i]
            j = n + 1
            while j < len(line) and line[j] in " \t":
                j += 1
            if j == len(line) or line[j] == "#":
                nxt = self.next_content(i + 1)
                if self.indent(nxt) > n:
                    value, i = self.node(nxt, self.indent(nxt), n)
                else:
                    value, i = None, i + 1
            else:
                value, i = self.node(i, j, n)
            items.append(value)
            i = self.next_content(i)
            m = self.indent(i)
            if m < n:
                return items, i
            if m > n:
                raise self.error(i, m, f"bad indentation: expected column {n + 1}")
            if not self.is_seq_entry(i, n):
                if under_key:
                    return items, i
                raise self.error(i, n, "expected a '- ' sequence entry at this indentation")

    def key_end(self, i: int, col: int) -> tuple[str, int] | None:
        """If a `key:` starts at (i, col), return the key and the column after its ':'."""
        line = self.lines[i]
        c = line[col]
        if c in "\"'":
            key, end = self.quoted(i, col)
            j = end
            while j < len(line) and line[j] in " \t":
                j += 1
            if j < len(line) and line[j] == ":" and (j + 1 == len(line) or line[j + 1] in " \t"):
                return key, j + 1
            return None
        if c in "[{":
            return None
        j = col
        while j < len(line):
            ch = line[j]
            if ch == "#" and j > col and line[j - 1] in " \t":
                return None
            if ch == ":" and (j + 1 == len(line) or line[j + 1] in " \t"):
                key = line[col:j].rstrip(" \t")
                if not key:
                    raise self.error(i, col, "a mapping key is empty")
                self.check_plain_start(i, col, flow=False)
                return key, j + 1
            j += 1
        return None

    def block_mapping(self, i: int, n: int) -> tuple[dict[str, object], int]:
        result: dict[str, object] = {}
        first_line: dict[str, int] = {}
        while True:
            if self.is_seq_entry(i, n):
                raise self.error(i, n, "expected 'key: value', found a '- ' sequence entry")
            found = self.key_end(i, n)
            if found is None:
                raise self.error(i, n, "expected 'key: value'")
            key, after = found
            if key == "<<" and self.lines[i][n] == "<":
                raise self.error(i, n, "merge keys '<<' are not supported; write the keys out")
            if key in result:
                raise self.error(
                    i, n, f"duplicate key {key!r} (first at line {first_line[key] + 1})"
                )
            first_line[key] = i
            self.positions[(id(result), key)] = (i + 1, n + 1)
            line = self.lines[i]
            j = after
            while j < len(line) and line[j] in " \t":
                j += 1
            value: object
            if j == len(line) or line[j] == "#":
                nxt = self.next_content(i + 1)
                m = self.indent(nxt)
                if m > n:
                    value, i = self.node(nxt, m, n)
                elif m == n and self.is_seq_entry(nxt, n):
                    value, i = self.block_sequence(nxt, n, under_key=True)
                else:
                    value, i = None, i + 1
            else:
                value, i = self.node_inline_only(i, j, n)
            result[key] = value
            i = self.next_content(i)
            m = self.indent(i)
            if m < n:
                return result, i
            if m > n:
                raise self.error(i, m, f"bad indentation: expected column {n + 1}")

    def node_inline_only(self, i: int, col: int, parent: int) -> tuple[object, int]:
        """A value on the same line as its key: a scalar or a flow collection."""
        if self.is_seq_entry(i, col):
            raise self.error(i, col, "a block sequence cannot start on the line of its key")
        if self.key_end(i, col) is not None:
            raise self.error(i, col, "a nested mapping cannot start on the line of its key")
        return self.node(i, col, parent)

    # scalars and flow collections

    def inline_value(self, i: int, col: int, parent: int) -> tuple[object, int, int]:
        """A scalar or flow collection at (i, col); returns value, end line, end column."""
        c = self.lines[i][col]
        if c in "[{":
            return self.flow(i, col, parent)
        if c in "\"'":
            text, end = self.quoted(i, col)
            return text, i, end
        self.check_plain_start(i, col, flow=False)
        line = self.lines[i]
        j = col
        while j < len(line):
            ch = line[j]
            if ch == "#" and j > col and line[j - 1] in " \t":
                break
            if ch == ":" and (j + 1 == len(line) or line[j + 1] in " \t"):
                raise self.error(i, j, "a mapping value is not allowed here; quote the text")
            j += 1
        text = line[col:j].rstrip(" \t")
        return _resolve_plain(text), i, col + len(text)

    def check_plain_start(self, i: int, col: int, flow: bool) -> None:
        line = self.lines[i]
        c = line[col]
        nxt = line[col + 1] if col + 1 < len(line) else " "
        quote_it = "; quote the value if you meant the text"
        if c == "&":
            raise self.error(i, col, "anchors ('&') are not supported" + quote_it)
        if c == "*":
            raise self.error(i, col, "aliases ('*') are not supported" + quote_it)
        if c == "!":
            raise self.error(i, col, "tags ('!') are not supported" + quote_it)
        if c in "|>":
            raise self.error(i, col, f"block scalars ('{c}') are not supported" + quote_it)
        if c in "%@`":
            raise self.error(i, col, f"'{c}' cannot start a plain scalar" + quote_it)
        if c in _FLOW_INDICATORS:
            raise self.error(i, col, f"unexpected '{c}'")
        if c == "?" and nxt in " \t":
            raise self.error(i, col, "complex keys ('? ') are not supported")
        if c in "-:" and (nxt in " \t" or (flow and nxt in _FLOW_INDICATORS)):
            raise self.error(i, col, f"unexpected '{c}'")

    def quoted(self, i: int, col: int) -> tuple[str, int]:
        """A single- or double-quoted scalar closing on the same line; (text, end col)."""
        line = self.lines[i]
        quote = line[col]
        out: list[str] = []
        j = col + 1
        while j < len(line):
            ch = line[j]
            if quote == "'":
                if ch == "'":
                    if j + 1 < len(line) and line[j + 1] == "'":
                        out.append("'")
                        j += 2
                        continue
                    return "".join(out), j + 1
                out.append(ch)
                j += 1
                continue
            if ch == '"':
                return "".join(out), j + 1
            if ch != "\\":
                out.append(ch)
                j += 1
                continue
            esc = line[j + 1] if j + 1 < len(line) else ""
            if esc in _SIMPLE_ESCAPES:
                out.append(_SIMPLE_ESCAPES[esc])
                j += 2
            elif esc in _HEX_ESCAPES:
                width = _HEX_ESCAPES[esc]
                digits = line[j + 2 : j + 2 + width]
                if len(digits) != width or not all(d in "0123456789abcdefABCDEF" for d in digits):
                    raise self.error(i, j, f"bad escape '\\{esc}': needs {width} hex digits")
                code = int(digits, 16)
                j += 2 + width
                low = line[j + 2 : j + 6] if line[j : j + 2] == "\\u" else ""
                if 0xD800 <= code < 0xDC00 and re.fullmatch(r"[dD][c-fC-F][0-9a-fA-F]{2}", low):
                    code = 0x10000 + ((code - 0xD800) << 10) + (int(low, 16) - 0xDC00)
                    j += 6  # a UTF-16 surrogate pair written as two \u escapes, as JSON does
                out.append(chr(code))
            else:
                raise self.error(i, j, f"unknown escape '\\{esc}' in a double-quoted string")
        kind = "single" if quote == "'" else "double"
        raise self.error(
            i, col, f"unterminated {kind}-quoted string (quoted strings must close on their line)"
        )

    def flow_skip(self, i: int, col: int, parent: int, opened: tuple[int, int]) -> tuple[int, int]:
        """Skip spaces, comments and line breaks inside a flow collection."""
        while True:
            line = self.lines[i]
            while col < len(line) and line[col] in " \t":
                col += 1
            if col < len(line) and not (line[col] == "#" and (col == 0 or line[col - 1] in " \t")):
                return i, col
            i += 1
            if i >= len(self.lines):
                raise self.error(*opened, "unterminated flow collection; close it with ']' or '}'")
            if self.is_content(i):
                m = self.indent(i)
                # A closing bracket may sit at its key's column, as JSON-minded writers put it.
                closing = m == parent and self.lines[i][m] in "]}"
                if m <= parent and not closing:
                    raise self.error(
                        i, m, "a flow collection's lines must be indented more than its key"
                    )
            col = 0

    def flow(self, i: int, col: int, parent: int) -> tuple[object, int, int]:
        """A flow sequence or mapping from its opening bracket; (value, end line, end col)."""
        opened = (i, col)
        closer = "]" if self.lines[i][col] == "[" else "}"
        seq: list[object] = []
        mapping: dict[str, object] = {}
        i, col = self.flow_skip(i, col + 1, parent, opened)
        while self.lines[i][col] != closer:
            if closer == "]":
                value, i, col = self.flow_node(i, col, parent)
                i, col = self.flow_skip(i, col, parent, opened)
                if self.lines[i][col] == ":":
                    raise self.error(i, col, "'key: value' inside [ ] is not supported; use { }")
                seq.append(value)
            else:
                ch = self.lines[i][col]
                if ch in "[{":
                    raise self.error(i, col, "flow collections as keys are not supported")
                key_at = (i, col)
                if ch in "\"'":
                    key, col = self.quoted(i, col)
                else:
                    key, col = self.flow_plain(i, col)
                i, col = self.flow_skip(i, col, parent, opened)
                if self.lines[i][col] != ":":
                    raise self.error(i, col, "expected ':' after a flow mapping key")
                if key in mapping:
                    raise self.error(*key_at, f"duplicate key {key!r}")
                i, col = self.flow_skip(i, col + 1, parent, opened)
                if self.lines[i][col] in ",}":
                    mapping[key] = None
                else:
                    mapping[key], i, col = self.flow_node(i, col, parent)
                    i, col = self.flow_skip(i, col, parent, opened)
            ch = self.lines[i][col]
            if ch == ",":
                i, col = self.flow_skip(i, col + 1, parent, opened)
                if self.lines[i][col] == ",":
                    raise self.error(i, col, "empty entry in a flow collection")
            elif ch != closer:
                raise self.error(i, col, f"expected ',' or '{closer}'")
        result: object = seq if closer == "]" else mapping
        return result, i, col + 1

    def flow_node(self, i: int, col: int, parent: int) -> tuple[object, int, int]:
        ch = self.lines[i][col]
        if ch in "[{":
            return self.flow(i, col, parent)
        if ch in "\"'":
            text, end = self.quoted(i, col)
            return text, i, end
        if ch == ",":
            raise self.error(i, col, "empty entry in a flow collection")
        text, end = self.flow_plain(i, col)
        return _resolve_plain(text), i, end

    def flow_plain(self, i: int, col: int) -> tuple[str, int]:
        self.check_plain_start(i, col, flow=True)
        line = self.lines[i]
        j = col
        while j < len(line):
            ch = line[j]
            if ch in _FLOW_INDICATORS:
                break
            if ch == "#" and line[j - 1] in " \t":
                break
            if ch == ":" and (j + 1 == len(line) or line[j + 1] in " \t" + _FLOW_INDICATORS):
                break
            j += 1
        text = line[col:j].rstrip(" \t")
        return text, col + len(text)


# Configuration records ############################################################

SERVER_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]*$")
TIERS = tuple(Tier)
LEVELS = ("L0", "L1", "L2", "L3")
_ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# env_passthrough must not carry secrets by name: they go under env: where they are seen.
_SECRET_NAME_RE = re.compile(r"TOKEN|KEY|SECRET|PASSWORD|CREDENTIAL", re.IGNORECASE)
_WITHHELD = "<withheld>"


@dataclass(frozen=True)
class OAuthSettings:
    """`oauth:` of a remote server (SPEC §3, §13): who rea is at its authorization server."""

    client_id: str | None = None  # a client registered there beforehand
    scopes: tuple[str, ...] = ()
    # An https URL serving rea's Client ID Metadata Document, for a user who hosts one: a
    # local command has no https address of its own, so without it rea registers (RFC 7591).
    client_metadata_url: str | None = None


@dataclass(frozen=True)
class ServerSpec:
    """One downstream MCP server as the registry declares it (SPEC §3): a local one
    started with `command`, or a remote one spoken to at `url` (§13)."""

    name: str
    command: str = ""
    args: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)  # raw templates, ${VAR} unexpanded
    env_passthrough: tuple[str, ...] = ()
    tier_overrides: Mapping[str, str] = field(default_factory=dict)  # tool -> tier
    enabled: bool = True
    trust_annotations: bool = False
    tools: tuple[str, ...] | None = None  # allow globs: only these tools are offered (§3)
    url: str = ""
    headers: Mapping[str, str] = field(default_factory=dict)  # raw templates, like env:
    oauth: OAuthSettings = field(default_factory=OAuthSettings)

    @property
    def remote(self) -> bool:
        return bool(self.url)


@dataclass(frozen=True)
class Registry:
    """The downstream servers of `.rea/registry.yaml`; `source` is None without a file."""

    version: str = "1"
    servers: tuple[ServerSpec, ...] = ()
    source: Path | None = None


@dataclass(frozen=True)
class RedactPattern:
    """A user secret pattern from `redact.patterns`; flags are letters among i m s x."""

    name: str
    regex: str
    flags: str = ""


@dataclass(frozen=True)
class ServerLimits:
    """Per-server rate and concurrency limits from `gateway.servers.<name>`; 0 is off."""

    calls_per_minute: int = 0
    max_concurrent_calls: int = 0


@dataclass(frozen=True)
class Policy:
    """The policy of `.rea/policy.yaml` (SPEC §4), every default filled in."""

    profile: str | None = None
    autonomy_level: str = "L1"
    max_autonomy_level: str = "L2"
    blocked_paths: tuple[str, ...] = ()
    injection_detection: str = "warn"
    suspicious_blocks_writes: bool = False
    redact_patterns: tuple[RedactPattern, ...] = ()
    audit_max_bytes: int = 50 * 1024 * 1024
    audit_max_age_days: int | None = None
    audit_fsync: str = "always"
    expose_diagnostics: bool = False
    call_timeout_s: float = 60.0
    startup_wait_s: float = 5.0
    max_tool_name: int = 52
    max_result_kb: int = 512
    breaker_failure_threshold: int = 5
    breaker_cooldown_s: float = 30.0
    session_blocker_threshold: int = 3
    server_limits: Mapping[str, ServerLimits] = field(default_factory=dict)
    blocked_tools: tuple[str, ...] = ()
    metrics_port: int | None = None
    restart_backoff_s: float = 0.5  # gateway.restart_backoff_s: first supervisor restart delay
    source: Path | None = None


# User regular expressions #########################################################
#
# Python's re cannot be timed out, so a user pattern that backtracks exponentially
# would hang every call whose result it scans (SPEC §6). Such patterns are refused at
# load by their shape: a variable quantifier inside a repeated group ((a+)+, (a*)*,
# (\w+\s?)+), or a repeated group whose alternatives can start the same way ((a|a)*,
# (a|aa)*); so are two unbounded repeats in a row that can take turns over the same text
# (.*.*x, .*x.*y), which backtrack cubically. What is left costs at most O(n^2), which
# BoundedRegex (below) brings down to linear. The check reads re's own parse tree so
# that escapes, classes and inline flags are understood exactly as re will run them.

_REGEX_FLAGS = {"i": re.IGNORECASE, "m": re.MULTILINE, "s": re.DOTALL, "x": re.VERBOSE}
# Characters on which "can two branches start alike?" is decided: Latin-1 plus a few
# non-ASCII digits, letters and spaces that \d, \w and \s also match.
_PROBE = frozenset([chr(c) for c in range(256)] + ["\u0660", "\u4e2d", "\u3000", "\u2028"])
_sre_parse: Callable[[str, int], object] = importlib.import_module("re._parser").parse
_REPEATS = ("MAX_REPEAT", "MIN_REPEAT")
# A repeat allowed more than this many times costs like an unbounded one.
_UNBOUNDED = 1000


def regex_flags(flags: str) -> int:
    """The re flags for the letters of RedactPattern.flags."""
    bits = 0
    for letter in flags:
        bits |= _REGEX_FLAGS[letter]
    return bits


def check_user_regex(regex: str, flags: str) -> str | None:
    """None when a user regex is safe to run; else the reason it is refused."""
    for letter in flags:
        if letter not in _REGEX_FLAGS:
            return f"unknown flag {letter!r} (use letters among i m s x)"
    try:
        compiled = re.compile(regex, regex_flags(flags))
        tree = _sre_parse(regex, regex_flags(flags))
    except re.error as err:
        return f"does not compile: {err}"
    state = getattr(tree, "state", None)
    ignore_case = bool(getattr(state, "flags", 0) & re.IGNORECASE)
    checker = _RegexShape(ignore_case)
    shape = checker.scan(_items(tree), None) or checker.compounding(_items(tree))
    if shape is None and compiled.fullmatch(""):
        return "matches the empty string, so it would match everywhere"
    if shape is None and _anchor_of(compiled) is None and _unbounded_then_more(tree):
        return (
            "has nothing that every match contains (a literal or a character class) and "
            "something after an unbounded repeat (like (ab|cd)+(ef|gh)), so it cannot be "
            "searched in bounded time; add a fixed part"
        )
    return shape


def _items(node: object) -> list[tuple[str, object]]:
    """The (op name, argument) pairs of a parsed sub-pattern."""
    data = getattr(node, "data", node)
    result: list[tuple[str, object]] = []
    if isinstance(data, list):
        for item in data:
            if isinstance(item, tuple) and len(item) == 2:
                result.append((str(item[0]), item[1]))
    return result


def _args(value: object) -> tuple[object, ...]:
    return value if isinstance(value, tuple) else ()


def _int(value: object) -> int:
    return value if isinstance(value, int) else 0


class _RegexShape:
    """Walks a parsed regex looking for exponential-backtracking shapes."""

    def __init__(self, ignore_case: bool) -> None:
        self.ignore_case = ignore_case

    def scan(
        self, items: list[tuple[str, object]], repeated: list[tuple[str, object]] | None
    ) -> str | None:
        """`repeated` is the body of the innermost enclosing variable repeat, if any."""
        for index, (op, arg) in enumerate(items):
            parts = _args(arg)
            reason: str | None = None
            if op in _REPEATS and len(parts) == 3:
                low, high, body = _int(parts[0]), _int(parts[1]), _items(parts[2])
                if low != high and repeated is not None:
                    return "has a nested quantifier (like (a+)+), which can backtrack exponentially"
                # a variable repeat, or a fixed one of more than 4 rounds ({20}: 2**20 ways
                # through overlapping alternatives), multiplies what backtracks inside it
                multiplies = (low != high and high > 1) or high > 4
                reason = self.scan(body, body if multiplies else repeated)
            elif op in ("POSSESSIVE_REPEAT", "ATOMIC_GROUP"):
                # No backtracking into these, so nothing inside them multiplies.
                reason = self.scan(_items(parts[-1] if parts else arg), None)
            elif op == "SUBPATTERN" and len(parts) == 4:
                reason = self.scan(_items(parts[3]), repeated)
            elif op in ("ASSERT", "ASSERT_NOT") and len(parts) == 2:
                reason = self.scan(_items(parts[1]), repeated)
            elif op == "GROUPREF_EXISTS" and len(parts) == 3:
                reason = self.scan(_items(parts[1]), repeated) or self.scan(
                    _items(parts[2]), repeated
                )
            elif op == "BRANCH" and len(parts) == 2 and isinstance(parts[1], list):
                alternatives = [_items(alt) for alt in parts[1]]
                if repeated is not None:
                    follow, _ = self.first(items[index + 1 :])
                    follow |= self.first(repeated)[0]
                    if self.overlap(alternatives, follow):
                        return (
                            "has a repeated group whose alternatives overlap (like (a|a)*), "
                            "which can backtrack exponentially"
                        )
                for alternative in alternatives:
                    reason = reason or self.scan(alternative, repeated)
            if reason:
                return reason
        return None

    def overlap(self, alternatives: list[list[tuple[str, object]]], follow: set[str]) -> bool:
        firsts = [self.first(alt) for alt in alternatives]
        if sum(1 for _, nullable in firsts if nullable) >= 2:
            return True
        for a, (first_a, nullable_a) in enumerate(firsts):
            for first_b, _ in firsts[a + 1 :]:
                if first_a & first_b:
                    return True
            # An empty branch lets the next repetition start where another branch could.
            if nullable_a and any(first & follow for first, _ in firsts):
                return True
        return False

    def first(self, items: list[tuple[str, object]]) -> tuple[set[str], bool]:
        """The probe characters a match can start with, and whether it can be empty."""
        result: set[str] = set()
        for op, arg in items:
            chars, nullable = self.first_item(op, arg)
            result |= chars
            if not nullable:
                return result, False
        return result, True

    def first_item(self, op: str, arg: object) -> tuple[set[str], bool]:
        parts = _args(arg)
        if op == "LITERAL":
            return self.literal(_int(arg)), False
        if op == "NOT_LITERAL":
            return set(_PROBE) - self.literal(_int(arg)), False
        if op == "ANY":
            return set(_PROBE), False
        if op == "IN" and isinstance(arg, list):
            return {ch for ch in _PROBE if self.in_set(_items(arg), ch)}, False
        if op in (*_REPEATS, "POSSESSIVE_REPEAT") and len(parts) == 3:
            chars, nullable = self.first(_items(parts[2]))
            return chars, nullable or _int(parts[0]) == 0
        if op == "SUBPATTERN" and len(parts) == 4:
            return self.first(_items(parts[3]))
        if op == "ATOMIC_GROUP":
            return self.first(_items(arg))
        if op == "BRANCH" and len(parts) == 2 and isinstance(parts[1], list):
            union: set[str] = set()
            any_empty = False
            for alt in parts[1]:
                alt_chars, alt_empty = self.first(_items(alt))
                union |= alt_chars
                any_empty = any_empty or alt_empty
            return union, any_empty
        if op in ("AT", "ASSERT", "ASSERT_NOT"):
            return set(), True  # zero width
        return set(_PROBE), True  # back-references and the rest: assume the worst

    def compounding(self, items: list[tuple[str, object]]) -> str | None:
        """Two unbounded repeats in a row that can take turns over the same text (`.*.*x`,
        `.*x.*y`, `\\w+\\w+:`): each start then tries every split of the text between them,
        a cost cubic in its length that no window keeps small. Nested sequences are read
        too; a repeat that ends the pattern cannot fail afterwards, so it is let through."""
        sequence = self.sequence(items)
        for i, (op, arg) in enumerate(sequence):
            first = self.unbounded(op, arg)
            if first is None:
                continue
            for j in range(i + 1, len(sequence)):
                second = self.unbounded(*sequence[j])
                if second is not None and first & second and j < len(sequence) - 1:
                    return (
                        "has two unbounded repeats in a row that can match the same text "
                        "(like .*.*x or .*x.*y), which backtracks polynomially; bound one "
                        "({0,200}) or make the first possessive (.*+)"
                    )
                if not self.consumed([sequence[j]]) <= first:
                    break  # the first repeat cannot run past this item
        for op, arg in sequence:
            parts = _args(arg)
            inner: list[list[tuple[str, object]]] = []
            if op == "BRANCH" and len(parts) == 2 and isinstance(parts[1], list):
                inner = [_items(alt) for alt in parts[1]]
            elif op in (*_REPEATS, "POSSESSIVE_REPEAT") and len(parts) == 3:
                inner = [_items(parts[2])]
            elif op in ("ASSERT", "ASSERT_NOT") and len(parts) == 2:
                inner = [_items(parts[1])]
            for sub in inner:
                reason = self.compounding(sub)
                if reason:
                    return reason
        return None

    def sequence(self, items: list[tuple[str, object]]) -> list[tuple[str, object]]:
        """The items in the order they consume text: groups opened, a fixed repeat of two
        or more written out twice (enough to see its copies compound)."""
        out: list[tuple[str, object]] = []
        for op, arg in items:
            parts = _args(arg)
            if op == "SUBPATTERN" and len(parts) == 4:
                out += self.sequence(_items(parts[3]))
            elif op in _REPEATS and len(parts) == 3 and _int(parts[0]) == _int(parts[1]) >= 2:
                body = self.sequence(_items(parts[2]))
                out += body + body
            else:
                out.append((op, arg))
        return out

    def unbounded(self, op: str, arg: object) -> set[str] | None:
        """The characters an unbounded, backtracking repeat takes; None for anything else."""
        parts = _args(arg)
        if op in _REPEATS and len(parts) == 3 and _int(parts[1]) > _UNBOUNDED:
            return self.consumed(_items(parts[2])) or None
        return None

    def consumed(self, items: list[tuple[str, object]]) -> set[str]:
        """The probe characters anything in `items` can consume."""
        result: set[str] = set()
        for op, arg in items:
            parts = _args(arg)
            if op in ("LITERAL", "NOT_LITERAL", "ANY", "IN"):
                result |= self.first_item(op, arg)[0]
            elif op in (*_REPEATS, "POSSESSIVE_REPEAT") and len(parts) == 3:
                result |= self.consumed(_items(parts[2]))
            elif op == "SUBPATTERN" and len(parts) == 4:
                result |= self.consumed(_items(parts[3]))
            elif op == "ATOMIC_GROUP":
                result |= self.consumed(_items(arg))
            elif op == "BRANCH" and len(parts) == 2 and isinstance(parts[1], list):
                for alt in parts[1]:
                    result |= self.consumed(_items(alt))
            elif op == "GROUPREF_EXISTS" and len(parts) == 3:
                result |= self.consumed(_items(parts[1])) | self.consumed(_items(parts[2]))
            elif op not in ("AT", "ASSERT", "ASSERT_NOT"):
                result |= _PROBE  # a back-reference: anything
        return result

    def literal(self, code: int) -> set[str]:
        ch = chr(code)
        return {ch, ch.lower(), ch.upper()} if self.ignore_case else {ch}

    def in_set(self, items: list[tuple[str, object]], ch: str) -> bool:
        negate = False
        hit = False
        folded = ch.lower() if self.ignore_case else ch
        for op, arg in items:
            parts = _args(arg)
            if op == "NEGATE":
                negate = True
            elif op == "LITERAL":
                hit = hit or ch in self.literal(_int(arg)) or folded in self.literal(_int(arg))
            elif op.startswith("RANGE") and len(parts) == 2:
                low, high = _int(parts[0]), _int(parts[1])
                # (a case change may give two characters: 'ß'.upper() is 'SS')
                cases = {c for c in (ch, ch.lower(), ch.upper()) if len(c) == 1}
                hit = hit or any(low <= ord(c) <= high for c in cases)
            elif op == "CATEGORY":
                hit = hit or _in_category(str(arg), ch)
            else:
                hit = True  # unknown member: assume it matches
        return hit != negate


def _in_category(name: str, ch: str) -> bool:
    tests: dict[str, Callable[[str], bool]] = {
        "CATEGORY_DIGIT": str.isdecimal,
        "CATEGORY_SPACE": str.isspace,
        "CATEGORY_WORD": lambda c: c.isalnum() or c == "_",
    }
    for base, test in tests.items():
        if name == base:
            return test(ch)
        if name == base.replace("CATEGORY_", "CATEGORY_NOT_"):
            return not test(ch)
    return True


# Bounded cost. A pattern that passes the load check can still cost O(n^2) on n
# characters when re searches it: `.*token`, `[a-z]*secret` and `\w+=\w+` try every
# start and from each scan to the end of a run (~150 s for `.*token` on 512 KB of one
# line). SPEC §6 keeps any one pattern under 100 ms on a 512 KB result, so a user
# pattern is searched only where it can match, in windows (BoundedRegex):
#
# - An anchor read from the parse tree: the longest literal run every match holds
#   (`token`, `=`), else its rarest required character class (`\d` in `[a-z]+\d`).
#   Text without it is skipped at C speed, and so is an anchor with nothing before it
#   that the part before the anchor could take (`\w+=` needs a word character there).
# - Around each anchor, a window. Backwards, only as far as the run of characters the
#   part before can consume (`.*token` starts at its line, `[a-z]*secret` after the last
#   non-letter), and at most _REGEX_EXACT characters when that part is one repeat like
#   `.*` or `\w+` (from a run's first character it takes any part of it, so the first
#   start tried is the leftmost), else at most its width or _REGEX_WINDOW. Forwards, the
#   width of the part after when that is at most _REGEX_EXACT, else _REGEX_WINDOW.
#   Anchors closer than a window share one search, so dense text costs one search too.
# - Vetoes before a search: the part after the anchor, compiled alone, must match after
#   it, and the pattern's other literal runs must be at hand.
# - A match that touches the end of its window is matched again from its start with
#   room doubling, so a long secret is redacted whole; a greedy part before that can run
#   over an anchor is matched again to the farthest one in its run.
#
# The trade-off, in exchange for a cost linear in the text (plus ~1 us per match): the
# part of a match before its anchor is found up to _REGEX_EXACT characters back (for
# `.*`-like prefixes; _REGEX_WINDOW for others), so a longer one is redacted from there
# on and what lies further back stays; a part after the anchor that needs more than
# _REGEX_WINDOW characters before it can succeed is found only while a budget of
# _REGEX_LONG_BUDGET characters per text lasts, and never beyond _REGEX_EXACT. Secrets
# are shorter. Shapes no window makes cheap (`.*.*x`, cubic) are refused at load.

_REGEX_WINDOW = 256
_REGEX_EXACT = 4096
# A search ends this far past the widest match, so that `$` and `\b` there see the real
# next characters, not an end of text made by the window.
_REGEX_SLACK = 2
# Anchors in one cluster at most that are each vetoed first (one call each); a denser
# cluster is searched at once, which costs about as much.
_REGEX_VETO_MAX = 32
# Characters per text that attempts reaching past a window (_REGEX_EXACT each) may scan.
_REGEX_LONG_BUDGET = 1 << 20
_CATEGORY_SOURCE = {
    "CATEGORY_DIGIT": r"\d",
    "CATEGORY_NOT_DIGIT": r"\D",
    "CATEGORY_SPACE": r"\s",
    "CATEGORY_NOT_SPACE": r"\S",
    "CATEGORY_WORD": r"\w",
    "CATEGORY_NOT_WORD": r"\W",
}
_AT_SOURCE = {
    "AT_BEGINNING": "^",
    "AT_BEGINNING_STRING": r"\A",
    "AT_END": "$",
    "AT_END_STRING": r"\Z",
    "AT_BOUNDARY": r"\b",
    "AT_NON_BOUNDARY": r"\B",
}
_FLAG_SOURCE = ((re.IGNORECASE, "i"), (re.MULTILINE, "m"), (re.DOTALL, "s"), (re.ASCII, "a"))
_SINGLE_CHAR_OPS = ("LITERAL", "NOT_LITERAL", "ANY", "IN")
_sre_maxrepeat: int = importlib.import_module("re._constants").MAXREPEAT


def _flag_letters(flags: int) -> str:
    return "".join(letter for bit, letter in _FLAG_SOURCE if flags & bit)


def _unparse(items: list[tuple[str, object]]) -> str | None:
    """Regex source for parsed items (groups become non-capturing); None for what has
    no meaning alone (back-references, conditionals) or is not known."""
    out: list[str] = []
    for op, arg in items:
        piece = _unparse_item(op, arg)
        if piece is None:
            return None
        out.append(piece)
    return "".join(out)


def _unparse_item(op: str, arg: object) -> str | None:
    parts = _args(arg)
    if op == "LITERAL":
        return re.escape(chr(_int(arg)))
    if op == "NOT_LITERAL":
        return "[^" + re.escape(chr(_int(arg))) + "]"
    if op == "ANY":
        return "."
    if op == "IN" and isinstance(arg, list):
        members: list[str] = []
        for sub_op, sub_arg in _items(arg):
            pair = _args(sub_arg)
            if sub_op == "NEGATE":
                members.insert(0, "^")
            elif sub_op == "LITERAL":
                members.append(re.escape(chr(_int(sub_arg))))
            elif sub_op == "RANGE" and len(pair) == 2:
                start, stop = chr(_int(pair[0])), chr(_int(pair[1]))
                members.append(re.escape(start) + "-" + re.escape(stop))
            elif sub_op == "CATEGORY" and str(sub_arg) in _CATEGORY_SOURCE:
                members.append(_CATEGORY_SOURCE[str(sub_arg)])
            else:
                return None
        return "[" + "".join(members) + "]"
    if op == "AT":
        return _AT_SOURCE.get(str(arg))
    if op in (*_REPEATS, "POSSESSIVE_REPEAT") and len(parts) == 3:
        body = _unparse(_items(parts[2]))
        if body is None:
            return None
        low, high = _int(parts[0]), _int(parts[1])
        count = f"{{{low},}}" if high >= _sre_maxrepeat else f"{{{low},{high}}}"
        suffix = {"MAX_REPEAT": "", "MIN_REPEAT": "?", "POSSESSIVE_REPEAT": "+"}[op]
        return f"(?:{body}){count}{suffix}"
    if op == "SUBPATTERN" and len(parts) == 4:
        body = _unparse(_items(parts[3]))
        if body is None:
            return None
        on, off = _flag_letters(_int(parts[1])), _flag_letters(_int(parts[2]))
        return f"(?{on}{'-' + off if off else ''}:{body})"
    if op == "ATOMIC_GROUP":
        body = _unparse(_items(arg))
        return None if body is None else f"(?>{body})"
    if op == "BRANCH" and len(parts) == 2 and isinstance(parts[1], list):
        alternatives = [_unparse(_items(alt)) for alt in parts[1]]
        if any(alt is None for alt in alternatives):
            return None
        return "(?:" + "|".join(alt for alt in alternatives if alt is not None) + ")"
    if op in ("ASSERT", "ASSERT_NOT") and len(parts) == 2:
        body = _unparse(_items(parts[1]))
        if body is None:
            return None
        ahead = _int(parts[0]) >= 0
        mark = {(True, "ASSERT"): "=", (True, "ASSERT_NOT"): "!"}.get((ahead, op))
        return f"(?{mark or ('<=' if op == 'ASSERT' else '<!')}{body})"
    return None


def _shape_of(items: list[tuple[str, object]]) -> object:
    """A parse tree with group numbers dropped, to compare a round trip through _unparse."""
    shape: list[object] = []
    for op, arg in items:
        parts = _args(arg)
        if op == "SUBPATTERN" and len(parts) == 4:
            inner = _shape_of(_items(parts[3]))
            if parts[1] or parts[2]:
                shape.append(("SUBPATTERN", parts[1], parts[2], inner))
            elif isinstance(inner, tuple):
                shape.extend(inner)  # a plain group, written back as (?:...), is no item
        elif op in (*_REPEATS, "POSSESSIVE_REPEAT") and len(parts) == 3:
            shape.append((op, parts[0], parts[1], _shape_of(_items(parts[2]))))
        elif op == "BRANCH" and len(parts) == 2 and isinstance(parts[1], list):
            shape.append((op, tuple(_shape_of(_items(alt)) for alt in parts[1])))
        elif op in ("ASSERT", "ASSERT_NOT") and len(parts) == 2:
            shape.append((op, parts[0], _shape_of(_items(parts[1]))))
        elif op == "ATOMIC_GROUP":
            shape.append((op, _shape_of(_items(arg))))
        elif op == "IN":
            shape.append((op, tuple((o, str(a)) for o, a in _items(arg))))
        else:
            shape.append((op, str(arg)))
    return tuple(shape)


def _compile_alone(items: list[tuple[str, object]], flags: int) -> re.Pattern[str] | None:
    """Part of a pattern compiled on its own, or None when that would not mean the same."""
    source = _unparse(items)
    if source is None:
        return None
    flags &= ~re.VERBOSE  # the source written here has no comments or free spacing
    try:
        compiled = re.compile(source, flags)
        if _shape_of(_items(_sre_parse(source, flags))) != _shape_of(items):
            return None
    except (re.error, RecursionError):
        return None
    return compiled


def _max_width(items: list[tuple[str, object]]) -> int:
    """The most characters `items` can match or look at ahead (_sre_maxrepeat: no bound);
    a lookahead counts as if it consumed what it reads, which can only widen a window."""
    total = 0
    for op, arg in items:
        parts = _args(arg)
        width = _sre_maxrepeat
        if op in _SINGLE_CHAR_OPS:
            width = 1
        elif op in ("ASSERT", "ASSERT_NOT") and len(parts) == 2:
            width = _max_width(_items(parts[1])) if _int(parts[0]) >= 0 else 0
        elif op == "AT":
            width = 0
        elif op in (*_REPEATS, "POSSESSIVE_REPEAT") and len(parts) == 3:
            body = _max_width(_items(parts[2]))
            high = _int(parts[1])
            width = body and (_sre_maxrepeat if high >= _sre_maxrepeat else high * body)
        elif op == "SUBPATTERN" and len(parts) == 4:
            width = _max_width(_items(parts[3]))
        elif op == "ATOMIC_GROUP":
            width = _max_width(_items(arg))
        elif op == "BRANCH" and len(parts) == 2 and isinstance(parts[1], list):
            width = max(_max_width(_items(alt)) for alt in parts[1])
        total = min(_sre_maxrepeat, total + width)
    return total


def _min_width(items: list[tuple[str, object]]) -> int:
    """The fewest characters `items` can match."""
    total = 0
    for op, arg in items:
        parts = _args(arg)
        if op in _SINGLE_CHAR_OPS:
            total += 1
        elif op in (*_REPEATS, "POSSESSIVE_REPEAT") and len(parts) == 3:
            total += _int(parts[0]) * _min_width(_items(parts[2]))
        elif op == "SUBPATTERN" and len(parts) == 4:
            total += _min_width(_items(parts[3]))
        elif op == "ATOMIC_GROUP":
            total += _min_width(_items(arg))
        elif op == "BRANCH" and len(parts) == 2 and isinstance(parts[1], list):
            total += min(_min_width(_items(alt)) for alt in parts[1])
    return total


def _unbounded_then_more(tree: object) -> bool:
    """Does anything follow the last unbounded part at the top of the pattern? Without an
    anchor, every start would scan that part and then fail there."""
    items = [(op, arg) for op, arg, _ in _flatten(_items(tree), 0)]
    last = max((i for i, item in enumerate(items) if _max_width([item]) > _REGEX_EXACT), default=-1)
    return 0 <= last < len(items) - 1


def _window(width: int) -> int:
    """How far to search on one side of an anchor for a part this wide."""
    return width if width <= _REGEX_EXACT else _REGEX_WINDOW


@dataclass(frozen=True)
class _Anchor:
    """Where a user pattern can match: what every match contains, and how far around it.

    `finder` finds anchors (overlapping ones too), each `length` characters long, and
    `reverse` finds them in reversed text (the last one of a stretch); `others` are the
    pattern's other literal runs, all of which a match holds too. `before` and `after`
    bound the search on each side (`bounded_after`: `after` is exact). `run` matches a
    run of the characters the part before the anchor can consume (a superset), read
    backwards for where a match may start and forwards for how far it may reach;
    `rest` is the part after the anchor compiled alone, and `least_before` the fewest
    characters the part before takes: the two vetoes. `crosses`: the part before can
    run greedily over an anchor to a later one.
    """

    finder: re.Pattern[str]
    reverse: re.Pattern[str]
    length: int
    others: tuple[re.Pattern[str], ...]
    before: int
    after: int
    bounded_after: bool
    run: re.Pattern[str] | None
    rest: re.Pattern[str] | None
    least_before: int
    crosses: bool


def _flatten(items: list[tuple[str, object]], flags: int) -> list[tuple[str, object, int]]:
    """The top-level items with groups opened, each with the flags in force there."""
    out: list[tuple[str, object, int]] = []
    for op, arg in items:
        parts = _args(arg)
        if op == "SUBPATTERN" and len(parts) == 4:
            inner = (flags | _int(parts[1])) & ~_int(parts[2])
            out += _flatten(_items(parts[3]), inner)
        else:
            out.append((op, arg, flags))
    return out


def _consumable(items: list[tuple[str, object, int]]) -> str | None:
    """A pattern for one of the characters `items` can consume (a superset; "" for none),
    or None when that is not known."""
    atoms: list[str] = []
    ignore_case = False

    def collect(op: str, arg: object, flags: int) -> bool:
        nonlocal ignore_case
        parts = _args(arg)
        if op in _SINGLE_CHAR_OPS:
            atom = r"[\s\S]" if op == "ANY" and flags & re.DOTALL else _unparse_item(op, arg)
            if atom is None:
                return False
            atoms.append(atom)
            ignore_case = ignore_case or bool(flags & re.IGNORECASE)
            return True
        if op in ("AT", "ASSERT", "ASSERT_NOT"):
            return True  # consumes nothing
        children: list[tuple[str, object, int]] = []
        if op in (*_REPEATS, "POSSESSIVE_REPEAT") and len(parts) == 3:
            children = _flatten(_items(parts[2]), flags)
        elif op == "ATOMIC_GROUP":
            children = _flatten(_items(arg), flags)
        elif op == "BRANCH" and len(parts) == 2 and isinstance(parts[1], list):
            for alt in parts[1]:
                children += _flatten(_items(alt), flags)
        else:
            return False
        return all(collect(*child) for child in children)

    if not all(collect(*item) for item in items):
        return None
    if not atoms:
        return ""
    body = "|".join(atoms)
    return f"(?{'i' if ignore_case else ''}:{body})"


def _simple_prefix(items: list[tuple[str, object]]) -> bool:
    """One greedy or lazy unbounded repeat of one character class (`.*`, `[a-z]*`, `\\w+`):
    from the first character of a run it can consume any part of it, so the leftmost
    start is where that run begins."""
    if len(items) != 1:
        return False
    op, arg = items[0]
    parts = _args(arg)
    if op not in _REPEATS or len(parts) != 3:
        return False
    body = _items(parts[2])
    return (
        _int(parts[0]) <= 1
        and _int(parts[1]) >= _sre_maxrepeat
        and len(body) == 1
        and body[0][0] in _SINGLE_CHAR_OPS
    )


def _literal_runs(flat: list[tuple[str, object, int]]) -> list[tuple[int, int]]:
    """(start, end) of each run of top-level literals alike in case sensitivity."""
    runs: list[tuple[int, int]] = []
    index = 0
    while index < len(flat):
        if flat[index][0] != "LITERAL":
            index += 1
            continue
        fold = flat[index][2] & re.IGNORECASE
        end = index + 1
        while (
            end < len(flat) and flat[end][0] == "LITERAL" and flat[end][2] & re.IGNORECASE == fold
        ):
            end += 1
        runs.append((index, end))
        index = end
    return runs


def _literal_text(flat: list[tuple[str, object, int]], start: int, end: int) -> str:
    return "".join(chr(_int(arg)) for _, arg, _ in flat[start:end])


def _anchor_of(pattern: re.Pattern[str]) -> _Anchor | None:
    """The anchor of a pattern: its longest literal run, else its rarest required
    character class (one outside any repeat, or the first of a `+`/`{n,}`). Among equals,
    one with a bounded part before it, then the last (so that less follows it).
    None when it has neither."""
    try:
        tree = _sre_parse(pattern.pattern, pattern.flags)
    except (re.error, RecursionError):
        return None
    flags = _int(getattr(getattr(tree, "state", None), "flags", pattern.flags))
    flat = _flatten(_items(tree), flags)
    plain = [(o, a) for o, a, _ in flat]
    shape = _RegexShape(bool(flags & re.IGNORECASE))
    runs = _literal_runs(flat)
    candidates: list[tuple[tuple[int, bool, int], int, int]] = []  # (score, start, end)

    def bounded(index: int) -> bool:  # is the part before searched in full?
        return _simple_prefix(plain[:index]) or _max_width(plain[:index]) <= _REGEX_EXACT

    for start, end in runs:
        candidates.append(((1, bounded(start), end - start), start, end))
    for index, (op, arg, _) in enumerate(flat):
        single: tuple[str, object] | None = None
        parts = _args(arg)
        if op in ("IN", "NOT_LITERAL"):
            single = (op, arg)
        elif op in (*_REPEATS, "POSSESSIVE_REPEAT") and len(parts) == 3 and _int(parts[0]) >= 1:
            body = _items(parts[2])
            if len(body) == 1 and body[0][0] in ("IN", "NOT_LITERAL", "LITERAL"):
                single = body[0]
        if single is not None:
            size = len(shape.first_item(*single)[0])
            candidates.append(((0, bounded(index), -size), index, index + 1))
    if not candidates:
        return None
    _, start, end = max(candidates, key=lambda c: (c[0], c[1]))
    op, arg, item_flags = flat[start]
    before, after = plain[:start], plain[end:]
    one = _consumable(flat[:start])
    # An anchor with nothing the part before could take just before it is no anchor.
    behind, ahead = (f"(?<={one})", f"(?={one})") if one and _min_width(before) else ("", "")
    if op == "LITERAL":
        text = _literal_text(flat, start, end)
        fold = item_flags & re.IGNORECASE
        finder = re.compile(f"{behind}(?={re.escape(text)})", fold)
        reverse = re.compile(re.escape(text[::-1]) + ahead, fold)
        length = len(text)
        probes = [text]
    else:
        single = (op, arg)
        parts = _args(arg)
        if op not in ("IN", "NOT_LITERAL"):  # the first of a repeat; the rest of it follows
            single = _items(parts[2])[0]
            high = _int(parts[1])
            left = (_int(parts[0]) - 1, high if high >= _sre_maxrepeat else high - 1, parts[2])
            after = [(op, left), *after]
        source = _unparse_item(*single)
        if source is None:
            return None
        class_flags = item_flags & (re.IGNORECASE | re.ASCII)
        finder = re.compile(behind + source, class_flags)
        reverse = re.compile(source + ahead, class_flags)
        length = 1
        probes = [ch for ch in _PROBE if re.fullmatch(source, ch, class_flags)]
    others = tuple(
        re.compile(re.escape(_literal_text(flat, s, e)), flat[s][2] & re.IGNORECASE)
        for s, e in runs
        if (s, e) != (start, end)
    )
    after_width = _max_width(after)
    run = None if one is None else re.compile(f"{one}*" if one else "")
    # Can a match run over this anchor to a later one? Only if the part before can take
    # the anchor's characters, and not if it is one lazy repeat (it stops at the first).
    crosses = (
        run is not None
        and any(run.fullmatch(probe) for probe in probes)
        and not (_simple_prefix(before) and before[0][0] == "MIN_REPEAT")
    )
    return _Anchor(
        finder=finder,
        reverse=reverse,
        length=length,
        others=others,
        before=_REGEX_EXACT if _simple_prefix(before) else _window(_max_width(before)),
        after=_window(after_width),
        bounded_after=after_width <= _REGEX_EXACT,
        run=run,
        rest=_compile_alone(after, flags) if after else None,
        least_before=_min_width(before),
        crosses=crosses,
    )


class BoundedRegex:
    """A user regex searched only where it can match, so that its cost on a text stays
    near linear whatever the text (the scheme and its trade-off: see above)."""

    def __init__(self, pattern: re.Pattern[str]) -> None:
        self.pattern = pattern
        self._anchor = _anchor_of(pattern)
        tree = _sre_parse(pattern.pattern, pattern.flags)
        self._width = _max_width(_items(tree))

    def finditer(self, text: str) -> Iterator[re.Match[str]]:
        """Non-overlapping matches, in order, as re.finditer finds them (within the
        windows above); their spans index `text` itself."""
        if self._anchor is None:  # bounded width: the load check refuses the others
            return self._chunked(text)
        return _AnchoredScan(self.pattern, self._anchor, text).matches()

    def _chunked(self, text: str) -> Iterator[re.Match[str]]:
        """No anchor: the text in chunks, each searched with room for a match after it."""
        n = len(text)
        after = _window(self._width)
        last = 0
        for chunk in range(0, n + 1, _REGEX_WINDOW):
            top = chunk + _REGEX_WINDOW
            low = max(chunk, last)
            high = min(n, top + after + _REGEX_SLACK)
            while low < top and low <= n:
                match = self.pattern.search(text, low, high)
                if match is None or match.start() >= top:
                    break
                if match.end() >= high - _REGEX_SLACK and high < n and self._width > _REGEX_EXACT:
                    match = _extend(self.pattern, text, match)
                yield match
                last = low = max(match.end(), match.start() + 1)


def _extend(pattern: re.Pattern[str], text: str, match: re.Match[str]) -> re.Match[str]:
    """The match again from its start, with room doubling until it stops short."""
    n = len(text)
    room = _REGEX_WINDOW
    while True:
        end = min(n, match.end() + room)
        longer = pattern.match(text, match.start(), end)
        if longer is None:
            return match
        if longer.end() < end - _REGEX_SLACK or end == n:
            return longer
        match, room = longer, room * 2


class _AnchoredScan:
    """One pass of a BoundedRegex over one text (its state: where the last match ended,
    the run of consumable characters last measured, what is left of the long budget)."""

    def __init__(self, pattern: re.Pattern[str], anchor: _Anchor, text: str) -> None:
        self.pattern = pattern
        self.anchor = anchor
        self.text = text
        self.n = len(text)
        self.last = 0  # where the last match ended: no match starts before it
        self.segment = (0, -1, False)  # a run of consumable characters: start, end, ended
        self.budget = _REGEX_LONG_BUDGET

    def matches(self) -> Iterator[re.Match[str]]:
        anchor, text = self.anchor, self.text
        scan = 0
        while True:
            found = anchor.finder.search(text, scan)
            if found is None:
                return
            first = found.start()
            # The anchors within one window of the first are searched together.
            span = min(self.n, first + _REGEX_WINDOW + anchor.length)
            tail = anchor.reverse.search(text[first:span][::-1])
            final = span - tail.end() if tail is not None else first
            kept = self._vetted(first, final)
            if kept is not None:
                yield from self._search(*kept)  # which moves self.last past each match
            scan = max(final + 1, self.last)

    def _vetted(self, first: int, final: int) -> tuple[int, int] | None:
        """The first and final anchors of a cluster that can still match; None if none."""
        anchor, text = self.anchor, self.text
        rest = anchor.rest
        least = anchor.least_before if anchor.run is not None else 0
        if rest is None and not least:
            return first, final
        anchors: list[int] = []
        for found in anchor.finder.finditer(text, first, final + anchor.length):
            if len(anchors) == _REGEX_VETO_MAX:
                return first, final  # dense: one search costs less than a veto each
            anchors.append(found.start())
        reach = anchor.after + _REGEX_SLACK
        alive = []
        for at in anchors:
            if least and at - self._run_start(at) < least:
                continue  # too little before it that the part before could take
            after = at + anchor.length
            if (
                rest is None
                or rest.match(text, after, after + reach) is not None
                # The part after may need more room than the window: look further, on budget.
                or (not anchor.bounded_after and self._long(rest, after) is not None)
            ):
                alive.append(at)
        return (alive[0], alive[-1]) if alive else None

    def _search(self, first: int, final: int) -> Iterator[re.Match[str]]:
        anchor, text, n = self.anchor, self.text, self.n
        low = max(self.last, first - anchor.before)
        if anchor.run is not None:
            low = max(low, self._run_start(first))
        high = min(n, final + anchor.length + anchor.after + _REGEX_SLACK)
        beyond = high + (0 if anchor.bounded_after else _REGEX_EXACT)
        for other in anchor.others:  # every literal of the pattern must be at hand
            if other.search(text, low, beyond) is None:
                return
        plain = not anchor.crosses
        exact = anchor.bounded_after
        while low <= final:
            match: re.Match[str] | None = None
            if plain:
                # The common case at C speed: matches inside the window, none of which
                # needs a second look (none touches its end, none leaves room before it
                # for an anchor the window may have cut short).
                for found in self.pattern.finditer(text, low, high):
                    if found.start() > final:
                        return
                    if not exact and (
                        found.end() >= high - _REGEX_SLACK
                        or self._anchor_between(low, found.start())
                    ):
                        match = found
                        break
                    end = found.end()
                    low = self.last = end if end > found.start() else end + 1
                    yield found
                else:
                    if exact or low > final:
                        return
            else:
                match = self.pattern.search(text, low, high)
            if not anchor.bounded_after and self.budget > 0:
                # The window may have cut short a match at an anchor before the one found:
                # its likeliest start tried again with more room (on budget); if that fails
                # too, the search goes on past it.
                skipped = self._cut_short(low, match, final, high)
                if skipped is not None:
                    start, at = skipped
                    longer = self._long(self.pattern, start)
                    if longer is None:
                        low = at + 1
                        continue
                    match = longer
            if match is None or match.start() > final:
                return
            match = self._reach(match, final, high)
            low = self.last = max(match.end(), match.start() + 1)
            yield match

    def _anchor_between(self, low: int, start: int) -> bool:
        """Is there an anchor, with room for the part before it, in [low, start)?"""
        anchor = self.anchor
        first = low + anchor.least_before
        if first >= start:
            return False
        return anchor.finder.search(self.text, first, start - 1 + anchor.length) is not None

    def _cut_short(
        self, low: int, match: re.Match[str] | None, final: int, high: int
    ) -> tuple[int, int] | None:
        """(likeliest start, anchor) of an anchor before `match` (or any, if None) that
        fails in the window only for want of room after it; None if there is none."""
        anchor, text = self.anchor, self.text
        end = final if match is None else min(final, match.start() - 1)
        if end < low + anchor.least_before:
            return None  # no room for an anchor with its part before between them
        found = anchor.finder.search(text, low, end + anchor.length)
        if found is None or found.start() > end:
            return None
        at = found.start()
        start = max(low, at - anchor.before)
        if anchor.run is not None:
            start = max(start, self._run_start(at))
            if at - start < anchor.least_before:
                return None  # the part before cannot fit: no room after would help
        rest = anchor.rest
        if rest is not None and rest.match(text, at + anchor.length, high) is not None:
            return None  # the part after fits in the window: it was not cut short
        return start, at

    def _reach(self, match: re.Match[str], final: int, high: int) -> re.Match[str]:
        """The whole match: a greedy part before the anchor may reach anchors past this
        cluster (`.*token` takes a line's last `token`), a part after it past the window."""
        anchor, text, n = self.anchor, self.text, self.n
        if anchor.crosses:
            self._run_start(match.start())
            start, end, _ = self.segment
            reach = min(end, match.start() + _REGEX_EXACT)
            if start <= match.start() and reach > final:
                later = anchor.finder.search(text, final + 1, reach + anchor.length)
                if later is not None:
                    room = min(n, reach + anchor.length + anchor.after + _REGEX_SLACK)
                    longer = self.pattern.match(text, match.start(), room)
                    if longer is not None and longer.end() > match.end():
                        match, high = longer, room
        if match.end() >= high - _REGEX_SLACK and high < n and not anchor.bounded_after:
            match = _extend(self.pattern, text, match)
        return match

    def _run_start(self, at: int) -> int:
        """Where the run of consumable characters that ends at `at` starts, not before the
        last match; measured once per run, up to _REGEX_EXACT on either side."""
        run = self.anchor.run
        assert run is not None
        text = self.text
        start, end, ended = self.segment
        if not start <= at <= end:
            floor = max(self.last, at - _REGEX_EXACT, end + 1 if ended and end < at else 0)
            back = run.match(text[floor:at][::-1])
            start = at - (back.end() if back is not None else 0)
            ahead = run.match(text, at, at + _REGEX_EXACT)
            end = ahead.end() if ahead is not None else at
            self.segment = (start, end, end < at + _REGEX_EXACT)
        return max(start, self.last)

    def _long(self, pattern: re.Pattern[str], at: int) -> re.Match[str] | None:
        """One anchored attempt reaching _REGEX_EXACT further, while the budget lasts."""
        if self.budget <= 0:
            return None
        self.budget -= _REGEX_EXACT
        return pattern.match(self.text, at, min(self.n, at + _REGEX_EXACT))


# Child environment ################################################################

# What every child gets from the gateway's environment (SPEC §3): neutral variables a
# program needs to run, never the whole environment (which holds the user's secrets).
NEUTRAL_ENV: tuple[str, ...] = (
    "PATH",
    "HOME",
    "USER",
    "LOGNAME",
    "SHELL",
    "LANG",
    "LC_ALL",
    "LC_CTYPE",
    "TZ",
    "TERM",
    "TMPDIR",
    "SYSTEMROOT",
    # Windows needs these to start node, npx and python at all.
    "TEMP",
    "TMP",
    "PATHEXT",
    "COMSPEC",
    "WINDIR",
    "USERPROFILE",
    "APPDATA",
    "LOCALAPPDATA",
    # Language runtimes: where a child finds its interpreter and packages.
    "PYTHONPATH",
    "PYTHONHOME",
    "PYTHONIOENCODING",
    "PYTHONUTF8",
    "VIRTUAL_ENV",
    "NODE_OPTIONS",
    "NODE_PATH",
    "NVM_DIR",
)
_TEMPLATE_RE = re.compile(r"\$\{([^}]*)\}")


def _template_problem(template: str) -> str | None:
    """Why an env: value is not a valid template (only ${VAR} is a form), else None."""
    for match in _TEMPLATE_RE.finditer(template):
        if not _ENV_NAME_RE.match(match.group(1)):
            return f"${{{match.group(1)}}} is not supported: only ${{VAR}} is"
    if "${" in _TEMPLATE_RE.sub("", template):
        return "has a '${' without a closing '}'"
    return None


def expand_env(
    template: str, environ: Mapping[str, str], server: str, key: str, what: str = "env"
) -> str:
    """Expand every ${VAR} of an env: (or headers:) value from environ; an unset VAR is an
    error."""
    problem = _template_problem(template)
    if problem:
        raise ReaError(f"server {server!r}: {what} {key}: {problem}; write ${{NAME}}")

    def value_of(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in environ:
            raise ReaError(
                f"server {server!r}: {what} {key} needs ${{{name}}}, which is not set; "
                f"export {name} before starting rea, or remove it from the registry"
            )
        return environ[name]

    return _TEMPLATE_RE.sub(value_of, template)


def child_environment(spec: ServerSpec, environ: Mapping[str, str]) -> dict[str, str]:
    """A child's whole environment: the neutral allowlist, then passthrough, then env:."""
    result = {name: environ[name] for name in NEUTRAL_ENV if name in environ}
    for name in spec.env_passthrough:
        if name in environ:
            result[name] = environ[name]
    for key, template in spec.env.items():
        result[key] = expand_env(template, environ, spec.name, key)
    return result


# Configuration loading ############################################################


def find_root(root_arg: str | None, cwd: Path | None = None) -> Path:
    """The project root (SPEC §1): --root; else the nearest ancestor holding .rea/; else cwd."""
    here = (cwd if cwd is not None else Path.cwd()).resolve()
    if root_arg is not None:
        root = (here / Path(root_arg).expanduser()).resolve()
        if not root.is_dir():
            raise ReaError(f"--root {root_arg}: no such directory; give an existing folder")
        return root
    for folder in (here, *here.parents):
        if (folder / REA_DIR).is_dir():
            return folder
    return here


@dataclass(frozen=True)
class Governance:
    """Where a root's governance lives (§2). Outside a linked git worktree, all of it is
    in `root/.rea`. In a linked worktree (agents in parallel worktrees of one repository)
    the audit chain, its head and lock, and the pins live in the primary checkout's
    `.rea/`, and its HALT stops every worktree: governance is per repository."""

    own: Path  # policy, registry, live state and this root's own HALT
    shared: Path  # the audit chain, its head, lock and cuts; fingerprints.json

    @property
    def linked(self) -> bool:
        return self.shared != self.own

    @property
    def halt_files(self) -> tuple[Path, ...]:
        own = self.own / "HALT"
        return (own,) if not self.linked else (own, self.shared / "HALT")


def governance_of(root: Path) -> Governance:
    own = root / REA_DIR
    primary = primary_checkout(root)
    return Governance(own, primary / REA_DIR if primary is not None else own)


def primary_checkout(root: Path) -> Path | None:
    """The primary checkout when root lies in a linked git worktree (its `.git` is a file
    naming a git dir under the primary's `.git/worktrees/`), else None."""
    for folder in (root, *root.parents):
        git = folder / ".git"
        if git.is_dir():
            return None
        if not git.is_file():
            continue
        try:
            text = git.read_text(encoding="utf-8", errors="replace")
            match = re.match(r"gitdir:\s*(.+)", text.strip())
            if match is None:
                return None
            gitdir = (folder / match.group(1).strip()).resolve()
            common = gitdir.parent.parent
            commondir = gitdir / "commondir"
            if commondir.is_file():
                common = (gitdir / commondir.read_text(encoding="utf-8").strip()).resolve()
        except OSError:
            return None
        if common.name == ".git" and common.parent != folder:
            return common.parent
        return None
    return None


def _read_document(
    rea_dir: Path, stem: str
) -> tuple[object, Path | None, dict[str, tuple[int, int]]]:
    """Parse `<stem>.yaml` or `<stem>.json` in rea_dir; (None, None) when neither exists."""
    yaml_path = rea_dir / f"{stem}.yaml"
    json_path = rea_dir / f"{stem}.json"
    if yaml_path.exists() and json_path.exists():
        raise ReaError(
            f"{rea_dir}: both {stem}.yaml and {stem}.json exist; keep one and delete the other"
        )
    path = json_path if json_path.exists() else yaml_path
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None, None, {}
    except (OSError, UnicodeDecodeError) as err:
        raise ReaError(f"{path}: cannot be read ({err}); make it a readable UTF-8 file") from err
    if path.suffix == ".json":
        return _parse_json(text, str(path)), path, {}
    value, located = parse_yaml_located(text, str(path))
    return value, path, located


def _parse_json(text: str, filename: str) -> object:
    """json.loads with refusals a user can act on: line:col, and no silent duplicate keys."""
    if not text.strip():
        return None

    def no_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
        result: dict[str, object] = {}
        for key, value in pairs:
            if key in result:
                raise ReaError(f"{filename}: duplicate key {key!r}; keep one of them")
            result[key] = value
        return result

    try:
        value: object = json.loads(text, object_pairs_hook=no_duplicates)
    except json.JSONDecodeError as err:
        raise ReaError(f"{filename}:{err.lineno}:{err.colno}: {err.msg}") from err
    except (ValueError, RecursionError) as err:  # huge integers, absurd nesting
        raise ReaError(f"{filename}: not usable JSON ({err})") from None
    return value


def load_registry(rea_dir: Path) -> Registry:
    """Load `.rea/registry.yaml` (or .json). A missing or empty file means no servers."""
    value, path, located = _read_document(rea_dir, "registry")
    if path is None:
        return Registry()
    try:
        return replace(registry_from_value(value, str(path)), source=path)
    except ReaError as err:
        raise _locate(err, str(path), located) from None


def load_policy(rea_dir: Path) -> Policy:
    """Load `.rea/policy.yaml` (or .json). A missing file means the defaults."""
    value, path, located = _read_document(rea_dir, "policy")
    if path is None:
        return Policy()
    try:
        return replace(policy_from_value(value, str(path)), source=path)
    except ReaError as err:
        raise _locate(err, str(path), located) from None


def _describe(value: object) -> str:
    """A value as an error message names it."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return f"the number {value}"
    if isinstance(value, str):
        return f"the text {value!r}"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return type(value).__name__


class _Section:
    """One mapping of a config document under validation: typed reads, strict keys.

    Every refusal names the file, the key path and the fix. A key given as null
    means its default, as if it were absent.
    """

    def __init__(
        self,
        value: object,
        filename: str,
        place: str,
        allowed: Iterable[str],
        ignored: Iterable[str] = (),
    ) -> None:
        self.filename = filename
        self.place = place
        self.data: dict[str, object] = {}
        if value is None:
            return
        if not isinstance(value, dict):
            raise self.fail(
                "", f"must be a mapping, got {_describe(value)}", "write key: value lines"
            )
        known = set(allowed)
        skip = set(ignored)
        for key, item in value.items():
            name = str(key)
            if name in skip:
                continue
            if name not in known:
                raise self.fail(
                    name, "unknown key", f"remove it; known keys are {', '.join(sorted(known))}"
                )
            self.data[name] = item

    def path(self, key: str) -> str:
        if not key:
            return self.place or "(top level)"
        return f"{self.place}.{key}" if self.place else key

    def fail(self, key: str, what: str, fix: str) -> ReaError:
        return ReaError(f"{self.filename}: {self.path(key)}: {what}; {fix}")

    def get(self, key: str) -> object:
        return self.data.get(key)

    def section(self, key: str, allowed: Iterable[str]) -> _Section:
        return _Section(self.get(key), self.filename, self.path(key), allowed)

    def string(self, key: str, default: str, choices: tuple[str, ...] = ()) -> str:
        value = self.get(key)
        if value is None:
            return default
        if not isinstance(value, str) or (choices and value not in choices):
            if choices:
                raise self.fail(
                    key,
                    f"must be one of {' | '.join(choices)}, got {_describe(value)}",
                    f"write one of {', '.join(choices)}",
                )
            raise self.fail(key, f"must be text, got {_describe(value)}", "quote the value")
        return value

    def boolean(self, key: str, default: bool) -> bool:
        value = self.get(key)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise self.fail(
                key, f"must be true or false, got {_describe(value)}", "write true or false"
            )
        return value

    def integer(self, key: str, default: int, minimum: int, maximum: int | None = None) -> int:
        value = self.get(key)
        if value is None:
            return default
        # bool is an int in Python; `true` is never a count.
        ok = isinstance(value, int) and not isinstance(value, bool)
        if (
            ok
            and isinstance(value, int)
            and value >= minimum
            and (maximum is None or value <= maximum)
        ):
            return value
        bound = f"from {minimum} to {maximum}" if maximum is not None else f">= {minimum}"
        raise self.fail(
            key,
            f"must be a whole number {bound}, got {_describe(value)}",
            f"write a number {bound}",
        )

    def optional_integer(self, key: str, minimum: int, maximum: int | None = None) -> int | None:
        if self.get(key) is None:
            return None
        return self.integer(key, 0, minimum, maximum)

    def number(self, key: str, default: float, positive: bool) -> float:
        value = self.get(key)
        if value is None:
            return default
        if isinstance(value, int | float) and not isinstance(value, bool):
            number = float(value)
            if math.isfinite(number) and (number > 0 or (not positive and number == 0)):
                return number
        bound = "> 0" if positive else ">= 0"
        raise self.fail(
            key, f"must be a number {bound}, got {_describe(value)}", f"write a number {bound}"
        )

    def string_list(self, key: str, what: str = "text") -> tuple[str, ...]:
        value = self.get(key)
        if value is None:
            return ()
        if not isinstance(value, list):
            raise self.fail(
                key, f"must be a list, got {_describe(value)}", "write [a, b] or - lines"
            )
        result: list[str] = []
        for index, item in enumerate(value):
            if not isinstance(item, str) or not item:
                raise self.fail(
                    f"{key}[{index}]",
                    f"must be non-empty {what}, got {_describe(item)}",
                    "quote the value",
                )
            result.append(item)
        return tuple(result)

    def string_map(self, key: str) -> dict[str, str]:
        value = self.get(key)
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise self.fail(
                key, f"must be a mapping, got {_describe(value)}", "write key: value lines"
            )
        result: dict[str, str] = {}
        for name, item in value.items():
            if not isinstance(item, str):
                raise self.fail(
                    f"{key}.{name}", f"must be text, got {_describe(item)}", "quote the value"
                )
            result[str(name)] = item
        return result

    def entries(self, key: str) -> list[tuple[str, object]]:
        """A list under key, as (place, item) pairs."""
        value = self.get(key)
        if value is None:
            return []
        if not isinstance(value, list):
            raise self.fail(key, f"must be a list, got {_describe(value)}", "write - entries")
        return [(f"{self.path(key)}[{index}]", item) for index, item in enumerate(value)]


_SERVER_KEYS = (
    "name",
    "command",
    "args",
    "env",
    "env_passthrough",
    "tier_overrides",
    "enabled",
    "trust_annotations",
    "tools",
    "url",
    "headers",
    "oauth",
)
_LOCAL_ONLY_KEYS = ("args", "env", "env_passthrough")  # a remote server has no process
_REMOTE_ONLY_KEYS = ("headers", "oauth")

# Headers rea sets itself on every request to a remote server (§13): `headers:` may not
# replace them, or a registry could forge a session or a protocol version.
_OWN_HEADERS = frozenset(
    {
        "accept",
        "content-type",
        "content-length",
        "host",
        "connection",
        "transfer-encoding",
        "mcp-session-id",
        "mcp-protocol-version",
        "mcp-method",
        "mcp-name",
        "last-event-id",
    }
)
_HEADER_NAME_RE = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")  # RFC 9110 §5.6.2 token


def is_loopback_host(host: str) -> bool:
    """127.0.0.0/8, ::1 (also as ::ffff:127.x) or the name localhost."""
    import ipaddress

    host = host.strip("[]").lower()
    if host == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_loopback
    return address.is_loopback


def public_url(url: str) -> str:
    """A URL as it may be shown: no user, password, query or fragment (they may hold secrets)."""
    try:
        parts = urllib.parse.urlsplit(url)
        host = parts.hostname or ""
        port = parts.port
    except ValueError:
        return "the URL"
    if ":" in host:
        host = f"[{host}]"
    netloc = host if port is None else f"{host}:{port}"
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def check_remote_url(url: str) -> str | None:
    """What is wrong with the URL of a remote server or an authorization server, or None.

    Only https://, or http:// to this machine (§13): a token or a tool call in clear text
    over a network is readable by anyone on the path. The text never shows a query or a
    password, which may be secrets.
    """
    if not url or any(ch.isspace() or ord(ch) < 0x20 or ord(ch) == 0x7F for ch in url):
        return "the URL is empty or has spaces or control characters"
    try:
        parts = urllib.parse.urlsplit(url)
        _ = parts.port  # a port that is not a number in range raises here
    except ValueError as exc:
        return f"{public_url(url)} is not a valid URL ({exc})"
    shown = public_url(url)
    scheme = parts.scheme.lower()
    if scheme not in ("https", "http"):
        return f"{shown}: only https:// is accepted (or http:// to 127.0.0.1, ::1 or localhost)"
    if not parts.hostname:
        return f"{shown}: the URL has no host"
    if parts.username is not None or parts.password is not None:
        return f"{shown}: the URL carries a user or password; put credentials under headers:"
    if parts.fragment:
        return f"{shown}: the URL has a #fragment; remove it"
    if scheme == "http" and not is_loopback_host(parts.hostname):
        return f"{shown}: http:// is accepted only to this machine (127.0.0.1, ::1, localhost); use https://"
    return None


def header_name_problem(name: str) -> str | None:
    """Why `name` cannot be a header of `headers:`, or None."""
    if not _HEADER_NAME_RE.fullmatch(name):
        return "is not a valid HTTP header name"
    if name.lower() in _OWN_HEADERS or name.lower().startswith("mcp-param-"):
        return "is set by rea itself"
    return None


def header_value_problem(value: str) -> str | None:
    """Why a header value cannot be sent (a line break would start a header of its own);
    the value itself is never part of the answer: it may be a secret."""
    if any(not (0x20 <= ord(ch) <= 0x7E or ch == "\t") for ch in value):
        return "has a line break, a control or a non-ASCII character"
    return None


def registry_from_value(value: object, filename: str) -> Registry:
    """Validate a parsed registry document (SPEC §3) into a Registry."""
    top = _Section(value, filename, "", ("version", "servers"))
    version = top.string("version", "1")
    if version != "1":
        raise top.fail("version", f"unsupported version {version!r}", 'write version: "1"')
    servers: list[ServerSpec] = []
    seen: dict[str, str] = {}
    for place, item in top.entries("servers"):
        spec = _server_from_value(item, filename, place)
        if spec.name in seen:
            raise ReaError(
                f"{filename}: {place}.name: duplicate server name {spec.name!r} "
                f"(also {seen[spec.name]}); give each server its own name"
            )
        seen[spec.name] = place
        servers.append(spec)
    return Registry(version=version, servers=tuple(servers))


def _server_from_value(value: object, filename: str, place: str) -> ServerSpec:
    if value is None:
        raise ReaError(f"{filename}: {place}: empty server entry; give it a name and a command")
    s = _Section(value, filename, place, _SERVER_KEYS)
    name = s.string("name", "")
    if not SERVER_NAME_RE.match(name):
        raise s.fail(
            "name",
            f"{name!r} is not a valid server name" if name else "missing",
            "use lowercase letters, digits and '-', starting with a letter or digit",
        )
    command = s.string("command", "")
    url = s.string("url", "")
    if command and url:
        raise s.fail(
            "url",
            "a server has exactly one of command and url",
            "keep command for a local server or url for a remote one",
        )
    if not command and not url:
        raise s.fail(
            "command",
            "missing",
            "give the program to start, such as npx, or the url of a remote server",
        )
    overrides = s.string_map("tier_overrides")
    for tool, tier in overrides.items():
        if tier not in TIERS:
            raise s.fail(
                f"tier_overrides.{tool}", f"unknown tier {tier!r}", "use read, write or destructive"
            )
    spec = _remote_server(s, url) if url else _local_server(s, command)
    return replace(
        spec,
        name=name,
        tier_overrides=overrides,
        enabled=s.boolean("enabled", True),
        trust_annotations=s.boolean("trust_annotations", False),
        tools=s.string_list("tools", "tool-name globs") if s.get("tools") is not None else None,
    )


def _local_server(s: _Section, command: str) -> ServerSpec:
    """What only a server started as a child process has (SPEC §3)."""
    for key in _REMOTE_ONLY_KEYS:
        if s.get(key) is not None:
            raise s.fail(
                key, "is for a remote server (url)", f"remove {key}, or give a url, not a command"
            )
    args = s.string_list("args")
    env = s.string_map("env")
    for key, template in env.items():
        if not _ENV_NAME_RE.match(key):
            raise s.fail(f"env.{key}", "not a valid variable name", "use letters, digits and _")
        problem = _template_problem(template)
        if problem:
            raise s.fail(f"env.{key}", problem, "write ${NAME} with NAME a variable name")
    passthrough = s.string_list("env_passthrough", "variable names")
    for index, name_ in enumerate(passthrough):
        where = f"env_passthrough[{index}]"
        if not _ENV_NAME_RE.match(name_):
            raise s.fail(where, f"{name_!r} is not a variable name", "use letters, digits and _")
        if _SECRET_NAME_RE.search(name_):
            raise s.fail(
                where,
                f"{name_!r} looks like a secret and cannot be passed through",
                f'map it explicitly under env: ({name_}: "${{{name_}}}")',
            )
    return ServerSpec(name="", command=command, args=args, env=env, env_passthrough=passthrough)


def _remote_server(s: _Section, url: str) -> ServerSpec:
    """What only a remote server has (SPEC §3, §13): its URL, headers and OAuth client."""
    for key in _LOCAL_ONLY_KEYS:
        if s.get(key) is not None:
            raise s.fail(
                key,
                "is for a local server (command)",
                f"remove {key}: a remote server runs no process",
            )
    problem = check_remote_url(url)
    if problem is not None:
        raise s.fail("url", problem, "give the server's https:// address")
    if "${" in url:
        raise s.fail("url", "${VAR} is not expanded in url", "put a secret under headers: instead")
    headers = s.string_map("headers")
    seen: set[str] = set()
    for key, template in headers.items():
        where = f"headers.{key}"
        problem = header_name_problem(key)
        if problem is not None:
            raise s.fail(where, f"{key!r} {problem}", "remove it, or rename it")
        if key.lower() in seen:
            raise s.fail(where, "appears twice (names ignore case)", "keep one of them")
        seen.add(key.lower())
        problem = _template_problem(template) or header_value_problem(template)
        if problem is not None:
            raise s.fail(where, f"the value {problem}", "write one line of text, or ${NAME}")
    o = s.section("oauth", ("client_id", "scopes", "client_metadata_url"))
    scopes = o.string_list("scopes", "scope names")
    for index, scope in enumerate(scopes):
        if any(ch.isspace() or ch in '"\\' for ch in scope):
            raise o.fail(f"scopes[{index}]", f"{scope!r} is not a scope name", "one scope per item")
    document = o.string("client_metadata_url", "") or None
    if document is not None and (
        not document.startswith("https://") or check_remote_url(document) is not None
    ):
        raise o.fail(
            "client_metadata_url", "must be an https:// URL", "give the document's https address"
        )
    oauth = OAuthSettings(o.string("client_id", "") or None, scopes, document)
    return ServerSpec(name="", url=url, headers=headers, oauth=oauth)


# Keys of the reference tool's policy files that the gateway accepts and ignores.
_POLICY_IGNORED = (
    "version",
    "profile",
    "installed_by",
    "installed_at",
    "promotion_requires_human_approval",
    "block_ai_attribution",
    "notification_channel",
    "context_protection",
    "review",
)
_POLICY_KEYS = (
    "autonomy_level",
    "max_autonomy_level",
    "blocked_paths",
    "injection_detection",
    "injection",
    "redact",
    "audit",
    "gateway",
)
_GATEWAY_KEYS = (
    "health",
    "call_timeout_s",
    "startup_wait_s",
    "max_tool_name",
    "max_result_kb",
    "breaker",
    "session_blocker_threshold",
    "servers",
    "blocked_tools",
    "metrics_port",
    "restart_backoff_s",
)


def policy_from_value(value: object, filename: str) -> Policy:
    """Validate a parsed policy document (SPEC §4) into a Policy."""
    top = _Section(value, filename, "", _POLICY_KEYS, ignored=_POLICY_IGNORED)
    profile = value.get("profile") if isinstance(value, dict) else None
    autonomy = top.string("autonomy_level", "L1", LEVELS)
    ceiling = top.string("max_autonomy_level", "L2", LEVELS)
    if LEVELS.index(autonomy) > LEVELS.index(ceiling):
        raise top.fail(
            "autonomy_level",
            f"{autonomy} is above max_autonomy_level {ceiling}",
            f"lower autonomy_level to {ceiling} or raise max_autonomy_level",
        )
    injection = top.section("injection", ("suspicious_blocks_writes",))
    redact = top.section("redact", ("patterns",))
    audit = top.section("audit", ("rotation", "fsync"))
    rotation = audit.section("rotation", ("max_bytes", "max_age_days"))
    gateway = top.section("gateway", _GATEWAY_KEYS)
    health = gateway.section("health", ("expose_diagnostics",))
    breaker = gateway.section("breaker", ("failure_threshold", "cooldown_s"))
    return Policy(
        profile=profile if isinstance(profile, str) else None,
        autonomy_level=autonomy,
        max_autonomy_level=ceiling,
        blocked_paths=top.string_list("blocked_paths", "path globs"),
        injection_detection=top.string("injection_detection", "warn", ("block", "warn")),
        suspicious_blocks_writes=injection.boolean("suspicious_blocks_writes", False),
        redact_patterns=tuple(
            _redact_pattern(item, filename, place) for place, item in redact.entries("patterns")
        ),
        audit_max_bytes=rotation.integer("max_bytes", 50 * 1024 * 1024, 1),
        audit_max_age_days=rotation.optional_integer("max_age_days", 1),
        audit_fsync=audit.string("fsync", "always", ("always", "batch", "off")),
        expose_diagnostics=health.boolean("expose_diagnostics", False),
        call_timeout_s=gateway.number("call_timeout_s", 60.0, positive=True),
        startup_wait_s=gateway.number("startup_wait_s", 5.0, positive=False),
        # Shortened names keep a hash suffix; fewer than 16 characters leaves no room.
        max_tool_name=gateway.integer("max_tool_name", 52, 16),
        max_result_kb=gateway.integer("max_result_kb", 512, 1),
        breaker_failure_threshold=breaker.integer("failure_threshold", 5, 1),
        breaker_cooldown_s=breaker.number("cooldown_s", 30.0, positive=True),
        session_blocker_threshold=gateway.integer("session_blocker_threshold", 3, 1),
        server_limits=_server_limits(gateway),
        blocked_tools=gateway.string_list("blocked_tools", "tool names"),
        metrics_port=gateway.optional_integer("metrics_port", 1, 65535),
        restart_backoff_s=gateway.number("restart_backoff_s", 0.5, positive=True),
    )


def _server_limits(gateway: _Section) -> dict[str, ServerLimits]:
    servers = gateway.get("servers")
    if servers is None:
        return {}
    if not isinstance(servers, dict):
        raise gateway.fail(
            "servers", f"must be a mapping, got {_describe(servers)}", "write name: lines"
        )
    limits: dict[str, ServerLimits] = {}
    for name, value in servers.items():
        if not SERVER_NAME_RE.match(name):
            raise gateway.fail(
                f"servers.{name}", "not a valid server name", "use the name from registry.yaml"
            )
        s = _Section(
            value,
            gateway.filename,
            gateway.path(f"servers.{name}"),
            ("calls_per_minute", "max_concurrent_calls"),
        )
        limits[name] = ServerLimits(
            calls_per_minute=s.integer("calls_per_minute", 0, 0),
            max_concurrent_calls=s.integer("max_concurrent_calls", 0, 0),
        )
    return limits


def _redact_pattern(value: object, filename: str, place: str) -> RedactPattern:
    s = _Section(value, filename, place, ("name", "regex", "flags"))
    name = s.string("name", "")
    regex = s.string("regex", "")
    if not name:
        raise s.fail("name", "missing", "name the pattern, it shows in audit records")
    if not regex:
        raise s.fail("regex", "missing", "give a Python regular expression")
    flags = s.string("flags", "")
    bad = sorted(set(flags) - set(_REGEX_FLAGS))
    if bad:
        raise s.fail("flags", f"unknown flag {bad[0]!r}", "use letters among i m s x")
    problem = check_user_regex(regex, flags)
    if problem:
        raise s.fail("regex", problem, "simplify the pattern")
    return RedactPattern(name=name, regex=regex, flags=flags)


# Configuration as JSON ########################################################


def policy_to_json(policy: Policy) -> dict[str, object]:
    """The policy nested as its YAML keys, every default filled in."""
    return {
        "profile": policy.profile,
        "autonomy_level": policy.autonomy_level,
        "max_autonomy_level": policy.max_autonomy_level,
        "blocked_paths": list(policy.blocked_paths),
        "injection_detection": policy.injection_detection,
        "injection": {"suspicious_blocks_writes": policy.suspicious_blocks_writes},
        "redact": {
            "patterns": [
                {"name": p.name, "regex": p.regex, "flags": p.flags} for p in policy.redact_patterns
            ]
        },
        "audit": {
            "rotation": {
                "max_bytes": policy.audit_max_bytes,
                "max_age_days": policy.audit_max_age_days,
            },
            "fsync": policy.audit_fsync,
        },
        "gateway": {
            "health": {"expose_diagnostics": policy.expose_diagnostics},
            "call_timeout_s": policy.call_timeout_s,
            "startup_wait_s": policy.startup_wait_s,
            "max_tool_name": policy.max_tool_name,
            "max_result_kb": policy.max_result_kb,
            "breaker": {
                "failure_threshold": policy.breaker_failure_threshold,
                "cooldown_s": policy.breaker_cooldown_s,
            },
            "session_blocker_threshold": policy.session_blocker_threshold,
            "servers": {
                name: {
                    "calls_per_minute": limits.calls_per_minute,
                    "max_concurrent_calls": limits.max_concurrent_calls,
                }
                for name, limits in policy.server_limits.items()
            },
            "blocked_tools": list(policy.blocked_tools),
            "metrics_port": policy.metrics_port,
            "restart_backoff_s": policy.restart_backoff_s,
        },
    }


def registry_to_json(registry: Registry) -> dict[str, object]:
    """The registry as JSON with every env: and headers: value withheld (SPEC §3: never
    shown); a local server has its process keys, a remote one its url, headers and oauth."""
    return {"version": registry.version, "servers": [_server_to_json(s) for s in registry.servers]}


def _server_to_json(spec: ServerSpec) -> dict[str, object]:
    how: dict[str, object]
    if spec.remote:
        how = {
            "url": public_url(spec.url),  # a query or user may hold a secret: withheld too
            "headers": {key: _WITHHELD for key in spec.headers},
            "oauth": {
                "client_id": spec.oauth.client_id,
                "scopes": list(spec.oauth.scopes),
                "client_metadata_url": spec.oauth.client_metadata_url,
            },
        }
    else:
        how = {
            "command": spec.command,
            "args": list(spec.args),
            "env": {key: _WITHHELD for key in spec.env},
            "env_passthrough": list(spec.env_passthrough),
        }
    return {
        "name": spec.name,
        **how,
        "tier_overrides": dict(spec.tier_overrides),
        "enabled": spec.enabled,
        "trust_annotations": spec.trust_annotations,
        "tools": list(spec.tools) if spec.tools is not None else None,
    }


# Tiers and autonomy ##########################################################

READ_PREFIXES = (
    "get_",
    "list_",
    "search_",
    "query_",
    "read_",
    "fetch_",
    "check_",
    "health_",
    "describe_",
    "show_",
    "count_",
)
DESTRUCTIVE_PREFIXES = (
    "delete_",
    "drop_",
    "purge_",
    "remove_",
    "destroy_",
    "ban_",
    "kick_",
    "revoke_",
    "truncate_",
)
TIER_RANK = {"read": 0, "write": 1, "destructive": 2}

# Which tiers each autonomy level lets run (§6 step 5).
_AUTONOMY_TIERS: dict[str, frozenset[str]] = {
    "L0": frozenset({"read"}),
    "L1": frozenset({"read", "write"}),
    "L2": frozenset({"read", "write"}),
    "L3": frozenset({"read", "write", "destructive"}),
}


def tier_from_name(tool: str) -> Tier:
    """The tier a bare tool name implies (§6 step 4). Case-insensitive on the prefix."""
    lowered = tool.lower()
    # Destructive first: a name can never read its way out of being destructive.
    if lowered.startswith(DESTRUCTIVE_PREFIXES):
        return Tier.DESTRUCTIVE
    if lowered.startswith(READ_PREFIXES):
        return Tier.READ
    return Tier.WRITE


def resolve_tier(
    tool: str,
    annotations: Mapping[str, object] | None,
    trust_annotations: bool,
    override: str | None,
) -> tuple[Tier, str | None]:
    """The tier of one call: name, then annotations, then the policy override (§6 step 4).

    Annotations are untrusted hints. Absent annotations change nothing (the protocol's
    default `destructiveHint: true` would otherwise make every unannotated tool
    destructive). An explicit `destructiveHint: true` always raises, even next to a
    contradictory `readOnlyHint: true`, because raising is always safe. An explicit
    `readOnlyHint: true` lowers to read only for a trusted server, only when the name is
    not destructive and `destructiveHint` is not explicitly true. The override may raise
    the tier; a lowering (or unknown) override is ignored and the warning says so.
    """
    tier = tier_from_name(tool)
    ann = annotations or {}
    destructive_hint = ann.get("destructiveHint") is True
    read_only_hint = ann.get("readOnlyHint") is True
    if destructive_hint:
        tier = Tier.DESTRUCTIVE
    elif read_only_hint and trust_annotations and tier is not Tier.DESTRUCTIVE:
        tier = Tier.READ
    warning: str | None = None
    if override is not None:
        if override not in TIER_RANK:
            warning = f"tier override {override!r} for {tool!r} is not a tier; ignored"
        elif TIER_RANK[override] >= TIER_RANK[tier]:
            tier = Tier(override)
        else:
            warning = (
                f"tier override {override!r} for {tool!r} would lower tier {tier!r}; "
                "overrides may only raise a tier, ignored"
            )
    return tier, warning


def autonomy_allows(level: str, tier: str) -> bool:
    """Whether an autonomy level lets a tier run. Unknown levels or tiers allow nothing."""
    return tier in _AUTONOMY_TIERS.get(level, frozenset())


def glob_match_tool(patterns: Sequence[str], name: str) -> bool:
    """Whether `server__tool` matches a `gateway.blocked_tools` glob (fnmatchcase)."""
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)


# Blocked paths ###############################################################

# The governance folder is always blocked: an agent must not edit its own rules.
_ALWAYS_BLOCKED = REA_DIR + "/"
_MAX_DECODE_ROUNDS = 3
# Readings of one string at most (trim x decode x `\` x NUL, ~48 in practice): a bound
# for an adversarial mix of them.
_MAX_FORMS = 128
# Linux NAME_MAX: no longer component exists, so the walk need not ask the disk.
_NAME_MAX_BYTES = 255
# Symlinks one walk follows before it stops, as the kernel does (ELOOP).
_MAX_LINKS = 40
# Only strings this short are memoised: a long content string rarely comes back, and the
# memo must not pin megabytes.
_MEMO_MAX_CHARS = 1024
_MEMO_MAX_ENTRIES = 4096
_URI_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.\-]+):")
_URL_IGNORED = re.compile(r"[\t\n\r]")
_C0_AND_SPACE = "".join(map(chr, range(0x21)))
# What a server's trim may drop at either end: the C0 controls (a sanitiser), Unicode
# whitespace (what str.isspace() holds: Python's strip; JS's trim, which also drops the
# BOM). A set for str.strip, linear in the text (a regex anchored at the end is not).
_TRIM_CHARS = (
    _C0_AND_SPACE
    + "\x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a\u2028\u2029\u202f\u205f\u3000\ufeff"
)
_FILE_URI = re.compile(r"file:", re.IGNORECASE)
_LEADING_SLASHES = re.compile(r"^/+")
# Links the kernel resolves per process: the gateway would see its own cwd, root or
# descriptors where the child sees the child's, so they are refused outright (§6).
# cwd, root and fd resolve in the server's process, not ours; environ and mem hold its
# secrets (its env: values) whatever the policy says
_PROC_LINK = re.compile(r"/proc/[^/]+/(?:task/[^/]+/)?(cwd|root|fd|environ|mem)(?:/|\Z)", re.DOTALL)
_ANCESTOR_OF_REA = "a folder holding .rea/, in a write"
# In a linked worktree .git is the file that says where governance lives (§2), and in
# any checkout its hooks run code: never written through a tool.
_GIT_IN_A_WRITE = "the repository's .git, in a write"


@dataclass(frozen=True)
class _CompiledGlob:
    """One blocked_paths glob, compiled once: its source text, its kind and its regexes.

    kind: "absolute" matches the absolute path; "anchored" (has a `/` inside) matches
    the path relative to the root; "basename" (no `/` inside) matches any component.
    `ancestor` (anchored and absolute globs) matches the folders above a match, which a
    write-tier call may not name: moving `config/` would carry `config/prod.yml` away.
    """

    source: str
    kind: str
    regex: re.Pattern[str]
    ancestor: re.Pattern[str] | None = None


def _glob_body_to_regex(body: str) -> str:
    """Translate `*`, `**`, `?` to a regex; everything else is literal."""
    out: list[str] = []
    i = 0
    while i < len(body):
        ch = body[i]
        if body.startswith("**/", i):
            out.append("(?:.*/)?")  # `**/` is zero or more whole directories
            i += 3
        elif body.startswith("**", i):
            out.append(".*")
            i += 2
        elif ch == "*":
            out.append("[^/]*")
            i += 1
        elif ch == "?":
            out.append("[^/]")
            i += 1
        else:
            out.append(re.escape(ch))
            i += 1
    return "".join(out)


def _ancestor_regex(body: str, flags: int) -> re.Pattern[str] | None:
    """The folders strictly above what `body` matches, up to its first `**`."""
    segments = body.split("/")[:-1]
    fixed: list[str] = []
    for segment in segments:
        if "**" in segment:
            break
        fixed.append(_glob_body_to_regex(segment))
    if not fixed:
        return None
    nested = ""
    for segment_regex in reversed(fixed[1:]):
        nested = f"(?:/{segment_regex}{nested})?"
    return re.compile(fixed[0] + nested, flags)


def _compile_glob(source: str, home: str, flags: int) -> _CompiledGlob | None:
    """Compile one glob; None for an empty one (it would block nothing or everything)."""
    flags |= re.DOTALL  # a component may hold a newline; `**` crosses it too
    glob = source.strip().replace("\\", "/")
    if glob == "~" or glob.startswith("~/"):
        glob = home + glob[1:]
    while glob.startswith("./"):
        glob = glob[2:]
    glob = glob.rstrip("/")  # a trailing `/` adds nothing: every match covers descendants
    if glob.startswith("/"):
        body = _LEADING_SLASHES.sub("", glob)
        if not body:
            return None
        # A match covers the named path and everything below it.
        pattern = "/" + _glob_body_to_regex(body) + r"(?:/.*)?"
        ancestor = _ancestor_regex(body, flags)
        return _CompiledGlob(
            source,
            "absolute",
            re.compile(pattern, flags),
            re.compile("/(?:" + ancestor.pattern + ")?", flags) if ancestor else None,
        )
    if not glob:
        return None
    if "/" in glob:
        pattern = _glob_body_to_regex(glob) + r"(?:/.*)?"
        return _CompiledGlob(
            source, "anchored", re.compile(pattern, flags), _ancestor_regex(glob, flags)
        )
    pattern = "(?:^|/)" + _glob_body_to_regex(glob) + r"(?:/|\Z)"
    return _CompiledGlob(source, "basename", re.compile(pattern, flags))


def _detect_case_insensitive(root: Path) -> bool:
    """Probe whether names under root compare case-insensitively (macOS, Windows)."""
    try:
        with os.scandir(root) as entries:
            for entry in entries:
                swapped = entry.name.swapcase()
                if swapped != entry.name:
                    try:
                        return os.path.samestat(
                            entry.stat(follow_symlinks=False), os.lstat(root / swapped)
                        )
                    except OSError:
                        return False
        name = root.name
        if name.swapcase() != name:
            try:
                return os.path.samestat(os.stat(root), os.stat(root.parent / name.swapcase()))
            except OSError:
                return False
    except OSError:
        pass
    return os.path.normcase("A") == "a"


def _home_dir_of(user: str) -> str | None:
    """`~user` expansion; None when the user is unknown or there is no pwd module."""
    try:
        import pwd

        return pwd.getpwnam(user).pw_dir
    except (ImportError, KeyError):
        return None


# Argument names that say "a path" (by their words: `source`, `repo_path`, `destDir`): an
# empty or blank string under one names the root
# for a server that resolves it (Node's path.resolve("") is the working directory). Under
# any other name (`content`, `old_text`) an empty string is text, and writes of it pass.
_PATH_WORDS = frozenset(
    [
        "path",
        "paths",
        "file",
        "files",
        "filename",
        "filepath",
        "dir",
        "directory",
        "folder",
        "root",
        "source",
        "src",
        "dest",
        "destination",
        "dst",
        "target",
        "from",
        "to",
        "location",
        "uri",
        "url",
        "cwd",
        "repo",
    ]
)


_PATH_NAMES: dict[str, bool] = {}  # the same few argument names come call after call


def _names_a_path(key: str) -> bool:
    found = _PATH_NAMES.get(key)
    if found is None:
        words = re.findall(r"[A-Z]+(?![a-z])|[A-Z][a-z]*|[a-z]+", key)  # snake, camel, UPPER
        found = any(word.lower() in _PATH_WORDS for word in words)
        if len(key) <= 64:  # bounded: a client choosing keys cannot grow it
            if len(_PATH_NAMES) >= 4096:
                _PATH_NAMES.clear()
            _PATH_NAMES[key] = found
    return found


def _empty_path_argument(value: object, key: str = "") -> str | None:
    """The argument name of a string naming a path that some reading leaves blank (a
    server's trim, up to three rounds of percent-decoding), if any."""
    stack: list[tuple[str, object]] = [(key, value)]
    while stack:
        name, item = stack.pop()
        if isinstance(item, str):
            # Decoding changes only what follows a `%`, and a NUL cuts a reading: a string
            # with something not blank before both keeps it in every reading.
            head = item.partition("%")[0].partition("\x00")[0]
            if (
                name
                and not head.strip(_TRIM_CHARS)
                and _names_a_path(name)
                and "" in _readings(item)
            ):
                return f"{name}={item!r}"
        elif isinstance(item, dict):
            stack.extend((str(k), v) for k, v in item.items())
        elif isinstance(item, (list, tuple)):
            stack.extend((name, v) for v in item)
    return None


def _iter_strings(value: object) -> list[str]:
    """Every string in a JSON value: dict keys and values, list items, at any depth."""
    found: list[str] = []
    stack: list[object] = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            found.append(item)
        elif isinstance(item, dict):
            # Pushed reversed so strings come out in document order.
            for key, sub in reversed(list(item.items())):
                stack.append(sub)
                if isinstance(key, str):
                    stack.append(key)
        elif isinstance(item, (list, tuple)):
            stack.extend(reversed(item))
    return found


def _normalise(absolute: str) -> str:
    """`.`, `..` and duplicate slashes of an absolute path resolved lexically."""
    return _LEADING_SLASHES.sub("/", os.path.normpath(absolute))


def _readings(text: str) -> list[str]:
    """The text every way a server may read it: as written, trimmed, percent-decoded (up
    to three rounds), `\\` as `/`, cut at a NUL (C APIs stop there) or with it dropped
    (a sanitiser), in every combination. A form still holding a NUL opens nothing."""
    rounds: dict[str, int] = {text: 0}  # each form, with the decoding rounds behind it
    queue = collections.deque([text])  # breadth first: the simplest readings come first
    while queue:
        form = queue.popleft()
        done = rounds[form]
        nexts = [(form.strip(_TRIM_CHARS), done)]
        if "\t" in form or "\n" in form or "\r" in form:
            # a URL parser (Python's urlsplit, Node's URL) drops tab and newline anywhere:
            # `file:.e\tnv` opens .env
            url = _URL_IGNORED.sub("", form).strip(_C0_AND_SPACE)
            if _URI_SCHEME.match(url):
                nexts.append((url, done))
        if "%" in form and done < _MAX_DECODE_ROUNDS:
            nexts.append((unquote(form), done + 1))
        if "\\" in form:
            nexts.append((form.replace("\\", "/"), done))
        if "\x00" in form:
            nexts += [(form.split("\x00", 1)[0], done), (form.replace("\x00", ""), done)]
        for nxt, nxt_done in nexts:
            if nxt not in rounds and len(rounds) < _MAX_FORMS:
                rounds[nxt] = nxt_done
                queue.append(nxt)
    return [form for form in rounds if "\x00" not in form]


def _component_too_long(part: str) -> bool:
    return len(part) > 63 and len(part.encode("utf-8", "surrogatepass")) > _NAME_MAX_BYTES


_S_IFMT = 0o170000


def _static_walk(base: str, path: str) -> str | None:
    """The walk of `path` from the real folder `base` when it needs no disk: only `.`
    and `..` before a first name too long to exist (prose is one such name). Else None."""
    current = base
    parts = path.split("/")
    for index, part in enumerate(parts):
        if part in ("", "."):
            continue
        if part == "..":
            current = os.path.dirname(current)
            continue
        if _component_too_long(part):
            return _normalise(current + "/" + "/".join(parts[index:]))
        return None
    return current


@dataclass(frozen=True)
class _Plan:
    """What a string stands for, as far as the file system does not matter (memoised).

    `read_hit` / `write_hit`: the glob a lexical reading matches, for a read-tier call
    and for a write- or destructive-tier one (which also may not name an ancestor of
    `.rea/`). `walks`: (base, path, guarded) to resolve through symlinks on each call;
    `base` is the real root for a relative path, "/" for an absolute one; a guarded walk
    (a URL read as a local path) counts only when its first component exists.
    """

    read_hit: str | None
    write_hit: str | None
    walks: tuple[tuple[str, str, bool], ...]


class PathGuard:
    """Decides whether any string in a call's arguments names a blocked path (§6 step 6).

    Every string, at any depth, dict keys included, is a path candidate, whatever it
    holds and however long (SPEC §6 "What counts as a path"): a server may trim it,
    percent-decode it, read `\\` as `/`, stop at a NUL, unwrap a `file:` URI or expand
    `~`, and may resolve it lexically first (Node's path.resolve, as the reference file
    server does: `x y/../.env` is `.env`, whatever `x y` is) or physically (Python's
    open: the kernel follows symlinks before `..`). Each reading is therefore made
    absolute against the root and resolved both ways, and both results are matched.
    Prose passes because a component must *equal* a blocked name: `the .env file` is
    one component, not `.env`.

    Globs (gitignore-like): `*` and `?` stay within one component, `**` crosses them;
    a glob with no `/` inside (`.env`, `.env.*`, `secrets/`) matches any component at
    any depth, inside or outside the root; a glob with a `/` inside (`.rea/HALT`) is
    anchored at the root; a glob starting with `/` or `~/` is anchored at the file
    system root. A match also blocks everything below the matched path, so a trailing
    `/` only documents that the glob names a folder. `.rea/` is always added.

    Always refused: `/proc/*/cwd`, `/proc/*/root` and `/proc/*/fd` (also reached
    through `/dev/fd` or `/proc/self`), which the gateway would resolve in its own
    process rather than the child's; and, in a write- or destructive-tier call, a
    folder holding `.rea/` (`.`, the root, `sub/..`, `/`) or holding what an anchored
    glob names, since moving or rewriting it carries the blocked files along.

    A URL with a scheme other than `file:` (`https://host/.env`) names a remote
    resource and passes, unless read as a local path its `..` climbs out of the
    `scheme:` folder (`https://../.env`) or that folder exists in the root.
    """

    def __init__(
        self,
        root: Path,
        blocked_globs: Sequence[str],
        *,
        case_insensitive: bool | None = None,
        home: Path | None = None,
    ) -> None:
        self._root_abs = _normalise(os.path.abspath(root))
        self._root_real = os.path.realpath(self._root_abs)
        if case_insensitive is None:
            case_insensitive = _detect_case_insensitive(Path(self._root_real))
        self.case_insensitive = case_insensitive
        self._home = os.path.normpath(str(home) if home is not None else os.path.expanduser("~"))
        flags = re.IGNORECASE if case_insensitive else 0
        globs: list[_CompiledGlob] = []
        seen: set[str] = set()
        for source in (*blocked_globs, _ALWAYS_BLOCKED):
            if source in seen:
                continue
            seen.add(source)
            compiled = _compile_glob(source, self._home, flags)
            if compiled is not None:
                globs.append(compiled)
        self._globs = tuple(globs)
        self._roots = tuple(dict.fromkeys((self._root_abs, self._root_real)))
        # Memos of the pure steps (dict operations are atomic: safe across threads).
        self._plans: dict[str, _Plan] = {}
        self._verdicts: dict[str, tuple[str | None, str | None]] = {}

    def check(self, arguments: object, *, tier: str = "write") -> tuple[str, str] | None:
        """The first (string as named, what it matches), or None when nothing is blocked.

        `tier` is the call's tier: anything but "read" (the default is the stricter
        "write") also refuses the folders holding `.rea/`. What does not touch the file
        system is memoised, since this runs on every call; the symlink walk is not,
        since links can change between calls.
        """
        write = tier != "read"
        if write:
            empty = _empty_path_argument(arguments)
            if empty is not None:  # path.resolve("") is the working directory: the root
                return empty, _ANCESTOR_OF_REA
        for text in _iter_strings(arguments):
            plan = self._plans.get(text)
            if plan is None:
                plan = self._plan(text)
                if len(text) <= _MEMO_MAX_CHARS:
                    if len(self._plans) >= _MEMO_MAX_ENTRIES:
                        self._plans.clear()
                    self._plans[text] = plan
            hit = plan.write_hit if write else plan.read_hit
            if hit is None:
                for base, path, guarded in plan.walks:
                    if guarded and not os.path.lexists(base + "/" + path.split("/", 1)[0]):
                        continue  # a URL, and no `scheme:` folder to read it from
                    resolved, hit = self._walk(base, path)
                    if hit is None:
                        verdict = self._verdict(resolved)
                        hit = verdict[1] if write else verdict[0]
                    if hit is not None:
                        break
            if hit is not None:
                return text, hit
        return None

    def _plan(self, text: str) -> _Plan:
        read_hit: str | None = None
        write_hit: str | None = None
        walks: dict[tuple[str, str, bool], None] = {}
        for form in _readings(text):
            for local, guarded in self._local_paths(form):
                if local.startswith("/"):
                    base, joined = "/", local
                else:
                    base, joined = self._root_real, self._root_abs + "/" + local
                lexical = _normalise(joined)
                candidates = [(base, local)]
                if ".." in local.split("/"):
                    # Resolved lexically first, then through the links that remain (Node).
                    inside = self._inside_root_abs(lexical)
                    candidates.append(
                        (self._root_real, inside) if inside is not None else ("/", lexical)
                    )
                if guarded:  # a URL in its `scheme:` folder: only if that folder exists
                    walks.update(((b, p, True), None) for b, p in candidates)
                    continue
                verdicts = [self._verdict(lexical)]
                for walk_base, path in candidates:
                    static = _static_walk(walk_base, path)
                    if static is None:
                        walks[(walk_base, path, False)] = None
                    else:  # the disk would not be asked: decided now, once
                        verdicts.append(self._verdict(static))
                for read, write in verdicts:
                    read_hit = read_hit or read
                    write_hit = write_hit or write
        return _Plan(read_hit, write_hit, tuple(walks))

    def _inside_root_abs(self, absolute: str) -> str | None:
        """`absolute` relative to the root as given (so the walk starts at its real
        path, not at "/"), or None when it is not below it."""
        root = self._root_abs
        if absolute == root:
            return ""
        if absolute.startswith(root + "/") or root == "/":
            return absolute[len(root) :].lstrip("/")
        return None

    def _local_paths(self, form: str) -> list[tuple[str, bool]]:
        """The local paths a reading stands for (URI unwrapped, `~` expanded), each with
        whether it is a URL read as a local path (`guarded`)."""
        if _FILE_URI.match(form):
            rest = form[5:]
            if rest.startswith("//"):
                # file://host/path: the authority is dropped, the path is absolute.
                slash = rest.find("/", 2)
                rest = rest[slash:] if slash >= 0 else "/"
            bare = re.split(r"[?#]", rest, maxsplit=1)[0]
            paths = dict.fromkeys((rest, bare, unquote(rest), unquote(bare)))
            # `file:` with nothing after it is the working directory: the root
            return [(path or ".", False) for path in paths]
        scheme = _URI_SCHEME.match(form)
        if scheme is not None:
            # A remote URL is not a local path, unless `..` climbs out of `scheme:`; while
            # it stays in, it counts only if a `scheme:` folder exists (guarded).
            first = os.path.normpath(form).split("/", 1)[0]
            return [(form, first.casefold() == (scheme.group(1) + ":").casefold())]
        if form == "~" or form.startswith("~/"):
            return [(self._home + form[1:], False), (form, False)]
        if form.startswith("~"):
            user, _, rest = form[1:].partition("/")
            home = _home_dir_of(user)
            if home is not None:
                return [(home + "/" + rest, False), (form, False)]
        return [(form, False)] if form else []

    def _walk(self, base: str, path: str) -> tuple[str, str | None]:
        """Resolve `path` from the real folder `base` as the kernel would: component by
        component, `..` from where the links led, each link's target read and walked.

        Where a component does not exist, the rest is joined lexically (nothing below a
        missing name can be a link). Returns the path and, when the walk passes through
        a per-process /proc link, the glob-like name of that link (checked before it is
        followed: resolved here it would be the gateway's, not the child's).
        """
        current = base
        pending = path.split("/")
        pending.reverse()
        links = 0
        while pending:
            part = pending.pop()
            if part in ("", "."):
                continue
            if part == "..":
                current = os.path.dirname(current)
                continue
            step = current + part if current == "/" else current + "/" + part
            proc = _PROC_LINK.match(step) if step.startswith("/proc/") else None
            if proc is not None:
                return step, f"/proc/*/{proc.group(1)}"
            if len(part) > 63 and _component_too_long(part):
                mode = None
            else:
                try:
                    mode = os.lstat(step).st_mode
                except (OSError, ValueError):
                    mode = None
            if mode is None:
                if not pending:
                    return step, None
                pending.append(part)
                return _normalise(current + "/" + "/".join(reversed(pending))), None
            if mode & _S_IFMT == stat.S_IFLNK:
                links += 1
                try:
                    target = os.readlink(step)
                except OSError:
                    target = None
                if target is None or links > _MAX_LINKS:
                    return _normalise(step + "/" + "/".join(reversed(pending))), None
                if target.startswith("/"):
                    current = "/"
                pending.extend(reversed(target.split("/")))
                continue
            current = step
        return current, None

    def _verdict(self, absolute: str) -> tuple[str | None, str | None]:
        """What an absolute, normalised path matches in a read-tier call and in a write-
        or destructive-tier one (None: nothing). Memoised: it runs on every call."""
        memo = len(absolute) <= _MEMO_MAX_CHARS
        found = self._verdicts.get(absolute) if memo else None
        if found is None:
            proc = _PROC_LINK.match(absolute)
            read = f"/proc/*/{proc.group(1)}" if proc is not None else self._match(absolute)
            found = (read, read or self._ancestor(absolute))
            if memo:
                if len(self._verdicts) >= _MEMO_MAX_ENTRIES:
                    self._verdicts.clear()
                self._verdicts[absolute] = found
        return found

    def _ancestor(self, absolute: str) -> str | None:
        """Does `absolute` hold `.rea/`, or what an anchored glob names? (write tiers)"""
        fold = self.case_insensitive
        probe = absolute.casefold() if fold else absolute
        for root in self._roots:
            base = root.casefold() if fold else root
            if probe in ("/", base) or base.startswith(probe + "/"):
                return _ANCESTOR_OF_REA
        rels = self._relative_to_root(absolute)
        if any(rel == ".git" or rel.startswith(".git/") for rel in rels):
            return _GIT_IN_A_WRITE
        for glob in self._globs:
            if glob.ancestor is None:
                continue
            if glob.kind == "absolute":
                if glob.ancestor.fullmatch(absolute):
                    return f"a folder holding {glob.source}, in a write"
            elif any(rel and glob.ancestor.fullmatch(rel) for rel in rels):
                return f"a folder holding {glob.source}, in a write"
        return None

    def _relative_to_root(self, absolute: str) -> list[str]:
        """The path relative to the root (lexical and real root), empty when outside."""
        rels: list[str] = []
        fold = self.case_insensitive
        probe = absolute.casefold() if fold else absolute
        for root in self._roots:
            base = root.casefold() if fold else root
            if base == "/":
                rels.append(absolute.lstrip("/"))
            elif probe == base:
                rels.append("")
            elif probe.startswith(base + "/"):
                rels.append(absolute[len(root) + 1 :])
        return rels

    def _match(self, absolute: str) -> str | None:
        """The glob an absolute, normalised path matches, or None."""
        rels = self._relative_to_root(absolute)
        for glob in self._globs:
            if glob.kind == "absolute":
                if glob.regex.fullmatch(absolute):
                    return glob.source
            elif glob.kind == "anchored":
                if any(glob.regex.fullmatch(rel) for rel in rels):
                    return glob.source
            elif rels:
                # Inside the root only the part below it counts: a root that itself
                # lives under a folder named like a glob must not block everything.
                if any(glob.regex.search(rel) for rel in rels):
                    return glob.source
            elif glob.regex.search(absolute):
                return glob.source
        return None


# Secret redaction ############################################################


@dataclass(frozen=True)
class Redaction:
    """The outcome of redacting one text: the new text and which patterns matched."""

    text: str
    names: tuple[str, ...]


@dataclass(frozen=True)
class _SecretPattern:
    """One named secret regex. If it has a group named `s`, only that group is replaced,
    so `api_key=` keeps its key and only the value disappears. A user's pattern is run
    through `bounded` (see "Bounded cost" under "User regular expressions"); the built-ins
    are written to run in linear time and use re directly."""

    name: str
    regex: re.Pattern[str]
    bounded: BoundedRegex | None = None

    def subn(self, text: str) -> tuple[str, int]:
        if self.bounded is None:
            return self.regex.subn(_replacer(self), text)
        replace = _replacer(self)
        out: list[str] = []
        done = 0
        for match in self.bounded.finditer(text):
            out += (text[done : match.start()], replace(match))
            done = match.end()
        if not out:
            return text, 0
        out.append(text[done:])
        return "".join(out), len(out) // 2


_BUILTIN_SECRETS: tuple[tuple[str, str, int], ...] = (
    (
        "Private Key",
        r"-----BEGIN (?:[A-Z0-9]+ ){0,3}PRIVATE KEY-----[\s\S]*?"
        r"(?:-----END (?:[A-Z0-9]+ ){0,3}PRIVATE KEY-----|\Z)",
        0,
    ),
    ("AWS Access Key", r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b", 0),
    (
        "AWS Secret Key",
        r"(?i:aws_secret_access_key|secret_access_key)[\"']?\s*[:=]\s*[\"']?"
        r"(?P<s>[A-Za-z0-9/+=]{40})(?![A-Za-z0-9/+=])",
        0,
    ),
    ("GitHub Token", r"\b(?:gh[pousr]_[A-Za-z0-9]{36,}|github_pat_[A-Za-z0-9_]{22,})", 0),
    ("Anthropic API Key", r"\bsk-ant-[A-Za-z0-9_\-]{20,}", 0),
    ("OpenAI Project Key", r"\bsk-proj-[A-Za-z0-9_\-]{20,}", 0),
    ("OpenAI API Key", r"\bsk-[A-Za-z0-9_\-]{20,}", 0),
    ("Hugging Face Token", r"\bhf_[A-Za-z0-9]{30,}", 0),
    ("Bearer Token", r"\b(?i:bearer)\s+(?P<s>[A-Za-z0-9\-._~+/]{8,}=*)", 0),
    (
        "Generic API Key",
        r"(?i:\b(?:x-)?api[_-]?key)[\"']?\s*[:=]\s*[\"']?(?P<s>[A-Za-z0-9\-_.+/=]{12,})",
        0,
    ),
)

# Words one of which every built-in secret pattern contains (lower-cased). Substring
# tests are C-speed; an IGNORECASE alternation regex costs ~10 us even on short text.
_SECRET_WORDS = (
    "private key",
    "akia",
    "asia",
    "secret_access_key",
    "ghp_",
    "gho_",
    "ghu_",
    "ghs_",
    "ghr_",
    "github_pat_",
    "sk-",
    "hf_",
    "bearer",
    "api_key",
    "api-key",
    "apikey",
)


def _may_hold_secret(text: str) -> bool:
    low = text.lower()
    for word in _SECRET_WORDS:  # noqa: SIM110 (a plain loop: a generator costs more than the tests)
        if word in low:
            return True
    return False


_FLAG_LETTERS = {"i": re.IGNORECASE, "m": re.MULTILINE, "s": re.DOTALL, "x": re.VERBOSE}


class Redactor:
    """Replaces secrets in text with `[REDACTED:<name>]` (§6 step 10)."""

    def __init__(self, user_patterns: Sequence[tuple[str, str, str]] = ()) -> None:
        self._builtin = tuple(
            _SecretPattern(name, re.compile(regex, flags))
            for name, regex, flags in _BUILTIN_SECRETS
        )
        user: list[_SecretPattern] = []
        for name, regex, letters in user_patterns:
            flags = 0
            for letter in letters:
                flags |= _FLAG_LETTERS.get(letter, 0)
            compiled = re.compile(regex, flags)
            user.append(_SecretPattern(name, compiled, BoundedRegex(compiled)))
        self._user = tuple(user)

    def redact(self, text: str) -> Redaction:
        """Redact one text; names are the matching patterns, unique, in pattern order."""
        patterns: tuple[_SecretPattern, ...] = self._user
        if _may_hold_secret(text):
            patterns = self._builtin + self._user
        names: list[str] = []
        for pattern in patterns:
            text, count = pattern.subn(text)
            if count and pattern.name not in names:
                names.append(pattern.name)
        return Redaction(text, tuple(names))

    def redact_value(
        self, value: object, dumped: str | None = None
    ) -> tuple[object, tuple[str, ...]]:
        """Redact every string in a JSON value, keys included; returns a new value (or the
        same value, untouched, when it holds no secret). `dumped`: the value's compact JSON
        when the caller has it already."""
        if not self._user:
            # One C-speed scan of the serialised value instead of a walk: the prefilter's
            # words hold no character JSON escapes, so none in the dump means none inside.
            if dumped is None:
                try:
                    dumped = COMPACT_JSON.encode(value)
                except (TypeError, ValueError):
                    dumped = None
            if dumped is not None and not _may_hold_secret(dumped):
                return value, ()
        names: list[str] = []

        def walk(item: object) -> object:
            if isinstance(item, str):
                result = self.redact(item)
                for name in result.names:
                    if name not in names:
                        names.append(name)
                return result.text
            if isinstance(item, dict):
                # a key can carry a secret too (a tool echoing its arguments' keys)
                return {
                    walk(key) if isinstance(key, str) else key: walk(sub)
                    for key, sub in item.items()
                }
            if isinstance(item, (list, tuple)):
                return [walk(sub) for sub in item]
            return item

        return walk(value), tuple(names)


def _replacer(pattern: _SecretPattern) -> Callable[[re.Match[str]], str]:
    """The substitution for a pattern: the whole match, or just its `s` group."""
    token = f"[REDACTED:{pattern.name}]"

    def replace(match: re.Match[str]) -> str:
        if "s" in match.re.groupindex and match.group("s") is not None:
            start, end = match.span("s")
            whole_start = match.start()
            whole = match.group(0)
            return whole[: start - whole_start] + token + whole[end - whole_start :]
        return token

    return replace


# Prompt injection ############################################################


@dataclass(frozen=True)
class InjectionVerdict:
    """How a result reads for prompt injection (§6 step 10).

    via_base64 is true when at least one phrase was found only inside decoded base64.
    """

    verdict: str
    phrases: tuple[str, ...]
    via_base64: bool


# (phrase reported in the audit, words one of which must appear, regex over lower-cased
# text). The words are a cheap `in` pre-check so clean text never meets the regexes.
# Kept narrow: at read tier a single hit is `likely_injection`, so prose such as
# "you are now connected" or "the system prompt setting" must not match.
_W = r"\s+"
_INSTRUCTIONS = r"(?:instructions|directions|directives|prompts?|rules|guidelines)"
_EARLIER = r"(?:previous|prior|above|earlier|preceding|all|any|your)"
_INJECTION_PHRASES: tuple[tuple[str, tuple[str, ...], str], ...] = (
    (
        "ignore previous instructions",
        ("ignore",),
        rf"ignore{_W}(?:all{_W}|any{_W})?(?:of{_W})?(?:the{_W}|your{_W})?{_EARLIER}{_W}{_INSTRUCTIONS}",
    ),
    (
        "disregard previous instructions",
        ("disregard",),
        rf"disregard{_W}(?:all{_W}|any{_W})?(?:of{_W})?(?:the{_W}|your{_W})?"
        rf"(?:{_EARLIER}{_W})?{_INSTRUCTIONS}",
    ),
    (
        "forget your instructions",
        ("forget",),
        rf"forget{_W}(?:all{_W}|everything{_W})?(?:of{_W})?(?:your|previous|prior|the{_W}above)"
        rf"{_W}{_INSTRUCTIONS}",
    ),
    (
        "forget everything",
        ("forget",),
        rf"forget{_W}everything{_W}(?:above|before|you{_W}(?:were|have{_W}been))",
    ),
    (
        "override your instructions",
        ("override",),
        rf"override{_W}(?:your|all|the|previous|prior){_W}{_INSTRUCTIONS}",
    ),
    (
        "system prompt override",
        ("override",),
        rf"system{_W}prompt{_W}override|override{_W}(?:the{_W}|your{_W})?system{_W}prompt",
    ),
    (
        "reveal your system prompt",
        ("prompt", "hidden"),
        rf"(?:reveal|print|show|output|repeat|leak){_W}(?:me{_W})?(?:your|the){_W}"
        rf"(?:system{_W}prompt|hidden{_W}instructions)",
    ),
    ("you are now", ("now",), rf"you{_W}are{_W}now{_W}(?:a|an|the|my){_W}"),
    ("from now on you are", ("now",), rf"from{_W}now{_W}on,?{_W}you{_W}(?:are|will|must)\b"),
    ("new instructions:", ("instructions",), r"(?:new|updated|real)\s+instructions\s*:"),
    ("your new instructions are", ("instructions",), rf"your{_W}new{_W}instructions{_W}are"),
    (
        "do not tell the user",
        ("user",),
        rf"(?:do{_W}not|don't|dont|never){_W}(?:tell|inform|alert|notify){_W}the{_W}user",
    ),
    ("exfiltrate", ("exfiltrat",), r"\bexfiltrat(?:e|ing|ion)\b"),
    ("pretend you are", ("pretend",), rf"pretend{_W}(?:that{_W})?you{_W}are{_W}"),
    ("roleplay as", ("play",), rf"role[\s\-]?play{_W}as{_W}"),
    ("developer mode", ("developer",), rf"(?:enable|enter|activate){_W}developer{_W}mode"),
    (
        "chat template token",
        ("<|", "inst]"),
        r"<\|im_start\|>|<\|system\|>|\[/?inst\]",
    ),
)
# Compiled once; run on lower-cased text (no IGNORECASE: literal prefixes scan fast).
_INJECTION_CHECKS: tuple[tuple[str, tuple[str, ...], re.Pattern[str]], ...] = tuple(
    (phrase, words, re.compile(regex)) for phrase, words, regex in _INJECTION_PHRASES
)
# Every word any check needs: text holding none of them holds no phrase.
_INJECTION_WORDS: tuple[str, ...] = tuple(
    dict.fromkeys(word for _, words, _ in _INJECTION_CHECKS for word in words)
)
# Zero-width and invisible characters used to split a phrase so it slips past a matcher.
_INVISIBLE = re.compile(
    "[\u00ad\u034f\u061c\u115f\u1160\u17b4\u17b5\u180b-\u180f\u200b-\u200f\u202a-\u202e"
    "\u2060-\u206f\u3164\ufe00-\ufe0f\ufeff\uffa0\ufff0-\ufffb"
    "\U0001d173-\U0001d17a\U000e0000-\U000e007f\U000e0100-\U000e01ef]"
)
_BASE64_RUN = re.compile(r"[A-Za-z0-9+/_\-]{16,}={0,2}")
_MIN_PRINTABLE_RATIO = 0.9


def _fold(text: str) -> str:
    """NFKC-fold and drop invisible characters (zero-width, bidi controls, variation
    selectors, tags, fillers: anything that splits a phrase without showing); ASCII text
    is already folded."""
    if text.isascii():
        return text
    return _INVISIBLE.sub("", unicodedata.normalize("NFKC", text))


def _phrases_in(folded: str) -> list[str]:
    """The distinct phrases in folded text, in list order."""
    lowered = folded.lower()
    for word in _INJECTION_WORDS:  # clean text (nearly every result) stops here
        if word in lowered:
            break
    else:
        return []
    return [
        phrase
        for phrase, words, regex in _INJECTION_CHECKS
        if any(word in lowered for word in words) and regex.search(lowered) is not None
    ]


def _decode_base64_run(run: str) -> str | None:
    """Decode a base64 (or base64url) run into mostly-printable text, else None."""
    altchars = b"-_" if ("-" in run or "_" in run) else None
    core = run.rstrip("=")
    # A run glued to a preceding word may be misaligned: try the next few offsets.
    for offset in range(4):
        chunk = core[offset:]
        if len(chunk) < 16:
            return None
        padded = chunk + "=" * (-len(chunk) % 4)
        try:
            raw = base64.b64decode(padded, altchars=altchars, validate=True)
        except (binascii.Error, ValueError):
            continue
        text = raw.decode("utf-8", errors="replace")
        if not text:
            continue
        printable = sum(1 for ch in text if ch.isprintable() or ch in "\t\n\r")
        if "\x00" not in text and printable / len(text) >= _MIN_PRINTABLE_RATIO:
            return text
    return None


def scan_injection(text: str, tier: str) -> InjectionVerdict:
    """Classify a result's text: clean, suspicious or likely_injection (§6 step 10)."""
    folded = _fold(text)
    literal = _phrases_in(folded)
    hidden: list[str] = []
    for run in _BASE64_RUN.finditer(folded):
        decoded = _decode_base64_run(run.group(0))
        if decoded is None:
            continue
        for phrase in _phrases_in(_fold(decoded)):
            if phrase not in literal and phrase not in hidden:
                hidden.append(phrase)
    if not literal and not hidden:
        return InjectionVerdict("clean", (), False)
    phrases = tuple(literal + hidden)
    if hidden or len(literal) >= 2 or tier not in ("write", "destructive"):
        # Unknown tiers fail closed, like read.
        return InjectionVerdict("likely_injection", phrases, bool(hidden))
    return InjectionVerdict("suspicious", phrases, False)


def content_text(result: object) -> str:
    """Every string a model may read in a result, for the injection scan: text items and
    every other field alike (a resource_link's name, a description, extra keys, `_meta`),
    keys included, and a text-typed `blob` decoded."""
    parts: list[str] = []
    stack: list[object] = [result]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            parts.append(item)
        elif isinstance(item, dict):
            mime = item.get("mimeType")
            textual = not isinstance(mime, str) or mime.startswith("text/")
            binary = item.get("type") in ("image", "audio") or not textual
            blob = item.get("blob")
            if isinstance(blob, str) and textual:
                try:
                    parts.append(base64.b64decode(blob[: 4 << 20]).decode("utf-8", "replace"))
                except (binascii.Error, ValueError):
                    pass
            for key, sub in item.items():
                if key == "blob" or (key == "data" and binary):  # base64 payloads
                    continue
                stack.append(sub)
                stack.append(str(key))
        elif isinstance(item, (list, tuple)):
            stack.extend(reversed(item))
    return "\n".join(parts)


# Result size cap #############################################################


def _utf8_len(text: str) -> int:
    # surrogatepass: a lone surrogate (a JS string cut mid-emoji) is counted, not fatal
    return len(text.encode("utf-8", "surrogatepass"))


def _json_size(value: object) -> int:
    """Bytes of the compact UTF-8 JSON form, as `encode` writes it (a lone surrogate as
    its 6-byte escape)."""
    return _wire_size(COMPACT_JSON.encode(value))


def _wire_size(json_text: str) -> int:
    """Bytes of compact JSON text as `encode` writes it."""
    return _utf8_len(escape_lone_surrogates(json_text))


def _truncation_notice(shown: int, total: int) -> str:
    return f"\n[TRUNCATED by rea: {shown} of {total} bytes shown]"


def cap_text(text: str, max_bytes: int) -> tuple[str, bool]:
    """Cut text to at most max_bytes UTF-8 bytes, notice included, at a character boundary.

    The notice says how many bytes of the original are shown. When max_bytes cannot even
    hold the notice, the result is the notice alone.
    """
    data = text.encode("utf-8", "surrogatepass")
    total = len(data)
    if total <= max_bytes:
        return text, False
    room = max(0, max_bytes - _utf8_len(_truncation_notice(total, total)))
    kept = data[:room].decode("utf-8", errors="ignore")  # drops a split trailing character
    shown = _utf8_len(kept)
    return kept + _truncation_notice(shown, total), True


def _cap_text_field(item: Mapping[str, object], holder: str | None, room: int) -> object | None:
    """A copy of a text-bearing content item whose JSON fits room bytes, or None."""
    inner: Mapping[str, object]
    if holder is None:
        inner = item
    else:
        nested = item.get(holder)
        if not isinstance(nested, Mapping):
            return None
        inner = nested
    text = inner.get("text")
    if not isinstance(text, str):
        return None

    def rebuild(new_text: str) -> dict[str, object]:
        new_inner = {**inner, "text": new_text}
        return new_inner if holder is None else {**item, holder: new_inner}

    limit = room - _json_size(rebuild(""))
    # JSON escaping makes the text longer than its bytes: shrink by the overshoot.
    for _ in range(6):
        if limit <= 0:
            return None
        capped, _truncated = cap_text(text, limit)
        candidate = rebuild(capped)
        size = _json_size(candidate)
        if size <= room:
            return candidate
        limit -= size - room
    return None


def _content_kind(item: object) -> tuple[str, str | None]:
    """("text", holder) for text items, ("binary", None) for image/audio/blob, else opaque."""
    if not isinstance(item, Mapping):
        return "opaque", None
    kind = item.get("type")
    if kind == "text" and isinstance(item.get("text"), str):
        return "text", None
    if kind == "resource":
        resource = item.get("resource")
        if isinstance(resource, Mapping):
            if isinstance(resource.get("text"), str):
                return "text", "resource"
            if "blob" in resource:
                return "binary", None
    if kind in ("image", "audio"):
        return "binary", None
    return "opaque", None


def _omission_notice(omitted: int, max_bytes: int) -> dict[str, object]:
    text = (
        f"[TRUNCATED by rea: {omitted} content item(s) omitted, "
        f"the result exceeds {max_bytes} bytes]"
    )
    return {"type": "text", "text": text}


def cap_content(content: list[object], max_bytes: int) -> tuple[list[object], bool]:
    """Bound an MCP content list to max_bytes of compact JSON.

    Items are kept in order while they fit; the first text item that does not fit is cut
    with a notice; an image, audio or blob item that does not fit is replaced by a short
    text notice; anything else that does not fit is omitted and one final notice counts
    the omissions. The bound holds for max_bytes of a few hundred bytes and more.
    """
    if _json_size(content) <= max_bytes:
        return list(content), False
    # Keep room for the final omission notice at its longest.
    reserve = _json_size(_omission_notice(len(content), max_bytes)) + 1
    budget = max_bytes - reserve - 2  # the list's brackets
    out: list[object] = []
    omitted = 0
    for item in content:
        size = _json_size(item) + 1  # and its comma
        if size <= budget:
            out.append(item)
            budget -= size
            continue
        kind, holder = _content_kind(item)
        replacement: object | None = None
        if kind == "text" and isinstance(item, Mapping):
            replacement = _cap_text_field(item, holder, budget - 1)
        elif kind == "binary" and isinstance(item, Mapping):
            replacement = {
                "type": "text",
                "text": f"[TRUNCATED by rea: {item.get('type')} item of {size - 1} bytes "
                f"removed, the result exceeds {max_bytes} bytes]",
            }
        if replacement is not None and _json_size(replacement) + 1 <= budget:
            out.append(replacement)
            budget -= _json_size(replacement) + 1
        else:
            omitted += 1
    if omitted:
        out.append(_omission_notice(omitted, max_bytes))
    return out, True


def cap_value(value: object, max_bytes: int) -> tuple[object, bool]:
    """Any JSON value within max_bytes: its longest strings (keys too) cut at one common
    length, each with the notice, and when that is not enough its lists and objects
    shortened from the end (an object of many small entries is as large as a long string).
    For results without a content list (resources, prompts, completion) and for what a
    tool result carries beside its content."""
    if _json_size(value) <= max_bytes:
        return value, False

    def cut(item: object, limit: int, keep: int | None) -> object:
        if isinstance(item, str):
            return cap_text(item, limit)[0] if _utf8_len(item) > limit else item
        if isinstance(item, Mapping):
            pairs = list(item.items()) if keep is None else list(item.items())[:keep]
            return {
                cut(k, limit, keep) if isinstance(k, str) else k: cut(v, limit, keep)
                for k, v in pairs
            }
        if isinstance(item, list | tuple):
            items = list(item) if keep is None else list(item)[:keep]
            return [cut(v, limit, keep) for v in items]
        return item

    low, high = 64, max_bytes
    while low < high:  # the longest string length that still fits
        mid = (low + high + 1) // 2
        if _json_size(cut(value, mid, None)) <= max_bytes:
            low = mid
        else:
            high = mid - 1
    capped = cut(value, low, None)
    keep = 1 << 20
    while _json_size(capped) > max_bytes and keep > 0:
        keep //= 2
        capped = cut(value, low, keep)
    return capped, True


def cap_result(result: dict[str, object], max_bytes: int) -> tuple[dict[str, object], bool]:
    """A tool result within the cap (§6 step 10), the whole of it: what it carries beside
    its content (`_meta`, other keys) gets at most a quarter of the cap, cut as
    `cap_value` does; a `structuredContent` that cannot fit beside the content is dropped
    with a notice (a cut object is not valid JSON); the content list gets the rest, cut
    as `cap_content` does."""
    if _json_size(result) <= max_bytes:  # the common case: nothing in it can be over
        return result, False
    content = result.get("content")
    content_list = content if isinstance(content, list) else None
    notices: list[object] = []
    if "content" in result and content_list is None:  # not a list: nothing to cut it by
        notices.append(_omission_notice(1, max_bytes))
    result = {k: v for k, v in result.items() if k != "content"}
    # beside the content: what the client reads besides (a true/false isError is not that)
    extras = {
        k: v
        for k, v in result.items()
        if k != "structuredContent" and not (k == "isError" and isinstance(v, bool))
    }
    if extras and _json_size(extras) > max_bytes // 4:
        capped, _ = cap_value(extras, max_bytes // 4)
        kept = capped if isinstance(capped, dict) and _json_size(capped) <= max_bytes // 4 else {}
        result = {k: v for k, v in result.items() if k not in extras} | kept

    def room() -> int:  # what is left for the content list, notices included
        return max_bytes - _json_size(result) - _json_size(notices) - 16

    needed = _json_size(content_list) if content_list is not None else 0
    if "structuredContent" in result and room() < min(needed, max_bytes // 2):
        size = _json_size(result.pop("structuredContent"))
        notices.append(
            {
                "type": "text",
                "text": f"[TRUNCATED by rea: structuredContent of {size} bytes removed, "
                f"over the limit of {max_bytes} bytes]",
            }
        )
    capped_content, _ = cap_content(content_list or [], max(room(), 256))
    result["content"] = [*capped_content, *notices]
    if _json_size(result) > max_bytes:  # a result of nothing but odd keys: the notice alone
        result = {
            "content": [_omission_notice(1, max_bytes)],
            "isError": result.get("isError") is True,
        }
    return result, True


# Audit log ###################################################################

AUDIT_KEYS = (
    "timestamp",
    "session_id",
    "tool_name",
    "server_name",
    "tier",
    "status",
    "autonomy_level",
    "duration_ms",
    "prev_hash",
)
OPTIONAL_KEYS = ("error", "redacted_fields", "metadata")
FSYNC_MODES = tuple(FsyncMode)
AUDIT_FILE = "audit.jsonl"
AUDIT_HEAD_FILE = "audit.head"
AUDIT_LOCK_FILE = "audit.lock"
AUDIT_CUTS_FILE = "audit.cuts"  # the heads of every cut the writer found, one JSON line each
_ROTATED_RE = re.compile(r"^audit-(\d{8})-(\d{6})(?:-(\d+))?\.jsonl$")
_READ_CHUNK = 1 << 16
AUDIT_HOLD_S = 0.02  # serve keeps the audit flock this long after an append (see AuditLog)
_HEAD_INTERVAL_S = 1.0  # SPEC §7: the head is written at most once a second while records arrive


def _sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _canonical_json(record: Mapping[str, object]) -> str:
    # The reference tool's canonical form: JSON.stringify with no spaces, raw UTF-8, and
    # a lone surrogate (a JS string cut mid-emoji) as its \uXXXX escape, as
    # JSON.stringify writes one: the line stays valid UTF-8 for every reader.
    text = _CANONICAL_JSON.encode(dict(record))
    return escape_lone_surrogates(text)


def _utf8(text: str) -> bytes:
    # surrogatepass: nothing the gateway was sent may make a record unwritable
    return text.encode("utf-8", "surrogatepass")


def record_hash(record_without_hash: Mapping[str, object]) -> str:
    """The chain hash of one record: sha256 hex of its canonical JSON, as the reference tool."""
    return _sha256_hex(_utf8(_canonical_json(record_without_hash)))


def _raw_record_hash(record_without_hash: Mapping[str, object]) -> str:
    """The hash as rea.py wrote it before surrogates were escaped (raw surrogate bytes):
    older logs keep verifying."""
    text = json.dumps(
        dict(record_without_hash), separators=(",", ":"), ensure_ascii=False, default=str
    )
    return _sha256_hex(_utf8(text))


@dataclass(frozen=True)
class AuditRecord:
    """One audit record before it is chained: the §7 fields, in §7 order."""

    timestamp: str
    session_id: str
    tool_name: str
    server_name: str
    tier: str
    status: str
    autonomy_level: str
    duration_ms: int
    error: str | None = None
    redacted_fields: tuple[str, ...] | None = None
    metadata: Mapping[str, object] | None = field(default=None)

    def chained(self, prev_hash: str) -> dict[str, object]:
        """The record as written, without `hash`: keys in §7 order, optional keys only if set."""
        out: dict[str, object] = {
            "timestamp": self.timestamp,
            "session_id": self.session_id,
            "tool_name": self.tool_name,
            "server_name": self.server_name,
            "tier": self.tier,
            "status": self.status,
            "autonomy_level": self.autonomy_level,
            "duration_ms": int(self.duration_ms),
            "prev_hash": prev_hash,
        }
        if self.error is not None:
            out["error"] = self.error
        if self.redacted_fields is not None:
            out["redacted_fields"] = list(self.redacted_fields)
        if self.metadata is not None:
            out["metadata"] = dict(self.metadata)
        return out


def _encode_line(record: dict[str, object]) -> tuple[bytes, str]:
    """Serialise once: hash the body, then splice `"hash"` in as the last key."""
    text = _CANONICAL_JSON.encode(record)
    try:
        body = text.encode()  # the common case: no lone surrogate, one pass
    except UnicodeEncodeError:
        body = _utf8(escape_lone_surrogates(text))  # as _canonical_json writes it
    digest = hashlib.sha256(body).hexdigest()
    # body ends with "}"; this is byte-identical to dumping the record with hash appended.
    return body[:-1] + b',"hash":"' + digest.encode() + b'"}\n', digest


def _line_hash(line: bytes) -> str | None:
    """The `hash` a complete line claims, or None when it is not a record."""
    try:
        value = json.loads(line.decode("utf-8", "surrogatepass"))
    except (ValueError, UnicodeDecodeError):
        return None
    if isinstance(value, dict):
        h = value.get("hash")
        if isinstance(h, str):
            return h
    return None


def _read_last_line(fd: int, end: int) -> bytes:
    """The line ending at byte `end` (exclusive of its newline), read backwards from there.

    Reads only as much as that line needs, so the cost does not grow with the log.
    """
    pos = end - 1 if end > 0 else 0  # skip the line's own newline
    chunks: list[bytes] = []
    while pos > 0:
        start = max(0, pos - _READ_CHUNK)
        buf = os.pread(fd, pos - start, start)
        i = buf.rfind(b"\n")
        if i >= 0:
            chunks.append(buf[i + 1 :])
            break
        chunks.append(buf)
        pos = start
    return b"".join(reversed(chunks))


def _read_first_line(fd: int) -> bytes:
    chunks: list[bytes] = []
    pos = 0
    while True:
        buf = os.pread(fd, _READ_CHUNK, pos)
        if not buf:
            return b"".join(chunks)
        i = buf.find(b"\n")
        if i >= 0:
            chunks.append(buf[:i])
            return b"".join(chunks)
        chunks.append(buf)
        pos += len(buf)


def _count_newlines(fd: int, start: int, end: int) -> int:
    count = 0
    pos = start
    while pos < end:
        buf = os.pread(fd, min(1 << 22, end - pos), pos)
        if not buf:
            break
        count += buf.count(b"\n")
        pos += len(buf)
    return count


def _parse_iso(ts: str) -> _dt.datetime | None:
    try:
        return _dt.datetime.strptime(ts, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=_dt.UTC)
    except ValueError:
        return None


def _rotated_files(rea_dir: Path) -> list[Path]:
    """Rotated files, oldest first: by the timestamp in the name, then the -N suffix."""
    found: list[tuple[str, str, int, Path]] = []
    try:
        names = os.listdir(rea_dir)
    except FileNotFoundError:
        return []
    for name in names:
        m = _ROTATED_RE.match(name)
        if m:
            found.append((m.group(1), m.group(2), int(m.group(3) or 0), rea_dir / name))
    found.sort()
    return [p for _, _, _, p in found]


def _last_hash_of(path: Path) -> str | None:
    """The chain value a file ends on: its last record's hash (or the hash of a bad line)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        size = os.fstat(fd).st_size
        if size == 0:
            return None
        if os.pread(fd, 1, size - 1) != b"\n":
            size = size - len(_read_last_line(fd, size + 1))  # ignore a torn line
            if size == 0:
                return None
        line = _read_last_line(fd, size)
        return _line_hash(line) or _sha256_hex(line)
    finally:
        os.close(fd)


@dataclass(frozen=True)
class _Head:
    """`.rea/audit.head`: where the chain ended when last written (tail-truncation check)."""

    records: int  # records in the current audit.jsonl (per file, not the whole chain)
    last_hash: str
    file: str
    bytes: int

    @staticmethod
    def load(rea_dir: Path) -> _Head | None:
        try:
            raw = json.loads((rea_dir / AUDIT_HEAD_FILE).read_bytes())
        except (OSError, ValueError):
            return None
        if not isinstance(raw, dict):
            return None
        records, last_hash = raw.get("records"), raw.get("last_hash")
        name, size = raw.get("file"), raw.get("bytes", -1)
        if (
            isinstance(records, int)
            and isinstance(last_hash, str)
            and isinstance(name, str)
            and isinstance(size, int)
        ):
            return _Head(records, last_hash, name, size)
        return None


class AuditLog:
    """Appends hash-chained records to <rea_dir>/audit.jsonl; thread-safe and multi-process safe.

    Processes serialise on an exclusive flock of `.rea/audit.lock` (a file that is never
    renamed, so rotation is covered by the same lock); `serve` keeps it for `hold_s`
    after an append, so that a busy gateway writes its records without a lock or a stat
    each, and every other writer waits at most that long. Inside a process `_lock` guards the
    file descriptor and the cached tail; `_sync_cond` guards the group-commit counters.
    Lock order: `_lock`, then the flock, then `_sync_cond`; never the other way round.
    """

    def __init__(
        self,
        rea_dir: Path,
        fsync: str = "always",
        max_bytes: int = 50 * 1024 * 1024,
        max_age_days: int | None = None,
        hold_s: float = 0.0,
    ) -> None:
        self._dir = Path(rea_dir)
        self._path = self._dir / AUDIT_FILE
        self._path_str = str(self._path)  # stat'ed on every append
        self._fsync = "always"
        self._max_bytes = max_bytes
        self._max_age_days: int | None = None
        self.configure(fsync, max_bytes, max_age_days)
        self._lock = threading.Lock()  # guards: fds, tail cache, counters, timers, _holding
        self._lock_fd: int | None = None
        self._fd: int | None = None
        self._fd_id: tuple[int, int] | None = None  # (st_dev, st_ino) of the open file
        # The size just after our last write: any other size means someone else wrote (§7:
        # size and inode tell, so that an append costs a stat, never an fstat besides).
        self._known: int | None = None
        self._tail_hash = ZERO_HASH
        self._file_records = 0
        self._first_ts: _dt.datetime | None = None
        self._first_ts_read = False
        self._head_written_at = 0.0
        self._head_dirty = False
        self._head_timer: threading.Timer | None = None
        # `serve` keeps the flock between appends for up to `hold_s` (then lets go, for the
        # CLI and other gateways): while it is ours nobody else can write, so an append
        # needs neither the flock nor a stat, only its write.
        self._hold_s = hold_s
        self._holding = False  # the flock is ours now
        self._hold_timer: threading.Timer | None = None
        # Group commit (fsync "batch"): sequence numbers of records written / made durable.
        self._sync_cond = threading.Condition(
            threading.Lock()
        )  # guards: _written_seq, _synced_seq, _syncing
        self._written_seq = 0
        self._synced_seq = 0
        self._syncing = False
        self.append_count = 0
        self.fail_count = 0
        self.fsync_count = 0
        self.rotation_count = 0

    @property
    def path(self) -> Path:
        return self._path

    def configure(self, fsync: str, max_bytes: int, max_age_days: int | None) -> None:
        """Apply a (re)loaded policy's `audit.*` settings."""
        if fsync not in FSYNC_MODES:
            raise ReaError(f"audit.fsync: {fsync!r} is not one of always, batch, off")
        if max_bytes <= 0:
            raise ReaError("audit.rotation.max_bytes: must be a positive integer")
        if max_age_days is not None and max_age_days <= 0:
            raise ReaError("audit.rotation.max_age_days: must be a positive integer")
        self._fsync, self._max_bytes, self._max_age_days = fsync, max_bytes, max_age_days

    # -- appending -------------------------------------------------------------

    def append(
        self,
        *,
        session_id: str,
        tool_name: str,
        server_name: str,
        tier: str,
        status: str,
        autonomy_level: str,
        duration_ms: int,
        error: str | None = None,
        redacted_fields: list[str] | None = None,
        metadata: Mapping[str, object] | None = None,
    ) -> dict[str, object]:
        """Chain and write one record; durable per the fsync mode when this returns."""
        rec = AuditRecord(
            timestamp=utc_now_iso(),
            session_id=session_id,
            tool_name=tool_name,
            server_name=server_name,
            tier=tier,
            status=status,
            autonomy_level=autonomy_level,
            duration_ms=duration_ms,
            error=error,
            redacted_fields=tuple(redacted_fields) if redacted_fields is not None else None,
            metadata=metadata,
        )
        return self.append_records([rec])[0]

    def append_records(self, recs: Sequence[AuditRecord]) -> list[dict[str, object]]:
        """Chain and write records in order, all at once (one flock, one write: a burst's
        records, HeldOutput); durable per the fsync mode when this returns."""
        try:
            with self._lock:
                written, seq = self._append_locked(recs)
            if self._fsync == "batch":
                self._wait_durable(seq)
        except OSError:
            self.fail_count += len(recs)
            raise
        return written

    def _chain(self, recs: Sequence[AuditRecord]) -> tuple[list[dict[str, object]], bytes, str]:
        """The records chained onto the tail: as written (with `hash`), their lines, and
        the new tail hash."""
        digest = self._tail_hash
        records: list[dict[str, object]] = []
        lines: list[bytes] = []
        for rec in recs:
            record = rec.chained(digest)
            line, digest = _encode_line(record)
            record["hash"] = digest
            records.append(record)
            lines.append(line)
        return records, b"".join(lines), digest

    def _append_locked(self, recs: Sequence[AuditRecord]) -> tuple[list[dict[str, object]], int]:
        held = self._holding and self._fd is not None and self._known is not None
        if not self._holding:
            fcntl.flock(self._lock_file(), fcntl.LOCK_EX)
            self._holding = True
        try:
            if held:  # the flock stayed ours since our last write: the file is as we left it
                assert self._fd is not None and self._known is not None
                fd, size = self._fd, self._known
            else:
                fd, size = self._sync_tail()
            records, data, digest = self._chain(recs)
            if self._should_rotate(fd, size, len(data)):
                self._rotate_locked("size" if self._over_size(size, len(data)) else "age")
                fd, size = self._sync_tail()
                records, data, digest = self._chain(recs)
            self._write(fd, data)
            if self._fsync == "always":
                os.fsync(fd)
                self.fsync_count += 1
            self._known = size + len(data)  # O_APPEND under the flock: the file's end
            self._tail_hash = digest
            self._file_records += len(recs)
            self.append_count += len(recs)
            with self._sync_cond:
                self._written_seq += 1
                seq = self._written_seq
            self._head_dirty = True
            now = time.monotonic()
            if now - self._head_written_at >= _HEAD_INTERVAL_S:
                self._write_head_locked()
            elif self._head_timer is None:
                delay = _HEAD_INTERVAL_S - (now - self._head_written_at)
                self._head_timer = threading.Timer(delay, self._flush_head_from_timer)
                self._head_timer.name = "rea-audit-head"
                self._head_timer.daemon = True
                self._head_timer.start()
        except BaseException:
            self._let_go()
            raise
        if self._hold_s <= 0:
            self._let_go()
        elif self._hold_timer is None:  # kept for hold_s, then given back (under `_lock`)
            self._hold_timer = threading.Timer(self._hold_s, self._let_go_from_timer)
            self._hold_timer.name = "rea-audit-hold"
            self._hold_timer.daemon = True
            self._hold_timer.start()
        return records, seq

    def _let_go_from_timer(self) -> None:
        with self._lock:
            self._hold_timer = None
            self._let_go()

    def _let_go(self) -> None:
        """Give the held flock back (under `_lock`)."""
        if self._holding:
            self._holding = False
            if self._lock_fd is not None:
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    def _write(self, fd: int, line: bytes) -> None:
        view = memoryview(line)
        try:
            while view:
                n = os.write(fd, view)
                view = view[n:]
        except OSError:
            self._known = None  # a partial line may be on disk: re-read (and repair) next time
            raise

    def _wait_durable(self, seq: int) -> None:
        """Group commit: the first waiter fsyncs everything written so far, for everyone."""
        while True:
            with self._sync_cond:
                while self._synced_seq < seq and self._syncing:
                    self._sync_cond.wait()
                if self._synced_seq >= seq:
                    return
                self._syncing = True  # we lead this round
            target, done = 0, False
            try:
                with self._lock:
                    with self._sync_cond:
                        target = self._written_seq
                    # dup: a rotation may close self._fd while we fsync outside the lock.
                    fd = os.dup(self._fd) if self._fd is not None else None
                if fd is not None:
                    try:
                        os.fsync(fd)
                    finally:
                        os.close(fd)
                done = True
            finally:
                with self._sync_cond:
                    if done:
                        self.fsync_count += fd is not None
                        # fd None: the file was closed, and closing made every record durable.
                        self._synced_seq = max(self._synced_seq, target)
                    self._syncing = False
                    self._sync_cond.notify_all()

    # -- the tail --------------------------------------------------------------

    def _lock_file(self) -> int:
        if self._lock_fd is None:
            self._dir.mkdir(parents=True, exist_ok=True)
            self._lock_fd = os.open(self._dir / AUDIT_LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
        return self._lock_fd

    def _flock(self) -> contextlib.AbstractContextManager[None]:
        if self._holding:
            return contextlib.nullcontext()  # held between appends: ours until let go
        return _FileLock(self._lock_file(), fcntl.LOCK_EX)

    def _sync_tail(self) -> tuple[int, int]:
        """Under the flock: open the current file and refresh the tail if it changed under
        us; the file and its size. One stat when it is still ours (the common case)."""
        try:
            st_path: os.stat_result | None = os.stat(self._path_str)
        except FileNotFoundError:
            st_path = None
        if (
            self._fd is not None
            and st_path is not None
            and (st_path.st_dev, st_path.st_ino) == self._fd_id
        ):
            fd, size = self._fd, st_path.st_size
        else:
            self._close_fd()  # rotated (or removed) by someone else, or not open yet
            fd = os.open(self._path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
            st = os.fstat(fd)
            self._fd, self._fd_id, size = fd, (st.st_dev, st.st_ino), st.st_size
            self._first_ts_read = False
            if st_path is None and self._fsync != "off":
                fsync_dir(self._dir)  # the new file's name must survive a crash too
        if self._known != size:
            size = self._reload_tail(fd, size)
        return fd, size

    def _reload_tail(self, fd: int, size: int) -> int:
        """Find the chain value at the end of the file: seek from the end, never read it all."""
        previous = self._known
        cut = self._cut_since(previous, fd, size)
        if size > 0 and os.pread(fd, 1, size - 1) != b"\n":
            torn = _read_last_line(fd, size + 1)
            new_size = size - len(torn)
            os.ftruncate(fd, new_size)
            if self._fsync != "off":
                os.fsync(fd)
            log(
                "warn",
                "audit_torn_tail_repaired",
                file=str(self._path),
                cut_bytes=len(torn),
                at_byte=new_size,
            )
            size = new_size
        if size == 0:
            self._tail_hash = self._previous_file_hash()
            self._file_records = 0
        else:
            line = _read_last_line(fd, size)
            h = _line_hash(line)
            if h is None:
                # Never skip silently (the reference restarts from zeros here): chain onto the
                # bad line's own bytes so that verify names it and nothing after is orphaned.
                h = _sha256_hex(line)
                log(
                    "error",
                    "audit_invalid_tail_line",
                    file=str(self._path),
                    detail="last line is not a valid record; chaining onto its sha256",
                )
            self._tail_hash = h
            if previous is not None and size >= previous:
                self._file_records += _count_newlines(fd, previous, size)
            else:
                self._file_records = self._count_records(fd, size)
        self._known = size
        if cut is not None:
            self._record_cut(fd, cut, size)
        return self._known

    def _cut_since(self, previous: int | None, fd: int, size: int) -> dict[str, object] | None:
        """Where the chain ended before, when the file no longer reaches it: records were
        cut from its end (§7). Against what this process saw, else against the head."""
        if previous is not None:
            if size >= previous:
                return None
            return {
                "expected_bytes": previous,
                "expected_records": self._file_records,
                "expected_last_hash": self._tail_hash,
            }
        head = _Head.load(self._dir)
        if head is None or head.file != AUDIT_FILE or head.bytes <= 0:
            return None
        if (
            head.bytes <= size
            and os.pread(fd, 1, head.bytes - 1) == b"\n"
            and _line_hash(_read_last_line(fd, head.bytes)) == head.last_hash
        ):
            return None
        return {
            "expected_bytes": head.bytes,
            "expected_records": head.records,
            "expected_last_hash": head.last_hash,
        }

    def _record_cut(self, fd: int, cut: dict[str, object], size: int) -> None:
        """Never paper over a cut: keep the old head in audit.cuts (verify reports it from
        then on), log it, and chain an `audit.truncation_detected` record onto what is left."""
        evidence: dict[str, object] = {
            "file": AUDIT_FILE,
            **cut,
            "found_bytes": size,
            "found_records": self._file_records,
            "found_last_hash": self._tail_hash,
            "detected_at": utc_now_iso(),
        }
        cuts = os.open(self._dir / AUDIT_CUTS_FILE, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(cuts, (json.dumps(evidence) + "\n").encode())
            os.fsync(cuts)
        finally:
            os.close(cuts)
        log("error", "audit_truncation_detected", **evidence)
        marker = AuditRecord(
            timestamp=utc_now_iso(),
            session_id="system",
            tool_name="audit.truncation_detected",
            server_name="rea",
            tier="read",
            status="error",
            autonomy_level="system",
            duration_ms=0,
            error="records were cut from the end of the audit log; audit.cuts keeps where it ended",
            metadata=evidence,
        ).chained(self._tail_hash)
        line, digest = _encode_line(marker)
        self._write(fd, line)
        os.fsync(fd)
        self._known = size + len(line)
        self._tail_hash = digest
        self._file_records += 1
        self._head_dirty = True

    def _count_records(self, fd: int, size: int) -> int:
        """Records in the file, for the head: from the head's own figure when it still holds."""
        head = _Head.load(self._dir)
        if (
            head is not None
            and head.file == AUDIT_FILE
            and 0 < head.bytes <= size
            and os.pread(fd, 1, head.bytes - 1) == b"\n"
            and _line_hash(_read_last_line(fd, head.bytes)) == head.last_hash
        ):
            return head.records + _count_newlines(fd, head.bytes, size)
        return _count_newlines(fd, 0, size)

    def _previous_file_hash(self) -> str:
        rotated = _rotated_files(self._dir)
        if rotated:
            h = _last_hash_of(rotated[-1])
            if h is not None:
                return h
        return ZERO_HASH

    # -- rotation --------------------------------------------------------------

    def _over_size(self, size: int, extra: int) -> bool:
        return size > 0 and size + extra > self._max_bytes

    def _should_rotate(self, fd: int, size: int, extra: int) -> bool:
        """Decide only (as RotatingFileHandler.shouldRollover); re-checked under the flock."""
        if self._over_size(size, extra):
            return True
        if self._max_age_days is None or self._file_records == 0:
            return False
        if not self._first_ts_read:
            self._first_ts_read = True
            first = _read_first_line(fd)
            ts: object = None
            try:
                value = json.loads(first.decode("utf-8", "surrogatepass"))
                if isinstance(value, dict):
                    ts = value.get("timestamp")
            except (ValueError, UnicodeDecodeError):
                pass
            self._first_ts = _parse_iso(ts) if isinstance(ts, str) else None
        if self._first_ts is None:
            return False
        age = _dt.datetime.now(_dt.UTC) - self._first_ts
        return age > _dt.timedelta(days=self._max_age_days)

    def rotate(self, reason: str = "manual") -> Path | None:
        """Rotate now; the rotated file's path, or None when there is nothing to rotate."""
        with self._lock, self._flock():
            if self._sync_tail()[1] == 0:
                return None
            return self._rotate_locked(reason)

    def _rotate_locked(self, reason: str) -> Path:
        """Act (as RotatingFileHandler.doRollover): rename, then the marker record, fsynced."""
        assert self._fd is not None
        old_fd = self._fd
        if self._fsync != "off":
            os.fsync(old_fd)  # everything in the old file is durable before it is renamed
        last_hash = self._tail_hash
        stamp = _dt.datetime.now(_dt.UTC).strftime("%Y%m%d-%H%M%S")
        target = self._dir / f"audit-{stamp}.jsonl"
        n = 0
        while target.exists():
            n += 1
            target = self._dir / f"audit-{stamp}-{n}.jsonl"
        os.rename(self._path, target)
        self._close_fd()
        with self._sync_cond:
            self._synced_seq = max(self._synced_seq, self._written_seq)  # old file fsynced
        fd = os.open(self._path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_EXCL, 0o600)
        st = os.fstat(fd)
        self._fd, self._fd_id = fd, (st.st_dev, st.st_ino)
        self._first_ts_read = False
        marker = AuditRecord(
            timestamp=utc_now_iso(),
            session_id="system",
            tool_name="audit.rotation",
            server_name="rea",
            tier="read",
            status="allowed",
            autonomy_level="system",
            duration_ms=0,
            metadata={"rotated_from": target.name, "rotated_at": utc_now_iso()},
        ).chained(last_hash)
        line, digest = _encode_line(marker)
        self._write(fd, line)
        os.fsync(fd)  # rename and marker are always durable, whatever the fsync mode
        fsync_dir(self._dir)
        self.fsync_count += 1
        self._known = len(line)  # a new file (O_EXCL) holding the marker alone
        self._tail_hash = digest
        self._file_records = 1
        self.rotation_count += 1
        self._write_head_locked()
        log("info", "audit_rotated", rotated_to=target.name, reason=reason)
        return target

    # -- the head --------------------------------------------------------------

    def _write_head_locked(self) -> None:
        """Under the flock, so the head always describes a state the file really had."""
        size = self._known if self._known is not None else 0
        data = {
            "records": self._file_records,
            "last_hash": self._tail_hash,
            "file": AUDIT_FILE,
            "bytes": size,
            "updated_at": utc_now_iso(),
        }
        atomic_write(self._dir / AUDIT_HEAD_FILE, (json.dumps(data) + "\n").encode())
        self._head_written_at = time.monotonic()
        self._head_dirty = False

    def _flush_head_from_timer(self) -> None:
        with self._lock:
            self._head_timer = None
            try:
                self._flush_head_locked()
            except OSError as exc:
                log("error", "audit_head_write_failed", error=str(exc))

    def _flush_head_locked(self) -> None:
        if not self._head_dirty or self._fd is None:
            return
        with self._flock():
            self._sync_tail()
            self._write_head_locked()

    def close(self) -> None:
        """Flush the head file and release the files; a later append reopens them."""
        with self._lock:
            for timer in (self._head_timer, self._hold_timer):
                if timer is not None:
                    timer.cancel()
            self._head_timer = self._hold_timer = None
            try:
                self._flush_head_locked()
            finally:
                self._close_fd()
                self._holding = False  # closing its file lets the flock go
                if self._lock_fd is not None:
                    os.close(self._lock_fd)
                    self._lock_fd = None

    def _close_fd(self) -> None:
        if self._fd is not None:
            try:
                if self._fsync == "batch":
                    os.fsync(self._fd)  # batch waiters count on this file reaching the disk
                    with self._sync_cond:
                        self._synced_seq = max(self._synced_seq, self._written_seq)
            finally:
                os.close(self._fd)
        self._fd, self._fd_id, self._known = None, None, None


class _FileLock:
    """A flock held for one `with` block."""

    def __init__(self, fd: int, mode: int) -> None:
        self._fd, self._mode = fd, mode

    def __enter__(self) -> None:
        fcntl.flock(self._fd, self._mode)

    def __exit__(self, *exc: object) -> None:
        fcntl.flock(self._fd, fcntl.LOCK_UN)


# Audit verify ################################################################


@dataclass(frozen=True)
class VerifyResult:
    """The outcome of `audit verify`: intact, or the first broken link and why."""

    ok: bool
    records: int
    files: tuple[str, ...]
    file: str | None = None
    line: int | None = None
    expected: str | None = None
    found: str | None = None
    reason: str | None = None

    def to_json(self) -> dict[str, object]:
        return {
            "ok": self.ok,
            "records": self.records,
            "files": list(self.files),
            "file": self.file,
            "line": self.line,
            "expected": self.expected,
            "found": self.found,
            "reason": self.reason,
        }


@dataclass(frozen=True)
class _Line:
    file: str
    number: int
    data: bytes
    complete: bool  # ends with a newline


def _lines(snapshot: list[tuple[str, int, int]]) -> Iterator[_Line]:
    """Every line of every file, oldest first, each file read only up to its snapshot size."""
    for name, fd, size in snapshot:
        pos, number, rest = 0, 0, b""
        while pos < size:
            buf = os.pread(fd, min(1 << 22, size - pos), pos)
            if not buf:
                break
            pos += len(buf)
            parts = (rest + buf).split(b"\n")
            rest = parts.pop()
            for part in parts:
                number += 1
                yield _Line(name, number, part, True)
        if rest:
            yield _Line(name, number + 1, rest, False)


def _is_rotation_marker(rec: Mapping[str, object]) -> bool:
    return rec.get("tool_name") == "audit.rotation" and rec.get("session_id") == "system"


def verify_audit(rea_dir: Path) -> VerifyResult:
    """Walk audit-*.jsonl oldest first, then audit.jsonl, checking every link of the chain."""
    rea_dir = Path(rea_dir)
    snapshot: list[tuple[str, int, int]] = []
    # A shared flock while taking the snapshot: no append is half-written in what we read,
    # and appends resume at once (we read beyond the lock, only up to the sizes seen).
    lock_fd: int | None = None
    try:
        lock_fd = os.open(rea_dir / AUDIT_LOCK_FILE, os.O_RDONLY)
    except OSError:
        pass
    try:
        if lock_fd is not None:
            fcntl.flock(lock_fd, fcntl.LOCK_SH)
        # listed under the lock: a rotation meanwhile must never look like a deleted file
        for p in [*_rotated_files(rea_dir), rea_dir / AUDIT_FILE]:
            try:
                fd = os.open(p, os.O_RDONLY)
            except FileNotFoundError:
                continue
            snapshot.append((p.name, fd, os.fstat(fd).st_size))
        head = _Head.load(rea_dir)
        cuts = _load_cuts(rea_dir)
    finally:
        if lock_fd is not None:
            os.close(lock_fd)  # closing releases the flock
    try:
        result = _verify_snapshot(snapshot, head)
        if result.ok and cuts:
            first = cuts[0]
            return VerifyResult(
                False,
                result.records,
                result.files,
                str(first.get("file", AUDIT_FILE)),
                _int_or(first.get("found_records"), 0) + 1,
                str(first.get("expected_last_hash")),
                str(first.get("found_last_hash")),
                f"truncated: records were cut from the end of the log before "
                f"{first.get('detected_at')} ({first.get('expected_records')} records "
                f"expected, {first.get('found_records')} found; see {AUDIT_CUTS_FILE})",
            )
        return result
    finally:
        for _, fd, _ in snapshot:
            os.close(fd)


def _load_cuts(rea_dir: Path) -> list[dict[str, object]]:
    """The cuts a writer found and kept (audit.cuts); a line that does not parse counts
    as a cut too: the evidence file itself was tampered with."""
    try:
        data = (rea_dir / AUDIT_CUTS_FILE).read_bytes()
    except OSError:
        return []
    cuts: list[dict[str, object]] = []
    for line in data.splitlines():
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except ValueError:
            value = None
        cuts.append(value if isinstance(value, dict) else {"detected_at": "(unreadable entry)"})
    return cuts


def _int_or(value: object, default: int) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else default


def _verify_snapshot(snapshot: list[tuple[str, int, int]], head: _Head | None) -> VerifyResult:
    files = tuple(name for name, _, _ in snapshot)
    expected_prev: str | None = None  # None: the first record of all
    records = 0
    head_seen = head is None
    last_hash = ZERO_HASH
    last_file, last_number = AUDIT_FILE, 0
    lines = _lines(snapshot)
    cut_seen: tuple[_Line, dict[str, object]] | None = None  # the chain's own evidence

    def broken(
        ln: _Line, reason: str, expected: str | None = None, found: str | None = None
    ) -> VerifyResult:
        return VerifyResult(False, records, files, ln.file, ln.number, expected, found, reason)

    for ln in lines:
        if not ln.complete:
            return broken(ln, "truncated: the last line is cut off mid-record")
        try:
            value = json.loads(ln.data.decode("utf-8", "surrogatepass"))
        except (ValueError, UnicodeDecodeError):
            return broken(ln, "not JSON: the line does not parse")
        if not isinstance(value, dict) or not isinstance(value.get("hash"), str):
            return broken(ln, "not JSON: the line is not an audit record (no hash)")
        rec: dict[str, object] = dict(value)
        found_hash = str(rec.pop("hash"))
        computed = record_hash(rec)
        if computed != found_hash and _raw_record_hash(rec) != found_hash:
            return broken(ln, "edited: the content does not match its hash", computed, found_hash)
        prev = rec.get("prev_hash")
        prev_s = prev if isinstance(prev, str) else repr(prev)
        if expected_prev is None:
            # The oldest file may start with a rotation marker: older files pruned by retention.
            if prev_s != ZERO_HASH and not _is_rotation_marker(rec):
                return broken(
                    ln, "deleted: the first record does not start the chain", ZERO_HASH, prev_s
                )
        elif prev_s != expected_prev:
            later = any(_line_hash(other.data) == prev_s for other in lines if other.complete)
            if later:
                return broken(
                    ln, "reordered: prev_hash names a later record", expected_prev, prev_s
                )
            return broken(ln, "deleted: a record before this one is missing", expected_prev, prev_s)
        records += 1
        expected_prev = last_hash = found_hash
        last_file, last_number = ln.file, ln.number
        if cut_seen is None and rec.get("tool_name") == "audit.truncation_detected":
            cut_seen = (ln, rec)
        if head is not None and found_hash == head.last_hash:
            head_seen = True
    if not head_seen and head is not None:
        return VerifyResult(
            False,
            records,
            files,
            last_file,
            last_number + 1,
            head.last_hash,
            last_hash,
            f"truncated: the log ends before its head ({head.records} records in {head.file})",
        )
    if cut_seen is not None:  # the writer found a cut and chained it in: it stays reported
        ln, rec = cut_seen
        meta = rec.get("metadata") if isinstance(rec.get("metadata"), dict) else {}
        assert isinstance(meta, dict)
        return VerifyResult(
            False,
            records,
            files,
            ln.file,
            ln.number,
            str(meta.get("expected_last_hash")),
            str(meta.get("found_last_hash")),
            f"truncated: records were cut from the end of the log before "
            f"{meta.get('detected_at')} ({meta.get('expected_records')} records expected, "
            f"{meta.get('found_records')} found; recorded at this line)",
        )
    return VerifyResult(True, records, files)


# Audit command ###############################################################


def cmd_audit(rea_dir: Path, argv: list[str], out: TextIO) -> int:
    """`audit verify [--json]`, `audit rotate`, `audit tail [-n N]` (SPEC §7, §11)."""
    args = parse_command(["audit", *argv])
    if args.audit_command == "verify":
        result = verify_audit(rea_dir)
        if args.json:
            out.write(json.dumps(result.to_json(), ensure_ascii=False) + "\n")
        elif result.ok:
            out.write(
                f"audit: OK — {result.records} records in {len(result.files)} files ({rea_dir})\n"
            )
        else:
            hashes = ""
            if result.expected is not None or result.found is not None:
                hashes = f" (expected {result.expected}, found {result.found})"
            out.write(f"audit: BROKEN at {result.file}:{result.line} — {result.reason}{hashes}\n")
        return 0 if result.ok else 1
    if args.audit_command == "rotate":
        audit = AuditLog(rea_dir)
        try:
            rotated = audit.rotate("manual")
        finally:
            audit.close()
        if rotated is None:
            out.write("audit: nothing to rotate\n")
        else:
            out.write(f"audit: rotated to {rotated.name}\n")
        return 0
    for line in _tail_lines(rea_dir, args.lines):
        out.write(line.decode("utf-8", "replace") + "\n")
    return 0


def record_governance_act(
    governance: Governance, act: str, metadata: dict[str, object], session_id: str = "cli"
) -> None:
    """Governance acts are audited like calls (§7): server `rea`, tier `write`, in the
    repository's one chain. The act stands even when the record cannot be written: the
    failure is one line on stderr."""
    try:
        policy = load_policy(governance.own)
        level, fsync = policy.autonomy_level, policy.audit_fsync
    except ReaError:
        level, fsync = "unknown", "always"
    audit = AuditLog(governance.shared, fsync)
    try:
        audit.append(
            session_id=session_id,
            tool_name=act,
            server_name="rea",
            tier="write",
            status="allowed",
            autonomy_level=level,
            duration_ms=0,
            metadata={"event": "GOVERNANCE", "user": os.environ.get("USER", ""), **metadata},
        )
    except OSError as exc:
        print(f"rea: {act}: done, but not audited ({exc.strerror or exc})", file=sys.stderr)
    finally:
        audit.close()


def _tail_lines(rea_dir: Path, n: int) -> list[bytes]:
    """The last n lines of the chain, newest file first, each read backwards from its end."""
    out: list[bytes] = []
    for p in reversed([*_rotated_files(rea_dir), rea_dir / AUDIT_FILE]):
        if len(out) >= n:
            break
        try:
            fd = os.open(p, os.O_RDONLY)
        except FileNotFoundError:
            continue
        try:
            end = os.fstat(fd).st_size
            if end and os.pread(fd, 1, end - 1) != b"\n":
                end -= len(_read_last_line(fd, end + 1))  # a torn line is not a record
            while end > 0 and len(out) < n:
                line = _read_last_line(fd, end)
                out.append(line)
                end -= len(line) + 1
        finally:
            os.close(fd)
    return list(reversed(out))


# Breaker and session blocker ##################################################


@dataclass(frozen=True)
class BreakerTicket:
    """Leave for one call to go through a circuit: the circuit's epoch when it was given
    (every transition starts a new one) and whether it is the half-open probe. Only a
    ticket of the current epoch moves the circuit: the probe's own outcome decides, never
    that of a call that started before (§9)."""

    epoch: int
    probe: bool = False


class CircuitBreaker:
    """Per-server circuit: closed -> open after N consecutive failures -> half-open lets
    exactly one probe -> closed/open (§9).

    Transitions out of `open` happen lazily, when `acquire`, `state` or `retry_at` is
    called after the cooldown; there is no timer thread. `on_transition(old, new)` is
    called outside the lock, in the order the transitions happened.
    """

    def __init__(
        self,
        threshold: int,
        cooldown_s: float,
        clock: Callable[[], float] = time.monotonic,
        on_transition: Callable[[CircuitState, CircuitState], None] | None = None,
    ) -> None:
        _check_breaker_settings(threshold, cooldown_s)
        self._clock = clock
        self._on_transition = on_transition
        # guards every field below, and the queue of transitions not yet reported
        self._lock = threading.Lock()
        self._threshold = threshold
        self._cooldown_s = cooldown_s
        self._state = CircuitState.CLOSED
        self._epoch = 0  # one per transition: tickets of an earlier epoch are history
        self._failures = 0  # consecutive; reset by any success
        self._opened_at = 0.0  # clock() when the circuit last opened
        self._probe_out = False  # half-open: the one probe is in flight
        self._pending: deque[tuple[CircuitState, CircuitState]] = deque()
        self._delivering = False  # one thread at a time reports, so the order holds

    def configure(self, threshold: int, cooldown_s: float) -> None:
        """Take new settings (a policy reload); they apply from the next event on."""
        _check_breaker_settings(threshold, cooldown_s)
        with self._lock:
            self._threshold = threshold
            self._cooldown_s = cooldown_s

    def acquire(self) -> BreakerTicket | float:
        """A ticket when the call may go ahead (in half-open: the probe's), else the epoch
        time (time.time() based) at which a retry may succeed."""
        result: BreakerTicket | float
        with self._lock:
            self._lazy_half_open()
            if self._state is CircuitState.CLOSED:
                result = BreakerTicket(self._epoch)
            elif self._state is CircuitState.HALF_OPEN and not self._probe_out:
                self._probe_out = True
                result = BreakerTicket(self._epoch, probe=True)
            else:
                result = self._retry_wall()
        self._deliver()
        return result

    def settle(self, ticket: BreakerTicket, verdict: BreakerVerdict) -> None:
        """A call that held `ticket` ended. A result with isError counts as success: the
        server works. An unused ticket (the call never reached the server) frees the probe."""
        with self._lock:
            if ticket.epoch == self._epoch:
                if verdict is BreakerVerdict.SUCCESS:
                    self._failures = 0
                    if self._state is CircuitState.HALF_OPEN and ticket.probe:
                        self._probe_out = False
                        self._move(CircuitState.CLOSED)
                elif verdict is BreakerVerdict.FAILURE:
                    self._failures += 1
                    if self._state is CircuitState.HALF_OPEN and ticket.probe:
                        # the probe failed: open again with a fresh cooldown
                        self._probe_out = False
                        self._opened_at = self._clock()
                        self._move(CircuitState.OPEN)
                    elif self._state is CircuitState.CLOSED and self._failures >= self._threshold:
                        self._opened_at = self._clock()
                        self._move(CircuitState.OPEN)
                elif ticket.probe and self._state is CircuitState.HALF_OPEN:
                    self._probe_out = False
            # another epoch: a call that started before the last transition; the circuit
            # has moved on (a late failure does not extend a cooldown, a late success
            # does not close a half-open circuit)
        self._deliver()

    @property
    def state(self) -> CircuitState:
        """Reading it may move open -> half-open."""
        with self._lock:
            self._lazy_half_open()
            state = self._state
        self._deliver()
        return state

    def retry_at(self) -> float | None:
        """Epoch seconds when a refused call may be retried; None unless open."""
        with self._lock:
            self._lazy_half_open()
            result = self._retry_wall() if self._state is CircuitState.OPEN else None
        self._deliver()
        return result

    # -- lock held below, except _deliver ------------------------------------------

    def _lazy_half_open(self) -> None:
        if self._state is CircuitState.OPEN and self._clock() >= self._opened_at + self._cooldown_s:
            self._probe_out = False
            self._move(CircuitState.HALF_OPEN)

    def _retry_wall(self) -> float:
        if self._state is CircuitState.OPEN:
            # the injected clock is not wall time: carry the remaining offset over
            remaining = self._opened_at + self._cooldown_s - self._clock()
            return time.time() + max(0.0, remaining)
        # half-open with the probe out: if it fails, a fresh cooldown starts about now
        return time.time() + self._cooldown_s

    def _move(self, new: CircuitState) -> None:
        old = self._state
        if old is new:
            return
        self._state = new
        self._epoch += 1
        if new is CircuitState.CLOSED:
            self._failures = 0
        if self._on_transition is not None:
            self._pending.append((old, new))

    def _deliver(self) -> None:
        """Report queued transitions outside the lock; one reporter at a time keeps order."""
        callback = self._on_transition
        if callback is None:
            return
        with self._lock:
            if self._delivering or not self._pending:
                return
            self._delivering = True
        while True:
            with self._lock:
                if not self._pending:
                    self._delivering = False
                    return
                old, new = self._pending.popleft()
            try:
                callback(old, new)
            except Exception as exc:  # a broken listener must not jam the breaker
                log("error", "breaker_listener_failed", old=old, new=new, error=repr(exc))


def _check_breaker_settings(threshold: int, cooldown_s: float) -> None:
    if threshold < 1 or cooldown_s < 0:
        raise ValueError(
            f"breaker needs threshold >= 1, cooldown_s >= 0: {threshold}, {cooldown_s}"
        )


class SessionBlocker:
    """Counts open-transitions per (session, server); fires once at the threshold (§9)."""

    def __init__(self, threshold: int) -> None:
        if threshold < 1:
            raise ValueError(f"session blocker threshold must be >= 1: {threshold}")
        self._threshold = threshold
        self._lock = threading.Lock()  # guards _counts and _emitted
        self._counts: dict[tuple[str, str], int] = {}
        self._emitted: set[tuple[str, str]] = set()

    def configure(self, threshold: int) -> None:
        """A reloaded policy's threshold; counts so far are kept."""
        if threshold < 1:
            raise ValueError("session blocker threshold must be at least 1")
        with self._lock:
            self._threshold = threshold

    def on_transition(self, session_id: str, server: str, new_state: str) -> int | None:
        """The open-transition count when this transition makes the blocker fire, else None.

        "open" counts; "closed" resets and re-arms; "half-open" does nothing. A child
        restart is not a transition and must not be reported here.
        """
        key = (session_id, server)
        with self._lock:
            if new_state == CircuitState.OPEN:
                count = self._counts.get(key, 0) + 1
                self._counts[key] = count
                if count >= self._threshold and key not in self._emitted:
                    self._emitted.add(key)
                    return count
            elif new_state == CircuitState.CLOSED:
                self._counts.pop(key, None)
                self._emitted.discard(key)
        return None

    def count(self, session_id: str, server: str) -> int:
        with self._lock:
            return self._counts.get((session_id, server), 0)

    def emitted(self, session_id: str, server: str) -> bool:
        with self._lock:
            return (session_id, server) in self._emitted


# Live state ###################################################################

STATE_FILE = "serve.state.json"
PID_FILE = "serve.pid"
HALT_FILE = "HALT"


def pid_alive(pid: int) -> bool:
    """Is there a live (not zombie) process with this pid? Permission denied means alive."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text(encoding="ascii", errors="replace")
    except OSError:
        return True  # no /proc (macOS): kill(0) is all we know
    # the state letter follows the command name, which ends at the last ")"
    fields = stat[stat.rfind(")") + 1 :].split()
    return not (fields and fields[0] in ("Z", "X"))


def _read_pid_file(path: Path) -> int | None:
    """The pid in serve.pid; None if absent. Raises ReaError if unreadable or not a pid."""
    try:
        text = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise ReaError(f"{path}: cannot read the pid file ({exc}); remove it if stale") from exc
    if not text.isdigit():
        raise ReaError(f"{path}: does not hold a pid; remove it if no gateway runs")
    return int(text)


def _read_state_owner(path: Path) -> int | None:
    """owner_pid of an existing live-state file, or None if there is no usable one."""
    try:
        raw: object = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return None
    if isinstance(raw, dict):
        owner = raw.get("owner_pid")
        if isinstance(owner, int) and not isinstance(owner, bool):
            return owner
    return None


class LiveState:
    """Owns .rea/serve.state.json: debounced, atomic, durable writes of the gateway's live
    state (§8).

    `changed()` starts one `threading.Timer` at the first change of a burst; when it fires
    the current snapshot is written, so a burst costs one write and the last state always
    lands. Only the owner (see `claim`) writes; a second gateway in the same root stays
    silent instead of clobbering the first one's file.
    """

    def __init__(
        self,
        rea_dir: Path,
        session_id: str,
        snapshot: Callable[[], dict[str, object]],
        debounce_s: float = 0.25,
    ) -> None:
        self.state_path = rea_dir / STATE_FILE
        self.pid_path = rea_dir / PID_FILE
        self._rea_dir = rea_dir
        self._session_id = session_id
        self._snapshot = snapshot
        self._debounce_s = debounce_s
        self._lock = threading.Lock()  # guards _timer, _owner, _closed
        self._timer: threading.Timer | None = None
        self._owner = False
        self._closed = False
        # one writer at a time: a later snapshot must never be replaced by an earlier one
        self._write_lock = threading.Lock()
        self.writes = 0  # file writes done; guarded by _write_lock

    @property
    def owner(self) -> bool:
        with self._lock:
            return self._owner

    def claim(self) -> bool:
        """Become the file's owner unless a live foreign gateway owns it; write serve.pid."""
        me = os.getpid()
        try:
            pid_in_file = _read_pid_file(self.pid_path)
        except ReaError:
            pid_in_file = None  # a garbled pid file is taken over like a dead one
        for other in (_read_state_owner(self.state_path), pid_in_file):
            if other is not None and other != me and pid_alive(other):
                log(
                    "warning",
                    "live_state_owned_elsewhere",
                    file=str(self.state_path),
                    owner_pid=other,
                    session_id=self._session_id,
                    detail="another gateway runs in this root; this one will not write live state",
                )
                return False
        try:
            self._rea_dir.mkdir(parents=True, exist_ok=True)
            atomic_write(self.pid_path, f"{me}\n".encode())
        except OSError as exc:
            log("error", "live_state_claim_failed", file=str(self.pid_path), error=str(exc))
            return False
        with self._lock:
            self._owner = True
        return True

    def changed(self) -> None:
        """Mark the state dirty; the write follows `debounce_s` after the burst's first change."""
        with self._lock:
            if not self._owner or self._closed or self._timer is not None:
                return
            timer = threading.Timer(self._debounce_s, self._on_timer)
            timer.name = "rea-state-timer"
            timer.daemon = True  # a pending write must not keep the process alive; close() flushes
            self._timer = timer
        timer.start()

    def flush(self) -> None:
        """Write now (if owner), cancelling any pending timer."""
        with self._lock:
            timer, self._timer = self._timer, None
            owner = self._owner
        if timer is not None:
            timer.cancel()
        if owner:
            self._write()

    def close(self) -> None:
        """Flush, stop scheduling writes, and remove serve.pid if it still holds our pid."""
        self.flush()
        with self._lock:
            self._closed = True
            owner = self._owner
        if not owner:
            return
        try:
            if _read_pid_file(self.pid_path) == os.getpid():
                self.pid_path.unlink()
        except (ReaError, OSError):
            pass  # someone else's or already gone: not ours to remove

    def _on_timer(self) -> None:
        with self._lock:
            if self._timer is not threading.current_thread():
                return  # cancelled by flush() after it had already started
            self._timer = None
            if self._closed:
                return
        self._write()

    def _write(self) -> None:
        with self._write_lock:
            # the snapshot is taken under the write lock so that writes land in order;
            # changes from now on start a new timer and so a new write
            state = dict(self._snapshot())
            state["updated_at"] = _utc_iso_ms()
            data = json.dumps(state, indent=2, ensure_ascii=False, default=str) + "\n"
            try:
                atomic_write(self.state_path, data.encode("utf-8"))
            except OSError as exc:
                log("error", "live_state_write_failed", file=str(self.state_path), error=str(exc))
                return
            self.writes += 1


def _utc_iso_ms(epoch: float | None = None) -> str:
    moment = _dt.datetime.fromtimestamp(time.time() if epoch is None else epoch, _dt.UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


# Status command ###############################################################

_WATCH_INTERVAL_S = 1.0
_CLEAR_SCREEN = "\x1b[H\x1b[2J"
_CHUNK = 1 << 20
_T = TypeVar("_T")


class _ShapeError(Exception):
    """The state file is JSON but not the shape rea writes."""


@dataclass(frozen=True)
class DownstreamStatus:
    """One downstream's entry of the live state (§8): what the gateway writes to
    serve.state.json, what health and metrics show, and what `status` reads back."""

    name: str
    connected: bool | None
    healthy: bool
    circuit_state: str | None
    retry_at: float | None  # epoch seconds
    last_error: str | None
    tools_count: int | None
    open_transitions: int | None
    session_blocker_emitted: bool | None
    pid: int | None
    restarts: int | None
    calls: int | None
    errors: int | None
    status: str | None = None
    era: str | None = None
    url: str | None = None  # a remote server's address (no query: it may hold a secret)
    withheld_tools: Mapping[str, str] = field(default_factory=dict)
    new_tools: tuple[str, ...] = ()
    removed_tools: tuple[str, ...] = ()

    def to_json(self) -> dict[str, object]:
        doc = asdict(self)
        doc["retry_at"] = _iso_or_none(self.retry_at)
        doc["withheld_tools"] = dict(self.withheld_tools)
        doc["new_tools"] = list(self.new_tools)
        doc["removed_tools"] = list(self.removed_tools)
        return doc


@dataclass(frozen=True)
class ServeState:
    """The gateway's live state (§8) as one record: written to serve.state.json, read
    back by `status`, shown by health and metrics."""

    session_id: str
    started_at: str | None
    updated_at: str | None
    owner_pid: int
    gateway_version: str | None
    metrics_port: int | None
    halt_active: bool
    halt_reason: str | None
    downstreams: tuple[DownstreamStatus, ...]
    tool_renames: Mapping[str, str] = field(default_factory=dict)
    audit_fail_count: int = 0
    tools_offered: int | None = None  # how many tools the client is offered (health included)

    def to_json(self) -> dict[str, object]:
        return {
            "session_id": self.session_id,
            "started_at": self.started_at,
            "updated_at": self.updated_at,
            "owner_pid": self.owner_pid,
            "gateway_version": self.gateway_version,
            "metrics_port": self.metrics_port,
            "halt": {"active": self.halt_active, "reason": self.halt_reason},
            "downstreams": [d.to_json() for d in self.downstreams],
            "tool_renames": dict(self.tool_renames),
            "audit_fail_count": self.audit_fail_count,
            "tools_offered": self.tools_offered,
        }


def _iso_or_none(epoch: float | None) -> str | None:
    if epoch is None:
        return None
    return (
        time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(epoch)) + f".{int(epoch * 1000) % 1000:03d}Z"
    )


@dataclass(frozen=True)
class AuditSummary:
    """Size, record count and last record of .rea/audit.jsonl, read cheaply."""

    path: str
    exists: bool
    size_bytes: int
    records: int
    last_timestamp: str | None
    last_tool: str | None
    last_status: str | None
    tail_hash_looks_valid: bool | None = None  # the last record's hash is its content's


@dataclass(frozen=True)
class StatusReport:
    """Everything `status` shows, gathered from files only."""

    rea_dir: Path
    running: bool
    pid: int | None  # the live gateway's pid
    stale_pid: int | None  # serve.pid names a dead process
    raw_state: dict[str, object] | None
    state: ServeState | None
    state_problem: str | None  # one line when the state file is missing or unusable
    halt_active: bool
    halt_reason: str | None
    policy: dict[str, object]
    audit: AuditSummary
    shared_dir: Path | None = None  # a linked worktree's primary .rea/ (audit, pins, HALT)

    @property
    def exit_code(self) -> int:
        if not self.running:
            return 3
        if self.state is None:
            return 2
        if self.halt_active or any(not d.healthy for d in self.state.downstreams):
            return 1
        return 0


def cmd_status(
    root: Path,
    argv: list[str],
    out: TextIO,
    summary: Callable[[], dict[str, object]],
) -> int:
    """`status [--json] [--watch]`: the running gateway as its files show it (§8)."""
    try:
        args = parse_command(["status", *argv])
    except ReaError as exc:
        print(f"rea: {exc}", file=sys.stderr)
        return 2
    as_json, watch = args.json, args.watch
    if not watch:
        try:
            report = gather_status(root, summary)
        except ReaError as exc:
            print(f"rea status: {exc}", file=sys.stderr)
            return 2
        out.write(_render(report, as_json))
        out.flush()
        return report.exit_code
    try:
        while True:
            try:
                text = _render(gather_status(root, summary), as_json)
            except ReaError as exc:
                text = f"rea status: {exc}\n"  # shown, not fatal: a file may be mid-edit
            out.write(_CLEAR_SCREEN + text)
            out.flush()
            time.sleep(_WATCH_INTERVAL_S)
    except KeyboardInterrupt:
        out.write("\n")
        out.flush()
        return 0


def gather_status(root: Path, summary: Callable[[], dict[str, object]]) -> StatusReport:
    """Read serve.pid, serve.state.json, HALT, audit.jsonl and the policy summary.

    Raises ReaError for unreadable files (exit 2); an unusable state file is not an error
    here but a `state_problem` line, since whether it matters depends on `running`.
    """
    rea_dir = root / ".rea"
    pid_in_file = _read_pid_file(rea_dir / PID_FILE)
    raw, state, problem = _load_state(rea_dir / STATE_FILE)
    # serve.pid is the only proof of life: close() removes it, owner_pid stays in the file
    running = False
    pid: int | None = None
    stale: int | None = None
    if pid_in_file is not None:
        if not pid_alive(pid_in_file):
            stale = pid_in_file
        elif state is None or state.owner_pid == pid_in_file:
            running, pid = True, pid_in_file
        else:
            problem = (
                f"{rea_dir / PID_FILE} names pid {pid_in_file} but the live state's owner is "
                f"{state.owner_pid}"
            )
    governance = governance_of(root)
    halt_active, halt_reason = False, None
    for halt in governance.halt_files:
        halt_active, halt_reason = _read_halt(halt)
        if halt_active:
            break
    return StatusReport(
        rea_dir=rea_dir,
        running=running,
        pid=pid,
        stale_pid=stale,
        raw_state=raw,
        state=state,
        state_problem=problem,
        halt_active=halt_active,
        halt_reason=halt_reason,
        policy=summary(),
        audit=_audit_summary(governance.shared / AUDIT_FILE),
        shared_dir=governance.shared if governance.linked else None,
    )


def _load_state(
    path: Path,
) -> tuple[dict[str, object] | None, ServeState | None, str | None]:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None, None, f"no live state: {path} does not exist"
    except OSError as exc:
        raise ReaError(f"{path}: cannot read the live state ({exc.strerror})") from exc
    if not data.strip():
        return None, None, f"live state {path} is empty"
    try:
        raw: object = json.loads(data)
    except ValueError:
        return None, None, f"live state {path} is corrupt (not JSON)"
    if not isinstance(raw, dict):
        return None, None, f"live state {path} is not rea's format (not a JSON object)"
    try:
        return raw, _parse_state(raw), None
    except _ShapeError as exc:
        return raw, None, f"live state {path} is not rea's format ({exc})"


def _parse_state(raw: dict[str, object]) -> ServeState:
    halt = raw.get("halt")
    if halt is None:
        halt = {}
    if not isinstance(halt, dict):
        raise _ShapeError("'halt' is not an object")
    items = raw.get("downstreams")
    if not isinstance(items, list):
        raise _ShapeError("'downstreams' is missing or not a list")
    downstreams: list[DownstreamStatus] = []
    for index, item in enumerate(items):
        if not isinstance(item, dict):
            raise _ShapeError(f"downstreams[{index}] is not an object")
        where = f"downstreams[{index}]"
        downstreams.append(
            DownstreamStatus(
                name=_req(_str(item, "name", where), "name", where),
                connected=_bool(item, "connected", where),
                healthy=_req(_bool(item, "healthy", where), "healthy", where),
                circuit_state=_str(item, "circuit_state", where),
                retry_at=_epoch(item, "retry_at", where),
                last_error=_str(item, "last_error", where),
                tools_count=_state_int(item, "tools_count", where),
                open_transitions=_state_int(item, "open_transitions", where),
                session_blocker_emitted=_bool(item, "session_blocker_emitted", where),
                pid=_state_int(item, "pid", where),
                restarts=_state_int(item, "restarts", where),
                calls=_state_int(item, "calls", where),
                errors=_state_int(item, "errors", where),
                status=_str(item, "status", where),
                era=_str(item, "era", where),
                url=_str(item, "url", where),
            )
        )
    return ServeState(
        session_id=_req(_str(raw, "session_id", "top level"), "session_id", "top level"),
        started_at=_str(raw, "started_at", "top level"),
        updated_at=_str(raw, "updated_at", "top level"),
        owner_pid=_req(_state_int(raw, "owner_pid", "top level"), "owner_pid", "top level"),
        gateway_version=_str(raw, "gateway_version", "top level"),
        metrics_port=_state_int(raw, "metrics_port", "top level"),
        halt_active=bool(_bool(halt, "active", "halt")),
        halt_reason=_str(halt, "reason", "halt"),
        downstreams=tuple(downstreams),
        audit_fail_count=_state_int(raw, "audit_fail_count", "top level") or 0,
        tools_offered=_state_int(raw, "tools_offered", "top level"),
    )


def _req(value: _T | None, key: str, where: str) -> _T:
    if value is None:
        raise _ShapeError(f"{where}: '{key}' is missing")
    return value


def _str(obj: dict[str, object], key: str, where: str) -> str | None:
    value = obj.get(key)
    if value is None or isinstance(value, str):
        return value
    raise _ShapeError(f"{where}: '{key}' is not a string")


def _state_int(obj: dict[str, object], key: str, where: str) -> int | None:
    value = obj.get(key)
    if value is None or (isinstance(value, int) and not isinstance(value, bool)):
        return value
    raise _ShapeError(f"{where}: '{key}' is not an integer")


def _bool(obj: dict[str, object], key: str, where: str) -> bool | None:
    value = obj.get(key)
    if value is None or isinstance(value, bool):
        return value
    raise _ShapeError(f"{where}: '{key}' is not true/false")


def _epoch(obj: dict[str, object], key: str, where: str) -> float | None:
    """A time as epoch seconds; the gateway may write a number or an ISO-8601 string."""
    value = obj.get(key)
    if value is None:
        return None
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        moment = _iso_to_epoch(value)
        if moment is not None:
            return moment
    raise _ShapeError(f"{where}: '{key}' is not a time")


def _iso_to_epoch(text: str) -> float | None:
    try:
        moment = _dt.datetime.fromisoformat(text)
    except ValueError:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=_dt.UTC)
    return moment.timestamp()


def _read_halt(path: Path) -> tuple[bool, str | None]:
    try:
        text = path.read_text(encoding="utf-8", errors="replace").strip()
    except FileNotFoundError:
        return False, None
    except OSError as exc:
        raise ReaError(f"{path}: cannot read the HALT file ({exc.strerror})") from exc
    return True, (text or None)


def _audit_summary(path: Path) -> AuditSummary:
    """Count lines in 1 MB chunks and read the last record by seeking from the end."""
    try:
        with path.open("rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            records = 0
            while chunk := fh.read(_CHUNK):
                records += chunk.count(b"\n")
            last = _last_line(fh, size)
    except FileNotFoundError:
        return AuditSummary(str(path), False, 0, 0, None, None, None)
    except OSError as exc:
        raise ReaError(f"{path}: cannot read the audit log ({exc.strerror})") from exc
    timestamp = tool = status = None
    looks_valid: bool | None = None
    try:
        record: object = json.loads(last) if last else None
    except ValueError:
        record = None  # a torn or damaged tail: `audit verify` explains it
    if isinstance(record, dict):
        timestamp, tool, status = (
            value if isinstance(value := record.get(key), str) else None
            for key in ("timestamp", "tool_name", "status")
        )
        claimed = record.pop("hash", None)
        looks_valid = (
            isinstance(claimed, str)
            and SHA256_HEX.match(claimed) is not None
            and record_hash(record) == claimed
        )
    elif last:
        looks_valid = False
    return AuditSummary(str(path), True, size, records, timestamp, tool, status, looks_valid)


def _last_line(fh: BinaryIO, size: int) -> bytes:
    """The last complete (newline-terminated) line, read backwards in chunks.

    A torn tail (no final newline) is not a record, so it is skipped.
    """
    tail = b""
    pos = size
    while pos > 0:
        step = min(_CHUNK, pos)
        pos -= step
        fh.seek(pos)
        tail = fh.read(step) + tail
        cut = tail.rfind(b"\n")
        if cut == -1:
            continue
        body = tail[:cut]
        start = body.rfind(b"\n")
        if start != -1 or pos == 0:
            return body[start + 1 :]
    return b""


def _render(report: StatusReport, as_json: bool) -> str:
    if as_json:
        return json.dumps(_as_json(report), indent=2, ensure_ascii=False, default=str) + "\n"
    return "\n".join(_human_lines(report)) + "\n"


def _as_json(report: StatusReport) -> dict[str, object]:
    """A superset of the reference tool's `status --json` (`serve`, `policy`, `audit`), so
    scripts written for it keep working (§8); rea.py's own fields beside them."""
    state = report.state
    audit = report.audit
    downstreams = (report.raw_state or {}).get("downstreams")
    uptime = _uptime_s(state) if report.running and state is not None else None
    return {
        "base_dir": str(report.rea_dir.parent),
        "serve": {
            "running": report.running,
            "pid": report.pid,
            "stale": report.stale_pid is not None,
            "stale_pid": report.stale_pid,
            "session_id": state.session_id if state is not None else None,
            "started_at": state.started_at if state is not None else None,
            "updated_at": state.updated_at if state is not None else None,
            "uptime_s": uptime,
            "metrics_port": state.metrics_port if state is not None else None,
            "downstreams": downstreams if isinstance(downstreams, list) else [],
            "state_problem": report.state_problem,
        },
        "policy": {
            **report.policy,
            "halt_active": report.halt_active,
            "halt_reason": report.halt_reason,
        },
        "audit": {
            "present": audit.exists,
            "lines": audit.records,
            "last_timestamp": audit.last_timestamp,
            "tail_hash_looks_valid": audit.tail_hash_looks_valid,
            "file": audit.path,
            "size_bytes": audit.size_bytes,
            "last_tool_name": audit.last_tool,
            "last_status": audit.last_status,
            # earlier names of rea.py's own
            "exists": audit.exists,
            "records": audit.records,
            "last_record_at": audit.last_timestamp,
        },
        "running": report.running,
        "pid": report.pid,
        "stale_pid": report.stale_pid,
        "exit_code": report.exit_code,
        "uptime_s": uptime,
        "state_problem": report.state_problem,
        "folder": str(report.rea_dir),
        "shared_folder": str(report.shared_dir) if report.shared_dir is not None else None,
        "state": report.raw_state,
        "halt": {"active": report.halt_active, "reason": report.halt_reason},
    }


def _human_lines(report: StatusReport) -> list[str]:
    state = report.state
    lines: list[str] = []
    if report.running:
        lines.append(f"gateway: running (pid {report.pid})")
    elif report.stale_pid is not None:
        lines.append(f"gateway: not running (stale pid {report.stale_pid})")
    else:
        lines.append("gateway: not running")
    if report.state_problem is not None:
        lines.append(f"  {report.state_problem}")
    lines.append(f"folder: {report.rea_dir}")
    if report.shared_dir is not None:
        lines.append(f"  a linked worktree: audit log, pins and HALT from {report.shared_dir}")
    if state is not None:
        version = f", version {state.gateway_version}" if state.gateway_version else ""
        lines.append(f"session: {state.session_id}{version}")
        if report.running:
            uptime = _uptime_s(state)
            shown = _duration(uptime) if uptime is not None else "unknown"
            lines.append(f"uptime: {shown} (started {state.started_at or 'unknown'})")
        else:
            lines.append(f"last state written: {state.updated_at or 'unknown'}")
    if report.halt_active:
        lines.append(f"HALT: active — {report.halt_reason or 'no reason given'}")
    else:
        lines.append("HALT: not active")
    lines.append(_policy_line(report.policy))
    if state is not None:
        lines.append(f"servers ({len(state.downstreams)}):")
        lines.extend(_server_lines(state.downstreams))
        lines.extend(tools_offered_lines(state.tools_offered))
    audit = report.audit
    if audit.exists:
        last = audit.last_timestamp or "unknown"
        if audit.last_tool:
            last += f" ({audit.last_tool}, {audit.last_status or '?'})"
        lines.append(
            f"audit log: {audit.path} — {_size(audit.size_bytes)}, "
            f"{audit.records} records, last at {last}"
        )
    else:
        lines.append(f"audit log: {audit.path} — none yet")
    return lines


TOOLS_WARN_ABOVE = 100  # VS Code and Copilot cap at 128 tools, Cursor around 40-100


def tools_offered_lines(count: int | None, when: str = "") -> list[str]:
    """How many tools the client is offered, and a warning above what clients take: every
    listed tool costs context on every turn (§3)."""
    if count is None:
        return []
    lines = [f"tools offered to the client{when}: {count}"]
    if count > TOOLS_WARN_ABOVE:
        lines.append(
            f"  warning: more than {TOOLS_WARN_ABOVE} tools: clients cap their lists (VS Code "
            "and Copilot at 128, Cursor around 40-100); offer fewer with a server's tools: "
            "in .rea/registry.yaml or gateway.blocked_tools in .rea/policy.yaml"
        )
    return lines


def _policy_line(policy: dict[str, object]) -> str:
    level = policy.get("autonomy_level", "?")
    parts = [f"autonomy {level}"]
    if policy.get("max_autonomy_level") is not None:
        parts.append(f"max {policy['max_autonomy_level']}")
    if policy.get("profile") is not None:
        parts.append(f"profile {policy['profile']}")
    if policy.get("blocked_paths_count") is not None:
        parts.append(f"{policy['blocked_paths_count']} blocked paths")
    source = policy.get("file") or "no policy file: the defaults"
    return f"policy: {source} — " + ", ".join(parts)


def _server_lines(downstreams: tuple[DownstreamStatus, ...]) -> list[str]:
    lines: list[str] = []
    for ds in downstreams:
        health = "healthy" if ds.healthy else "UNHEALTHY"
        if ds.connected is not None:
            health += ", connected" if ds.connected else ", not connected"
        if ds.status == "needs-login":
            health += f", needs a login: python rea.py login {ds.name}"
        circuit = ds.circuit_state or "unknown"
        if ds.retry_at is not None:
            wait = max(0.0, ds.retry_at - time.time())
            circuit += f", retry at {_utc_iso_ms(ds.retry_at)} (in {_duration(wait)})"
        blocker = "FIRED" if ds.session_blocker_emitted else "not fired"
        lines += [
            f"  {ds.name}",
            f"    health: {health}",
            f"    circuit: {circuit}",
            f"    tools: {_n(ds.tools_count)}   "
            + (f"url: {ds.url}" if ds.url else f"pid: {_n(ds.pid)}")
            + f"   restarts: {_n(ds.restarts)}"
            f"   calls: {_n(ds.calls)}   errors: {_n(ds.errors)}",
            f"    open transitions: {_n(ds.open_transitions)}   SESSION_BLOCKER: {blocker}",
            f"    last error: {_one_line(ds.last_error) if ds.last_error else '-'}",
        ]
    return lines


def _uptime_s(state: ServeState) -> float | None:
    started = _iso_to_epoch(state.started_at) if state.started_at else None
    return None if started is None else max(0.0, time.time() - started)


def _duration(seconds: float) -> str:
    whole = int(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h {minutes:02d}m {secs:02d}s"
    if minutes:
        return f"{minutes}m {secs:02d}s"
    return f"{secs}s"


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{n} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


def _n(value: int | None) -> str:
    return "-" if value is None else str(value)


def _one_line(text: str, limit: int = 200) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


# Trust on first use ###############################################################
#
# The file, sorted keys, mode 0600:
#
#   {"version": 1,
#    "servers": {"github": {"definition": {"command": …, "args": […], "env_keys": […],
#                                          "env_passthrough": […]},
#                           (a remote server's: {"url": …, "header_keys": […]}, the URL
#                            without its query: it may hold a key)
#                           "definition_hash": "<sha256>", "pinned_at": "…Z",
#                           "tools": {"create_issue": {"hash": "<sha256>", "pinned_at": "…Z",
#                                                      "pinned": {"name", "description",
#                                                        "inputSchema", "outputSchema",
#                                                        "annotations"}}}}},
#    "held": {"gitlab": "why it is held until `trust gitlab`"}}
#
# The definition and the pinned tool fields are stored beside their hashes so that
# `trust` can show what changed; on load every hash is recomputed, so a hand-edited
# field (or hash) makes the whole file untrusted. The hashes are not keyed: they
# catch a server or a tool changing under the user (a "rug pull"), not someone who
# can already write `.rea/`.

FINGERPRINTS_FILE = "fingerprints.json"
FINGERPRINTS_LOCK = "fingerprints.lock"  # trust and serve read-modify-write under it (§10)
FINGERPRINTS_FORMAT = 1
TOOL_PINNED_FIELDS = ("name", "description", "inputSchema", "outputSchema", "annotations")
# Pinned too since this release: they reach the model or change how a tool runs. A pin
# written before holds only the fields above and is compared on those alone, then
# completed (a file from an older rea.py keeps working, never held for it).
TOOL_PINNED_LATER = ("title", "icons", "execution")
_TOOL_PINS = (*TOOL_PINNED_FIELDS, *TOOL_PINNED_LATER)
_DEFINITION_FIELDS = ("command", "args", "env_keys", "env_passthrough")
_REMOTE_DEFINITION_FIELDS = ("url", "header_keys")
_DEFINITION_LABELS = {  # field -> how a reason names it
    "command": "command",
    "args": "args",
    "env_keys": "env keys",
    "env_passthrough": "env_passthrough",
    "url": "url",
    "header_keys": "header names",
}


def server_definition(spec: ServerSpec) -> dict[str, object]:
    """What is pinned of a server: how it is started, never the values of its env; a
    remote server by its URL (as shown: no query, user or fragment, which may hold a
    secret) and the names of its headers, never their values (§10)."""
    if spec.remote:
        return {"url": public_url(spec.url), "header_keys": sorted(spec.headers)}
    return {
        "command": spec.command,
        "args": list(spec.args),
        # env values are secrets or per-machine paths: only which names are set is pinned
        "env_keys": sorted(spec.env),
        "env_passthrough": sorted(spec.env_passthrough),
    }


def definition_hash(defn: Mapping[str, object]) -> str:
    """SHA-256 (hex) of a server definition in canonical JSON."""
    return _trust_sha256(defn)


def public_definition(defn: Mapping[str, object]) -> dict[str, object]:
    """A pinned definition as this rea.py pins it: an earlier one kept a remote server's
    URL whole, query included. Compared and shown in this form, such a pin stays valid
    and never shows what the query held."""
    url = defn.get("url")
    return {**defn, "url": public_url(url)} if isinstance(url, str) else dict(defn)


def tool_fingerprint(tool: Mapping[str, object]) -> dict[str, object]:
    """The pinned fields of a tool as `tools/list` gives it; an absent field is null."""
    return {name: tool.get(name) for name in _TOOL_PINS}


def tool_hash(tool: Mapping[str, object]) -> str:
    """SHA-256 (hex) of a tool's pinned fields in canonical JSON."""
    return _trust_sha256(tool_fingerprint(tool))


def _trust_sha256(value: object) -> str:
    """Hash of a JSON value written one way only: sorted keys, no spaces, UTF-8."""
    text = SORTED_JSON.encode(value)
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def _pretty(value: object) -> str:
    return json.dumps(value, sort_keys=True, indent=2, ensure_ascii=False)


@dataclass(frozen=True)
class ToolVerdict:
    """How a server's current tools compare with their pins (one `tools/list`)."""

    trusted: tuple[str, ...]  # pin matches: list them
    new: tuple[str, ...]  # never pinned: pinned now and listed (trust on first use)
    changed: Mapping[str, str]  # name -> "description changed", …: withheld and refused
    removed: tuple[str, ...]  # pinned, no longer listed: reported; the pin is kept


@dataclass(frozen=True)
class _ToolPin:
    """One tool's pin: its pinned fields and their hash."""

    pinned: Mapping[str, object]
    hash: str
    pinned_at: str


@dataclass(frozen=True)
class _ServerPin:
    """One server's pin: its definition, the hash of it, and its tools' pins."""

    definition: Mapping[str, object]
    hash: str
    pinned_at: str
    tools: Mapping[str, _ToolPin]


class _PinsUnusable(Exception):
    """fingerprints.json cannot be trusted; str() is the one-line reason."""


def _tools_by_name(tools: Sequence[Mapping[str, object]]) -> dict[str, Mapping[str, object]]:
    """A `tools/list` result by tool name; a tool without a text name is skipped."""
    by_name: dict[str, Mapping[str, object]] = {}
    for tool in tools:
        name = tool.get("name")
        if isinstance(name, str):
            by_name[name] = tool
    return by_name


class Fingerprints:
    """The trust-on-first-use pins of .rea/fingerprints.json: servers' definitions and tools.

    A missing file is an empty one. A corrupt or hand-edited file sets `error` and fails
    closed: every server is held with that reason (and nothing is written, so the file
    stays as evidence) until `rea.py trust SERVER` sets it aside and writes a valid one.
    Pins are never dropped when a server leaves the registry, so putting a server back
    with a different definition is held, not silently trusted again. The file is re-read
    when it changed on disk (by `trust` while `serve` runs) before each check.
    """

    def __init__(self, rea_dir: Path) -> None:
        self.path = rea_dir / FINGERPRINTS_FILE
        # _lock guards: _servers, _held, error, _seen and every write of the file, so
        # that concurrent check_tools calls neither lose a pin nor interleave writes.
        self._lock = threading.Lock()
        self._servers: dict[str, _ServerPin] = {}
        self._held: dict[str, str] = {}  # name -> reason, set when earlier pins were lost
        self.error: str | None = None
        self._seen: tuple[int, int, int] | None = None  # (inode, size, mtime_ns) loaded
        self._lost: set[str] = set()  # server names an unusable file still shows
        # log lines decided under _lock, written after it is released (never nest locks)
        self._pending_logs: list[tuple[str, str, dict[str, object]]] = []
        with self._lock:
            self._load()
        self._flush_logs()

    @contextlib.contextmanager
    def _across_processes(self) -> Iterator[None]:
        """An exclusive flock of .rea/fingerprints.lock around a read-modify-write: `trust`
        and a running `serve` never overwrite each other's pins (§10). Taken inside
        `_lock`, never the other way round."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path.parent / FINGERPRINTS_LOCK, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError:
            yield  # a folder we cannot write to: nothing can be pinned there either
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _flush_logs(self) -> None:
        with self._lock:
            pending, self._pending_logs = self._pending_logs, []
        for level, event, fields in pending:
            log(level, event, **fields)

    # Reading ------------------------------------------------------------------------

    def _stat(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        except OSError:
            return (-1, -1, -1)  # unreadable: _load reports it
        return (st.st_ino, st.st_size, st.st_mtime_ns)

    def _refresh(self) -> None:
        """Reload if the file changed on disk since it was last read or written."""
        if self._stat() != self._seen:
            self._load()

    def _load(self) -> None:
        self._seen = self._stat()
        self._servers, self._held, self.error, self._lost = {}, {}, None, set()
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return
        except OSError as err:
            self.error = f"{self.path}: cannot be read ({err.strerror or err})"
        else:
            try:
                self._servers, self._held = _parse_pins(raw)
            except _PinsUnusable as err:
                self.error = f"{self.path}: {err}"
                self._lost = _salvage_server_names(raw)
        if self.error is not None:
            fields: dict[str, object] = {"path": str(self.path), "reason": self.error}
            self._pending_logs.append(("error", "fingerprints_unusable", fields))

    # Checks ---------------------------------------------------------------------------

    def check_server(self, spec: ServerSpec) -> str | None:
        """None if the server may start (pinning it when first seen); else why it is held."""
        with self._lock, self._across_processes():
            self._refresh()
            held = self._check_server_locked(spec)
        self._flush_logs()
        return held

    def _check_server_locked(self, spec: ServerSpec) -> str | None:
        accept = f"run `python rea.py trust {spec.name}`"
        if self.error is not None:
            return f"fingerprints.json is unusable ({self.error}); {accept} to re-pin"
        if spec.name in self._held:
            return f"{self._held[spec.name]}; {accept}"
        defn = server_definition(spec)
        pin = self._servers.get(spec.name)
        if pin is None:
            self._servers[spec.name] = _ServerPin(defn, definition_hash(defn), utc_now_iso(), {})
            self._save_logged()
            return None
        if pin.hash == definition_hash(defn):
            return None
        pinned = public_definition(pin.definition)
        if definition_hash(pinned) == definition_hash(defn):  # pinned with the query: drop it
            self._servers[spec.name] = replace(pin, definition=defn, hash=definition_hash(defn))
            self._save_logged()
            return None
        fields = [label for f, label in _DEFINITION_LABELS.items() if pinned.get(f) != defn.get(f)]
        return f"definition changed since pinned: {', '.join(fields)} changed; {accept}"

    def check_tools(self, server: str, tools: Sequence[Mapping[str, object]]) -> ToolVerdict:
        """Compare a server's `tools/list` with the pins; new tools are pinned (and written).

        A server without a trusted pin (never checked, held, or the file unusable) has
        every tool withheld: fail closed.
        """
        current = _tools_by_name(tools)
        with self._lock, self._across_processes():
            self._refresh()
            pin = self._servers.get(server)
            if self.error is None and pin is not None and server not in self._held:
                verdict = self._compare_tools_locked(server, pin, current)
            else:
                why = "server is not trusted" if self.error is None else "fingerprints unusable"
                verdict = ToolVerdict((), (), {name: why for name in current}, ())
                pin = None  # nothing to report: the server itself is held
        self._flush_logs()
        if pin is not None and verdict.new:
            log("info", "tools_pinned", server=server, tools=list(verdict.new))
        if pin is not None and verdict.changed:
            log("warning", "tools_changed", server=server, changed=dict(verdict.changed))
        if pin is not None and verdict.removed:
            log("info", "tools_removed", server=server, tools=list(verdict.removed))
        return verdict

    def _compare_tools_locked(
        self, server: str, pin: _ServerPin, current: Mapping[str, Mapping[str, object]]
    ) -> ToolVerdict:
        trusted: list[str] = []
        new: dict[str, _ToolPin] = {}
        changed: dict[str, str] = {}
        now = utc_now_iso()
        completed: dict[str, _ToolPin] = {}  # older pins, now with every pinned field
        for name, tool in current.items():
            old = pin.tools.get(name)
            fingerprint = tool_fingerprint(tool)
            if old is None:
                new[name] = _ToolPin(fingerprint, _trust_sha256(fingerprint), now)
                continue
            if not _pin_matches(old, fingerprint):
                changed[name] = _tool_change_reason(old.pinned, fingerprint)
                continue
            trusted.append(name)
            if set(old.pinned) != set(fingerprint):
                completed[name] = _ToolPin(fingerprint, _trust_sha256(fingerprint), old.pinned_at)
        removed = tuple(sorted(set(pin.tools) - set(current)))
        if new or completed:
            self._servers[server] = replace(pin, tools={**pin.tools, **new, **completed})
            self._save_logged()
        return ToolVerdict(tuple(trusted), tuple(new), changed, removed)

    # Writing --------------------------------------------------------------------------

    def save(self) -> None:
        """Write the pins atomically (mode 0600); ReaError if the disk refuses."""
        with self._lock:
            self._save()

    def _save(self) -> None:
        if self.error is not None:
            # never overwrite an unusable file: it is the evidence; `trust` replaces it
            raise ReaError(f"{self.error}; run `python rea.py trust SERVER` to re-pin")
        document: dict[str, object] = {
            "version": FINGERPRINTS_FORMAT,
            "servers": {name: _server_pin_json(pin) for name, pin in self._servers.items()},
            "held": dict(self._held),
        }
        text = json.dumps(document, sort_keys=True, indent=2, ensure_ascii=False)
        data = (escape_lone_surrogates(text) + "\n").encode()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(self.path, data, 0o600)
        except OSError as err:
            raise ReaError(
                f"{self.path}: cannot be written ({err}); free space or fix permissions"
            ) from err
        self._seen = self._stat()

    def _save_logged(self) -> None:
        """Save for the gateway: a failed write is logged, the pin stays in memory."""
        try:
            self._save()
        except ReaError as err:
            fields: dict[str, object] = {"path": str(self.path), "reason": str(err)}
            self._pending_logs.append(("error", "fingerprints_write_failed", fields))

    def pinned_tools(self, server: str) -> list[dict[str, object]]:
        """The tools of a server as last pinned, absent fields left out: what a remote
        server that needs a login still shows, so that a call can say so (§13)."""
        with self._lock:
            held = self.error is not None or server in self._held
            pin = None if held else self._servers.get(server)
        if pin is None:
            return []
        return [{k: v for k, v in t.pinned.items() if v is not None} for t in pin.tools.values()]

    # For `trust` ------------------------------------------------------------------------

    def _pin_of(self, server: str) -> _ServerPin | None:
        with self._lock:
            return self._servers.get(server)

    def _accept(
        self,
        spec: ServerSpec,
        tools: Sequence[Mapping[str, object]] | None,
        others: Sequence[str],
    ) -> None:
        """Re-pin a server's definition (and its whole tool set when tools are given).

        On an unusable file the old one is set aside, and every other server it may
        have pinned (`others`) is held until trusted by name: their pins are lost, and
        pinning them afresh on the next start would be exactly the silent re-trust the
        pins exist to prevent.
        """
        with self._lock, self._across_processes():
            self._refresh()
            if self.error is not None:
                aside = self.path.with_name(f"{FINGERPRINTS_FILE}.unusable")
                try:
                    os.replace(self.path, aside)
                except OSError as err:
                    raise ReaError(f"{self.path}: cannot be moved aside ({err})") from err
                reason = f"its pin was lost when {self.path} was unusable (kept as {aside.name})"
                self._servers, self.error, self._lost = {}, None, set()
                self._held = {name: reason for name in others if name != spec.name}
            defn = server_definition(spec)
            now = utc_now_iso()
            old = self._servers.get(spec.name)
            if tools is None:
                pinned_tools = dict(old.tools) if old is not None else {}
            else:
                pinned_tools = {}
                for name, tool in _tools_by_name(tools).items():
                    fingerprint = tool_fingerprint(tool)
                    pinned_tools[name] = _ToolPin(fingerprint, _trust_sha256(fingerprint), now)
            self._servers[spec.name] = _ServerPin(defn, definition_hash(defn), now, pinned_tools)
            self._held.pop(spec.name, None)
            self._save()

    def _accept_tool(self, server: str, name: str, tool: Mapping[str, object] | None) -> None:
        """Re-pin one tool of a trusted server; None drops its pin (accepts its removal)."""
        with self._lock, self._across_processes():
            self._refresh()
            pin = self._servers.get(server)
            if self.error is not None or pin is None or server in self._held:
                raise ReaError(
                    f"{self.path}: server {server!r} has no trusted definition; "
                    f"run `python rea.py trust {server}` without --tool first"
                )
            tools = dict(pin.tools)
            if tool is None:
                tools.pop(name, None)
            else:
                fingerprint = tool_fingerprint(tool)
                tools[name] = _ToolPin(fingerprint, _trust_sha256(fingerprint), utc_now_iso())
            self._servers[server] = replace(pin, tools=tools)
            self._save()

    def _known_names(self) -> list[str]:
        """Every server the file pins or holds, or (unusable) still shows."""
        with self._lock:
            return sorted({*self._servers, *self._held, *self._lost})


def _pin_matches(pin: _ToolPin, fingerprint: Mapping[str, object]) -> bool:
    """Whether a tool still matches its pin, on the fields the pin holds."""
    return pin.hash == _trust_sha256({field: fingerprint.get(field) for field in pin.pinned})


def _tool_change_reason(old: Mapping[str, object], new: Mapping[str, object]) -> str:
    """ "description changed", "inputSchema, annotations changed", …"""
    fields = [f for f in _TOOL_PINS if f in old and old.get(f) != new.get(f)]
    return f"{', '.join(fields) or 'pinned fields'} changed"


def _server_pin_json(pin: _ServerPin) -> dict[str, object]:
    return {
        "definition": dict(pin.definition),
        "definition_hash": pin.hash,
        "pinned_at": pin.pinned_at,
        "tools": {
            name: {"hash": t.hash, "pinned": dict(t.pinned), "pinned_at": t.pinned_at}
            for name, t in pin.tools.items()
        },
    }


# fingerprints.json parsing: typed pins, or _PinsUnusable with the first problem found.


def _parse_pins(raw: bytes) -> tuple[dict[str, _ServerPin], dict[str, str]]:
    try:
        value: object = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise _PinsUnusable("not UTF-8 text; run `python rea.py trust SERVER`") from None
    except json.JSONDecodeError as err:
        raise _PinsUnusable(f"not JSON (line {err.lineno} column {err.colno}: {err.msg})") from None
    except (ValueError, RecursionError) as err:
        raise _PinsUnusable(f"not usable JSON ({err})") from None
    top = _pins_object(value, "the file", {"version", "servers", "held"}, {"version", "servers"})
    if top["version"] != FINGERPRINTS_FORMAT or isinstance(top["version"], bool):
        raise _PinsUnusable(f"format version {top['version']!r} is not {FINGERPRINTS_FORMAT}")
    servers: dict[str, _ServerPin] = {}
    for name, entry in _pins_object(top["servers"], "servers", None, set()).items():
        servers[name] = _parse_server_pin(name, entry)
    held: dict[str, str] = {}
    for name, reason in _pins_object(top.get("held", {}), "held", None, set()).items():
        if not isinstance(reason, str):
            raise _PinsUnusable(f"held.{name} is not text")
        held[name] = reason
    return servers, held


def _salvage_server_names(raw: bytes) -> set[str]:
    """The server names an unusable file still shows, so `trust` can hold them."""
    try:
        value: object = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError):
        return set()
    names: set[str] = set()
    if isinstance(value, dict):
        for key in ("servers", "held"):
            section = value.get(key)
            if isinstance(section, dict):
                names.update(str(name) for name in section)
    return names


def _parse_server_pin(name: str, entry: object) -> _ServerPin:
    keys = {"definition", "definition_hash", "pinned_at", "tools"}
    obj = _pins_object(entry, f"servers.{name}", keys, keys)
    remote = isinstance(obj["definition"], dict) and "url" in obj["definition"]
    fields = _REMOTE_DEFINITION_FIELDS if remote else _DEFINITION_FIELDS
    defn = _pins_object(obj["definition"], f"servers.{name}.definition", set(fields), None)
    text = fields[0]  # command, or url
    if not isinstance(defn[text], str):
        raise _PinsUnusable(f"servers.{name}.definition.{text} is not text")
    for key in fields[1:]:
        items = defn[key]
        if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
            raise _PinsUnusable(f"servers.{name}.definition.{key} is not a list of text")
    pinned_hash = _pins_hash(obj["definition_hash"], f"servers.{name}.definition_hash")
    if pinned_hash != definition_hash(defn):
        raise _PinsUnusable(
            f"servers.{name}.definition_hash does not match its definition (hand-edited?)"
        )
    tools: dict[str, _ToolPin] = {}
    for tool_name, tool_entry in _pins_object(
        obj["tools"], f"servers.{name}.tools", None, set()
    ).items():
        where = f"servers.{name}.tools.{tool_name}"
        tool_keys = {"hash", "pinned", "pinned_at"}
        tool_obj = _pins_object(tool_entry, where, tool_keys, tool_keys)
        pinned = _pins_object(
            tool_obj["pinned"], f"{where}.pinned", set(_TOOL_PINS), set(TOOL_PINNED_FIELDS)
        )
        if pinned["name"] != tool_name:
            raise _PinsUnusable(f"{where}.pinned.name is not {tool_name!r}")
        if _pins_hash(tool_obj["hash"], f"{where}.hash") != _trust_sha256(pinned):
            raise _PinsUnusable(f"{where}.hash does not match its pinned fields (hand-edited?)")
        tools[tool_name] = _ToolPin(pinned, _trust_sha256(pinned), _pins_text(tool_obj, where))
    return _ServerPin(defn, pinned_hash, _pins_text(obj, f"servers.{name}"), tools)


def _pins_object(
    value: object, where: str, allowed: set[str] | None, required: set[str] | None
) -> dict[str, object]:
    """A JSON object with string keys; `allowed`/`required` None means any / exactly allowed."""
    if not isinstance(value, dict):
        raise _PinsUnusable(f"{where} is not a JSON object")
    obj: dict[str, object] = {str(k): v for k, v in value.items()}
    if allowed is not None:
        extra = sorted(set(obj) - allowed)
        if extra:
            raise _PinsUnusable(f"{where} has unknown key {extra[0]!r}")
        missing = sorted((allowed if required is None else required) - set(obj))
        if missing:
            raise _PinsUnusable(f"{where} lacks {missing[0]!r}")
    return obj


def _pins_hash(value: object, where: str) -> str:
    if not isinstance(value, str) or not SHA256_HEX.match(value):
        raise _PinsUnusable(f"{where} is not a SHA-256 hex digest")
    return value


def _pins_text(obj: Mapping[str, object], where: str) -> str:
    value = obj["pinned_at"]
    if not isinstance(value, str):
        raise _PinsUnusable(f"{where}.pinned_at is not text")
    return value


# `rea.py trust` ###################################################################


def cmd_trust(
    root: Path,
    argv: list[str],
    out: TextIO,
    lister: Callable[[ServerSpec], list[dict[str, object]]] | None,
) -> int:
    """`trust SERVER [--tool NAME] [--yes] [--dry-run]`: show what changed, then re-pin it.

    Running the command is the acceptance, with or without a terminal; `--yes` is
    accepted for scripts and changes nothing. `--dry-run` shows the diff and pins
    nothing. Without --tool the definition and the whole current tool set are pinned
    (removed tools' pins are dropped); with --tool only that tool's pin changes.
    """
    server, tool_name, dry_run, reason = _parse_trust_args(argv)
    rea_dir = root / REA_DIR
    registry = load_registry(rea_dir)
    specs = {spec.name: spec for spec in registry.servers}
    if server not in specs:
        source = registry.source or rea_dir / "registry.yaml"
        known = ", ".join(sorted(specs)) or "none"
        raise ReaError(
            f"{source}: no server named {server!r} (known: {known}); "
            "trust a server the registry declares"
        )
    spec = specs[server]
    governance = governance_of(root)
    pins = Fingerprints(governance.shared)
    if pins.error is not None:
        out.write(f"{pins.error}\n  its pins cannot be trusted; {server} is pinned afresh\n")
    old = pins._pin_of(server)
    tools = lister(spec) if lister is not None else None

    if tool_name is not None:
        if tools is None:
            raise ReaError(f"trust {server} --tool {tool_name}: the server's tools are unknown")
        code = _trust_one_tool(pins, server, tool_name, tools, old, dry_run, out)
        if not dry_run:
            pinned = old.tools.get(tool_name) if old is not None else None
            now = _tools_by_name(tools).get(tool_name)
            record_governance_act(
                governance,
                "trust",
                {
                    "server": server,
                    "tool": tool_name,
                    "reason": reason,
                    "pinned": pinned.hash if pinned is not None else None,
                    "accepted": tool_hash(now) if now is not None else None,
                },
            )
        return code

    defn = server_definition(spec)
    shown = public_definition(old.definition) if old is not None else None  # no query
    if shown is None:
        out.write(f"{server}: no pin yet; its definition:\n{_pretty(defn)}\n")
    else:
        for key in _DEFINITION_LABELS:
            if shown.get(key) != defn.get(key):
                out.write(_field_diff(f"{server} {key}", shown.get(key), defn.get(key)))
    lines = 0
    if tools is not None:
        lines = _write_tools_diff(server, old, tools, out)
    same = shown is not None and definition_hash(shown) == definition_hash(defn)
    unchanged = same and lines == 0
    if unchanged:
        out.write(f"{server}: definition and tools match their pins\n")
    if dry_run:
        out.write(f"{server}: --dry-run, nothing pinned\n")
        return 0
    pins._accept(spec, tools, [*pins._known_names(), *specs])
    what = "definition" if tools is None else f"definition and {len(_tools_by_name(tools))} tool(s)"
    out.write(f"{server}: pinned {what} in {pins.path}\n")
    accepted: dict[str, object] = {"definition": definition_hash(defn)}
    if tools is not None:
        accepted["tools"] = {name: tool_hash(t) for name, t in _tools_by_name(tools).items()}
    record_governance_act(
        governance,
        "trust",
        {
            "server": server,
            "reason": reason,
            "pinned": {
                "definition": old.hash,
                "tools": {name: t.hash for name, t in old.tools.items()},
            }
            if old is not None
            else None,
            "accepted": accepted,
        },
    )
    return 0


def _parse_trust_args(argv: list[str]) -> tuple[str, str | None, bool, str | None]:
    args = parse_command(["trust", *argv])
    if args.server is None:
        raise ReaError("trust: which server? usage: rea.py trust SERVER [--tool NAME] [--dry-run]")
    return str(args.server), args.tool, bool(args.dry_run), args.reason


def _field_diff(label: str, old: object, new: object) -> str:
    """A unified diff of two JSON values, pretty-printed, headed by what they are."""
    import difflib

    diff = difflib.unified_diff(
        _pretty(old).splitlines(),
        _pretty(new).splitlines(),
        f"pinned   {label}",
        f"current  {label}",
        lineterm="",
    )
    return "\n".join(diff) + "\n"


def _write_tools_diff(
    server: str,
    old: _ServerPin | None,
    tools: Sequence[Mapping[str, object]],
    out: TextIO,
) -> int:
    """Write the changed, new and removed tools; return how many were written."""
    pinned = old.tools if old is not None else {}
    current = _tools_by_name(tools)
    count = 0
    for key in sorted(current):
        fingerprint = tool_fingerprint(current[key])
        if key not in pinned:
            out.write(f"{server}: new tool {key}: {_pretty(fingerprint.get('description'))}\n")
            count += 1
        elif not _pin_matches(pinned[key], fingerprint):
            for fname in _TOOL_PINS:
                before, after = pinned[key].pinned.get(fname), fingerprint.get(fname)
                if before != after:
                    out.write(_field_diff(f"{server} tool {key} {fname}", before, after))
            count += 1
    for key in sorted(set(pinned) - set(current)):
        out.write(f"{server}: removed tool {key}\n")
        count += 1
    return count


def _trust_one_tool(
    pins: Fingerprints,
    server: str,
    tool_name: str,
    tools: Sequence[Mapping[str, object]],
    old: _ServerPin | None,
    dry_run: bool,
    out: TextIO,
) -> int:
    current = _tools_by_name(tools)
    tool = current.get(tool_name)
    pinned = old.tools.get(tool_name) if old is not None else None
    if tool is None and pinned is None:
        names = ", ".join(sorted(current)) or "none"
        raise ReaError(f"trust {server} --tool {tool_name}: no such tool (it lists: {names})")
    if tool is None:
        out.write(f"{server}: tool {tool_name} was removed; its pin is dropped\n")
    elif pinned is None:
        out.write(f"{server}: new tool {tool_name}:\n{_pretty(tool_fingerprint(tool))}\n")
    elif _pin_matches(pinned, tool_fingerprint(tool)):
        out.write(f"{server}: tool {tool_name} matches its pin\n")
    else:
        fingerprint = tool_fingerprint(tool)
        for field in _TOOL_PINS:
            if pinned.pinned.get(field) != fingerprint.get(field):
                label = f"{server} tool {tool_name} {field}"
                out.write(_field_diff(label, pinned.pinned.get(field), fingerprint.get(field)))
    if dry_run:
        out.write(f"{server}: --dry-run, nothing pinned\n")
        return 0
    pins._accept_tool(server, tool_name, tool)
    out.write(f"{server}: pinned tool {tool_name} in {pins.path}\n")
    return 0


# Echo server ##################################################################

# The handshake-era revisions the echo server answers, newest first.
_ECHO_VERSIONS = ("2025-11-25", "2025-06-18", "2025-03-26", "2024-11-05")
_ECHO_TOOL: dict[str, object] = {
    "name": "echo",
    "description": "Returns its arguments as JSON text (rea bench's built-in downstream).",
    "inputSchema": {"type": "object", "additionalProperties": True},
}


def cmd_echo_server(argv: list[str]) -> int:
    """Hidden `_echo-server`: a minimal, fast MCP server over stdio with one tool, `echo`.

    It is the downstream `bench` measures against, so it does as little as possible per
    message: one thread, one parse, one write. Requests are answered in arrival order, so
    a client may pipeline as many as it likes. Handshake era only; `server/discover` is
    answered with -32601, which makes the gateway fall back to `initialize` (SPEC §5).
    """
    # --delay-ms N: each tools/call takes N ms, like a tool doing real work (one at a time)
    delay = float(argv[argv.index("--delay-ms") + 1]) / 1000.0 if "--delay-ms" in argv else 0.0
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    for line in stdin:
        reply = _echo_reply(line)
        if delay and reply is not None and "content" in (reply.get("result") or {}):  # type: ignore[operator]
            time.sleep(delay)
        if reply is not None:
            stdout.write(json.dumps(reply, separators=(",", ":")).encode() + b"\n")
            stdout.flush()
    return 0


def _echo_reply(line: bytes) -> dict[str, object] | None:
    """The answer to one line, or None for a notification or a blank line."""
    if not line.strip():
        return None
    try:
        msg = json.loads(line)
    except ValueError:
        return _echo_error(None, -32700, "parse error")
    if not isinstance(msg, dict) or not isinstance(msg.get("method"), str):
        if isinstance(msg, dict) and ("result" in msg or "error" in msg):
            return None  # an answer to a request we never send
        return _echo_error(None, -32600, "invalid request")
    if "id" not in msg:
        return None  # notifications/initialized and friends need no answer
    msg_id, method = msg["id"], msg["method"]
    params = msg.get("params")
    params = params if isinstance(params, dict) else {}
    result: dict[str, object]
    if method == "tools/call":
        if params.get("name") != "echo":
            return _echo_error(msg_id, -32602, f"unknown tool {params.get('name')!r}")
        text = json.dumps(params.get("arguments") or {}, separators=(",", ":"))
        result = {"content": [{"type": "text", "text": text}], "isError": False}
    elif method == "initialize":
        asked = params.get("protocolVersion")
        version = asked if isinstance(asked, str) and asked in _ECHO_VERSIONS else None
        result = {
            "protocolVersion": version or _ECHO_VERSIONS[0],
            "capabilities": {"tools": {}},
            "serverInfo": {"name": "rea-echo", "version": VERSION},
        }
    elif method == "tools/list":
        result = {"tools": [_ECHO_TOOL]}
    elif method == "ping":
        result = {}
    else:
        return _echo_error(msg_id, -32601, f"method not found: {method}")
    return {"jsonrpc": "2.0", "id": msg_id, "result": result}


def _echo_error(msg_id: object, code: int, message: str) -> dict[str, object]:
    return {"jsonrpc": "2.0", "id": msg_id, "error": {"code": code, "message": message}}


# Bench client ##################################################################

_BENCH_CLIENT_VERSION = "2025-06-18"
_BENCH_REPLY_TIMEOUT_S = 30.0  # a downstream silent this long is broken, not slow
_BENCH_WINDOW = 16  # calls in flight for the throughput figure (SPEC §12)


@dataclass(frozen=True)
class _BenchReply:
    """One JSON-RPC answer: its id and either a result object or an error message."""

    msg_id: object
    result: dict[str, object] | None
    error: str | None


class _BenchPeer:
    """One MCP server process the bench drives over its pipes, as an MCP host would.

    Single-threaded on purpose: the caller writes requests and reads answers itself
    (with `select` for a deadline), so the client adds the same small, steady cost to
    the direct and the gateway path. Pipelining 16 requests needs no thread either: the
    answers are a few hundred bytes, far below what a pipe buffers.
    """

    def __init__(self, label: str, argv: Sequence[str], env: dict[str, str], cwd: Path) -> None:
        self.label = label
        self._stderr_path = cwd / f".bench-{label}.stderr"
        with open(self._stderr_path, "wb") as err:
            # Own session: the user's Ctrl-C reaches only `bench`, which then stops us in order.
            self.proc = subprocess.Popen(
                list(argv),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err,
                env=env,
                cwd=cwd,
                start_new_session=True,
            )
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self._in_fd = self.proc.stdin.fileno()
        self._out_fd = self.proc.stdout.fileno()
        self._buf = bytearray()
        self._next_id = 0
        self._descendants: dict[int, bytes] = {}  # pid -> cmdline, to reap orphans safely
        self._closed = False

    # -- wire --

    def new_id(self) -> int:
        self._next_id += 1
        return self._next_id

    def send(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                n = os.write(self._in_fd, view)
            except BrokenPipeError:
                raise ReaError(self._died("closed its input")) from None
            view = view[n:]

    def read_line(self) -> bytes:
        deadline = time.monotonic() + _BENCH_REPLY_TIMEOUT_S
        while True:
            end = self._buf.find(b"\n")
            if end >= 0:
                line = bytes(self._buf[:end])
                del self._buf[: end + 1]
                return line
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ReaError(
                    f"bench: {self.label} sent no answer within {_BENCH_REPLY_TIMEOUT_S:.0f} s"
                )
            ready, _, _ = select.select([self._out_fd], [], [], remaining)
            if ready:
                chunk = os.read(self._out_fd, 1 << 16)
                if not chunk:
                    raise ReaError(self._died("closed its output"))
                self._buf += chunk

    def read_reply(self) -> _BenchReply:
        """The next answer, skipping notifications and refusing requests from the server."""
        while True:
            line = self.read_line()
            try:
                msg = json.loads(line)
            except ValueError:
                raise ReaError(f"bench: {self.label} wrote a line that is not JSON") from None
            if not isinstance(msg, dict):
                continue
            if "method" in msg:
                if "id" in msg:  # sampling, roots...: the bench has none to give
                    self.send(_bench_encode_error(msg["id"], -32601, "rea bench offers none"))
                continue
            result = msg.get("result")
            error = msg.get("error")
            if isinstance(error, dict):
                return _BenchReply(msg.get("id"), None, str(error.get("message", error)))
            if isinstance(result, dict):
                return _BenchReply(msg.get("id"), result, None)
            return _BenchReply(msg.get("id"), None, "answer with neither result nor error")

    def request(self, method: str, params: dict[str, object]) -> dict[str, object]:
        msg_id = self.new_id()
        self.send(
            _bench_encode({"jsonrpc": "2.0", "id": msg_id, "method": method, "params": params})
        )
        while True:
            reply = self.read_reply()
            if reply.msg_id != msg_id:
                continue
            if reply.result is None:
                raise ReaError(f"bench: {self.label} refused {method}: {reply.error}")
            return reply.result

    def notify(self, method: str) -> None:
        self.send(_bench_encode({"jsonrpc": "2.0", "method": method}))

    # -- MCP --

    def initialize(self) -> None:
        self.request(
            "initialize",
            {
                "protocolVersion": _BENCH_CLIENT_VERSION,
                "capabilities": {},
                "clientInfo": {"name": "rea-bench", "version": VERSION},
            },
        )
        self.notify("notifications/initialized")

    def tool_names(self) -> list[str]:
        names: list[str] = []
        cursor: object = None
        while True:
            params: dict[str, object] = {} if cursor is None else {"cursor": cursor}
            result = self.request("tools/list", params)
            tools = result.get("tools")
            for tool in tools if isinstance(tools, list) else []:
                if isinstance(tool, dict) and isinstance(tool.get("name"), str):
                    names.append(tool["name"])
            cursor = result.get("nextCursor")
            if not isinstance(cursor, str) or not cursor:
                return names

    # -- the process --

    def rss_kb(self) -> tuple[int, int]:
        """(VmRSS, VmHWM) in KiB from /proc; (0, 0) where /proc is not there."""
        fields: dict[str, int] = {}
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                key, _, value = line.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    fields[key] = int(value.split()[0])
        return fields.get("VmRSS", 0), fields.get("VmHWM", 0)

    def remember_descendants(self) -> None:
        """Note the processes this one started, so none can outlive the bench."""
        for pid in _bench_descendants(self.proc.pid):
            with contextlib.suppress(OSError):
                self._descendants[pid] = Path(f"/proc/{pid}/cmdline").read_bytes()

    def close(self) -> None:
        """Close stdin (an MCP server's cue to stop), then SIGTERM, then SIGKILL; reap all."""
        if self._closed:
            return
        self._closed = True
        self.remember_descendants()
        with contextlib.suppress(OSError):
            assert self.proc.stdin is not None
            self.proc.stdin.close()
        for sig, grace in ((None, 5.0), (signal.SIGTERM, 2.0), (signal.SIGKILL, 5.0)):
            if sig is not None:
                with contextlib.suppress(OSError):
                    self.proc.send_signal(sig)
            try:
                self.proc.wait(grace)
                break
            except subprocess.TimeoutExpired:
                continue
        with contextlib.suppress(OSError):
            assert self.proc.stdout is not None
            self.proc.stdout.close()
        # The gateway stops its own children; these are the ones it could not (it was killed).
        for pid, cmdline in self._descendants.items():
            with contextlib.suppress(OSError):
                if Path(f"/proc/{pid}/cmdline").read_bytes() == cmdline:  # not a reused pid
                    os.kill(pid, signal.SIGKILL)

    def _died(self, what: str) -> str:
        code = self.proc.poll()
        tail = ""
        with contextlib.suppress(OSError):
            lines = self._stderr_path.read_text(errors="replace").strip().splitlines()
            tail = " | ".join(lines[-3:])
        status = f"exit code {code}" if code is not None else "still running"
        return f"bench: {self.label} {what} ({status}){': ' + tail if tail else ''}"


def _bench_encode(msg: dict[str, object]) -> bytes:
    return json.dumps(msg, separators=(",", ":")).encode() + b"\n"


def _bench_encode_error(msg_id: object, code: int, message: str) -> bytes:
    return _bench_encode(
        {"jsonrpc": "2.0", "id": msg_id, "error": {"code": code, "message": message}}
    )


def _bench_descendants(pid: int) -> list[int]:
    """All processes below `pid`, from /proc/<pid>/task/*/children (Linux)."""
    found: list[int] = []
    todo = [pid]
    while todo:
        current = todo.pop()
        with contextlib.suppress(OSError):
            for task in Path(f"/proc/{current}/task").iterdir():
                with contextlib.suppress(OSError):
                    for child in (task / "children").read_text().split():
                        found.append(int(child))
                        todo.append(int(child))
    return found


# Bench measurements ############################################################


class _BenchCaller:
    """Times `tools/call` of one tool on one peer; the request bytes are built once."""

    def __init__(self, peer: _BenchPeer, tool: str, arguments: dict[str, object]) -> None:
        self.peer = peer
        params = json.dumps({"name": tool, "arguments": arguments}, separators=(",", ":"))
        self._head = b'{"jsonrpc":"2.0","method":"tools/call","params":' + params.encode()
        self.tool = tool

    def _send(self) -> int:
        msg_id = self.peer.new_id()
        self.peer.send(self._head + b',"id":' + str(msg_id).encode() + b"}\n")
        return msg_id

    def _check(self, reply: _BenchReply) -> None:
        if reply.result is None:
            raise ReaError(f"bench: {self.peer.label} failed {self.tool}: {reply.error}")
        if reply.result.get("isError") is True:
            content = reply.result.get("content")
            text = ""
            if isinstance(content, list) and content and isinstance(content[0], dict):
                text = str(content[0].get("text", ""))
            raise ReaError(f"bench: {self.peer.label} answered {self.tool} with an error: {text}")

    def one_at_a_time(self, n: int) -> tuple[float, list[float]]:
        """n calls, each sent after the last answer: (elapsed s, latencies in ms)."""
        latencies: list[float] = []
        clock = time.perf_counter
        start = clock()
        for _ in range(n):
            t0 = clock()
            msg_id = self._send()
            reply = self.peer.read_reply()
            while reply.msg_id != msg_id:
                reply = self.peer.read_reply()
            latencies.append((clock() - t0) * 1000.0)
            self._check(reply)
        return clock() - start, latencies

    def pipelined(self, n: int, window: int) -> float:
        """n calls with `window` in flight at all times; elapsed seconds."""
        clock = time.perf_counter
        start = clock()
        sent = done = 0
        while sent < min(window, n):
            self._send()
            sent += 1
        while done < n:
            reply = self.peer.read_reply()
            self._check(reply)
            done += 1
            if sent < n:
                self._send()
                sent += 1
        return clock() - start


@dataclass(frozen=True)
class _BenchPath:
    """What one path (direct or gateway) measured."""

    p50_ms: float
    p99_ms: float
    calls_per_s_1: float
    calls_per_s_16: float


@dataclass(frozen=True)
class BenchReport:
    """Every figure of one `bench` run (SPEC §12); `as_json()` is the `--json` object."""

    downstream: str
    tool: str
    calls: int
    fsync: str
    direct: _BenchPath
    gateway: _BenchPath
    added_p50_ms: float
    added_p99_ms: float
    throughput_ratio_1: float
    throughput_ratio_16: float
    child_start_ms: float
    gateway_start_ms: float
    gateway_own_start_ms: float
    gateway_rss_kb: int
    gateway_peak_rss_kb: int
    audit_appends_per_s: dict[str, float]
    targets: dict[str, bool]

    def as_json(self) -> dict[str, object]:
        return asdict(self)


def _bench_percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile: the value at or below which q% of the samples lie."""
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100.0 * len(ordered)))
    return ordered[rank - 1]


def _bench_blocks(total: int, count: int) -> list[int]:
    """`total` split into at most `count` near-equal non-empty blocks."""
    count = max(1, min(count, total))
    return [total // count + (1 if i < total % count else 0) for i in range(count)]


def _bench_interleaved(
    direct: _BenchCaller, gateway: _BenchCaller, calls: int
) -> tuple[_BenchPath, _BenchPath]:
    """Both paths in alternating blocks (ABBA), so machine noise hits both alike."""
    import statistics

    lat: dict[str, list[float]] = {"direct": [], "gateway": []}
    secs_1 = {"direct": 0.0, "gateway": 0.0}
    secs_16 = {"direct": 0.0, "gateway": 0.0}
    blocks = _bench_blocks(calls, 10)
    for i, size in enumerate(blocks):
        order = [("direct", direct), ("gateway", gateway)]
        for name, caller in order if i % 2 == 0 else order[::-1]:
            elapsed, samples = caller.one_at_a_time(size)
            secs_1[name] += elapsed
            lat[name].extend(samples)
    for i, size in enumerate(blocks):
        order = [("direct", direct), ("gateway", gateway)]
        for name, caller in order if i % 2 == 0 else order[::-1]:
            secs_16[name] += caller.pipelined(size, _BENCH_WINDOW)
    paths = {
        name: _BenchPath(
            p50_ms=statistics.median(lat[name]),
            p99_ms=_bench_percentile(lat[name], 99),
            calls_per_s_1=calls / secs_1[name],
            calls_per_s_16=calls / secs_16[name],
        )
        for name in ("direct", "gateway")
    }
    return paths["direct"], paths["gateway"]


def _bench_start(
    label: str, argv: Sequence[str], env: dict[str, str], cwd: Path, tool: str
) -> tuple[_BenchPeer, float]:
    """Spawn a server; ms from spawn to its first tools/list answer. Waits for `tool`."""
    t0 = time.perf_counter()
    peer = _BenchPeer(label, argv, env, cwd)
    try:
        peer.initialize()
        names = peer.tool_names()
        start_ms = (time.perf_counter() - t0) * 1000.0
        # A child slower than gateway.startup_wait_s joins later (SPEC §5): ask again.
        deadline = time.monotonic() + _BENCH_REPLY_TIMEOUT_S
        while tool not in names:
            if time.monotonic() > deadline:
                shown = ", ".join(names[:10]) or "none"
                raise ReaError(f"bench: {label} does not list the tool {tool!r} (it lists {shown})")
            time.sleep(0.05)
            names = peer.tool_names()
    except BaseException:
        peer.close()
        raise
    return peer, start_ms


# The audit benchmark runs in a child: AuditLog lives in rea.py itself, loaded from its path.
_AUDIT_BENCH_CODE = r"""
import importlib.util, sys, threading, time
from pathlib import Path
spec = importlib.util.spec_from_file_location("rea", sys.argv[1])
rea = importlib.util.module_from_spec(spec)
sys.modules["rea"] = rea
spec.loader.exec_module(rea)
rea_dir, mode, n, threads = Path(sys.argv[2]), sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
rea_dir.mkdir(parents=True, exist_ok=True)
audit = rea.AuditLog(rea_dir, fsync=mode)
def append():
    audit.append(session_id="b", tool_name="echo", server_name="echo", tier="read",
                 status="allowed", autonomy_level="L1", duration_ms=0,
                 metadata={"args_sha256": "0" * 64})
def work(k):
    for _ in range(k):
        append()
append()  # opens the files: not what is measured
shares = [n // threads + (1 if i < n % threads else 0) for i in range(threads)]
workers = [threading.Thread(target=work, args=(k,)) for k in shares]
t0 = time.perf_counter()
for w in workers: w.start()
for w in workers: w.join()
elapsed = time.perf_counter() - t0
audit.close()
print(n / elapsed)
"""


def _bench_audit(rea_path: Path, work_dir: Path, calls: int) -> dict[str, float]:
    """Audit appends per second in each fsync mode, in a fresh log each.

    Counts scale with --calls: the default 2000 gives 5000 (off), 2000 over 16 threads
    (batch, group commit) and 500 (always, one fsync each).
    """
    plans = {
        "off": (max(10, calls * 5 // 2), 1),
        "batch": (max(_BENCH_WINDOW, calls), _BENCH_WINDOW),
        "always": (max(5, calls // 4), 1),
    }
    rates: dict[str, float] = {}
    for mode, (n, threads) in plans.items():
        argv = [sys.executable, "-c", _AUDIT_BENCH_CODE, str(rea_path)]
        argv += [str(work_dir / f"audit-{mode}" / ".rea"), mode, str(n), str(threads)]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=600, check=False)
        if done.returncode != 0:
            tail = " | ".join(done.stderr.strip().splitlines()[-3:])
            raise ReaError(f"bench: the audit benchmark ({mode}) failed: {tail}")
        rates[mode] = float(done.stdout.strip().splitlines()[-1])
    return rates


# Bench command #################################################################

_BENCH_START_SAMPLES = 3  # start times are noisy: the median of three spawns
_BENCH_ADDED_P50_MS = 0.3
_BENCH_RATIO_16 = 0.8
_BENCH_OWN_START_MS = 150.0
# Runs the user's server in the project root whoever starts it (the gateway starts
# children in its own root, which for the bench is a temporary folder).
_BENCH_CHDIR_EXEC = "import os,sys; os.chdir(sys.argv[1]); os.execvp(sys.argv[2], sys.argv[2:])"


@dataclass(frozen=True)
class _BenchOptions:
    """`bench`'s command line, validated."""

    calls: int = 2000
    warmup: int = 200
    as_json: bool = False
    fsync: str = "off"
    server: str | None = None
    tool: str | None = None
    arguments: dict[str, object] | None = None
    delay_ms: float = 0.0


def _bench_options(argv: list[str]) -> _BenchOptions:
    args = parse_command(["bench", *argv])
    server, tool = args.server, args.tool
    if (server is None) != (tool is None):
        raise ReaError("bench: --server and --tool go together (and --args, default {})")
    if args.args is not None and server is None:
        raise ReaError("bench: --args needs --server and --tool")
    arguments: dict[str, object] | None = None
    if args.args is not None:
        try:
            parsed = json.loads(args.args)
        except ValueError as exc:
            raise ReaError(f"bench: --args is not JSON ({exc})") from None
        if not isinstance(parsed, dict):
            raise ReaError('bench: --args must be a JSON object, such as \'{"path": "x"}\'')
        arguments = {str(key): value for key, value in parsed.items()}
    try:
        delay_ms = float(args.delay_ms)
    except ValueError:
        raise ReaError("bench: --delay-ms must be a number of milliseconds") from None
    if not 0 <= delay_ms <= 1000 or (delay_ms and server is not None):
        raise ReaError("bench: --delay-ms takes 0 to 1000, for the built-in echo server only")
    return _BenchOptions(
        args.calls, args.warmup, args.json, args.fsync, server, tool, arguments, delay_ms
    )


def cmd_bench(
    root: Path,
    argv: list[str],
    out: TextIO,
    rea_path: Path,
    echo_cmd: list[str] | None = None,
) -> int:
    """`bench`: the gateway against a direct connection to the same downstream (SPEC §12).

    A temporary project holds a registry with just that downstream and a policy with the
    chosen `audit.fsync`; the same client then drives the downstream directly and through
    `rea.py serve`, interleaved. `echo_cmd` replaces the built-in echo server's command.
    """
    import tempfile

    opts = _bench_options(argv)
    work = Path(tempfile.mkdtemp(prefix="rea-bench-"))
    try:
        report = _bench_run(root, opts, work, rea_path, echo_cmd)
    finally:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    if opts.as_json:
        out.write(json.dumps(report.as_json(), indent=2) + "\n")
    else:
        out.write(_bench_table(report))
    return 0


def _bench_spec(
    root: Path, opts: _BenchOptions, rea_path: Path, echo_cmd: list[str] | None
) -> ServerSpec:
    """The downstream to bench, as the temporary registry will declare it."""
    if opts.server is None:
        argv = echo_cmd or [sys.executable, str(rea_path), "_echo-server"]
        if opts.delay_ms:
            argv = [*argv, "--delay-ms", f"{opts.delay_ms:g}"]
        return ServerSpec(name="echo", command=argv[0], args=tuple(argv[1:]))
    registry = load_registry(root / ".rea")
    for spec in registry.servers:
        if spec.name == opts.server and spec.remote:
            raise ReaError(
                f"bench --server {spec.name}: a remote server (url); bench drives local "
                "(command) servers over stdio: bench one of those, or the built-in echo server"
            )
        if spec.name == opts.server:
            # Same process tree on both paths: a small exec shim puts the child in the root.
            args = ("-c", _BENCH_CHDIR_EXEC, str(root), spec.command, *spec.args)
            return ServerSpec(
                name=spec.name,
                command=sys.executable,
                args=args,
                env=spec.env,
                env_passthrough=spec.env_passthrough,
            )
    known = ", ".join(s.name for s in registry.servers) or "none"
    where = registry.source or root / ".rea" / "registry.yaml"
    raise ReaError(f"{where}: no server named {opts.server!r} (servers: {known})")


def _bench_project(work: Path, spec: ServerSpec, fsync: str) -> Path:
    """The temporary project `serve` runs in: registry and policy, nothing else."""
    project = work / "project"
    rea_dir = project / ".rea"
    rea_dir.mkdir(parents=True)
    server: dict[str, object] = {
        "name": spec.name,
        "command": spec.command,
        "args": list(spec.args),
    }
    if spec.env:
        server["env"] = dict(spec.env)  # templates stay ${VAR}: serve expands them itself
    if spec.env_passthrough:
        server["env_passthrough"] = list(spec.env_passthrough)
    registry = {"version": "1", "servers": [server]}
    (rea_dir / "registry.json").write_text(json.dumps(registry, indent=2) + "\n")
    policy = f"audit:\n  fsync: {fsync}\n"
    if spec.name != "echo":
        # The user asked for this very tool: let autonomy not stand between bench and it.
        policy += "autonomy_level: L3\nmax_autonomy_level: L3\n"
    (rea_dir / "policy.yaml").write_text(policy)
    return project


def _bench_run(
    root: Path, opts: _BenchOptions, work: Path, rea_path: Path, echo_cmd: list[str] | None
) -> BenchReport:
    import statistics

    spec = _bench_spec(root, opts, rea_path, echo_cmd)
    project = _bench_project(work, spec, opts.fsync)
    env = child_environment(spec, os.environ)
    child_argv = [spec.command, *spec.args]
    # Started as init writes it into .mcp.json: importing rea uses its cached bytecode.
    warm_bytecode_cache(rea_path)
    launch = gateway_launch(rea_path, project)
    launch_args = launch["args"]
    assert isinstance(launch_args, list)
    serve_argv = [sys.executable, *map(str, launch_args)]
    bare_tool = opts.tool or "echo"
    exposed = f"{spec.name}__{bare_tool}"
    arguments: dict[str, object] = {"text": "hello"}
    if opts.arguments is not None:
        arguments = opts.arguments

    child_starts: list[float] = []
    gateway_starts: list[float] = []
    with contextlib.ExitStack() as stack:
        for i in range(_BENCH_START_SAMPLES):
            # The last spawn of each stays up for the measurement itself.
            direct, ms = _bench_start("direct", child_argv, env, project, bare_tool)
            stack.callback(direct.close)
            child_starts.append(ms)
            gateway, ms = _bench_start("gateway", serve_argv, dict(os.environ), project, exposed)
            stack.callback(gateway.close)
            gateway_starts.append(ms)
            if i < _BENCH_START_SAMPLES - 1:
                direct.close()
                gateway.close()
        d_call = _BenchCaller(direct, bare_tool, arguments)
        g_call = _BenchCaller(gateway, exposed, arguments)
        for caller in (d_call, g_call):
            if opts.warmup:
                caller.one_at_a_time(opts.warmup)
                caller.pipelined(opts.warmup, _BENCH_WINDOW)
        d_path, g_path = _bench_interleaved(d_call, g_call, opts.calls)
        rss, peak = gateway.rss_kb()
        gateway.remember_descendants()
    rates = _bench_audit(rea_path, work, opts.calls)

    child_ms = statistics.median(child_starts)
    gateway_ms = statistics.median(gateway_starts)
    added_p50 = g_path.p50_ms - d_path.p50_ms
    ratio_16 = g_path.calls_per_s_16 / d_path.calls_per_s_16
    # "within one fsync" of the fsync-off target (SPEC §12): one fsync from the always rate.
    p50_limit = _BENCH_ADDED_P50_MS + (0.0 if opts.fsync == "off" else 1000.0 / rates["always"])
    return BenchReport(
        downstream=(
            spec.name
            if opts.server is not None
            else "built-in echo" + (f" ({opts.delay_ms:g} ms per call)" if opts.delay_ms else "")
        ),
        tool=exposed,
        calls=opts.calls,
        fsync=opts.fsync,
        direct=d_path,
        gateway=g_path,
        added_p50_ms=added_p50,
        added_p99_ms=g_path.p99_ms - d_path.p99_ms,
        throughput_ratio_1=g_path.calls_per_s_1 / d_path.calls_per_s_1,
        throughput_ratio_16=ratio_16,
        child_start_ms=child_ms,
        gateway_start_ms=gateway_ms,
        gateway_own_start_ms=gateway_ms - child_ms,
        gateway_rss_kb=rss,
        gateway_peak_rss_kb=peak,
        audit_appends_per_s=rates,
        targets={
            "added_p50": added_p50 < p50_limit,
            "throughput_16": ratio_16 >= _BENCH_RATIO_16,
            "start": gateway_ms - child_ms < _BENCH_OWN_START_MS,
        },
    )


def _bench_table(r: BenchReport) -> str:
    """The readable report: one table, then the SPEC §12 targets marked PASS or FAIL."""
    d, g = r.direct, r.gateway

    def row(label: str, direct: str, gateway: str, diff: str) -> str:
        return f"  {label:<24}{direct:>12}{gateway:>12}{diff:>14}\n"

    lines = [
        f"rea bench: {r.downstream} downstream, tool {r.tool}, {r.calls} calls per path "
        f"per mode, audit.fsync {r.fsync}\n\n",
        row("", "direct", "gateway", "added / ratio"),
        row("p50 latency (ms)", f"{d.p50_ms:.3f}", f"{g.p50_ms:.3f}", f"+{r.added_p50_ms:.3f}"),
        row("p99 latency (ms)", f"{d.p99_ms:.3f}", f"{g.p99_ms:.3f}", f"+{r.added_p99_ms:.3f}"),
        row(
            "calls/s, 1 in flight",
            f"{d.calls_per_s_1:,.0f}",
            f"{g.calls_per_s_1:,.0f}",
            f"{r.throughput_ratio_1:.0%}",
        ),
        row(
            f"calls/s, {_BENCH_WINDOW} in flight",
            f"{d.calls_per_s_16:,.0f}",
            f"{g.calls_per_s_16:,.0f}",
            f"{r.throughput_ratio_16:.0%}",
        ),
        row(
            "start to tools/list (ms)",
            f"{r.child_start_ms:.1f}",
            f"{r.gateway_start_ms:.1f}",
            f"+{r.gateway_own_start_ms:.1f}",
        ),
        f"\n  gateway memory          {r.gateway_rss_kb / 1024:.1f} MiB resident "
        f"(peak {r.gateway_peak_rss_kb / 1024:.1f} MiB)\n",
        "  audit appends/s         "
        + "   ".join(f"{mode} {rate:,.0f}" for mode, rate in r.audit_appends_per_s.items())
        + f"   (batch: {_BENCH_WINDOW} threads)\n",
        "\ntargets (SPEC §12)\n",
    ]
    within = "" if r.fsync == "off" else " + one fsync"
    marks = [
        ("added_p50", f"added p50 under {_BENCH_ADDED_P50_MS} ms{within}: {r.added_p50_ms:.3f} ms"),
        (
            "throughput_16",
            f"throughput at {_BENCH_WINDOW} in flight >= {_BENCH_RATIO_16:.0%} of direct: "
            f"{r.throughput_ratio_16:.0%}",
        ),
        (
            "start",
            f"start under {_BENCH_OWN_START_MS:.0f} ms plus the child's: "
            f"{r.gateway_own_start_ms:.1f} ms",
        ),
    ]
    for key, text in marks:
        lines.append(f"  {'PASS' if r.targets[key] else 'FAIL'}  {text}\n")
    return "".join(lines)


# init ##########################################################################

# The default policy, written once by `init` and never overwritten. Every key of SPEC §4
# is here, explained; optional ones are commented out. It must load with load_policy.
INIT_POLICY_YAML = """\
# rea policy: what the gateway lets tool calls do (SPEC §4).
# Written by `python rea.py init`; init never overwrites this file, so edit it freely.
# The gateway re-reads it when it changes; a version that no longer parses keeps the
# last good policy in force. Check your edits with `python rea.py check`.
# Keys of the TypeScript rea's policy files (version, profile, installed_by, review, ...)
# are accepted and ignored.

# What tool tiers may run. Tools are read, write or destructive (tier_overrides in
# registry.yaml, or the tool's name):
#   L0: read only   L1: read + write   L2: + destructive   L3: everything, no limits
autonomy_level: "L1"
# An autonomy_level above this ceiling is a load error, so that raising autonomy is
# a deliberate two-key change.
max_autonomy_level: "L2"

# Globs of paths that no tool argument may name. .rea/ itself is always protected.
blocked_paths:
  - ".env"
  - ".env.*"
  - ".rea/policy.yaml"
  - ".rea/HALT"

# A likely prompt injection in a tool result: "warn" (log and audit) or "block".
injection_detection: "warn"
injection:
  # true: once a result looked suspicious, later write-tier calls in the session are refused.
  suspicious_blocks_writes: false

# Extra secret patterns, redacted from results, errors and the audit log:
#   - name: "internal-token"
#     regex: "itk_[A-Za-z0-9]{32}"
#     flags: "i"          # optional: letters among i m s x
redact:
  patterns: []

audit:
  rotation:
    # Rotate .rea/audit.jsonl when it would grow past this many bytes (50 MiB).
    max_bytes: 52428800
    # Also rotate when its first record is older than this many days (default: never).
    # max_age_days: 30
  # Durability of each audit record: "always" (fsync each), "batch" or "off".
  fsync: "always"

gateway:
  health:
    # true: the __rea__health tool shows each server's last_error text.
    expose_diagnostics: false
  # A tool call with no answer after this many seconds fails.
  call_timeout_s: 60
  # How long the first tools/list waits for servers still starting.
  startup_wait_s: 5
  # Longer server__tool names are shortened (with a hash) for clients with name limits.
  max_tool_name: 52
  # Larger tool results are truncated with a notice.
  max_result_kb: 512
  breaker:
    # Consecutive failures (error, timeout, dead child) that open a server's circuit.
    failure_threshold: 5
    # Seconds an open circuit waits before letting one probe call through.
    cooldown_s: 30
  # Circuit openings per session and server that raise one SESSION_BLOCKER alert.
  session_blocker_threshold: 3
  # First delay before a crashed server is restarted (doubles up to 30 s).
  restart_backoff_s: 0.5
  # Per-server limits; 0 is off.
  # servers:
  #   github:
  #     calls_per_minute: 60
  #     max_concurrent_calls: 4
  # Tools never callable (server__tool; globs allowed).
  blocked_tools: []
  # Serve Prometheus metrics on 127.0.0.1:PORT (or set REA_METRICS_PORT).
  # metrics_port: 9464
"""

INIT_REGISTRY_HEADER = """\
# rea registry: the MCP servers the gateway starts (SPEC §3).
# Each server:
#   - name: "github"        # lowercase letters, digits, '-'; its tools show as github__TOOL
#     command: "npx"        # found through PATH
#     args: ["-y", "@modelcontextprotocol/server-github"]
#     env:                  # ${VAR} takes VAR from the gateway's environment
#       GITHUB_TOKEN: "${GITHUB_TOKEN}"
#     env_passthrough: []   # variable names copied from the gateway's environment
#     tier_overrides: {}    # tool -> read | write | destructive
#     enabled: true         # false: declared, not started
#     trust_annotations: false
#   - name: "linear"        # a remote server (Streamable HTTP): url instead of command
#     url: "https://mcp.linear.app/mcp"   # https://, or http:// to this machine only
#     headers:              # optional; values may use ${VAR}, like env:
#       X-Team: "${LINEAR_TEAM}"
#     oauth: {}             # optional: client_id, scopes; log in with `python rea.py login linear`
# Servers see only a neutral environment plus what is named here.
# Check your edits with `python rea.py check`.
"""

# Env names whose values are secrets (a superset of the registry's env_passthrough rule).
_INIT_SECRET_NAME_RE = re.compile(
    r"TOKEN|KEY|SECRET|PASS|CREDENTIAL|AUTH|PRIVATE|COOKIE", re.IGNORECASE
)
# Values that are tokens by their shape: well-known prefixes, credentials in a URL,
# a bearer header, a JWT, long hex, or a long mixed-case-and-digit run.
_INIT_SECRET_VALUE_RES = (
    re.compile(
        r"^(?:gh[pousr]_|github_pat_|glpat-|sk-|sk_live_|rk_live_|xox[abprs]-|AKIA|ASIA|AIza"
        r"|ya29\.|npm_|hf_|pypi-|dop_v1_|shpat_|SG\.)"
    ),
    re.compile(r"://[^/\s:@]+:[^/\s@]+@"),
    re.compile(r"^(?:Bearer|Basic|token)\s+\S", re.IGNORECASE),
    re.compile(r"^eyJ[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\."),
    re.compile(r"^[0-9a-fA-F]{32,}$"),
    re.compile(r"^(?=.*[a-z])(?=.*[A-Z])(?=.*[0-9])[A-Za-z0-9_\-+=.][A-Za-z0-9_\-+/=.]{19,}$"),
)
_INIT_REA_PY_RE = re.compile(r"(?:^|[/\\])rea\.py$")
_INIT_ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_INIT_TEMPLATE_RE = re.compile(r"\$\{([^}]*)\}")
# Claude Code's `${VAR:-default}`: the registry knows only `${VAR}`.
_INIT_DEFAULTED_RE = re.compile(r"^\$\{([A-Za-z_][A-Za-z0-9_]*):-[^}]*\}$")
# How clients name a server they reach over HTTP (Claude Code `http` and `sse`, Cline
# `streamableHttp`, others `streamable-http`): rea speaks Streamable HTTP to them (§13).
_INIT_HTTP_TYPES = ("http", "sse", "streamable-http", "streamableHttp")
_INIT_REMOTE_TYPES = (*_INIT_HTTP_TYPES, "ws", "websocket")
# Keys of an mcpServers entry that rea reads; the rest are named as ignored.
_INIT_ENTRY_KEYS = ("command", "args", "env", "type", "disabled")
_INIT_REMOTE_KEYS = ("url", "headers", "type", "disabled")
_INIT_AUTH_SCHEME_RE = re.compile(r"^(Bearer|Basic|token)(\s+)(\S+)$", re.IGNORECASE)


@dataclass(frozen=True)
class RegistryEntry:
    """One server as `init` writes it into registry.yaml: every field of SPEC §3."""

    name: str
    command: str = ""
    args: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()  # ordered (name, template)
    env_passthrough: tuple[str, ...] = ()
    tier_overrides: tuple[tuple[str, str], ...] = ()
    enabled: bool = True
    trust_annotations: bool = False
    url: str = ""  # a remote server (§13): url, headers and oauth instead of a command
    headers: tuple[tuple[str, str], ...] = ()  # ordered (name, template)
    oauth: OAuthSettings = field(default_factory=OAuthSettings)
    tools: tuple[str, ...] | None = None  # the allow globs, kept when init rewrites

    def definition(self) -> tuple[object, ...]:
        """What an import compares: a re-import is 'the same server' when these match."""
        return (
            self.command,
            self.args,
            tuple(sorted(self.env)),
            self.url,
            tuple(sorted(self.headers)),
        )


@dataclass(frozen=True)
class SecretReference:
    """An env or header value of the client's config that init replaced by `${NAME}`."""

    name: str  # the variable the user must export
    origin: str  # where the value is, e.g. mcpServers["github"].env.GITHUB_TOKEN in FILE


@dataclass(frozen=True)
class ClientEntry:
    """One entry of the client's `mcpServers`, classified by what init does with it.

    outcome: "import" (a stdio or HTTP server for the registry), "present" (the registry
    has it already, same definition), "clash" (the registry has a different server of that
    name), "remote" (a remote server rea cannot govern: websocket, or a secret in its URL),
    "rea" (already routes through rea), "invalid" (cannot be read, or the registry would
    refuse it).
    """

    key: str
    outcome: str
    why: str
    value: object  # the plain JSON value, kept as is in the new .mcp.json when not imported
    server: RegistryEntry | None = None
    notes: tuple[str, ...] = ()
    secrets: tuple[SecretReference, ...] = ()


class _JsonPairs(list[tuple[str, object]]):
    """A JSON object as its (key, value) pairs in order, duplicates included."""


def cmd_init(root: Path, argv: list[str], out: TextIO, rea_path: Path) -> int:
    """`python rea.py init [--from PATH] [--write]`: set up .rea/ and route a client through rea.

    - Creates root/.rea/. Writes a commented default `policy.yaml` only when no policy
      file (yaml or json) exists: re-running never overwrites the user's policy.
    - Writes `registry.yaml` (version "1", no servers) when no registry exists.
    - `--from PATH` (relative to the working directory) reads a Claude Code `.mcp.json` or a Claude Desktop config (both hold a
      top-level `mcpServers` object). Every entry gets one report line:
        * stdio entries (`command`, `args`, `env`) are imported under a name normalised
          to ^[a-z0-9][a-z0-9-]*$ (lowercase, other characters -> '-', runs collapsed,
          trimmed, "server" if nothing is left); names that clash within the file get
          -2, -3, ... in file order (so a re-run gives the same names);
        * a name the registry already has: the same command/args/env is "already in the
          registry"; a different one is a clash, reported, the registry's entry kept;
        * remote entries (`url`, `type` http, sse, streamable-http) are imported as `url`
          servers with their `headers`, so that every server the user had is governed; a
          websocket one, one whose URL query carries a secret (the registry would hold it
          in plain text), and unreadable entries are skipped and kept unchanged in the new
          .mcp.json so the client still has them;
        * an entry that already runs `rea.py serve` is skipped (it is replaced).
      Keys rea does not use (e.g. `cwd`) are named in the line; `disabled: true` becomes
      `enabled: false`.
    - Env values: `${VAR}` references are kept (`${VAR:-default}` becomes `${VAR}`, the
      default is reported). A literal value whose name looks like a secret (TOKEN, KEY,
      SECRET, PASS, CREDENTIAL, AUTH, PRIVATE, COOKIE) or whose value looks like one (known
      token prefixes, credentials in a URL, Bearer/Basic, JWT, 32+ hex, 20+ mixed-case
      letters and digits) is written as `${NAME}` (NAME the variable's own name, or
      SERVER_NAME if two servers set NAME differently) and the user is told to export NAME;
      the value itself is never written to the registry nor printed. Other literals stay.
      `headers` values are treated alike; a secret header becomes `${SERVER_HEADER}`, its
      scheme (`Bearer `, `Basic `, `token `) kept in front, so the user exports the token.
    - The registry is merged: existing servers are kept untouched; only new names are
      added. A rewritten registry that held text init would not write (comments, edits)
      is first copied to registry.yaml.bak (.bak.N when that exists).
    - Prints the .mcp.json that routes the client through `python3 rea.py serve --root
      ROOT`, plus every entry rea does not host. `--write` (needs --from) writes it into
      the --from file, other top-level keys unchanged, after copying the file to
      FILE.bak (.bak.N); an unchanged file is not rewritten, so re-running is idempotent.
    Returns 0, or 1 when some entry needs the user (unreadable entry or a name clash).
    Errors (bad usage, unreadable or malformed files) raise ReaError.
    """
    source, write = _init_parse_argv(argv)
    rea_dir = root / REA_DIR
    if rea_dir.exists() and not rea_dir.is_dir():
        raise ReaError(f"{rea_dir}: exists but is not a folder; move it away and re-run init")
    # Read and check everything first: a bad file stops init before it writes anything.
    entries: list[ClientEntry] = []
    document: _JsonPairs | None = None
    if source is not None:
        document = _init_read_client_config(source)
        entries = _init_classify(_init_mcp_servers(document, source), str(source))
    registry_source, existing = _init_existing(rea_dir)
    entries = _init_against_registry(entries, existing)

    if not rea_dir.exists():
        rea_dir.mkdir(parents=True)
        out.write(f"created {rea_dir}\n")
    _init_policy(rea_dir, out)
    added = [e.server for e in entries if e.outcome == "import" and e.server is not None]
    _init_registry(rea_dir, registry_source, existing, added, out)

    if source is not None:
        out.write(f"from {source} ({len(entries)} entries in mcpServers):\n")
        registry_name = (registry_source or rea_dir / "registry.yaml").name
        for entry in entries:
            out.write(f"  {_init_line(entry, registry_name)}\n")
        secrets: dict[str, list[str]] = {}
        for entry in entries:
            if entry.outcome == "import":
                for secret in entry.secrets:
                    secrets.setdefault(secret.name, []).append(secret.origin)
        if secrets:
            out.write(
                "env values that look like secrets (or that ${VAR} cannot hold) were not "
                "copied into the registry; export them where the gateway runs:\n"
            )
            for variable, origins in secrets.items():
                out.write(f"  export {variable}=...   # the value of {' and '.join(origins)}\n")

    servers = _init_client_servers(root, rea_path, entries)
    if write and source is not None and document is not None:
        _init_write_client_config(source, document, servers, out)
    else:
        text = json.dumps({"mcpServers": servers}, indent=2, ensure_ascii=False)
        out.write(f"to route your MCP client through rea, use this as its mcpServers:\n{text}\n")
    needs_user = any(e.outcome in ("invalid", "clash") for e in entries)
    return 1 if needs_user else 0


def _init_parse_argv(argv: list[str]) -> tuple[Path | None, bool]:
    args = parse_command(["init", *argv])
    source: Path | None = None
    if args.source is not None:
        if not args.source:
            raise ReaError("init --from: needs a path (a .mcp.json or Claude Desktop config)")
        source = (Path.cwd() / Path(args.source).expanduser()).absolute()
    if args.write and source is None:
        raise ReaError("init --write: needs --from PATH, the .mcp.json to rewrite")
    return source, bool(args.write)


def _init_read_client_config(path: Path) -> _JsonPairs:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ReaError(f"{path}: no such file; give the path of a .mcp.json") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ReaError(f"{path}: cannot be read ({err}); make it a readable UTF-8 file") from None
    if not text.strip():
        raise ReaError(f'{path}: empty; a client config is a JSON object with "mcpServers"')
    try:
        value: object = json.loads(text, object_pairs_hook=_JsonPairs)
    except json.JSONDecodeError as err:
        raise ReaError(
            f"{path}:{err.lineno}:{err.colno}: {err.msg}; fix the JSON "
            "(JSON allows no comments and no trailing commas)"
        ) from None
    except (ValueError, RecursionError) as err:
        raise ReaError(f"{path}: not usable JSON ({err})") from None
    if not isinstance(value, _JsonPairs):
        raise ReaError(f'{path}: the top level must be a JSON object with "mcpServers"')
    return value


def _init_mcp_servers(document: _JsonPairs, path: Path) -> _JsonPairs:
    found = [value for key, value in document if key == "mcpServers"]
    if len(found) > 1:
        raise ReaError(f'{path}: "mcpServers" appears {len(found)} times; keep one')
    if not found:
        raise ReaError(
            f'{path}: no top-level "mcpServers" object; give a Claude Code .mcp.json '
            "or a Claude Desktop claude_desktop_config.json"
        )
    servers = found[0]
    if not isinstance(servers, _JsonPairs):
        raise ReaError(f'{path}: "mcpServers" must be an object of name: server entries')
    return servers


def _init_classify(servers: _JsonPairs, filename: str) -> list[ClientEntry]:
    """Classify every entry, name imports uniquely in file order, map secret env values."""
    entries: list[ClientEntry] = []
    taken: set[str] = set()
    secret_values: dict[str, str] = {}  # variable -> the literal first mapped to it
    seen_keys: set[str] = set()
    for key, value in servers:
        entry = _init_entry(key, value)
        notes = list(entry.notes)
        if key in seen_keys:
            notes.append(f"{key!r} appears again in mcpServers (a client would keep only the last)")
        seen_keys.add(key)
        if entry.outcome != "import" or entry.server is None:
            entries.append(_init_with(entry, notes=tuple(notes)))
            continue
        base = _init_server_name(key)
        name, n = base, 1
        while name in taken:
            n += 1
            name = f"{base}-{n}"
        taken.add(name)
        if name != key:
            if name != base:
                notes.append(f"renamed: {base!r} was already taken in this file")
            else:
                notes.append("name normalised to the registry's rules")
        env, secrets = _init_values(
            "env", entry.server.env, name, key, filename, secret_values, notes
        )
        headers, header_secrets = _init_values(
            "headers", entry.server.headers, name, key, filename, secret_values, notes
        )
        server = replace(entry.server, name=name, env=env, headers=headers)
        secrets += header_secrets
        problem = _init_registry_problem([server])
        if problem is not None:  # e.g. an empty argument, which the registry refuses
            what = problem.removeprefix("servers[0].").split("; ")[0]  # the fix is for YAML
            why = f"the registry cannot hold it ({what})"
            entries.append(_init_with(entry, outcome="invalid", why=why, notes=tuple(notes)))
            continue
        entries.append(_init_with(entry, server=server, notes=tuple(notes), secrets=secrets))
    return entries


def _init_registry_problem(servers: list[RegistryEntry]) -> str | None:
    """Why the registry text init would write does not load back, else None."""
    try:
        registry_from_value(parse_yaml(render_registry_yaml(servers), "<init>"), "<init>")
    except ReaError as err:
        return str(err).removeprefix("<init>: ")
    return None


def _init_with(
    entry: ClientEntry,
    *,
    outcome: str | None = None,
    why: str | None = None,
    server: RegistryEntry | None = None,
    notes: tuple[str, ...] | None = None,
    secrets: tuple[SecretReference, ...] | None = None,
) -> ClientEntry:
    return ClientEntry(
        key=entry.key,
        outcome=outcome if outcome is not None else entry.outcome,
        why=why if why is not None else entry.why,
        value=entry.value,
        server=server if server is not None else entry.server,
        notes=notes if notes is not None else entry.notes,
        secrets=secrets if secrets is not None else entry.secrets,
    )


def _init_entry(key: str, value: object) -> ClientEntry:
    """Classify one mcpServers entry; a stdio one gets a RegistryEntry with its raw env."""

    def skip(outcome: str, why: str) -> ClientEntry:
        return ClientEntry(key=key, outcome=outcome, why=why, value=plain)

    plain = _init_plain(value)
    if not isinstance(value, _JsonPairs):
        return skip("invalid", "not a JSON object")
    keys = [k for k, _ in value]
    twice = sorted({k for k in keys if keys.count(k) > 1})
    if twice:
        return skip("invalid", f"key {twice[0]!r} appears twice in the entry")
    fields = dict(value)
    kind = fields.get("type")
    if "url" in fields or kind in _INIT_REMOTE_TYPES:
        return _init_remote_entry(key, fields, plain)
    if kind is not None and kind != "stdio":
        return skip("invalid", f"type {kind!r} is not supported; rea hosts stdio servers")
    command = fields.get("command")
    args_value = fields.get("args", [])
    env_value = fields.get("env", _JsonPairs())
    if not isinstance(command, str) or not command.strip():
        return skip("invalid", '"command" is missing or not text')
    if not isinstance(args_value, list) or not all(isinstance(a, str) for a in args_value):
        return skip("invalid", '"args" must be a list of text')
    args = tuple(a for a in args_value if isinstance(a, str))
    if _init_routes_through_rea(command, args):
        return skip("rea", "already routes through rea (replaced by the entry below)")
    if not isinstance(env_value, _JsonPairs):
        return skip("invalid", '"env" must be an object of NAME: "value"')
    env: list[tuple[str, str]] = []
    for name, text in env_value:
        if not isinstance(text, str):
            return skip("invalid", f'"env".{name} must be text')
        if not _INIT_ENV_NAME_RE.match(name):
            return skip("invalid", f'"env" name {name!r} is not a variable name')
        if any(name == n for n, _ in env):
            return skip("invalid", f'"env".{name} appears twice')
        env.append((name, text))
    disabled = fields.get("disabled", False)
    if not isinstance(disabled, bool):
        return skip("invalid", '"disabled" must be true or false')
    server = RegistryEntry(
        name=key, command=command, args=args, env=tuple(env), enabled=not disabled
    )
    return _init_import(key, plain, server, _init_notes(fields, _INIT_ENTRY_KEYS, disabled))


def _init_remote_entry(key: str, fields: dict[str, object], plain: object) -> ClientEntry:
    """Classify an mcpServers entry a client reaches over the network (SPEC §13)."""

    def skip(outcome: str, why: str) -> ClientEntry:
        return ClientEntry(key=key, outcome=outcome, why=why, value=plain)

    kind = fields.get("type", "http")
    url = fields.get("url")
    headers_value = fields.get("headers", _JsonPairs())
    if kind not in _INIT_HTTP_TYPES:
        return skip("remote", f"remote server ({kind}); rea speaks Streamable HTTP only")
    if not isinstance(url, str) or not url.strip():
        return skip("invalid", '"url" is missing or not text')
    try:
        query = urllib.parse.parse_qsl(urllib.parse.urlsplit(url).query)
    except ValueError:
        query = []
    if any(_init_looks_secret(name, value) for name, value in query):
        return skip(
            "remote",
            "remote server whose URL carries a secret in its query, which the registry would "
            "hold in plain text; give it the secret in a header (${VAR}) and add it by hand",
        )
    if not isinstance(headers_value, _JsonPairs):
        return skip("invalid", '"headers" must be an object of Name: "value"')
    headers: list[tuple[str, str]] = []
    for name, text in headers_value:
        if not isinstance(text, str):
            return skip("invalid", f'"headers".{name} must be text')
        if any(name.lower() == n.lower() for n, _ in headers):
            return skip("invalid", f'"headers".{name} appears twice')
        headers.append((name, text))
    disabled = fields.get("disabled", False)
    if not isinstance(disabled, bool):
        return skip("invalid", '"disabled" must be true or false')
    notes = _init_notes(fields, _INIT_REMOTE_KEYS, disabled)
    if kind == "sse":
        notes.append(
            "type sse: rea speaks Streamable HTTP; a server that offers only the old "
            "HTTP+SSE transport will not start (see python rea.py status)"
        )
    server = RegistryEntry(name=key, url=url, headers=tuple(headers), enabled=not disabled)
    return _init_import(key, plain, server, notes)


def _init_notes(fields: dict[str, object], known: Iterable[str], disabled: bool) -> list[str]:
    """What init says of an entry it imports: the keys rea does not use, and a disabled one."""
    notes: list[str] = []
    ignored = [k for k in fields if k not in known]
    if ignored:
        notes.append(f"ignored keys rea does not use: {', '.join(ignored)}")
    if disabled:
        notes.append("disabled: written as enabled: false")
    return notes


def _init_import(key: str, plain: object, server: RegistryEntry, notes: list[str]) -> ClientEntry:
    return ClientEntry(
        key=key, outcome="import", why="", value=plain, server=server, notes=tuple(notes)
    )


def _init_routes_through_rea(command: str, args: tuple[str, ...]) -> bool:
    """An entry like `python3 /x/rea.py serve ...`: the gateway itself, not a server."""
    runs_rea = any(
        _INIT_REA_PY_RE.search(word) or "import rea;" in word for word in (command, *args)
    )
    return runs_rea and "serve" in args


def _init_server_name(raw: str) -> str:
    name = re.sub(r"[^a-z0-9-]+", "-", raw.lower())
    name = re.sub(r"-{2,}", "-", name).strip("-")
    return name if SERVER_NAME_RE.match(name) else "server"


def _init_values(
    kind: str,
    raw: tuple[tuple[str, str], ...],
    server: str,
    key: str,
    filename: str,
    secret_values: dict[str, str],
    notes: list[str],
) -> tuple[tuple[tuple[str, str], ...], tuple[SecretReference, ...]]:
    """`env` or `headers` (kind) as the registry gets them: ${VAR} references kept, secret
    literals (and values ${VAR} cannot hold) made references to a variable the user exports.
    An env value is read from the variable of its own name when that is free (else
    SERVER_NAME); a header from SERVER_HEADER, its `Bearer `/`Basic `/`token ` kept in front."""
    out: list[tuple[str, str]] = []
    secrets: list[SecretReference] = []
    label = "env" if kind == "env" else "header"
    for name, value in raw:
        defaulted = _INIT_DEFAULTED_RE.match(value)
        if defaulted:
            out.append((name, f"${{{defaulted.group(1)}}}"))
            notes.append(
                f"{label} {name}: the default in {value!r} dropped (rea has only ${{VAR}})"
            )
            continue
        templated = bool(_INIT_TEMPLATE_RE.search(value))
        if (templated and _init_template_ok(value)) or (
            not templated and "${" not in value and not _init_looks_secret(name, value)
        ):
            out.append((name, value))
            continue
        # A secret, or a value the registry's ${VAR} syntax cannot hold: read it from the
        # gateway's environment instead, under a variable no other value has taken.
        scheme = _INIT_AUTH_SCHEME_RE.match(value) if kind == "headers" else None
        prefix, secret = (scheme.group(1) + " ", scheme.group(3)) if scheme else ("", value)
        qualified = re.sub(r"[^A-Z0-9]+", "_", f"{server}_{name}".upper()).strip("_")
        candidates = itertools.chain(
            [name] if kind == "env" else [],
            [qualified],
            (f"{qualified}_{n}" for n in itertools.count(2)),
        )
        variable = next(v for v in candidates if secret_values.get(v, secret) == secret)
        secret_values.setdefault(variable, secret)
        out.append((name, f"{prefix}${{{variable}}}"))
        what = f"the token after {prefix.strip()} in " if prefix else ""
        where = f"mcpServers[{json.dumps(key, ensure_ascii=False)}].{kind}.{name}"
        secrets.append(SecretReference(name=variable, origin=f"{what}{where} in {filename}"))
    return tuple(out), tuple(secrets)


def _init_template_ok(value: str) -> bool:
    if any(not _INIT_ENV_NAME_RE.match(m.group(1)) for m in _INIT_TEMPLATE_RE.finditer(value)):
        return False
    return "${" not in _INIT_TEMPLATE_RE.sub("", value)


def _init_looks_secret(name: str, value: str) -> bool:
    """A literal env value that must not be written in plain text (see cmd_init)."""
    if not value:
        return False
    if _INIT_SECRET_NAME_RE.search(name):
        return True
    return any(pattern.search(value) for pattern in _INIT_SECRET_VALUE_RES)


def _init_existing(rea_dir: Path) -> tuple[Path | None, list[RegistryEntry]]:
    """The registry as it is (validated: a broken one stops init before any write)."""
    registry = load_registry(rea_dir)
    entries = [
        RegistryEntry(
            name=spec.name,
            command=spec.command,
            args=spec.args,
            env=tuple(spec.env.items()),
            env_passthrough=spec.env_passthrough,
            tier_overrides=tuple(spec.tier_overrides.items()),
            enabled=spec.enabled,
            trust_annotations=spec.trust_annotations,
            url=spec.url,
            headers=tuple(spec.headers.items()),
            oauth=spec.oauth,
            tools=spec.tools,
        )
        for spec in registry.servers
    ]
    return registry.source, entries


def _init_against_registry(
    entries: list[ClientEntry], existing: list[RegistryEntry]
) -> list[ClientEntry]:
    """Imports whose name the registry has: the same server is 'present', else a clash."""
    by_name = {server.name: server for server in existing}
    result: list[ClientEntry] = []
    for entry in entries:
        server = entry.server
        if entry.outcome != "import" or server is None or server.name not in by_name:
            result.append(entry)
        elif by_name[server.name].definition() == server.definition():
            result.append(_init_with(entry, outcome="present"))
        else:
            why = f"the registry already has a different server {server.name!r} (kept)"
            result.append(_init_with(entry, outcome="clash", why=why))
    return result


def _init_line(entry: ClientEntry, registry_name: str) -> str:
    """The one report line of an entry: what became of it, then any notes."""
    name = entry.server.name if entry.server is not None else entry.key
    if entry.outcome == "import":
        head = f"imported as {name}"
    elif entry.outcome == "present":
        head = f"already in {registry_name} as {name} (unchanged)"
    elif entry.outcome == "rea":
        head = f"skipped: {entry.why}"
    else:
        head = f"skipped: {entry.why}; kept in .mcp.json as it was"
    return "; ".join([f"{json.dumps(entry.key, ensure_ascii=False)}: {head}", *entry.notes])


def _init_policy(rea_dir: Path, out: TextIO) -> None:
    existing = [p for p in (rea_dir / "policy.yaml", rea_dir / "policy.json") if p.exists()]
    if existing:
        try:
            level = f"autonomy {load_policy(rea_dir).autonomy_level}"
        except ReaError as err:  # init leaves the user's file alone, but says it is broken
            level = f"it does not load: {err}"
        out.write(f"kept {existing[0]} (init never overwrites a policy; {level})\n")
        return
    path = rea_dir / "policy.yaml"
    atomic_write(path, INIT_POLICY_YAML.encode("utf-8"), 0o644)
    out.write(f"wrote {path} (autonomy L1; .env, .env.*, .rea/policy.yaml, .rea/HALT blocked)\n")


def _init_registry(
    rea_dir: Path,
    source: Path | None,
    existing: list[RegistryEntry],
    added: list[RegistryEntry],
    out: TextIO,
) -> None:
    servers = [*existing, *added]
    if source is not None and not added:
        out.write(f"kept {source} ({len(existing)} servers, nothing new to add)\n")
        return
    problem = _init_registry_problem(servers)
    if problem is not None:  # a bug guard: never write a registry that does not load
        raise ReaError(f"init: the merged registry would not load ({problem}); nothing written")
    path = source or rea_dir / "registry.yaml"
    as_json = path.suffix == ".json"
    text = render_registry_json(servers) if as_json else render_registry_yaml(servers)
    mode = 0o644
    if source is not None:
        old = source.read_text(encoding="utf-8")
        mode = source.stat().st_mode & 0o777
        was_ours = old == (render_registry_json if as_json else render_registry_yaml)(existing)
        if not was_ours:
            backup = _init_backup(source)
            out.write(f"saved the old registry (with its comments) as {backup}\n")
    atomic_write(path, text.encode("utf-8"), mode)
    names = ", ".join(s.name for s in added) or "no servers yet"
    out.write(f"wrote {path} ({len(servers)} servers; added: {names})\n")


def render_registry_yaml(servers: Iterable[RegistryEntry]) -> str:
    """registry.yaml text, every string double-quoted so no value can change meaning."""
    lines = [INIT_REGISTRY_HEADER.rstrip("\n"), 'version: "1"']
    items = list(servers)
    if not items:
        lines.append("servers: []")
    else:
        lines.append("servers:")
    for server in items:
        lines.append(f"  - name: {_init_yaml_str(server.name)}")
        if server.url:
            lines.append(f"    url: {_init_yaml_str(server.url)}")
        else:
            lines.append(f"    command: {_init_yaml_str(server.command)}")
            lines.append(f"    args: [{', '.join(_init_yaml_str(a) for a in server.args)}]")
        for key, pairs in (
            ("env", server.env),
            ("headers", server.headers),
            ("tier_overrides", server.tier_overrides),
        ):
            if pairs:
                lines.append(f"    {key}:")
                lines.extend(f"      {_init_yaml_str(k)}: {_init_yaml_str(v)}" for k, v in pairs)
        oauth = _init_oauth(server.oauth)
        if oauth:
            lines.append("    oauth:")
            for key, value in oauth.items():
                if isinstance(value, list):
                    items_text = ", ".join(_init_yaml_str(str(v)) for v in value)
                    lines.append(f"      {key}: [{items_text}]")
                else:
                    lines.append(f"      {key}: {_init_yaml_str(str(value))}")
        if server.env_passthrough:
            names = ", ".join(_init_yaml_str(n) for n in server.env_passthrough)
            lines.append(f"    env_passthrough: [{names}]")
        if not server.enabled:
            lines.append("    enabled: false")
        if server.trust_annotations:
            lines.append("    trust_annotations: true")
        if server.tools is not None:
            globs = ", ".join(_init_yaml_str(g) for g in server.tools)
            lines.append(f"    tools: [{globs}]")
    return "\n".join(lines) + "\n"


def render_registry_json(servers: Iterable[RegistryEntry]) -> str:
    """registry.json text (for a user who keeps the registry as JSON)."""
    doc: list[dict[str, object]] = []
    for server in servers:
        item: dict[str, object] = {"name": server.name}
        if server.url:
            item["url"] = server.url
        else:
            item["command"] = server.command
            item["args"] = list(server.args)
        if server.env:
            item["env"] = dict(server.env)
        if server.headers:
            item["headers"] = dict(server.headers)
        if _init_oauth(server.oauth):
            item["oauth"] = _init_oauth(server.oauth)
        if server.env_passthrough:
            item["env_passthrough"] = list(server.env_passthrough)
        if server.tier_overrides:
            item["tier_overrides"] = dict(server.tier_overrides)
        if not server.enabled:
            item["enabled"] = False
        if server.trust_annotations:
            item["trust_annotations"] = True
        if server.tools is not None:
            item["tools"] = list(server.tools)
        doc.append(item)
    return json.dumps({"version": "1", "servers": doc}, indent=2, ensure_ascii=False) + "\n"


def _init_oauth(oauth: OAuthSettings) -> dict[str, object]:
    """The `oauth:` keys a registry entry sets, in order; {} for none."""
    doc: dict[str, object] = {}
    if oauth.client_id is not None:
        doc["client_id"] = oauth.client_id
    if oauth.scopes:
        doc["scopes"] = list(oauth.scopes)
    if oauth.client_metadata_url is not None:
        doc["client_metadata_url"] = oauth.client_metadata_url
    return doc


def _init_yaml_str(text: str) -> str:
    """A YAML double-quoted scalar: JSON escapes, plus \\u escapes for anything unprintable.

    Line separators (U+0085, U+2028, U+2029) are escaped too: a line-based reader must
    never see a string broken across lines.
    """
    out = ['"']
    for ch in text:
        code = ord(ch)
        if ch in '"\\':
            out.append("\\" + ch)
        elif 0x20 <= code < 0x7F or (code >= 0xA0 and ch.isprintable() and code != 0xFEFF):
            out.append(ch)
        elif code <= 0xFF:
            out.append(f"\\x{code:02x}")
        elif code <= 0xFFFF:
            out.append(f"\\u{code:04x}")
        else:
            out.append(f"\\U{code:08x}")
    out.append('"')
    return "".join(out)


def _init_client_servers(
    root: Path, rea_path: Path, entries: list[ClientEntry]
) -> dict[str, object]:
    """The new mcpServers: rea first, then every entry rea does not host, unchanged."""
    kept: list[tuple[str, object]] = [
        (e.key, e.value) for e in entries if e.outcome in ("remote", "invalid", "clash")
    ]
    kept_keys = {k for k, _ in kept}
    rea_key = "rea" if "rea" not in kept_keys else "rea-gateway"
    servers: dict[str, object] = {rea_key: gateway_launch(rea_path.absolute(), root.absolute())}
    for key, value in kept:
        unique, n = key, 1
        while unique in servers:  # a key the file had twice: keep both
            n += 1
            unique = f"{key}-{n}"
        servers[unique] = value
    return servers


def _init_write_client_config(
    path: Path, document: _JsonPairs, servers: dict[str, object], out: TextIO
) -> None:
    new: dict[str, object] = {}
    for key, value in document:
        new[key] = servers if key == "mcpServers" else _init_plain(value)
    text = json.dumps(new, indent=2, ensure_ascii=False) + "\n"
    old = path.read_bytes()
    if old == text.encode("utf-8"):
        out.write(f"{path} already routes your client through rea (unchanged)\n")
        return
    backup = _init_backup(path)
    atomic_write(path, text.encode("utf-8"), path.stat().st_mode & 0o777)
    out.write(f"wrote {path} (the original is saved as {backup}); restart your MCP client\n")


def _init_backup(path: Path) -> Path:
    """Copy path to path.bak, or path.bak.N when that exists; never overwrite a backup."""
    data = path.read_bytes()
    mode = path.stat().st_mode & 0o777
    n = 0
    while True:
        backup = path.with_name(path.name + (".bak" if n == 0 else f".bak.{n}"))
        try:
            fd = os.open(backup, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        except FileExistsError:
            n += 1
            continue
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        return backup


def _init_plain(value: object) -> object:
    """A parsed JSON value with its objects as dicts again (the last of a repeated key wins)."""
    if isinstance(value, _JsonPairs):
        return {k: _init_plain(v) for k, v in value}
    if isinstance(value, list):
        return [_init_plain(v) for v in value]
    return value


# Metrics #######################################################################

# Latency buckets (seconds): sub-millisecond gateway overhead up to the call timeout.
METRICS_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)
# Label values come partly from the client (tool names): cap the series so a client
# inventing names cannot grow the gateway's memory without bound.
METRICS_MAX_SERIES = 5000
_METRICS_OTHER = "__other__"
_PROM_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class _LatencyHistogram:
    """Per-bucket (non-cumulative) counts, sum and count of one server's call latency."""

    __slots__ = ("buckets", "count", "total")

    def __init__(self) -> None:
        self.buckets = [0] * (len(METRICS_BUCKETS) + 1)  # the last is above 60 s (+Inf only)
        self.total = 0.0
        self.count = 0


class Metrics:
    """Counters and histograms for the Prometheus text endpoint; thread-safe, cheap on the hot path."""

    def __init__(self) -> None:
        self._lock = threading.Lock()  # guards: _calls, _latency (one short section per call)
        self._calls: dict[tuple[str, str, str, str], int] = {}
        self._latency: dict[str, _LatencyHistogram] = {}
        self._gauges: Callable[[], ServeState] | None = None
        self._gauge_failed = False

    def observe_call(self, server: str, tool: str, tier: str, status: str, seconds: float) -> None:
        """Count one finished tool call and its latency."""
        if not seconds >= 0.0:  # negative or NaN: a clock oddity, counted as instant
            seconds = 0.0
        slot = bisect.bisect_left(METRICS_BUCKETS, seconds)  # first bound >= seconds
        key = (server, tool, tier, status)
        with self._lock:
            if key not in self._calls and len(self._calls) >= METRICS_MAX_SERIES:
                key = (server, _METRICS_OTHER, tier, status)
            self._calls[key] = self._calls.get(key, 0) + 1
            histogram = self._latency.get(server)
            if histogram is None:
                if len(self._latency) >= METRICS_MAX_SERIES:
                    histogram = self._latency.setdefault(_METRICS_OTHER, _LatencyHistogram())
                else:
                    histogram = self._latency[server] = _LatencyHistogram()
            histogram.buckets[slot] += 1
            histogram.total += seconds
            histogram.count += 1

    def set_gauges(self, fn: Callable[[], ServeState]) -> None:
        """Read gauges at each scrape from fn: the gateway's live state record."""
        self._gauges = fn

    def render(self) -> str:
        """The Prometheus text exposition format 0.0.4."""
        with self._lock:
            calls = sorted(self._calls.items())
            latency = sorted(
                (name, list(h.buckets), h.total, h.count) for name, h in self._latency.items()
            )
        lines: list[str] = []
        _prom_family(lines, "rea_up", "gauge", "1 while the gateway serves.")
        lines.append("rea_up 1")
        _prom_family(
            lines, "rea_tool_calls_total", "counter", "Tool calls by server, tool, tier and status."
        )
        for (server, tool, tier, status), count in calls:
            labels = _prom_labels(server=server, tool=tool, tier=tier, status=status)
            lines.append(f"rea_tool_calls_total{labels} {count}")
        name = "rea_tool_call_duration_seconds"
        _prom_family(lines, name, "histogram", "Tool call latency through the gateway, by server.")
        for server, buckets, total, count in latency:
            cumulative = 0
            for bound, in_bucket in zip(METRICS_BUCKETS, buckets, strict=False):
                cumulative += in_bucket
                labels = _prom_labels(server=server, le=repr(bound))
                lines.append(f"{name}_bucket{labels} {cumulative}")
            lines.append(f"{name}_bucket{_prom_labels(server=server, le='+Inf')} {count}")
            lines.append(f"{name}_sum{_prom_labels(server=server)} {_prom_number(total)}")
            lines.append(f"{name}_count{_prom_labels(server=server)} {count}")
        self._render_gauges(lines)
        return "\n".join(lines) + "\n"

    def _render_gauges(self, lines: list[str]) -> None:
        state = self._snapshot()
        downstreams: list[DownstreamStatus] = []
        seen: set[str] = set()
        for item in state.downstreams if state is not None else ():
            if item.name not in seen:
                seen.add(item.name)
                downstreams.append(item)
        _prom_family(
            lines, "rea_circuit_state", "gauge", "1 for the circuit's current state, else 0."
        )
        for d in downstreams:
            for candidate in CircuitState:
                value = 1 if candidate == d.circuit_state else 0
                lines.append(
                    f"rea_circuit_state{_prom_labels(server=d.name, state=candidate.value)} {value}"
                )
        _prom_family(lines, "rea_downstream_healthy", "gauge", "1 if the server is healthy.")
        for d in downstreams:
            lines.append(f"rea_downstream_healthy{_prom_labels(server=d.name)} {int(d.healthy)}")
        _prom_family(
            lines,
            "rea_downstream_restarts_total",
            "counter",
            "Restarts of the server's process by the supervisor.",
        )
        for d in downstreams:
            lines.append(
                f"rea_downstream_restarts_total{_prom_labels(server=d.name)} {d.restarts or 0}"
            )
        _prom_family(
            lines,
            "rea_audit_append_failures_total",
            "counter",
            "Audit records that could not be appended.",
        )
        lines.append(f"rea_audit_append_failures_total {state.audit_fail_count if state else 0}")
        _prom_family(lines, "rea_halt_active", "gauge", "1 while .rea/HALT refuses every call.")
        lines.append(f"rea_halt_active {int(state.halt_active) if state else 0}")

    def _snapshot(self) -> ServeState | None:
        fn = self._gauges
        if fn is None:
            return None
        try:
            return fn()
        except Exception as exc:  # a scrape must not take the gateway down; say so once
            if not self._gauge_failed:
                self._gauge_failed = True
                log("error", "metrics_snapshot_failed", error=repr(exc))
            return None


def _prom_family(lines: list[str], name: str, kind: str, help_text: str) -> None:
    lines.append(f"# HELP {name} {help_text}")
    lines.append(f"# TYPE {name} {kind}")


def _prom_labels(**labels: str) -> str:
    parts = []
    for key, value in labels.items():
        escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
        parts.append(f'{key}="{escaped}"')
    return "{" + ",".join(parts) + "}"


def _prom_number(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


def _metrics_http_server(metrics: Metrics, port: int) -> http.server.ThreadingHTTPServer:
    """Build the HTTP server; http.server is imported here, only when metrics are on
    (it costs ~25 ms of start-up, which every `serve` would otherwise pay)."""
    import http.server

    class _MetricsHTTPServer(http.server.ThreadingHTTPServer):
        """The HTTP server behind MetricsServer; carries the Metrics its handler renders."""

        daemon_threads = True  # a stuck scraper never holds the gateway's exit

        def __init__(self, metrics: Metrics, port: int) -> None:
            self.metrics = metrics
            super().__init__(("127.0.0.1", port), _MetricsHandler)

    class _MetricsHandler(http.server.BaseHTTPRequestHandler):
        """Answers GET /metrics; everything else is 404. Quiet: stdout is the protocol."""

        timeout = 10  # a client that sends nothing does not hold a thread forever
        server_version = "rea-metrics"

        def do_GET(self) -> None:
            self._answer(with_body=True)

        def do_HEAD(self) -> None:
            self._answer(with_body=False)

        def _answer(self, with_body: bool) -> None:
            path = self.path.split("?", 1)[0]
            if not self._host_is_local():
                # DNS rebinding: a web page must not read tool names through a browser.
                self._send(403, b"forbidden: use http://127.0.0.1:PORT/metrics\n", with_body)
                return
            if path != "/metrics":
                self._send(404, b"not found: try /metrics\n", with_body)
                return
            server = self.server
            assert isinstance(server, _MetricsHTTPServer)
            self._send(200, server.metrics.render().encode("utf-8"), with_body)

        def _host_is_local(self) -> bool:
            host = self.headers.get("Host")
            if host is None:
                return True  # HTTP/1.0 without Host: only a local process reaches 127.0.0.1
            name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
            return name in ("127.0.0.1", "localhost", "[::1]")

        def _send(self, code: int, body: bytes, with_body: bool) -> None:
            self.send_response(code)
            self.send_header("Content-Type", _PROM_CONTENT_TYPE)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if with_body:
                self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass  # stdout carries JSON-RPC, and a scrape every few seconds is not news

    return _MetricsHTTPServer(metrics, port)


class MetricsServer:
    """The Prometheus endpoint: http://127.0.0.1:PORT/metrics, never on another address."""

    def __init__(self, metrics: Metrics, port: int) -> None:
        try:
            self._server = _metrics_http_server(metrics, port)
        except OSError as err:
            raise ReaError(
                f"metrics port {port}: cannot listen on 127.0.0.1 ({err.strerror or err}); "
                "choose a free port in REA_METRICS_PORT or gateway.metrics_port"
            ) from None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def start(self) -> None:
        if self._thread is not None:
            return
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.25}, name="rea-metrics"
        )
        self._thread.daemon = True
        self._thread.start()

    def close(self) -> None:
        """Stop serving and free the port; safe to call twice or before start()."""
        thread, self._thread = self._thread, None
        if thread is not None:
            self._server.shutdown()  # waits for serve_forever to return: only if it runs
            thread.join(timeout=5)
        self._server.server_close()


# Protocol ###################################################################

JsonObj = dict[str, object]

HANDSHAKE_VERSIONS = ("2025-11-25", "2025-06-18", "2025-03-26", "2024-11-05")  # newest first
STATELESS_VERSIONS = ("2026-07-28",)
META_VERSION = "io.modelcontextprotocol/protocolVersion"
META_CAPS = "io.modelcontextprotocol/clientCapabilities"
META_CLIENT = "io.modelcontextprotocol/clientInfo"
META_SERVER = "io.modelcontextprotocol/serverInfo"

PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603
UNSUPPORTED_VERSION = -32022
RESOURCE_NOT_FOUND = -32002
POLICY_DENIED = -32001  # a non-tool request refused by policy (tool calls: an isError result)

HEALTH_TOOL = "__rea__health"
GATEWAY_INFO: JsonObj = {"name": "rea", "title": "rea governance gateway", "version": VERSION}
# A child's request to the client, and the client capability that lets it through.
RELAYED_REQUESTS = {
    "sampling/createMessage": "sampling",
    "elicitation/create": "elicitation",
    "roots/list": "roots",
}
TASKS_CAPABILITY: JsonObj = {"list": {}, "cancel": {}, "requests": {"tools": {"call": {}}}}
_ALL_CHILD_CAPS: JsonObj = {
    "resources": {"subscribe": True, "listChanged": True},
    "prompts": {"listChanged": True},
    "completions": {},
    "logging": {},
    "tasks": TASKS_CAPABILITY,
}
TERMINAL_TASK_STATES = frozenset({"completed", "failed", "cancelled"})
RELATED_TASK = "io.modelcontextprotocol/related-task"
MAX_INPUT_ROUNDS = 8  # input_required rounds one call may take
MIN_SECRET_CHARS = 6  # shorter env: values are not scrubbed as text (too many false hits)
MAX_LINE = 64 * 1024 * 1024  # one JSON-RPC message; a longer line is refused, not buffered forever
TOOLS_PAGE = 100
RESTART_WINDOW_S = 60.0
MAX_RESTARTS = 5  # more than this many restarts within RESTART_WINDOW_S gives up
BACKOFF_MAX_S = 30.0


class Era(StrEnum):
    """The two protocol eras (§5): `initialize` first, or `_meta` on every request."""

    HANDSHAKE = "handshake"
    STATELESS = "stateless"


@dataclass(frozen=True)
class Timeouts:
    """The gateway's fixed waits (§5, §9), in one record. `REA_TIMEOUTS` (say
    `discover_s=0.5,stop_grace_s=1`) shortens them for a test; users have no need to."""

    discover_s: float = 5.0  # no answer to server/discover by then: the handshake era
    handshake_s: float = 30.0  # initialize and list requests to a server
    stop_grace_s: float = 5.0  # in-flight calls may finish for this long at stop
    kill_after_s: float = 2.0  # SIGTERM, then SIGKILL after this long

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> Timeouts:
        raw = environ.get("REA_TIMEOUTS", "").strip()
        if not raw:
            return cls()
        values: dict[str, float] = {}
        names = {f.name for f in dataclasses.fields(cls)}
        for part in raw.split(","):
            key, _, text = part.partition("=")
            key = key.strip()
            try:
                number = float(text)
            except ValueError:
                number = -1.0
            if key not in names or not number > 0:
                raise ReaError(
                    f"REA_TIMEOUTS: {part.strip()!r} is not NAME=SECONDS with NAME one of "
                    f"{', '.join(sorted(names))}; fix or unset it"
                )
            values[key] = number
        return cls(**values)

    @property
    def servers_stop_s(self) -> float:
        """How long stopping every server may take (they stop at once): a child's stdin
        closed (0.5 s), SIGTERM then SIGKILL after kill_after_s, the same again for helpers
        left in its group; a remote server's DELETE and joins take kill_after_s (§5)."""
        return 2 * self.kill_after_s + 1.5


class RpcError(Exception):
    """A JSON-RPC error to send back: code, message and optional data."""

    def __init__(self, code: int, message: str, data: object = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.data = data

    def to_json(self) -> JsonObj:
        err: JsonObj = {"code": self.code, "message": self.message}
        if self.data is not None:
            err["data"] = self.data
        return err


OnDone = Callable[[JsonObj | None, Exception | None], None]


def as_obj(value: object) -> JsonObj | None:
    """The value as a JSON object, or None: the one narrowing at the JSON boundary."""
    return value if isinstance(value, dict) else None


def meta_of(params: JsonObj | None) -> JsonObj | None:
    return as_obj(params.get("_meta")) if params else None


def takes_tasks(caps: JsonObj) -> bool:
    """Whether a peer runs `tools/call` as a task (2025-11-25 `tasks` capability)."""
    tasks = as_obj(caps.get("tasks")) or {}
    tools = as_obj((as_obj(tasks.get("requests")) or {}).get("tools")) or {}
    return "call" in tools


def knows_tasks(caps: JsonObj) -> bool:
    """Whether a client declared tasks: the 2025-11-25 capability or the 2026-07-28
    extension (SEP-2663)."""
    extensions = as_obj(caps.get("extensions")) or {}
    return "tasks" in caps or "io.modelcontextprotocol/tasks" in extensions


def is_request_id(value: object) -> bool:
    """A JSON-RPC id we accept: a string or an integer (never a bool, float or object)."""
    return isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool))


def encode(msg: JsonObj) -> bytes:
    text = COMPACT_JSON.encode(msg)
    try:
        return text.encode() + b"\n"
    except UnicodeEncodeError:  # a lone surrogate (JS strings cut mid-emoji): escape it alone
        return escape_lone_surrogates(text).encode() + b"\n"


class LineBuffer:
    """Newline-framed messages out of a byte stream (stdio JSON-RPC): `feed` returns
    the complete lines, each with its newline. A line longer than `limit` is dropped up
    to its end and reported once through `too_long`, never buffered without end."""

    def __init__(self, limit: int, too_long: Callable[[], None]) -> None:
        self._limit = limit
        self._too_long = too_long
        self._buf = bytearray()
        self._skipping = False  # inside a line longer than the limit: drop up to its end

    def feed(self, chunk: bytes) -> list[bytes]:
        buf = self._buf
        buf += chunk
        lines: list[bytes] = []
        start = 0
        while (end := buf.find(b"\n", start)) >= 0:
            if self._skipping:
                self._skipping = False
            else:
                lines.append(bytes(buf[start : end + 1]))
            start = end + 1
        del buf[:start]
        if len(buf) > self._limit:
            buf.clear()
            if not self._skipping:
                self._skipping = True
                self._too_long()
        return lines

    def rest(self) -> bytes:
        """At the end of the stream: a last line with no newline (a script's printf)."""
        return bytes(self._buf) if self._buf.strip() and not self._skipping else b""


def encode_batch(msgs: list[JsonObj]) -> bytes:
    """The answers to one batch, as one JSON array on one line."""
    text = COMPACT_JSON.encode(msgs)
    try:
        return text.encode() + b"\n"
    except UnicodeEncodeError:
        return escape_lone_surrogates(text).encode() + b"\n"


def _finite(text: str) -> float:
    value = float(text)
    if math.isinf(value):  # 1e400: no double holds it, and Infinity is not JSON
        raise ValueError(f"number out of range: {text[:40]}")
    return value


def _no_constant(name: str) -> object:
    raise ValueError(f"{name} is not JSON")


_JSON = json.JSONDecoder(parse_float=_finite, parse_constant=_no_constant)  # made once


def decode(line: bytes | str) -> object:
    """One JSON document (a JSON-RPC line, an answer from the network) parsed; ValueError
    for anything that is not JSON: nesting too deep for the parser (a RecursionError is
    not a ValueError), NaN and Infinity, and a number no double holds (it would leave as
    Infinity, which no JSON parser reads)."""
    try:
        if isinstance(line, bytes):
            # what json.loads does with bytes, minus the guess for the common case:
            # two ASCII characters, neither NUL, open a UTF-8 line (no BOM, not UTF-16/32)
            start = line[:2]
            plain = len(start) == 2 and start.isascii() and b"\0" not in start
            encoding = "utf-8" if plain else json.detect_encoding(line)
            line = line.decode(encoding, "surrogatepass")
        return _JSON.decode(line)
    except RecursionError:
        raise ValueError("nested too deeply") from None
    except UnicodeDecodeError as exc:
        raise ValueError("not UTF-8") from exc


def map_strings(value: object, change: Callable[[str], str]) -> object:
    """A copy of a JSON value with `change` applied to every string in it, keys included.
    Iterative: a value nested as deeply as the parser allows cannot exhaust the stack."""
    if isinstance(value, str):
        return change(value)
    if not isinstance(value, dict | list):
        return value
    top: dict[str, object] | list[object] = dict(value) if isinstance(value, dict) else list(value)
    todo: list[dict[str, object] | list[object]] = [top]
    while todo:
        node = todo.pop()
        pairs = list(node.items()) if isinstance(node, dict) else list(enumerate(node))
        if isinstance(node, dict):
            node.clear()
        for key, item in pairs:
            if isinstance(item, dict | list):
                item = dict(item) if isinstance(item, dict) else list(item)
                todo.append(item)
            elif isinstance(item, str):
                item = change(item)
            if isinstance(node, dict):
                node[change(str(key))] = item
            else:
                node[int(key)] = item
    return top


def id_key(value: object) -> tuple[str, object]:
    """A request id as a dict key: 1 and "1" are different ids in JSON-RPC."""
    return (type(value).__name__, value)


def trace_id(params: JsonObj | None) -> str | None:
    """The trace id of a W3C `traceparent` in the request's `_meta` (SEP-414), if any."""
    parent = (meta_of(params) or {}).get("traceparent")
    if isinstance(parent, str):
        parts = parent.split("-")
        if len(parts) >= 4 and len(parts[1]) == 32 and _HEX_RE.match(parts[1]):
            return parts[1]
    return None


_HEX_RE = re.compile(r"^[0-9a-f]+$")


def shaped_result(result: JsonObj, era: Era | None) -> JsonObj:
    """A result as the client's era wants it: stateless results carry `resultType`,
    handshake results carry none of the stateless-only fields."""
    if era is Era.STATELESS:
        return {**result, "resultType": result.get("resultType", "complete")}
    if "resultType" in result or "ttlMs" in result or "cacheScope" in result:
        return {k: v for k, v in result.items() if k not in ("resultType", "ttlMs", "cacheScope")}
    return result


def tool_error_result(text: str) -> JsonObj:
    return {"content": [{"type": "text", "text": text}], "isError": True}


# Tool names ##################################################################

_NAME_OK = re.compile(r"^[A-Za-z0-9_.-]+$")
_NAME_BAD_CHARS = re.compile(r"[^A-Za-z0-9_.-]")


def exposed_tool_name(server: str, tool: str, max_len: int) -> str:
    """`server__tool`, shortened deterministically when too long or not name-safe (§5).

    The Claude API caps tool names at 64 characters and Claude Code prefixes
    `mcp__<gateway>__`, so one long name would otherwise break the client's whole list.
    """
    full = f"{server}__{tool}"
    if len(full) <= max_len and _NAME_OK.fullmatch(full):  # fullmatch: `$` lets "x\n" by
        return full
    digest = hashlib.sha256(full.encode("utf-8", "surrogatepass")).hexdigest()[:8]
    prefix = _NAME_BAD_CHARS.sub("_", full)[: max(1, max_len - 9)]
    return f"{prefix}_{digest}"


# Transports ##################################################################
#
# What a Downstream speaks through. A transport sends requests and notifications to
# one server and delivers each request's outcome exactly once (`on_done`): the answer,
# a timeout, or the transport's end. The server's own messages (notifications, requests
# to the client) go to `on_message`; the end of a child process to `on_exit`. The child
# process is here; the remote HTTP server (§13) fits beside it.


class ChildDied(Exception):
    """The server's process exited or its pipes broke while a request was in flight."""


@dataclass
class Pending:
    """A request sent to a server, waiting for its answer, its deadline or the end."""

    method: str
    sent_at: float
    deadline: float
    on_done: OnDone


_K = TypeVar("_K")
_V = TypeVar("_V")


def take_due(
    table: dict[_K, _V], now: float, deadline: Callable[[_V], float]
) -> tuple[list[tuple[_K, _V]], float | None]:
    """(The caller holds the lock of `table`.) Remove the entries whose deadline has
    passed and return them, with the soonest deadline of those left, if any."""
    due = [(key, value) for key, value in table.items() if deadline(value) <= now]
    for key, _ in due:
        del table[key]
    return due, min((deadline(value) for value in table.values()), default=None)


class PendingRequests:
    """The requests in flight to one server. Ids are this server's own counter, so ids
    from the client (or from other servers) can never collide; the caller keeps the
    mapping. Every request is delivered exactly once: whoever takes it delivers it."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._lock = threading.Lock()  # guards: _pending, _next_id, _closed
        self._pending: dict[int, Pending] = {}
        self._next_id = 0
        self._closed = False

    def add(self, method: str, timeout_s: float, on_done: OnDone) -> tuple[int, float]:
        now = time.monotonic()
        with self._lock:
            if self._closed:
                raise ChildDied(f"server {self.name} is not running")
            self._next_id += 1
            deadline = now + timeout_s
            self._pending[self._next_id] = Pending(method, now, deadline, on_done)
            return self._next_id, deadline

    def take(self, request_id: object) -> Pending | None:
        if not isinstance(request_id, int) or isinstance(request_id, bool):
            return None
        with self._lock:
            return self._pending.pop(request_id, None)

    def waiting(self, request_id: int) -> bool:
        """Whether the request still waits: nobody has taken it to deliver its outcome."""
        with self._lock:
            return request_id in self._pending

    def due(self, now: float) -> tuple[list[tuple[int, Pending]], float | None]:
        """Take the requests past their deadline; also the next deadline, if any."""
        with self._lock:
            return take_due(self._pending, now, lambda pending: pending.deadline)

    def close(self) -> list[Pending]:
        """No more requests; take every one still waiting."""
        with self._lock:
            self._closed = True
            pending = list(self._pending.values())
            self._pending.clear()
        return pending

    @property
    def closed(self) -> bool:
        with self._lock:
            return self._closed

    def deliver(self, msg: JsonObj) -> None:
        """A response from the server: hand it to its waiter, or drop it when nobody waits
        (a late answer to a timed-out or cancelled request is never delivered, §9)."""
        pending = self.take(msg.get("id"))
        if pending is None:
            return
        error = as_obj(msg.get("error"))
        if error is not None:
            code = error.get("code")
            pending.on_done(
                None,
                RpcError(
                    code
                    if isinstance(code, int) and not isinstance(code, bool)
                    else INTERNAL_ERROR,
                    str(error.get("message", "error")),
                    error.get("data"),
                ),
            )
            return
        result = as_obj(msg.get("result"))
        if result is None:
            pending.on_done(None, RpcError(INTERNAL_ERROR, "malformed result from server"))
        else:
            pending.on_done(result, None)


class Transport(Protocol):
    """What a Downstream speaks through: a child process, or a remote server (§13). Both
    subclass it for `request` and `notify`, made of their own `request_async` and `send`."""

    name: str
    era: Era
    version: str
    stopping: bool

    @property
    def alive(self) -> bool: ...

    @property
    def pid(self) -> int | None: ...

    def request_async(
        self, method: str, params: JsonObj | None, timeout_s: float, on_done: OnDone
    ) -> int: ...

    def request(self, method: str, params: JsonObj | None, timeout_s: float) -> JsonObj:
        """Send a request and wait for its result (raises what request_async's on_done gets:
        RpcError, ChildDied, TimeoutError)."""
        return wait_for(lambda done: self.request_async(method, params, timeout_s, done))

    def notify(self, method: str, params: JsonObj | None = None) -> None:
        msg: JsonObj = {"jsonrpc": "2.0", "method": method}
        if params is not None:
            msg["params"] = params
        self.send(msg)

    def send(self, msg: JsonObj) -> None: ...

    def cancel(self, request_id: int, reason: str) -> bool: ...

    def expire(self, now: float) -> float | None: ...

    def stop(self) -> None: ...

    def last_stderr(self) -> str: ...


def wait_for(request: Callable[[OnDone], object]) -> JsonObj:
    """Run an asynchronous request and wait for its outcome (raises what it failed with)."""
    done = threading.Event()
    box: list[tuple[JsonObj | None, Exception | None]] = []

    def finish(result: JsonObj | None, error: Exception | None) -> None:
        box.append((result, error))
        done.set()

    request(finish)
    done.wait()
    result, error = box[0]
    if error is not None:
        raise error
    assert result is not None
    return result


class ChildProcess(Transport):
    """One running process of a downstream server: its pipes and the threads that own
    them. `rea-child-NAME` reads its stdout, `rea-stderr-NAME` drains its stderr into a
    bounded ring, and `rea-write-NAME` writes its stdin from a queue (§9): a child busy
    with one request, its pipe full, blocks nobody but its own writer."""

    def __init__(
        self,
        name: str,
        argv: list[str],
        env: dict[str, str],
        cwd: Path,
        on_message: Callable[[ChildProcess, JsonObj], None],
        on_exit: Callable[[ChildProcess, int | None], None],
        deadlines: Deadlines,
        timeouts: Timeouts,
    ) -> None:
        self.name = name
        self._on_message = on_message
        self._on_exit = on_exit
        self._deadlines = deadlines
        self._timeouts = timeouts
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            cwd=cwd,
            start_new_session=True,  # the client's Ctrl-C reaches the gateway, which stops us in order
        )
        assert self.proc.stdin is not None
        self._stdin_fd = self.proc.stdin.fileno()
        os.set_blocking(self._stdin_fd, False)  # nobody ever waits in a write: see send()
        self.era = Era.HANDSHAKE
        self.version = HANDSHAKE_VERSIONS[0]
        self.stopping = False
        self.stderr_tail: collections.deque[str] = collections.deque(maxlen=40)
        self.requests = PendingRequests(name)
        self._out_lock = threading.Lock()  # guards: _outbox, _closing, _writing_since
        self._out_ready = threading.Condition(self._out_lock)  # the writer has work
        self._outbox: collections.deque[bytes] = collections.deque()
        self._closing = False
        self._writing_since: float | None = None  # a write the child has not taken yet
        self._threads = [
            threading.Thread(target=self._read_stdout, name=f"rea-child-{name}", daemon=True),
            threading.Thread(target=self._read_stderr, name=f"rea-stderr-{name}", daemon=True),
            threading.Thread(target=self._write_stdin, name=f"rea-write-{name}", daemon=True),
            threading.Thread(target=self._watch_exit, name=f"rea-exit-{name}", daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    @property
    def pid(self) -> int | None:
        return self.proc.pid

    @property
    def alive(self) -> bool:
        return not self.requests.closed

    # -- sending --

    def send(self, msg: JsonObj) -> None:
        """Hand one message to the child's stdin without ever waiting for it. The writer
        thread owns the pipe; when it is idle and the pipe takes the whole message at
        once, the sender writes it directly (no thread hop on the hot path). Anything
        that would wait, the rest of a partial write included, is queued for the writer."""
        data = encode(msg)
        with self._out_lock:
            if self._closing or self.requests.closed:
                raise ChildDied(f"server {self.name}: its stdin is closed")
            if not self._outbox and self._writing_since is None:
                try:
                    written = os.write(self._stdin_fd, data)
                except BlockingIOError:
                    written = 0
                except OSError:
                    raise ChildDied(f"server {self.name}: its stdin is closed") from None
                if written == len(data):
                    return
                data = data[written:]
            self._outbox.append(data)
            self._out_ready.notify()

    def request_async(
        self, method: str, params: JsonObj | None, timeout_s: float, on_done: OnDone
    ) -> int:
        """Send a request; on_done(result, error) is called exactly once, from some thread."""
        request_id, deadline = self.requests.add(method, timeout_s, on_done)
        msg: JsonObj = {"jsonrpc": "2.0", "id": request_id, "method": method}
        if params is not None:
            msg["params"] = params
        try:
            self.send(msg)
        except ChildDied:
            if self.requests.take(request_id) is not None:
                raise
            return request_id  # the child died meanwhile and its death delivered the outcome
        self._deadlines.watch(self, deadline)
        return request_id

    def cancel(self, request_id: int, reason: str) -> bool:
        """Forget a request and tell the child; its waiter gets a cancellation error."""
        pending = self.requests.take(request_id)
        if pending is None:
            return False
        try:
            self.notify("notifications/cancelled", {"requestId": request_id, "reason": reason})
        except ChildDied:
            pass
        pending.on_done(None, RpcError(INTERNAL_ERROR, reason))
        return True

    def expire(self, now: float) -> float | None:
        """Fail requests past their deadline; return the next deadline, if any. A child that
        has taken none of its input for as long as a call may wait is stuck: killed (§9)."""
        expired, soonest = self.requests.due(now)
        with self._out_lock:
            since = self._writing_since
        for request_id, pending in expired:
            if since is not None and since <= pending.sent_at:
                log("error", "child_stalled", server=self.name, waited_s=round(now - since, 1))
                self.signal(signal.SIGKILL)
            try:  # a late answer will find no pending entry and is dropped (§9)
                self.notify(
                    "notifications/cancelled", {"requestId": request_id, "reason": "timeout"}
                )
            except ChildDied:
                pass
            try:
                pending.on_done(None, TimeoutError(f"server {self.name} did not answer in time"))
            except Exception as exc:  # the timeout thread serves everyone: never let it die
                log_bug("timeout", exc, server=self.name)
        return soonest

    # -- the child's threads --

    def _write_stdin(self) -> None:
        stdin = self.proc.stdin
        assert stdin is not None
        fd = self._stdin_fd
        try:
            while True:
                with self._out_lock:
                    while not self._outbox and not self._closing:
                        self._out_ready.wait()
                    if self._closing:
                        break
                    data = self._outbox.popleft()
                    self._writing_since = time.monotonic()
                view = memoryview(data)
                while view:
                    try:
                        view = view[os.write(fd, view) :]
                    except BlockingIOError:  # a busy child: wait for room, only here
                        select.select([], [fd], [], 0.5)
                        with self._out_lock:
                            if self._closing:
                                return
                with self._out_lock:
                    self._writing_since = None
        except OSError:
            pass  # the child is gone: its reader sees the end and reports it
        finally:
            with self._out_lock:
                self._closing = True
                self._outbox.clear()
                self._writing_since = None
            with contextlib.suppress(OSError):
                stdin.close()

    def _watch_exit(self) -> None:
        """The child's own exit, seen even when a helper it started still holds its
        stdout open (then the reader would never see the end): the helpers of a dead
        server are killed, its pipes close, and its death is handled as any other."""
        self.proc.wait()
        if self.stopping:
            return
        self._threads[0].join(timeout=1.0)
        if self._threads[0].is_alive() and not self.stopping:
            log("warn", "child_helpers_killed", server=self.name, pid=self.proc.pid)
            self.signal(signal.SIGKILL)

    def _read_stdout(self) -> None:
        stdout = self.proc.stdout
        assert stdout is not None
        fd = stdout.fileno()
        lines = LineBuffer(
            MAX_LINE, lambda: log("error", "child_line_too_long", server=self.name, limit=MAX_LINE)
        )
        try:
            while chunk := os.read(fd, 1 << 16):
                # One burst per read: the answers it brings are recorded in one audit
                # append and sent to the client in one write (HeldOutput).
                with HeldOutput.burst():
                    for line in lines.feed(chunk):
                        self._take_line(line)
            if last := lines.rest():
                self._take_line(last)
        except (OSError, ValueError):
            pass
        self._died()

    def _take_line(self, line: bytes) -> None:
        try:
            self._handle_line(line)
        except Exception as exc:  # a bug handling one message must not end the child
            log_bug("child_message", exc, server=self.name)

    def _handle_line(self, line: bytes) -> None:
        try:
            msg = as_obj(decode(line))
        except ValueError:
            msg = None
        if msg is None:
            if line.strip():
                # its content is not logged: it may carry anything, secrets included
                log("warn", "child_sent_non_json", server=self.name, bytes=len(line))
            return
        if "method" not in msg and "id" in msg:
            self.requests.deliver(msg)
            return
        self._on_message(self, msg)

    def _read_stderr(self) -> None:
        stderr = self.proc.stderr
        assert stderr is not None
        partial = b""
        try:
            while True:
                chunk = stderr.read1(65536)  # type: ignore[attr-defined]
                if not chunk:
                    break
                lines = (partial + chunk).split(b"\n")
                partial = lines.pop()[-4096:]  # a line with no end is kept bounded
                for raw in lines:
                    text = raw.decode("utf-8", "replace").rstrip()
                    if text:
                        self.stderr_tail.append(text[:500])
        except (OSError, ValueError):
            pass
        if partial.strip():
            self.stderr_tail.append(partial.decode("utf-8", "replace")[:500])

    def _died(self) -> None:
        pending = self.requests.close()
        with self._out_lock:
            self._closing = True
            self._out_ready.notify()
        code: int | None
        try:
            code = self.proc.wait(timeout=2)
        except subprocess.TimeoutExpired:
            code = None
        self._threads[1].join(timeout=1)  # the last stderr lines explain the exit
        reason = f"server {self.name} exited" + (f" with code {code}" if code is not None else "")
        tail = self.last_stderr()
        for p in pending:
            try:
                p.on_done(None, ChildDied(reason + (f": {tail}" if tail else "")))
            except Exception as exc:
                log_bug("child_died", exc, server=self.name)
        self._on_exit(self, code)

    def last_stderr(self) -> str:
        return " | ".join(list(self.stderr_tail)[-3:])

    # -- stopping --

    def stop(self) -> None:
        """Close stdin; then SIGTERM; then SIGKILL after kill_after_s; reap and join the
        child's threads, so that every answer it gave has been delivered (§5)."""
        self.stopping = True
        with self._out_lock:
            self._closing = True
            self._outbox.clear()
            self._out_ready.notify()
        if not _wait(self.proc, 0.5):
            self.signal(signal.SIGTERM)
            if not _wait(self.proc, self._timeouts.kill_after_s):
                self.signal(signal.SIGKILL)
                _wait(self.proc, 5)
        # helpers it left in its process group: SIGTERM, then SIGKILL (no orphan, §5)
        if _group_members(self.proc.pid):
            self.signal(signal.SIGTERM)
            deadline = time.monotonic() + self._timeouts.kill_after_s
            while _group_members(self.proc.pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            if _group_members(self.proc.pid):
                self.signal(signal.SIGKILL)
        me = threading.current_thread()
        for thread in self._threads:
            if thread is not me:
                thread.join(timeout=5)

    def signal(self, sig: int) -> None:
        try:
            os.killpg(self.proc.pid, sig)  # the child's own session: its helpers go too
        except (ProcessLookupError, PermissionError):
            try:
                self.proc.send_signal(sig)
            except ProcessLookupError:
                pass


def _group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes of a process group, from /proc (Linux); elsewhere
    whether kill(0) reaches any."""
    proc = Path("/proc")
    if not proc.is_dir():
        try:
            os.killpg(pgid, 0)
        except OSError:
            return []
        return [pgid]
    members: list[int] = []
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text(encoding="ascii", errors="replace")
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()
        if len(fields) > 2 and fields[2] == str(pgid) and fields[0] not in ("Z", "X"):
            members.append(int(entry.name))
    return members


def _wait(proc: subprocess.Popen[bytes], timeout: float) -> bool:
    try:
        proc.wait(timeout=timeout)
        return True
    except subprocess.TimeoutExpired:
        return False


class Expiring(Protocol):
    """Something with deadlines: expire what is due, return the next deadline or None."""

    def expire(self, now: float) -> float | None: ...


class Deadlines:
    """One thread, `rea-timeouts`, that expires whatever has a deadline: requests to
    servers, calls waiting for a client's retry, the gateway's requests to the client,
    tasks. Cheaper than a Timer per call, and joined at stop."""

    def __init__(self) -> None:
        self._lock = threading.Lock()  # guards: _sources, _wake_at, _closed
        self._wake = threading.Condition(self._lock)  # a sooner deadline, or the close
        # source -> how often it was watched: a watch during its expire() keeps it
        self._sources: dict[Expiring, int] = {}
        self._wake_at = float("inf")  # when the thread will next look
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="rea-timeouts", daemon=True)
        self._thread.start()

    def watch(self, source: Expiring, deadline: float) -> None:
        with self._lock:
            self._sources[source] = self._sources.get(source, 0) + 1
            if deadline < self._wake_at:
                self._wake_at = deadline
                self._wake.notify()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._wake.notify()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=5)

    def _run(self) -> None:
        while True:
            with self._lock:
                if self._closed:
                    return
                self._wake_at = float("inf")  # not waiting: a watch meanwhile lowers it
                sources = list(self._sources.items())
            now = time.monotonic()
            soonest: float | None = None
            for source, watched in sources:
                try:
                    nxt = source.expire(now)
                except Exception as exc:  # one broken source must not stop every deadline
                    log_bug("deadlines", exc)
                    nxt = None
                if nxt is None:
                    with self._lock:
                        if self._sources.get(source) == watched:  # nothing new meanwhile
                            del self._sources[source]
                elif soonest is None or nxt < soonest:
                    soonest = nxt
            with self._lock:
                if self._closed:
                    return
                # the soonest of what we saw and of what was watched while we looked
                due = min(soonest if soonest is not None else float("inf"), self._wake_at)
                wait = min(1.0, max(0.005, due - time.monotonic()))
                self._wake_at = time.monotonic() + wait
                self._wake.wait(wait)


def child_meta(version: str) -> JsonObj:
    """The `_meta` a stateless-era request to a server must carry."""
    return {
        META_VERSION: version,
        META_CAPS: {},
        META_CLIENT: {"name": "rea", "version": VERSION},
    }


def transport_params(transport: Transport, params: JsonObj) -> JsonObj:
    """The client's params as the server's era wants them (§5: translate both ways).
    The client's own protocol keys never reach a server; trace context does."""
    meta = {
        k: v
        for k, v in (as_obj(params.get("_meta")) or {}).items()
        if not k.startswith("io.modelcontextprotocol/")
    }
    if transport.era is Era.STATELESS:
        meta.update(child_meta(transport.version))
    out = {k: v for k, v in params.items() if k != "_meta"}
    if meta:
        out["_meta"] = meta
    return out


def open_transport(
    transport: Transport, timeouts: Timeouts, client_caps: JsonObj | None = None
) -> JsonObj:
    """Speak to the server in the era it serves; return its capabilities.

    Probe server/discover first; fall back to the handshake (initialize) otherwise. A
    handshake server is told only the client capabilities the gateway can relay and the
    client itself declared (a server must not ask a client that cannot sample to sample).
    """
    stateless, caps = probe_stateless(transport, timeouts)
    if stateless is not None:
        transport.era, transport.version = Era.STATELESS, stateless
        return caps
    result = transport.request(
        "initialize",
        {
            "protocolVersion": HANDSHAKE_VERSIONS[0],
            "capabilities": client_caps or {},
            "clientInfo": {"name": "rea", "version": VERSION},
        },
        timeouts.handshake_s,
    )
    version = result.get("protocolVersion")
    if not isinstance(version, str) or version not in HANDSHAKE_VERSIONS:
        raise ValueError(
            f"server {transport.name} answered initialize with unsupported version {version!r}"
        )
    transport.era, transport.version = Era.HANDSHAKE, version
    transport.notify("notifications/initialized")
    return as_obj(result.get("capabilities")) or {}


def probe_stateless(transport: Transport, timeouts: Timeouts) -> tuple[str | None, JsonObj]:
    """The stateless version to use (None: handshake era) and the capabilities seen (§5).

    Only -32022 means "stay stateless at one of the versions it lists"; any other error,
    a malformed answer or silence means handshake — never keyed on one error code.
    """
    params: JsonObj = {"_meta": child_meta(STATELESS_VERSIONS[0])}
    try:
        result = transport.request("server/discover", params, timeouts.discover_s)
    except RpcError as exc:
        if exc.code != UNSUPPORTED_VERSION:
            return None, {}
        offered = (as_obj(exc.data) or {}).get("supported")
        versions = offered if isinstance(offered, list) else []
        return next((v for v in STATELESS_VERSIONS if v in versions), None), {}
    except TimeoutError:
        return None, {}
    supported = result.get("supportedVersions")
    if not isinstance(supported, list):
        return None, {}
    version = next((v for v in STATELESS_VERSIONS if v in supported), None)
    return version, (as_obj(result.get("capabilities")) or {}) if version else {}


def list_all(transport: Transport, method: str, key: str, timeout_s: float) -> list[JsonObj]:
    """Every item a server lists (tools, resources, templates, prompts), following
    nextCursor, bounded: a server that pages forever is cut off."""
    items: list[JsonObj] = []
    cursor: object = None
    for _ in range(100):
        params: JsonObj = {} if cursor is None else {"cursor": cursor}
        result = transport.request(method, transport_params(transport, params), timeout_s)
        page = result.get(key)
        if not isinstance(page, list):
            raise ValueError(f"server {transport.name}: {method} result has no {key} list")
        items.extend(obj for obj in map(as_obj, page) if obj is not None)
        cursor = result.get("nextCursor")
        if not cursor:
            break
    return items


def list_tools(transport: Transport, timeout_s: float) -> list[JsonObj]:
    """The server's tools; one without a string name is skipped with a warning."""
    tools: list[JsonObj] = []
    for tool in list_all(transport, "tools/list", "tools", timeout_s):
        if isinstance(tool.get("name"), str):
            tools.append(tool)
        else:
            log("warn", "tool_skipped", server=transport.name, reason="tool without a string name")
    return tools


# Remote transport ############################################################
#
# A registry entry with `url:` is a remote MCP server spoken to over Streamable HTTP (§13),
# through a transport with the face of ChildProcess: a Downstream drives either. Each request
# is its own POST on a kept-alive connection, answered as JSON or as an event stream that may
# carry the server's notifications and requests first. Handshake era: `initialize` assigns an
# Mcp-Session-Id that goes on every later message, a GET stream carries the server's own
# messages, and a 404 on the session opens a new one. Stateless era (2026-07-28): no session,
# and every request mirrors its version, method and name into headers. The bearer token comes
# from a TokenProvider (the OAuth section's TokenSource); a 401 it cannot mend is NeedsLogin.

ACCEPT = "application/json, text/event-stream"  # Streamable HTTP: a client MUST list both
MAX_CONNECTIONS = 8  # requests in flight at once per remote server; more wait their turn
CONNECT_TIMEOUT_S = 10.0
# Each of these is a deadline for the whole exchange, kept by expire(): a per-read socket
# timeout alone lets a server that sends a byte now and then hold a connection for ever.
SEND_TIMEOUT_S = 30.0  # one notification or response POST
DELETE_TIMEOUT_S = 2.0  # ending the session at stop is best effort (and within kill_after_s)
DRAIN_TIMEOUT_S = 2.0  # what may follow the answer on an event stream, read to keep the connection
MAX_RESUMES = 3  # GETs with Last-Event-ID after a stream broke before its answer (2025-11-25)
LISTEN_RETRY_S = 1.0  # the GET stream is opened again after this, or after the server's `retry:`
LISTEN_RETRY_MIN_S = 0.5  # ... but never sooner: `retry: 0` must not make a hot loop
LISTEN_STEADY_S = 10.0  # a GET stream open this long (or with messages) did not end "at once"
LISTEN_BACKOFF_MAX_S = 30.0  # streams that end at once double the wait, up to this
MAX_ERROR_BODY = 64 * 1024
MAX_PROBLEM = 300  # characters of last_stderr()

# Methods that change nothing on the server: when a kept-alive connection breaks after one of
# them was sent and before any answer, it may go out once more. A tools/call never does: the
# server may have run it (§9, at most once); nor initialize (it would orphan a session).
_RESENDABLE = frozenset(
    {
        "server/discover",
        "ping",
        "tools/list",
        "resources/list",
        "resources/templates/list",
        "resources/read",
        "prompts/list",
        "prompts/get",
        "completion/complete",
    }
)
_SESSION_ID_RE = re.compile(r"^[\x21-\x7e]{1,1024}$")  # 2025-11-25 Session Management 1


def _net_errors(*more: type[Exception]) -> tuple[type[Exception], ...]:
    """What a failed HTTP exchange raises (ValueError: a TLS socket aborted under it), and
    `more`. http.client is imported here, not at the top: a `serve` of local servers never
    needs it."""
    import http.client

    return (OSError, http.client.HTTPException, ValueError, *more)


class TransportFailed(ChildDied):
    """An exchange with a remote server failed: its connection, or its answer. For the
    gateway it is what a dead child is: the call fails and is not sent again."""


class ServerUnreachable(TransportFailed):
    """No connection to the server could be opened: the transport ends and says so through
    on_exit, so that the supervisor reconnects with backoff (§9, §13)."""


class NeedsLogin(TransportFailed):
    """The server wants a token rea does not have, or a refresh was refused (§13). Its text
    is the line a call answers; `why` is for the log. The request never ran."""

    def __init__(self, server: str, why: str = "") -> None:
        super().__init__(f"server {server} needs a login: python rea.py login {server}")
        self.server = server
        self.why = why


class _Abandoned(Exception):
    """The request was taken by a timeout, a cancellation or stop while its exchange ran."""


class TokenProvider(Protocol):
    """Where a remote transport gets its bearer token (the OAuth section's TokenSource)."""

    def serves(self, url: str) -> bool:
        """Whether the token may go to this URL (no token passthrough)."""
        ...

    def access_token(self, *, refresh: bool = True) -> str | None:
        """The token to send now, or None; may refresh first; NeedsLogin when it cannot."""
        ...

    def after_unauthorized(self, used: str | None) -> None:
        """A 401 came back for `used`: make a better token available, or raise NeedsLogin."""
        ...

    def scrub(self, text: str) -> str:
        """The text with every token this provider has held taken out."""
        ...


def expanded_headers(spec: ServerSpec, environ: Mapping[str, str]) -> dict[str, str]:
    """A remote server's `headers:` with ${VAR} expanded; ReaError for an unset variable or
    a value that cannot be sent (the value is never shown: it may be a secret)."""
    headers: dict[str, str] = {}
    for key, template in spec.headers.items():
        value = expand_env(template, environ, spec.name, key, "header")
        problem = header_value_problem(value)
        if problem is not None:
            raise ReaError(
                f"server {spec.name!r}: header {key}: its value {problem} once expanded; "
                "fix the variable it uses"
            )
        headers[key] = value
    return headers


def header_value(text: str) -> str:
    """A value for Mcp-Name or Mcp-Param-*: plain when header-safe, else the Base64 sentinel.

    2026-07-28 Streamable HTTP, Value Encoding: non-ASCII, control characters, leading or
    trailing whitespace, or a plain value that looks like the sentinel, are Base64-encoded.
    """
    plain = all(0x20 <= ord(ch) <= 0x7E or ch == "\t" for ch in text)
    sentinel = text.startswith("=?base64?") and text.endswith("?=")
    if plain and text == text.strip(" \t") and not sentinel:
        return text
    return "=?base64?" + base64.b64encode(text.encode()).decode("ascii") + "?="


def canonical_resource(url: str) -> str:
    """The canonical URI of a server (RFC 8707 §2, MCP authorization "Canonical Server URI"):
    lower-case scheme and host, no default port, no fragment, no trailing slash."""
    parts = urllib.parse.urlsplit(url)
    scheme = parts.scheme.lower()
    host = (parts.hostname or "").lower()
    if ":" in host:
        host = f"[{host}]"
    port = parts.port
    default = (scheme, port) in (("https", 443), ("http", 80))
    netloc = host if port is None or default else f"{host}:{port}"
    return urllib.parse.urlunsplit((scheme, netloc, parts.path.rstrip("/"), parts.query, ""))


def resource_covers(resource: str, url: str) -> bool:
    """Whether a token for `resource` may be sent to `url`: same origin, and the URL's path is
    the resource's or below it. Anything else is another server (no token passthrough)."""
    try:
        r = urllib.parse.urlsplit(canonical_resource(resource))
        u = urllib.parse.urlsplit(canonical_resource(url))
    except ValueError:
        return False
    if (r.scheme, r.netloc) != (u.scheme, u.netloc) or not r.netloc:
        return False
    return not r.path or u.path == r.path or u.path.startswith(r.path + "/")


def covered_neighbour(resource: str, url: str, neighbours: Mapping[str, str]) -> str | None:
    """The other server (name) a token for `resource`, meant for the server at `url`, would
    be valid at too; None when there is none.

    A resource above a server's URL is accepted (real servers declare their origin while
    they serve /mcp), unless it also covers the URL of another server of the registry: a
    hostile server below an honest one (/mcp/evil under /mcp) could name the honest one's
    metadata, have rea mint a token for it, and replay it there. The server's own URL as
    the resource is always fine.
    """
    if canonical_resource(resource) == canonical_resource(url):
        return None
    for name, other in sorted(neighbours.items()):
        if resource_covers(resource, other):
            return name
    return None


def _reason(exc: BaseException) -> str:
    """A short, secret-free reason for a network failure."""
    import http.client
    import ssl

    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"TLS certificate not trusted: {exc.verify_message}"
    if isinstance(exc, http.client.RemoteDisconnected):
        return "the server closed the connection"
    if isinstance(exc, TimeoutError):  # socket.timeout
        return "timed out"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    return type(exc).__name__


@dataclass(frozen=True)
class SseEvent:
    """One event of a text/event-stream body."""

    event: str  # "message" unless the server named it
    data: str
    id: str | None  # the stream's last event ID so far (SSE "last event ID buffer")
    retry_ms: int | None


class _ReadsLines(Protocol):
    def readline(self, size: int = -1, /) -> bytes: ...


def sse_events(body: _ReadsLines) -> Iterator[SseEvent]:
    """The events of an event-stream body until it ends (WHATWG HTML, "Interpreting an event
    stream").

    A block that sets any field is yielded, data or not, so that a priming event's id is seen.
    An event cut off by the end of the body is still yielded: a server that forgets the last
    blank line should not lose its answer. A line or event longer than MAX_LINE ends the stream.
    """
    data: list[str] = []
    size = 0
    event = ""
    last_id: str | None = None
    retry: int | None = None
    fields = False
    while True:
        raw = body.readline(MAX_LINE + 1)
        if not raw:
            break
        if len(raw) > MAX_LINE:
            raise TransportFailed("an event stream line is longer than the limit")
        line = raw.decode("utf-8", "replace").rstrip("\r\n")
        if not line:
            if fields:
                yield SseEvent(event or "message", "\n".join(data), last_id, retry)
            data, size, event, fields = [], 0, "", False
            continue
        if line.startswith(":"):
            continue  # a comment, e.g. a keep-alive
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        fields = True
        if name == "data":
            size += len(value)
            if size > MAX_LINE:
                raise TransportFailed("an event stream event is longer than the limit")
            data.append(value)
        elif name == "event":
            event = value
        elif name == "id" and "\0" not in value:
            last_id = value
        elif name == "retry" and value.isdigit():
            retry = int(value)
    if fields:
        yield SseEvent(event or "message", "\n".join(data), last_id, retry)


def param_header_map(tool: JsonObj) -> tuple[tuple[str, tuple[str, ...]], ...] | str:
    """A tool's x-mcp-header mirrors as (header name, property path), or why the tool is invalid.

    2026-07-28 server/tools "x-mcp-header": a token, unique ignoring case, on a string,
    integer or boolean property reached from the schema root through `properties` keys only.
    """
    found: list[tuple[str, tuple[str, ...]]] = []
    problems: list[str] = []

    def walk(node: object, path: tuple[str, ...] | None, depth: int) -> None:
        if depth > 64:  # deeper than any real schema; nothing below is mirrored
            return
        if isinstance(node, list):
            for item in node:
                walk(item, None, depth + 1)
            return
        if not isinstance(node, dict):
            return
        if "x-mcp-header" in node:
            name = node["x-mcp-header"]
            if path is None:
                problems.append("x-mcp-header on a property not reachable through properties")
            elif not isinstance(name, str) or not _HEADER_NAME_RE.fullmatch(name):
                problems.append(f"x-mcp-header {name!r} is not a header name")
            elif node.get("type") not in ("string", "integer", "boolean"):
                problems.append(
                    f"x-mcp-header {name} is on a property of type {node.get('type')!r}"
                )
            else:
                found.append((name, path))
        for key, value in node.items():
            if key == "properties" and path is not None and isinstance(value, dict):
                for prop, sub in value.items():
                    walk(sub, (*path, str(prop)), depth + 1)
            elif key != "x-mcp-header":
                walk(value, None, depth + 1)

    schema = as_obj(tool.get("inputSchema"))
    if schema is not None:
        walk(schema, (), 0)
    names = [name.lower() for name, _ in found]
    if len(set(names)) != len(names):
        problems.append("two x-mcp-header names are the same ignoring case")
    return "; ".join(problems) if problems else tuple(found)


def _mirrored_value(value: object) -> str | None:
    """A tool argument as an Mcp-Param-* value (2026-07-28 Value Encoding, type conversion)."""
    if value is None:
        return None  # a null value: the header is omitted
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, str):
        return value
    return None


def _stateless_version(params: JsonObj | None) -> str | None:
    """The 2026-07-28 version a message's _meta names, or None (a handshake-era message)."""
    version = (meta_of(params) or {}).get(META_VERSION)
    return version if isinstance(version, str) else None


def _mcp_name(method: str, params: JsonObj | None) -> str | None:
    """What Mcp-Name mirrors: params.name of tools/call and prompts/get, params.uri of
    resources/read."""
    if params is None:
        return None
    key = {"tools/call": "name", "prompts/get": "name", "resources/read": "uri"}.get(method)
    value = params.get(key) if key else None
    return value if isinstance(value, str) else None


def _abort(conn: http.client.HTTPConnection | None) -> None:
    """Break a connection another thread may be reading: its read ends at once."""
    import socket

    sock = conn.sock if conn is not None else None
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)


def _still_open(conn: http.client.HTTPConnection) -> bool:
    """An idle kept-alive connection is usable only if the server has not closed it: a
    readable idle socket means end-of-file (or junk), so no request is ever sent on it."""
    sock = conn.sock
    if sock is None:
        return False
    try:
        readable, _, _ = select.select([sock], [], [], 0)
    except (OSError, ValueError):
        return False
    return not readable


def _content_type(resp: http.client.HTTPResponse) -> str:
    return (resp.getheader("Content-Type") or "").split(";")[0].strip().lower()


def parse_www_authenticate(value: str | None) -> dict[str, str]:
    """The parameters of the Bearer challenge in a WWW-Authenticate header (RFC 9110 §11.6.1,
    RFC 6750 §3), names in lower case; {} without one."""
    if not value:
        return {}
    start = re.search(r"(?:^|,)\s*bearer(?:\s+|$)", value, re.IGNORECASE)
    if start is None:
        return {}
    param = re.compile(
        r'\s*([!#$%&\'*+.^_`|~0-9A-Za-z-]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^\s,"]*)\s*(?:,|$)'
    )
    params: dict[str, str] = {}
    pos = start.end()
    while pos < len(value):
        match = param.match(value, pos)
        if match is None:
            break  # the next challenge's scheme, or something unreadable
        raw = match.group(2)
        if raw.startswith('"'):
            raw = re.sub(r"\\(.)", r"\1", raw[1:-1])
        params.setdefault(match.group(1).lower(), raw)
        pos = match.end()
    return params


@dataclass(eq=False)
class _Request:
    """One JSON-RPC request to a remote server, as its exchange needs it; who waits for it
    is in the transport's PendingRequests."""

    id: int
    method: str
    params: JsonObj | None
    deadline: float
    session_id: str | None = None  # what an initialize answer's Mcp-Session-Id assigned


@dataclass(frozen=True)
class _StreamEnd:
    """How reading an event stream ended."""

    answered: bool
    last_id: str | None
    retry_ms: int | None
    messages: int


class _Lane:
    """Worker threads of one transport for one kind of work, started on demand, at most `size`.

    Each queued item is claimed exactly once — by an idle worker, by a new one, or as backlog
    by a busy worker when it finishes — so no item waits while a thread could run it.
    """

    def __init__(
        self, name_thread: Callable[[], str], size: int, on_bug: Callable[[Exception], None]
    ) -> None:
        self._queue: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._lock = threading.Lock()  # guards: _threads, _idle, _backlog, _closed
        self._threads: list[threading.Thread] = []
        self._idle = 0
        self._backlog = 0
        self._closed = False
        self._size = size
        self._name_thread = name_thread
        self._on_bug = on_bug

    def submit(self, work: Callable[[], None]) -> None:
        thread: threading.Thread | None = None
        with self._lock:
            if self._closed:
                raise TransportFailed("the connection is closed")
            if self._idle:
                self._idle -= 1
            elif len(self._threads) < self._size:
                thread = threading.Thread(target=self._run, name=self._name_thread(), daemon=True)
                self._threads.append(thread)
            else:
                self._backlog += 1
        self._queue.put(work)
        if thread is not None:
            thread.start()

    def _run(self) -> None:
        while True:
            work = self._queue.get()
            if work is None:
                return
            try:
                work()
            except Exception as exc:  # a bug in one exchange must not end the worker
                self._on_bug(exc)
            with self._lock:
                if self._backlog:
                    self._backlog -= 1
                else:
                    self._idle += 1

    def close(self, deadline: float) -> None:
        """Let the workers end once the queue is empty (queued work still runs and finds its
        request gone), and join them until the deadline (monotonic)."""
        with self._lock:
            self._closed = True
            threads = list(self._threads)
        for _ in threads:
            self._queue.put(None)
        for thread in threads:
            if thread is not threading.current_thread() and thread.ident is not None:
                thread.join(max(0.0, deadline - time.monotonic()))


class StreamableHttpTransport(Transport):
    """A remote MCP server over Streamable HTTP, with the face of ChildProcess (§13).

    Each request is its own POST, run by one of this server's worker threads
    (`rea-http-NAME-N`) on a kept-alive connection of its own; the answer is JSON or an event
    stream whose notifications and server requests go to on_message and whose response ends
    the wait. Deadlines are kept by the gateway's Deadlines through expire(), as for a child.
    Notifications and responses are queued and go out in order through one sender thread: the
    client's reader never waits on the network (§9). Request ids are this transport's own.

    In the handshake era a 404 to a request that carried the session id means the server no
    longer knows the session, so it did not process the request: the session is opened again
    (once, for every request that met it) and the request sent again. Nothing that may have
    reached the server is ever sent twice (§9).
    """

    def __init__(
        self,
        name: str,
        url: str,
        headers: Mapping[str, str],
        on_message: Callable[[StreamableHttpTransport, JsonObj], None],
        on_exit: Callable[[StreamableHttpTransport, int | None], None],
        deadlines: Deadlines,
        timeouts: Timeouts,
        auth: TokenProvider | None = None,
        on_needs_login: Callable[[StreamableHttpTransport, NeedsLogin], None] | None = None,
        *,
        max_connections: int = MAX_CONNECTIONS,
    ) -> None:
        import ssl  # here, not at the top: a `serve` of local servers never needs it

        problem = check_remote_url(url) or next(
            (
                f"header {key} {why}"
                for key, value in headers.items()
                if (why := header_name_problem(key) or header_value_problem(value))
            ),
            None,
        )
        if problem is not None:
            raise ValueError(f"server {name}: {problem}")
        if auth is not None and not auth.serves(url):
            raise ValueError(f"server {name}: its token source is for another URL")
        parts = urllib.parse.urlsplit(url)
        self.name = name
        self.url = url
        self.era = Era.HANDSHAKE
        self.version = HANDSHAKE_VERSIONS[0]
        self.stopping = False
        self.requests = PendingRequests(name)
        self._on_message = on_message
        self._on_exit = on_exit
        self._on_needs_login = on_needs_login
        self._deadlines = deadlines
        self._timeouts = timeouts
        # A static Authorization of `headers:` wins: no OAuth token is ever sent beside it.
        self._static_auth = any(key.lower() == "authorization" for key in headers)
        self._auth = None if self._static_auth else auth
        # `headers:` values are secrets by contract (§3): scrubbed from any text we make and
        # from all the server sends (it may echo one back), as they are and JSON-escaped
        values = {value for value in headers.values() if len(value) >= MIN_SECRET_CHARS}
        self._secret_values = tuple(sorted(values, key=len, reverse=True))
        escaped = {COMPACT_JSON.encode(value)[1:-1] for value in values}
        self._escaped_values = tuple(escaped - values)
        self._user_headers = dict(headers)
        self._post_headers: dict[str, str] = {
            "Accept": ACCEPT,
            "Content-Type": "application/json",
            "User-Agent": f"rea/{VERSION}",
            **headers,
        }
        self._https = parts.scheme.lower() == "https"
        self._host = parts.hostname or ""
        self._port = parts.port or (443 if self._https else 80)
        self._target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        self._tls = ssl.create_default_context() if self._https else None
        self._lock = threading.Lock()  # guards: _active, _limited, _ended, _exited
        self._active: dict[int, http.client.HTTPConnection] = {}  # request id -> its connection
        # connections that answer no request of a waiter -> when expire() breaks them: a POST
        # of a notification or response, the read after an answer, the session's DELETE
        self._limited: dict[http.client.HTTPConnection, float] = {}
        self._ended = False  # stop() or _die() has run
        self._exited = False  # on_exit has been called
        # guards: _session_id, _renewing, _init_params, _listen_conn, _listening
        self._session = threading.Condition()
        self._session_id: str | None = None
        self._renewing = False
        self._init_params: JsonObj | None = None
        self._listen_conn: http.client.HTTPConnection | None = None
        self._listening: threading.Thread | None = None  # the GET stream's thread, while it runs
        self._said_no_stream = False  # "no GET stream" is logged once
        self._pool_lock = threading.Lock()  # guards: _idle
        self._idle: list[http.client.HTTPConnection] = []
        self._max_idle = max_connections
        self._stopped = threading.Event()
        self._problem = ""  # last HTTP problem, one line; replaced whole (one reference write)
        # tool name -> its x-mcp-header mirrors; replaced whole, never mutated (no lock)
        self._param_headers: dict[str, tuple[tuple[str, tuple[str, ...]], ...]] = {}
        self._thread_numbers = itertools.count(1)
        self._requests = _Lane(self._thread_name, max_connections, self._on_bug)
        self._sender = _Lane(self._thread_name, 1, self._on_bug)

    # -- the face of ChildProcess --

    @property
    def alive(self) -> bool:
        return not self.requests.closed

    @property
    def pid(self) -> int | None:
        return None  # no process of ours

    def request_async(
        self, method: str, params: JsonObj | None, timeout_s: float, on_done: OnDone
    ) -> int:
        """Send a request; on_done(result, error) is called exactly once, from some thread.

        Errors: RpcError (the server's JSON-RPC error, or an HTTP error status), TimeoutError,
        TransportFailed (NeedsLogin and ServerUnreachable among them).
        """
        request_id, deadline = self.requests.add(method, timeout_s, on_done)
        job = _Request(request_id, method, params, deadline)
        try:
            self._requests.submit(lambda: self._run(job))
        except TransportFailed:
            if self.requests.take(request_id) is not None:
                raise
            return request_id  # ended meanwhile, and its end delivered the outcome
        self._deadlines.watch(self, deadline)
        return request_id

    def send(self, msg: JsonObj) -> None:
        """Queue one message that expects no answer: a notification, or the answer to a
        server's request. It goes out in order with the others, on the sender thread."""
        if not self.alive:
            raise TransportFailed(f"server {self.name} is not connected")
        if msg.get("method") == "notifications/initialized":
            # in the caller's thread: no request may overtake it (2025-11-25 Lifecycle)
            self._post_quietly(msg)
            return
        self._sender.submit(lambda: self._post_quietly(msg))

    def cancel(self, request_id: int, reason: str) -> bool:
        """Forget a request and tell the server; the waiter gets a cancellation error."""
        pending = self.requests.take(request_id)
        if pending is None:
            return False
        self._abandon(request_id, pending.method, reason)
        self._call(pending.on_done, None, RpcError(INTERNAL_ERROR, reason))
        return True

    def expire(self, now: float) -> float | None:
        """Fail requests past their deadline; return the next deadline, if any. Never waits
        on the network: it runs on the gateway's one deadline thread."""
        expired, soonest = self.requests.due(now)
        for request_id, pending in expired:  # a late answer finds no waiter and is dropped (§9)
            self._abandon(request_id, pending.method, "timeout")
            self._call(
                pending.on_done, None, TimeoutError(f"server {self.name} did not answer in time")
            )
        with self._lock:
            overdue = [conn for conn, at in self._limited.items() if at <= now]
            for conn in overdue:
                del self._limited[conn]
            later = min(self._limited.values(), default=None)
        for conn in overdue:
            _abort(conn)
        if later is not None and (soonest is None or later < soonest):
            soonest = later
        return soonest

    def stop(self) -> None:
        """Fail what is in flight, end the session (DELETE, best effort), close every
        connection and join this server's threads: all within Timeouts.kill_after_s,
        whatever the server does (§5: a bounded stop). Every connection open now is broken,
        the one that sends notifications/initialized on a starting server's thread too."""
        self.stopping = True
        with self._lock:
            if self._ended:
                return
            self._ended = True
            active = [*self._active.values(), *self._limited]
            self._limited.clear()
        deadline = time.monotonic() + self._timeouts.kill_after_s
        jobs = self.requests.close()
        self._stopped.set()
        for conn in active:
            _abort(conn)
        with self._session:
            session, listening, listener = self._session_id, self._listen_conn, self._listening
            self._session.notify_all()  # a request waiting for a renewal stops waiting
        _abort(listening)
        for pending in jobs:
            self._call(pending.on_done, None, TransportFailed(f"server {self.name}: disconnected"))
        if session is not None:
            self._end_session(session, min(deadline, time.monotonic() + DELETE_TIMEOUT_S))
        self._close(deadline)
        if listener is not None and listener is not threading.current_thread():
            listener.join(max(0.0, deadline - time.monotonic()))
        self._exit(0)

    def last_stderr(self) -> str:
        """The last HTTP problem, one line, with no token or `headers:` value in it."""
        return self._problem

    # -- internals: bookkeeping --

    def _thread_name(self) -> str:
        return f"rea-http-{self.name}-{next(self._thread_numbers)}"

    def _on_bug(self, exc: Exception) -> None:
        log_bug("http_worker", exc, server=self.name)

    def _bind(self, job: _Request, conn: http.client.HTTPConnection) -> bool:
        """Note the connection a request uses, so that a timeout or cancel can break it."""
        with self._lock:
            if not self.requests.waiting(job.id):
                return False
            self._active[job.id] = conn
            return True

    def _unbind(self, job: _Request) -> None:
        with self._lock:
            self._active.pop(job.id, None)

    def _limit(self, conn: http.client.HTTPConnection, deadline: float) -> None:
        """Break this connection at `deadline` (monotonic), whatever it is doing then."""
        with self._lock:
            self._limited[conn] = deadline
        self._deadlines.watch(self, deadline)

    def _unlimit(self, conn: http.client.HTTPConnection) -> bool:
        """Take the deadline off; False when the connection was broken (its deadline passed,
        or stop), so that it is closed, never kept for another request."""
        with self._lock:
            return self._limited.pop(conn, None) is not None

    def _call(self, on_done: OnDone, result: JsonObj | None, error: Exception | None) -> None:
        try:
            on_done(result, error)
        except Exception as exc:  # the caller's bug must not end a worker or the deadline thread
            log_bug("on_done", exc, server=self.name)

    def _finish(self, request_id: int, error: Exception) -> None:
        pending = self.requests.take(request_id)
        if pending is not None:
            self._call(pending.on_done, None, error)

    def _abandon(self, request_id: int, method: str, reason: str) -> None:
        """Stop waiting for a request: break its stream, and in the handshake era say so.

        2026-07-28 Cancellation: closing the response stream is the cancellation. Earlier
        revisions: disconnection is not cancellation, so notifications/cancelled is POSTed
        (2025-11-25 Streamable HTTP, Sending Messages 6); initialize is never cancelled, and
        server/discover is a stateless-era request whatever the era.
        """
        with self._lock:
            conn = self._active.get(request_id)
        _abort(conn)
        if self.era is Era.HANDSHAKE and method not in ("initialize", "server/discover"):
            with contextlib.suppress(ChildDied):
                self.notify("notifications/cancelled", {"requestId": request_id, "reason": reason})

    def _note(self, problem: str) -> str:
        """Remember a problem for last_stderr(); return it scrubbed, as one line."""
        text = " ".join(self._scrub(problem).split())[:MAX_PROBLEM]
        self._problem = text
        return text

    def _fail(self, problem: str) -> TransportFailed:
        return TransportFailed(self._note(f"server {self.name}: {problem}"))

    def _refused(self, method: str, status: int, reason: str) -> RpcError:
        """An HTTP error status without a JSON-RPC error in it: the server refused the request,
        as a JSON-RPC error says (the era probe falls back on it, §5)."""
        text = self._note(f"server {self.name} answered {method} with HTTP {status} {reason}")
        return RpcError(INTERNAL_ERROR, text.rstrip())

    def _scrub(self, text: str) -> str:
        for value in self._secret_values:
            text = text.replace(value, "[REDACTED:header]")
        if self._auth is not None:
            text = self._auth.scrub(text)
        return text

    def _message(self, raw: bytes | str) -> object:
        """What the server sent, parsed (ValueError when it is not JSON), with every
        `headers:` value and token of ours taken out of its strings: a server that echoes
        one (in a result, an error's message or data, a notification) does not hand it to
        the client. The message is looked at written one way first (a server's own escapes,
        `\\/` or `\\uXXXX`, hide nothing from that), so that a message without a secret costs
        one encode more."""
        msg = decode(raw)
        if not self._secret_values and self._auth is None:
            return msg
        text = COMPACT_JSON.encode(msg)
        if self._scrub(text) == text and not any(v in text for v in self._escaped_values):
            return msg
        return map_strings(msg, self._scrub)

    def _login_needed(self, exc: NeedsLogin) -> None:
        """Tell the owner that the server needs a login (it may change the server's status)."""
        self._note(str(exc))
        if self._on_needs_login is None:
            return
        try:
            self._on_needs_login(self, exc)
        except Exception as bug:
            log_bug("on_needs_login", bug, server=self.name)

    def _exit(self, code: int | None) -> None:
        with self._lock:
            if self._exited:
                return
            self._exited = True
        try:
            self._on_exit(self, code)
        except Exception as exc:
            log_bug("on_exit", exc, server=self.name)

    def _die(self, reason: str) -> None:
        """The server cannot be reached: fail everything, and report the exit (§9)."""
        with self._lock:
            if self._ended:
                return
            self._ended = True
            active = [*self._active.values(), *self._limited]
            self._limited.clear()
        jobs = self.requests.close()
        text = self._note(reason)  # the owner logs it, as it logs a child's exit
        self._stopped.set()
        for conn in active:
            _abort(conn)
        with self._session:
            listening = self._listen_conn
        _abort(listening)
        for pending in jobs:
            self._call(pending.on_done, None, TransportFailed(text))
        self._close(deadline=0.0)
        self._exit(None)

    def _close(self, deadline: float) -> None:
        self._requests.close(deadline)
        self._sender.close(deadline)
        with self._pool_lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

    # -- internals: connections --

    def _new_connection(self, timeout_s: float = CONNECT_TIMEOUT_S) -> http.client.HTTPConnection:
        import http.client

        if self._tls is not None:
            return http.client.HTTPSConnection(
                self._host, self._port, timeout=timeout_s, context=self._tls
            )
        return http.client.HTTPConnection(self._host, self._port, timeout=timeout_s)

    def _connect(self) -> http.client.HTTPConnection:
        import socket

        conn = self._new_connection()
        try:
            conn.connect()
        except _net_errors() as exc:
            conn.close()
            raise ServerUnreachable(
                self._note(
                    f"server {self.name}: cannot connect to {public_url(self.url)} ({_reason(exc)})"
                )
            ) from None
        if conn.sock is not None:
            with contextlib.suppress(OSError):  # small requests and answers: no Nagle delay
                conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return conn

    def _connection(self) -> tuple[http.client.HTTPConnection, bool]:
        """A kept-alive idle connection the server has not closed, else a new one; and
        whether it was reused."""
        while True:
            with self._pool_lock:
                conn = self._idle.pop() if self._idle else None
            if conn is None:
                return self._connect(), False
            if _still_open(conn):
                return conn, True
            conn.close()  # the server closed it while idle: the request was not sent on it

    def _release(self, conn: http.client.HTTPConnection, resp: http.client.HTTPResponse) -> None:
        """Keep a connection whose answer was read to its end; close any other."""
        if not resp.will_close and resp.isclosed():
            with self._pool_lock:
                if not self._stopped.is_set() and len(self._idle) < self._max_idle:
                    self._idle.append(conn)
                    return
        conn.close()

    def _discard_body(
        self, conn: http.client.HTTPConnection, resp: http.client.HTTPResponse
    ) -> None:
        try:
            resp.read(MAX_ERROR_BODY)
        except _net_errors():
            conn.close()
            return
        self._release(conn, resp)

    # -- internals: one request --

    def _run(self, job: _Request) -> None:
        if not self.requests.waiting(job.id):
            return  # timed out or cancelled while it waited for a worker
        try:
            self._exchange(job)
        except _Abandoned:
            pass
        except NeedsLogin as exc:  # the owner hears before the caller, which may look next
            taken = self.requests.take(job.id)
            self._login_needed(exc)
            if taken is not None:
                self._call(taken.on_done, None, exc)
        except ServerUnreachable as exc:  # down before the caller hears: alive is False by then
            taken = self.requests.take(job.id)
            self._die(str(exc))
            if taken is not None:
                self._call(taken.on_done, None, exc)
        except (TransportFailed, RpcError) as exc:
            self._finish(job.id, exc)
        except Exception as exc:  # a bug: the caller still gets its one answer
            self._on_bug(exc)
            self._finish(job.id, self._fail(f"internal error handling {job.method}"))

    def _headers(
        self, method: str | None, params: JsonObj | None, stateless: str | None, session: str | None
    ) -> dict[str, str]:
        headers = dict(self._post_headers)
        if stateless is not None:
            # 2026-07-28 Streamable HTTP, Request Metadata: version, method and name mirrored
            headers["MCP-Protocol-Version"] = stateless
            if method is not None:
                headers["Mcp-Method"] = method
                name = _mcp_name(method, params)
                if name is not None:
                    headers["Mcp-Name"] = header_value(name)
                if method == "tools/call" and params is not None:
                    headers.update(self._mirrored(params))
            return headers
        if method != "initialize":  # 2025-11-25 Protocol Version Header: every request after it
            headers["MCP-Protocol-Version"] = self.version
        if session is not None:
            headers["Mcp-Session-Id"] = session
        return headers

    def _mirrored(self, params: JsonObj) -> dict[str, str]:
        """Mcp-Param-* headers of a tools/call (2026-07-28 Custom Headers from Tool Parameters)."""
        name = params.get("name")
        mirrors = self._param_headers.get(name) if isinstance(name, str) else None
        if not mirrors:
            return {}
        arguments = as_obj(params.get("arguments")) or {}
        out: dict[str, str] = {}
        for header, path in mirrors:
            value: object = arguments
            for key in path:
                value = value.get(key) if isinstance(value, dict) else None
            text = _mirrored_value(value)
            if text is not None:
                out[f"Mcp-Param-{header}"] = header_value(text)
        return out

    def _authorize(self, headers: dict[str, str], refresh: bool = True) -> str | None:
        """Add the bearer token, if this server has one; return the token sent."""
        if self._auth is None:
            return None
        token = self._auth.access_token(refresh=refresh)
        if token:
            headers["Authorization"] = f"Bearer {token}"
        return token

    def _reauthorize(self, token: str | None) -> None:
        """After a 401: refresh once (MCP authorization, Token Handling), or NeedsLogin."""
        if self._static_auth:
            raise self._fail(
                "refused the Authorization of its headers: (HTTP 401); check the value it "
                "takes from .rea/registry.yaml"
            )
        if self._auth is None:
            raise NeedsLogin(self.name, "the server answered 401 and rea has no token for it")
        self._auth.after_unauthorized(token)

    def _session_for(self, job: _Request) -> str | None:
        """The session id to send; waits while another thread opens a new session."""
        with self._session:
            while self._renewing and not self._stopped.is_set():
                if not self._session.wait(max(0.01, job.deadline - time.monotonic())):
                    break
            return self._session_id

    def _adopt(self, job: _Request, result: JsonObj) -> None:
        """An initialize succeeded: its session (and version) go on every later message."""
        version = result.get("protocolVersion")
        with self._session:
            self._session_id = job.session_id
            self._init_params = job.params
        if isinstance(version, str) and version in HANDSHAKE_VERSIONS:
            self.version = version

    def _renew(self, old: str) -> None:
        """Open a new session after a 404 on `old`, once for all requests that met it."""
        with self._session:
            if self._session_id != old:
                return  # another request renewed it already
            while self._renewing:
                self._session.wait(self._timeouts.handshake_s)
            if self._session_id != old:
                return
            self._renewing = True
            params = self._init_params
        try:
            if params is None:
                raise self._fail("the session ended before it was set up")
            log("info", "remote_session_expired", server=self.name)
            self._reinitialize(params)
        except NeedsLogin:
            raise
        except (TransportFailed, RpcError, TimeoutError) as exc:
            text = self._note(
                f"server {self.name}: its session expired and a new one failed: {exc}"
            )
            self._die(text)
            raise TransportFailed(text) from None
        finally:
            with self._session:
                self._renewing = False
                self._session.notify_all()
        log("info", "remote_session_renewed", server=self.name)

    def _reinitialize(self, params: JsonObj) -> None:
        """initialize and notifications/initialized again, in this thread: a renewal runs on
        a worker whose siblings may all be waiting for this very session."""

        def run(done: OnDone) -> None:
            request_id, deadline = self.requests.add("initialize", self._timeouts.handshake_s, done)
            self._deadlines.watch(self, deadline)
            self._run(_Request(request_id, "initialize", params, deadline))

        result = wait_for(run)
        version = result.get("protocolVersion")
        if not isinstance(version, str) or version not in HANDSHAKE_VERSIONS:
            raise self._fail(f"answered initialize with unsupported version {version!r}")
        with self._session:
            session = self._session_id
        self._post({"jsonrpc": "2.0", "method": "notifications/initialized"}, session)
        self._start_listening()  # a GET stream refused for the old session may exist for this

    def _exchange(self, job: _Request) -> None:
        """POST one request and read its answer, sending it again only where it certainly did
        not run: not fully sent; a 401 (refused before any work); a 404 for an unknown session."""
        msg: JsonObj = {"jsonrpc": "2.0", "id": job.id, "method": job.method}
        if job.params is not None:
            msg["params"] = job.params
        body = encode(msg)
        stateless = _stateless_version(job.params)
        resent = reauthorized = renewed = False
        while True:
            session = None
            if stateless is None and job.method != "initialize":
                session = self._session_for(job)
            headers = self._headers(job.method, job.params, stateless, session)
            token = self._authorize(headers)
            conn, reused = self._connection()
            if not self._bind(job, conn):
                conn.close()
                raise _Abandoned
            try:
                sent = False
                try:
                    assert conn.sock is not None
                    conn.sock.settimeout(max(1.0, job.deadline - time.monotonic()) + 5.0)
                    conn.request("POST", self._target, body, headers)
                    sent = True
                    resp = conn.getresponse()
                except _net_errors() as exc:
                    conn.close()
                    if not self.requests.waiting(job.id):
                        raise _Abandoned from None
                    if not resent and (not sent or (reused and job.method in _RESENDABLE)):
                        resent = True  # it never reached the server whole; or it is harmless
                        continue
                    raise self._fail(
                        f"the connection broke after {job.method} was sent ({_reason(exc)}); "
                        "not sent again: it may have run"
                    ) from None
                if resp.status == 401 and not reauthorized:
                    self._discard_body(conn, resp)
                    reauthorized = True
                    self._reauthorize(token)
                    continue
                if resp.status == 404 and session is not None and not renewed:
                    # 2025-11-25 Session Management 3-4: the server no longer knows the
                    # session, so it did not process this request: a new session, then again
                    self._discard_body(conn, resp)
                    renewed = True
                    self._renew(session)
                    continue
                self._answer(job, conn, resp, stateless)
                return
            finally:
                self._unbind(job)

    def _answer(
        self,
        job: _Request,
        conn: http.client.HTTPConnection,
        resp: http.client.HTTPResponse,
        stateless: str | None,
    ) -> None:
        status = resp.status
        kind = _content_type(resp)
        if job.method == "initialize" and status == 200:
            session = resp.getheader("Mcp-Session-Id")
            if session is not None and not _SESSION_ID_RE.fullmatch(session):
                conn.close()
                raise self._fail("its Mcp-Session-Id is not visible ASCII")
            job.session_id = session
        if status == 200 and kind == "text/event-stream":
            self._read_stream(job, conn, resp, stateless)
            return
        if status == 401:  # a second 401, after a refresh or with a token from `login`
            self._discard_body(conn, resp)
            if self._static_auth:
                raise self._fail("refused the Authorization of its headers: (HTTP 401)")
            raise NeedsLogin(self.name, "the server refused the token")
        if 300 <= status < 400:
            self._discard_body(conn, resp)
            raise self._fail(
                f"answered HTTP {status} (a redirect); rea follows none, so that no token goes "
                "to another address: put the new URL in .rea/registry.yaml"
            )
        if status == 403:
            challenge = parse_www_authenticate(resp.getheader("WWW-Authenticate"))
            if challenge.get("error") == "insufficient_scope":
                self._discard_body(conn, resp)
                scope = challenge.get("scope", "")
                raise NeedsLogin(self.name, f"the server asks for scope {scope!r}")
        try:
            data = resp.read(MAX_LINE + 1)
        except _net_errors() as exc:
            conn.close()
            if not self.requests.waiting(job.id):
                raise _Abandoned from None
            raise self._fail(
                f"the connection broke while reading the answer to {job.method} ({_reason(exc)})"
            ) from None
        if len(data) > MAX_LINE:
            conn.close()
            raise self._fail(f"the answer to {job.method} is larger than the limit")
        self._release(conn, resp)
        try:
            msg = self._message(data) if data.strip() else None
        except ValueError:
            msg = None
        if status == 200:
            if isinstance(msg, dict | list) and self._deliver(msg, job):
                return
            raise self._refused(job.method, status, "without a JSON-RPC response")
        # An error status whose body is a JSON-RPC error is that error (2026-07-28: 400 for
        # UnsupportedProtocolVersion and HeaderMismatch, 404 for an unknown method).
        error = as_obj(msg)
        if (
            error is not None
            and isinstance(error.get("error"), dict)
            and error.get("id") in (job.id, None)
        ):
            self._deliver(error, job)
            return
        raise self._refused(job.method, status, resp.reason)

    def _deliver(self, msg: object, job: _Request | None) -> bool:
        """Route what the server sent; True when it is the response to `job`."""
        if isinstance(msg, list):  # a 2025-03-26 batch
            answered = False
            for item in msg:
                answered = self._deliver(item, job) or answered
            return answered
        obj = as_obj(msg)
        if obj is None:
            log("warn", "remote_sent_non_object", server=self.name)
            return False
        if "method" not in obj and ("result" in obj or "error" in obj):
            request_id = obj.get("id")
            if request_id is None and "error" in obj and job is not None:
                obj = {**obj, "id": job.id}  # an error with no id answers the POST it came on
                request_id = job.id
            if not isinstance(request_id, int) or isinstance(request_id, bool):
                return False
            mine = job is not None and request_id == job.id
            if mine and job is not None:
                obj = self._seen_answer(job, obj)
            self.requests.deliver(obj)
            return mine
        try:  # a server notification, or a server request on a handshake-era stream
            self._on_message(self, obj)
        except Exception as exc:
            log_bug("remote_message", exc, server=self.name)
        return False

    def _seen_answer(self, job: _Request, msg: JsonObj) -> JsonObj:
        """What this transport learns from an answer before its waiter gets it: the session of
        an initialize; the header mirrors of a stateless tools/list."""
        result = as_obj(msg.get("result"))
        if result is None or not self.requests.waiting(job.id):
            return msg
        if job.method == "initialize":
            self._adopt(job, result)
        elif job.method == "tools/list" and _stateless_version(job.params) is not None:
            return {**msg, "result": self._screen_tools(result)}
        return msg

    def _screen_tools(self, result: JsonObj) -> JsonObj:
        """Drop tools whose x-mcp-header is invalid and learn the mirrors of the others
        (2026-07-28 server/tools: such a tool MUST be left out of tools/list)."""
        tools = result.get("tools")
        if not isinstance(tools, list):
            return result
        mirrors = dict(self._param_headers)
        kept: list[object] = []
        for item in tools:
            tool = as_obj(item)
            name = tool.get("name") if tool is not None else None
            found = param_header_map(tool) if tool is not None else ()
            if isinstance(found, str):
                log("warn", "tool_rejected", server=self.name, tool=str(name), reason=found)
                continue
            if isinstance(name, str):
                if found:
                    mirrors[name] = found
                else:
                    mirrors.pop(name, None)
            kept.append(item)
        self._param_headers = mirrors
        return {**result, "tools": kept}

    # -- internals: event streams --

    def _consume(self, resp: http.client.HTTPResponse, job: _Request | None) -> _StreamEnd:
        """Read events until the answer to `job` or the end of the stream."""
        last_id: str | None = None
        retry: int | None = None
        messages = 0
        try:
            for event in sse_events(resp):
                last_id = event.id if event.id is not None else last_id
                retry = event.retry_ms if event.retry_ms is not None else retry
                if event.event != "message" or not event.data.strip():
                    continue  # a priming event, or one that is not JSON-RPC
                try:
                    msg = self._message(event.data)
                except ValueError:
                    log("warn", "remote_sent_non_json", server=self.name, bytes=len(event.data))
                    continue
                messages += 1
                if self._deliver(msg, job):
                    return _StreamEnd(True, last_id, retry, messages)
        except _net_errors(TransportFailed):
            pass
        return _StreamEnd(False, last_id, retry, messages)

    def _read_stream(
        self,
        job: _Request,
        conn: http.client.HTTPConnection,
        resp: http.client.HTTPResponse,
        stateless: str | None,
    ) -> None:
        end = self._consume(resp, job)
        if end.answered:
            self._drain(conn, resp)
            return
        conn.close()
        if not self.requests.waiting(job.id):
            raise _Abandoned
        if stateless is not None or end.last_id is None:  # 2026-07-28: streams do not resume
            raise self._fail(
                f"the event stream of {job.method} ended before its answer; "
                "not sent again: it may have run"
            )
        self._resume(job, end.last_id, end.retry_ms)

    def _drain(self, conn: http.client.HTTPConnection, resp: http.client.HTTPResponse) -> None:
        """After the answer the stream SHOULD end; read what is left, to keep the connection,
        and pass on anything the server still says: for DRAIN_TIMEOUT_S in all. A stream the
        server keeps open (with keep-alive comments, say) is cut then, so that no server holds
        a connection and its worker for ever."""
        self._limit(conn, time.monotonic() + DRAIN_TIMEOUT_S)
        try:
            if conn.sock is not None:
                conn.sock.settimeout(DRAIN_TIMEOUT_S)
            self._consume(resp, None)
            read = True
        except _net_errors():
            read = False
        if self._unlimit(conn) and read:
            self._release(conn, resp)
        else:
            conn.close()

    def _get_headers(self, session: str | None, last_id: str | None) -> dict[str, str]:
        headers = {
            "Accept": "text/event-stream",
            "User-Agent": f"rea/{VERSION}",
            **self._user_headers,
            "MCP-Protocol-Version": self.version,
        }
        if session is not None:
            headers["Mcp-Session-Id"] = session
        if last_id is not None:
            headers["Last-Event-ID"] = last_id
        return headers

    def _resume(self, job: _Request, last_id: str, retry_ms: int | None) -> None:
        """Resume a broken stream with GET and Last-Event-ID (2025-11-25 Resumability and
        Redelivery); the request itself is never sent again."""
        for _ in range(MAX_RESUMES):
            delay = min((retry_ms or 0) / 1000.0, max(0.0, job.deadline - time.monotonic()))
            if self._stopped.wait(delay) or not self.requests.waiting(job.id):
                raise _Abandoned
            with self._session:
                session = self._session_id
            headers = self._get_headers(session, last_id)
            self._authorize(headers)
            conn, _ = self._connection()
            if not self._bind(job, conn):
                conn.close()
                raise _Abandoned
            try:
                try:
                    assert conn.sock is not None
                    conn.sock.settimeout(max(1.0, job.deadline - time.monotonic()) + 5.0)
                    conn.request("GET", self._target, headers=headers)
                    resp = conn.getresponse()
                except _net_errors():
                    conn.close()
                    continue
                if resp.status != 200 or _content_type(resp) != "text/event-stream":
                    self._discard_body(conn, resp)
                    raise self._fail(
                        f"the event stream of {job.method} broke and could not be resumed "
                        f"(HTTP {resp.status}); not sent again: it may have run"
                    )
                end = self._consume(resp, job)
                if end.answered:
                    self._drain(conn, resp)
                    return
                conn.close()
                last_id = end.last_id or last_id
                retry_ms = end.retry_ms if end.retry_ms is not None else retry_ms
            finally:
                self._unbind(job)
        if not self.requests.waiting(job.id):
            raise _Abandoned
        raise self._fail(
            f"the event stream of {job.method} broke {MAX_RESUMES} times; not sent again: "
            "it may have run"
        )

    def _start_listening(self) -> None:
        """Open the GET stream for the server's own messages (2025-11-25 Streamable HTTP,
        Listening for Messages from the Server) on a thread of its own, unless one runs:
        once initialized, and again once a session is renewed."""
        with self._session:
            if self._listening is not None or self._stopped.is_set():
                return
            self._listening = threading.Thread(
                target=self._listen, name=self._thread_name(), daemon=True
            )
            self._listening.start()

    def _listen(self) -> None:
        """The GET stream: server notifications and requests outside any request's stream.

        Opened again whenever it ends, never sooner than the server's `retry:` (at least
        LISTEN_RETRY_MIN_S), the wait doubling while streams end at once, up to
        LISTEN_BACKOFF_MAX_S. A refusal means the server offers no GET stream: a 405
        (2025-11-25 Listening 3), or a 404 while the session lives on for POSTs (an Express
        server without GET /mcp): only a 404 to a POST renews a session. The listener then
        ends; a renewed session starts another.
        """
        retry = LISTEN_RETRY_S
        failures = -1  # attempts in a row without a stream that did its job; -1: none yet
        last_id: str | None = None
        listened: str | None = None  # the session last_id belongs to
        reauthorized = False
        try:
            while True:
                wait = min(LISTEN_BACKOFF_MAX_S, retry * 2 ** min(failures, 16))
                if self._stopped.wait(wait if failures >= 0 else 0.0):
                    return
                failures += 1
                with self._session:
                    session = self._session_id
                if session != listened:
                    last_id, listened = None, session  # event ids belong to one session
                try:
                    conn = self._connect()
                except ServerUnreachable:
                    continue
                with self._session:
                    self._listen_conn = conn
                if self._stopped.is_set():
                    conn.close()
                    return
                opened = time.monotonic()
                try:
                    headers = self._get_headers(session, last_id)
                    token = self._authorize(headers)
                    assert conn.sock is not None
                    conn.sock.settimeout(None)  # a quiet stream is not a dead one
                    conn.request("GET", self._target, headers=headers)
                    resp = conn.getresponse()
                    if resp.status == 401 and not reauthorized:
                        reauthorized = True
                        self._reauthorize(token)
                        continue
                    if 400 <= resp.status < 500 and resp.status not in (408, 429):
                        if self._no_get_stream(session, resp.status):
                            return
                        continue  # the session was renewed meanwhile: listen to the new one
                    if resp.status != 200 or _content_type(resp) != "text/event-stream":
                        self._note(
                            f"server {self.name}: its GET stream answered HTTP {resp.status}"
                        )
                        continue
                    reauthorized = False
                    end = self._consume(resp, None)
                    last_id = end.last_id or last_id
                    if end.retry_ms is not None:
                        retry = min(
                            LISTEN_BACKOFF_MAX_S, max(LISTEN_RETRY_MIN_S, end.retry_ms / 1000)
                        )
                    if end.messages or time.monotonic() - opened >= LISTEN_STEADY_S:
                        failures = 0  # it did its job: the next one after `retry` alone
                except NeedsLogin as exc:
                    self._login_needed(exc)
                    return
                except TransportFailed:  # e.g. a static Authorization refused
                    return
                except _net_errors():
                    pass
                finally:
                    conn.close()
                    with self._session:
                        self._listen_conn = None
        finally:
            with self._session:
                if self._listening is threading.current_thread():
                    self._listening = None

    def _no_get_stream(self, session: str | None, status: int) -> bool:
        """The GET stream was refused for `session`: True when the listener ends, False
        when the session was renewed meanwhile (the new one is listened to)."""
        with self._session:
            if self._session_id != session and not self._stopped.is_set():
                return False
            self._listening = None  # under the lock a renewal takes to start another
            said, self._said_no_stream = self._said_no_stream, True
        if not said:
            level = "debug" if status == 405 else "info"
            log(level, "remote_no_get_stream", server=self.name, status=status)
        return True

    # -- internals: messages without an answer --

    def _post(self, msg: JsonObj, session: str | None) -> None:
        """POST a notification or a response and check the 202, in this thread."""
        body = encode(msg)
        method = msg.get("method")
        params = as_obj(msg.get("params"))
        stateless = _stateless_version(params)
        name = method if isinstance(method, str) else None
        what = name or "a response"
        resent = reauthorized = False
        while True:
            if self._stopped.is_set():
                raise TransportFailed(f"server {self.name}: stopped before {what} was sent")
            headers = self._headers(name, params, stateless, None if stateless else session)
            token = self._authorize(headers)
            conn, reused = self._connection()
            self._limit(conn, time.monotonic() + SEND_TIMEOUT_S)
            sent = read = False
            try:
                assert conn.sock is not None
                conn.sock.settimeout(SEND_TIMEOUT_S)
                conn.request("POST", self._target, body, headers)
                sent = True
                resp = conn.getresponse()
                resp.read(MAX_ERROR_BODY)
                read = True
            except _net_errors() as exc:
                conn.close()
                in_time = self._unlimit(conn)  # False: broken at its deadline, or by stop
                if in_time and not resent and (not sent or reused):
                    resent = True  # a repeated notification or response is harmless
                    continue
                why = _reason(exc) if in_time else f"no answer within {SEND_TIMEOUT_S:g} s"
                raise self._fail(f"could not send {what} ({why})") from None
            if self._unlimit(conn) and read:
                self._release(conn, resp)
            else:
                conn.close()
            if resp.status == 401 and not reauthorized:
                reauthorized = True
                self._reauthorize(token)
                continue
            if resp.status in (200, 202, 204):
                return
            raise self._fail(f"answered {what} with HTTP {resp.status} {resp.reason}".rstrip())

    def _post_quietly(self, msg: JsonObj) -> None:
        if self._stopped.is_set():
            return
        with self._session:
            session = self._session_id
        try:
            self._post(msg, session)
        except NeedsLogin as exc:
            self._login_needed(exc)
        except ServerUnreachable as exc:
            self._die(str(exc))
        except TransportFailed as exc:
            if not self._stopped.is_set():
                log("warn", "remote_send_failed", server=self.name, error=str(exc))
        else:
            if msg.get("method") == "notifications/initialized":
                self._start_listening()

    def _end_session(self, session: str, deadline: float) -> None:
        """DELETE the session (2025-11-25 Session Management 5), done by `deadline`
        (monotonic) whatever the server does; a 405, an error or silence is fine."""
        headers = self._get_headers(session, None)
        headers.pop("Accept")
        try:
            self._authorize(headers, refresh=False)  # stop never waits on an authorization server
        except TransportFailed:
            return
        left = deadline - time.monotonic()
        if left <= 0:
            return
        conn = self._new_connection(left)
        try:
            conn.connect()  # within `left`; from here on expire() breaks it at the deadline
            self._limit(conn, deadline)
            conn.request("DELETE", self._target, headers=headers)
            conn.getresponse().read(MAX_ERROR_BODY)
        except _net_errors():
            pass
        finally:
            self._unlimit(conn)
            conn.close()


# OAuth #######################################################################
#
# MCP authorization (2026-07-28 basic/authorization): protected resource metadata (RFC 9728)
# names the authorization server; its metadata (RFC 8414, or OpenID discovery) names the
# endpoints; the flow is authorization code with PKCE S256 (RFC 7636), the resource parameter
# (RFC 8707) on both requests, state and iss (RFC 9207) checked on the redirect. The client is
# the configured client_id, else a Client ID Metadata Document, else dynamic registration
# (RFC 7591). `serve` never opens a browser: without a usable token a server needs a login.
# Credentials live in .rea/credentials/SERVER.json (mode 0600, folder 0700), and their
# secrets never reach a log line, an error's text, the live state, the audit log or a child.

OAUTH_TIMEOUT_S = 10.0  # one request to an authorization server or for metadata
LOGIN_TIMEOUT_S = 300.0  # how long `login` waits for the browser
REFRESH_MARGIN_S = 60.0  # refresh this long before expiry (less for short-lived tokens)
MAX_TOKEN_LIFETIME_S = 365 * 86400.0  # a longer expires_in (10**400, say) is taken as this
MAX_DOCUMENT = 1024 * 1024
CLIENT_NAME = "rea (MCP governance gateway)"
CREDENTIALS_DIR = "credentials"  # under .rea/
_BEARER_TOKEN = re.compile(r"^[A-Za-z0-9\-._~+/]+=*$")  # RFC 6750 §2.1 b64token: header-safe
_ERROR_CODE = re.compile(r"^[\x20-\x21\x23-\x5b\x5d-\x7e]{1,64}$")  # RFC 6749 §5.2 error


class OAuthError(ReaError):
    """A login, logout or discovery step failed: one line that says what to do."""


@dataclass(frozen=True)
class ResourceMetadata:
    """Protected resource metadata (RFC 9728 §2), the fields rea uses."""

    resource: str
    authorization_servers: tuple[str, ...]
    scopes_supported: tuple[str, ...]


@dataclass(frozen=True)
class AuthServerMetadata:
    """Authorization server metadata (RFC 8414 §2, OpenID discovery), the fields rea uses."""

    issuer: str
    authorization_endpoint: str
    token_endpoint: str
    registration_endpoint: str | None
    revocation_endpoint: str | None
    scopes_supported: tuple[str, ...]
    iss_parameter_supported: bool
    client_id_metadata_document_supported: bool


@dataclass(frozen=True)
class OAuthClient:
    """Who rea is at one authorization server."""

    client_id: str
    client_secret: str | None = field(default=None, repr=False)
    auth_method: str = (
        "none"  # token_endpoint_auth_method: none | client_secret_basic | client_secret_post
    )


@dataclass(frozen=True)
class Credentials:
    """`.rea/credentials/SERVER.json`: tokens of one remote server and what refreshes them.

    The secrets are left out of repr(), so that no log line or error can carry one.
    """

    server: str
    resource: str  # what the tokens were issued for (RFC 8707): they go nowhere else
    issuer: str
    token_endpoint: str
    revocation_endpoint: str | None
    client_id: str
    client_secret: str | None = field(repr=False)
    auth_method: str
    redirect_uri: str
    access_token: str = field(repr=False)
    refresh_token: str | None = field(repr=False)
    expires_at: float | None  # epoch seconds
    obtained_at: float
    scope: str | None

    def client(self) -> OAuthClient:
        return OAuthClient(self.client_id, self.client_secret, self.auth_method)

    def to_json(self) -> JsonObj:
        return {"version": 1, **{f.name: getattr(self, f.name) for f in dataclasses.fields(self)}}

    @staticmethod
    def from_json(obj: object) -> Credentials:
        """Parse a credentials file; ValueError says what is wrong."""
        doc = as_obj(obj)
        if doc is None or doc.get("version") != 1:
            raise ValueError("not a version 1 credentials object")

        def text(key: str, optional: bool = False) -> str | None:
            value = doc.get(key)
            if value is None and optional:
                return None
            if not isinstance(value, str) or not value:
                raise ValueError(f"{key} is missing or not a string")
            return value

        def number(key: str) -> float | None:
            value = doc.get(key)
            if value is None:
                return None
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"{key} is not a number")
            return float(value)

        obtained = number("obtained_at")
        expires = number("expires_at")
        if expires is not None and obtained is not None and expires <= obtained:
            expires = None  # a non-positive expires_in an earlier rea.py kept: unknown
        return Credentials(
            server=text("server") or "",
            resource=text("resource") or "",
            issuer=text("issuer") or "",
            token_endpoint=text("token_endpoint") or "",
            revocation_endpoint=text("revocation_endpoint", True),
            client_id=text("client_id") or "",
            client_secret=text("client_secret", True),
            auth_method=text("auth_method") or "",
            redirect_uri=text("redirect_uri") or "",
            access_token=text("access_token") or "",
            refresh_token=text("refresh_token", True),
            expires_at=expires,
            obtained_at=obtained if obtained is not None else 0.0,
            scope=text("scope", True),
        )


class TokenStore:
    """`.rea/credentials/SERVER.json`: one server's credentials, mode 0600 in a 0700 folder,
    written atomically (a reader sees the old file or the new, never a part).

    Never through a symbolic link: one planted at the file or the folder would make rea
    chmod, read, overwrite or delete a file of someone else's choosing. Such a link is
    refused with one line (OAuthError) that says to remove it.
    """

    def __init__(self, folder: Path, server: str) -> None:
        if not SERVER_NAME_RE.fullmatch(server):
            raise ValueError(f"{server!r} is not a server name")
        self.server = server
        self.folder = folder
        self.path = folder / f"{server}.json"

    def refuse_links(self) -> None:
        """OAuthError when the folder or the file is a symbolic link."""
        for path in (self.folder, self.path):
            try:
                linked = stat.S_ISLNK(os.lstat(path).st_mode)
            except FileNotFoundError:
                return  # nothing below a missing folder; nothing at a missing file
            except OSError as exc:
                raise OAuthError(
                    f"{path}: cannot read it ({exc.strerror}); check its permissions"
                ) from None
            if linked:
                raise self._linked(path)

    def _linked(self, path: Path) -> OAuthError:
        return OAuthError(
            f"{path} is a symbolic link; rea never follows one in .rea/credentials/ (it could "
            f"point at any file of yours): remove it, then run python rea.py login {self.server}"
        )

    def load(self) -> Credentials | None:
        """The saved credentials, None without a file; OAuthError for a file rea cannot use."""
        self.refuse_links()
        try:  # O_NOFOLLOW: a link put there since; O_NONBLOCK: a FIFO must not hang us
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise self._linked(self.path) from None
            raise OAuthError(
                f"{self.path}: cannot read it ({exc.strerror}); check its permissions"
            ) from None
        with open(fd, "rb") as fh:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise OAuthError(
                    f"{self.path} is not a regular file: remove it, then run "
                    f"python rea.py login {self.server}"
                )
            data = fh.read(MAX_DOCUMENT + 1)
            if stat.S_IMODE(info.st_mode) & 0o077:  # widened: tokens are the user's alone
                try:
                    os.fchmod(fd, 0o600)  # this very file, never what a path leads to
                    log("warn", "credentials_mode_fixed", file=str(self.path))
                except OSError:
                    pass
        try:
            creds = Credentials.from_json(decode(data))
        except ValueError as exc:
            raise OAuthError(
                f"{self.path}: not a credentials file rea can use ({exc}); "
                f"delete it and run python rea.py login {self.server}"
            ) from None
        return creds

    def save(self, creds: Credentials) -> None:
        self.refuse_links()
        self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.refuse_links()  # made by us, or there before: either way, no link
        os.chmod(self.folder, 0o700)  # mkdir's mode passes through the umask; this does not
        data = json.dumps(creds.to_json(), indent=2).encode() + b"\n"
        # os.replace puts a new file there, never writes through; the umask only narrows 0600
        atomic_write(self.path, data, 0o600)

    def delete(self) -> bool:
        self.refuse_links()  # below a linked folder, the file is someone else's
        try:
            self.path.unlink()
            return True
        except FileNotFoundError:
            return False

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        """An flock of SERVER.lock beside the file, around a refresh: refresh tokens rotate,
        so two gateways refreshing with one token at once would leave one of them logged
        out. A folder rea cannot write to (or a link) means no lock (and no saved refresh
        either)."""
        try:
            self.refuse_links()
            self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(
                self.folder / f"{self.server}.lock",
                os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
                0o600,
            )
        except (OSError, OAuthError):
            yield
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def stamp(self) -> tuple[int, int, int] | None:
        """Changes whenever the file is replaced: (mtime, size, inode), None without a file."""
        try:
            info = os.lstat(self.path)
        except OSError:
            return None
        return (info.st_mtime_ns, info.st_size, info.st_ino)


@dataclass(frozen=True)
class _Reply:
    status: int
    headers: Mapping[str, str]  # names in lower case
    body: bytes


def _origin(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    return f"{parts.scheme}://{parts.hostname}" + (f":{parts.port}" if parts.port else "")


def _http(
    method: str,
    url: str,
    what: str,
    timeout_s: float,
    *,
    form: Mapping[str, str] | None = None,
    body_json: JsonObj | None = None,
    headers: Mapping[str, str] | None = None,
) -> _Reply:
    """One exchange with an authorization server or a metadata URL, on a fresh connection,
    over in `timeout_s` however slowly the server answers (a deadline breaks the
    connection: a socket's own timeout is per read, and a byte now and then resets it).

    No redirect is followed: a redirect would carry a code, a secret or a token elsewhere.
    """
    import http.client
    import ssl

    problem = check_remote_url(url)
    if problem is not None:
        raise OAuthError(f"{what}: {problem}")
    parts = urllib.parse.urlsplit(url)
    host, port = parts.hostname or "", parts.port
    conn: http.client.HTTPConnection
    if parts.scheme.lower() == "https":
        context = ssl.create_default_context()
        conn = http.client.HTTPSConnection(host, port, timeout=timeout_s, context=context)
    else:
        conn = http.client.HTTPConnection(host, port, timeout=timeout_s)
    sent = {"Accept": "application/json", "User-Agent": f"rea/{VERSION}", **(headers or {})}
    payload: bytes | None = None
    if form is not None:
        payload = urllib.parse.urlencode(form).encode()
        sent["Content-Type"] = "application/x-www-form-urlencoded"
    elif body_json is not None:
        payload = json.dumps(body_json).encode()
        sent["Content-Type"] = "application/json"
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    late = threading.Event()
    # The socket itself, not conn.sock: an answer with `Connection: close` takes the socket
    # from the connection (conn.sock is None then) while its body is still being read.
    opened: list[socket.socket] = []

    def expire() -> None:
        import socket

        late.set()
        for sock in opened:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    deadline = threading.Timer(timeout_s, expire)
    deadline.name, deadline.daemon = "rea-oauth-deadline", True
    deadline.start()
    try:
        conn.connect()
        if conn.sock is not None:
            opened.append(conn.sock)
        if late.is_set():  # the deadline passed while connecting
            raise TimeoutError
        conn.request(method, target, payload, sent)
        resp = conn.getresponse()
        body = resp.read(MAX_DOCUMENT + 1)
    except _net_errors() as exc:
        if not late.is_set():
            raise OAuthError(
                f"{what}: cannot reach {_origin(url)} ({_reason(exc)}); "
                "check the network and the URL"
            ) from None
    finally:
        deadline.cancel()
        conn.close()
    if late.is_set():  # what was read may be cut short: none of it is used
        raise OAuthError(
            f"{what}: {_origin(url)} sent no whole answer within {timeout_s:.0f} s; "
            "check the network and the URL"
        )
    if len(body) > MAX_DOCUMENT:
        raise OAuthError(
            f"{what}: the answer from {_origin(url)} is larger than {MAX_DOCUMENT} bytes"
        )
    return _Reply(resp.status, {k.lower(): v for k, v in resp.getheaders()}, body)


def _json_object(reply: _Reply, what: str) -> JsonObj:
    try:  # decode: no traceback for nesting too deep, NaN or a number no double holds
        doc = as_obj(decode(reply.body))
    except ValueError:
        doc = None
    if doc is None:
        raise OAuthError(f"{what}: the answer is not a JSON object")
    return doc


def _error_code(reply: _Reply) -> str:
    """The `error` of an OAuth error answer (RFC 6749 §5.2), or the HTTP status. The
    description is not shown: it is the server's free text."""
    try:
        doc = as_obj(decode(reply.body))
    except ValueError:
        doc = None
    code = doc.get("error") if doc is not None else None
    if isinstance(code, str) and _ERROR_CODE.fullmatch(code):
        return f"HTTP {reply.status}: {code}"
    return f"HTTP {reply.status}"


def _strings(value: object) -> tuple[str, ...]:
    return tuple(v for v in value if isinstance(v, str)) if isinstance(value, list) else ()


def resource_metadata_urls(server_url: str) -> list[str]:
    """Where protected resource metadata may be (RFC 9728 §3.1): the path-suffixed well-known
    URI first, then the root one (MCP authorization server discovery order)."""
    parts = urllib.parse.urlsplit(server_url)
    origin = _origin(server_url)
    path = parts.path.rstrip("/")
    urls = [f"{origin}/.well-known/oauth-protected-resource{path}"] if path else []
    urls.append(f"{origin}/.well-known/oauth-protected-resource")
    return urls


def fetch_resource_metadata(
    server_url: str, challenge: Mapping[str, str], timeout_s: float
) -> ResourceMetadata:
    """The server's protected resource metadata: from the 401's resource_metadata, else from
    the well-known URIs (MCP authorization, Protected Resource Metadata Discovery)."""
    hinted = challenge.get("resource_metadata")
    candidates = [hinted] if hinted else resource_metadata_urls(server_url)
    doc: JsonObj | None = None
    for url in candidates:
        reply = _http("GET", url, "protected resource metadata", timeout_s)
        if reply.status == 200:
            doc = _json_object(reply, f"protected resource metadata at {public_url(url)}")
            break
    if doc is None:
        tried = ", ".join(public_url(url) for url in candidates)
        raise OAuthError(
            f"{public_url(server_url)} publishes no protected resource metadata (RFC 9728; tried "
            f"{tried}): it does not support MCP authorization; give it a key under headers: instead"
        )
    resource = doc.get("resource")
    # RFC 9728 §3.3 and §7.3: metadata about another resource must not be used, or a token
    # would be minted for one server and sent to another. rea accepts the server's own URL or
    # a path above it on the same origin.
    if not isinstance(resource, str) or not resource_covers(resource, server_url):
        raise OAuthError(
            f"the protected resource metadata of {public_url(server_url)} is about "
            f"{resource!r}, not this server; refusing it (RFC 9728 §3.3)"
        )
    servers = _strings(doc.get("authorization_servers"))
    if not servers:
        raise OAuthError(
            f"the protected resource metadata of {public_url(server_url)} names no authorization server"
        )
    return ResourceMetadata(resource, servers, _strings(doc.get("scopes_supported")))


def authorization_server_metadata_urls(issuer: str) -> list[str]:
    """Where an issuer's metadata may be, in the MCP order (RFC 8414 §3.1 path insertion,
    then OpenID discovery with path insertion, then OpenID path appending)."""
    path = urllib.parse.urlsplit(issuer).path.rstrip("/")
    origin = _origin(issuer)
    if path:
        return [
            f"{origin}/.well-known/oauth-authorization-server{path}",
            f"{origin}/.well-known/openid-configuration{path}",
            f"{origin}{path}/.well-known/openid-configuration",
        ]
    return [
        f"{origin}/.well-known/oauth-authorization-server",
        f"{origin}/.well-known/openid-configuration",
    ]


def fetch_authorization_server(issuer: str, timeout_s: float) -> AuthServerMetadata:
    """The issuer's metadata, checked: same issuer, PKCE S256, endpoints https or loopback."""
    problem = check_remote_url(issuer)
    if problem is None and urllib.parse.urlsplit(issuer).query:  # RFC 8414 §2: no query
        problem = f"{public_url(issuer)}: an issuer has no query component"
    if problem is not None:
        raise OAuthError(f"authorization server: {problem}")
    urls = authorization_server_metadata_urls(issuer)
    for url in urls:
        reply = _http("GET", url, "authorization server metadata", timeout_s)
        if reply.status != 200:
            continue
        doc = _json_object(reply, f"authorization server metadata at {public_url(url)}")
        # RFC 8414 §3.3, OpenID discovery §4.3: the document must be about the issuer we asked
        # for, or a hostile server could pose as an honest one (mix-up).
        named = doc.get("issuer")
        if named != issuer:
            shown = named[:100] if isinstance(named, str) else None
            raise OAuthError(
                f"the metadata at {public_url(url)} names issuer {shown!r}, "
                f"not {issuer}; refusing it (RFC 8414 §3.3)"
            )
        return _parse_server_metadata(issuer, doc)
    raise OAuthError(
        f"no authorization server metadata for {issuer} (tried {', '.join(urls)}); "
        "check that the server's authorization server is up"
    )


def _parse_server_metadata(issuer: str, doc: JsonObj) -> AuthServerMetadata:
    def endpoint(key: str, required: bool) -> str | None:
        value = doc.get(key)
        if value is None and not required:
            return None
        if not isinstance(value, str):
            raise OAuthError(f"the authorization server {issuer} has no {key}")
        problem = check_remote_url(value)
        if problem is not None:
            raise OAuthError(f"the authorization server's {key}: {problem}")
        return value

    # MCP authorization, Security Considerations: no code_challenge_methods_supported, or no
    # S256 in it, means no PKCE: refuse to proceed.
    if "S256" not in _strings(doc.get("code_challenge_methods_supported")):
        raise OAuthError(
            f"the authorization server {issuer} does not offer PKCE with S256; rea will not log "
            "in without it (ask the server's operator)"
        )
    response_types = doc.get("response_types_supported")
    if response_types is not None and "code" not in _strings(response_types):
        raise OAuthError(f"the authorization server {issuer} does not offer the code flow")
    return AuthServerMetadata(
        issuer=issuer,
        authorization_endpoint=endpoint("authorization_endpoint", True) or "",
        token_endpoint=endpoint("token_endpoint", True) or "",
        registration_endpoint=endpoint("registration_endpoint", False),
        revocation_endpoint=endpoint("revocation_endpoint", False),
        scopes_supported=_strings(doc.get("scopes_supported")),
        iss_parameter_supported=doc.get("authorization_response_iss_parameter_supported") is True,
        client_id_metadata_document_supported=doc.get("client_id_metadata_document_supported")
        is True,
    )


def pkce_pair() -> tuple[str, str]:
    """A code verifier (RFC 7636 §4.1: 43-128 unreserved characters) and its S256 challenge."""
    verifier = secrets.token_urlsafe(48)  # 64 characters of [A-Za-z0-9_-]
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return verifier, base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def _client_auth(client: OAuthClient, form: dict[str, str], headers: dict[str, str]) -> None:
    """Authenticate a token, revocation or refresh request as the client registered to."""
    if client.client_secret and client.auth_method == "client_secret_basic":
        # RFC 6749 §2.3.1: each part form-urlencoded before the Base64
        pair = f"{urllib.parse.quote_plus(client.client_id)}:{urllib.parse.quote_plus(client.client_secret)}"
        headers["Authorization"] = "Basic " + base64.b64encode(pair.encode()).decode("ascii")
        return
    form["client_id"] = client.client_id
    if client.client_secret and client.auth_method == "client_secret_post":
        form["client_secret"] = client.client_secret


def register_client(
    server: str, asm: AuthServerMetadata, redirect_uri: str, scope: str | None, timeout_s: float
) -> OAuthClient:
    """Dynamic client registration (RFC 7591 §3.1) as a native public client."""
    assert asm.registration_endpoint is not None
    body: JsonObj = {
        "client_name": CLIENT_NAME,
        "redirect_uris": [redirect_uri],
        "grant_types": ["authorization_code", "refresh_token"],
        "response_types": ["code"],
        "token_endpoint_auth_method": "none",
        "application_type": "native",  # MCP client registration: a CLI on localhost is native
    }
    if scope:
        body["scope"] = scope
    reply = _http(
        "POST", asm.registration_endpoint, "client registration", timeout_s, body_json=body
    )
    if reply.status not in (200, 201):
        raise OAuthError(
            f"the authorization server {asm.issuer} refused to register rea as a client "
            f"({_error_code(reply)}); register a client there with redirect URI "
            f"http://127.0.0.1/callback (any port) and set oauth.client_id for server {server} "
            "in .rea/registry.yaml"
        )
    doc = _json_object(reply, "client registration")
    client_id = doc.get("client_id")
    if not isinstance(client_id, str) or not client_id:
        raise OAuthError(
            f"the authorization server {asm.issuer} registered rea without a client_id"
        )
    secret = doc.get("client_secret")
    method = doc.get("token_endpoint_auth_method")
    if not isinstance(method, str):  # RFC 7591 §2: the default is client_secret_basic
        method = "client_secret_basic" if isinstance(secret, str) else "none"
    return OAuthClient(client_id, secret if isinstance(secret, str) else None, method)


def choose_client(
    server: str,
    asm: AuthServerMetadata,
    config: OAuthSettings,
    redirect_uri: str,
    scope: str | None,
    previous: Credentials | None,
    timeout_s: float,
) -> OAuthClient:
    """Who rea is at this authorization server, in the MCP priority order: pre-registered,
    Client ID Metadata Document, then dynamic registration (MCP client registration)."""
    if config.client_id:
        return OAuthClient(config.client_id)
    if config.client_metadata_url and asm.client_id_metadata_document_supported:
        return OAuthClient(config.client_metadata_url)  # the AS fetches the document itself
    # Without an https document of its own, rea skips the Client ID Metadata Document option
    # (see OAuthSettings) and registers. A client registered earlier with this issuer and this
    # redirect URI is used again (MCP "Authorization Server Binding": never another issuer's).
    if (
        previous is not None
        and previous.issuer == asm.issuer
        and previous.redirect_uri == redirect_uri
    ):
        return previous.client()
    if asm.registration_endpoint is not None:
        return register_client(server, asm, redirect_uri, scope, timeout_s)
    raise OAuthError(
        f"the authorization server {asm.issuer} offers no client registration (RFC 7591); "
        "register a client there with redirect URI http://127.0.0.1/callback (any port) and set "
        f"oauth.client_id for server {server} in .rea/registry.yaml"
    )


def choose_scope(
    config: OAuthSettings,
    challenge: Mapping[str, str],
    prm: ResourceMetadata,
    asm: AuthServerMetadata,
) -> str | None:
    """The registry's scopes, else the 401's scope, else the PRM's scopes_supported (MCP
    authorization, Scope Selection Strategy); offline_access added when the server lists it,
    so that a refresh token is issued (MCP authorization, Refresh Tokens)."""
    if config.scopes:
        scopes = list(config.scopes)
    elif challenge.get("scope"):
        scopes = challenge["scope"].split()
    else:
        scopes = list(prm.scopes_supported)
    if scopes and "offline_access" in asm.scopes_supported and "offline_access" not in scopes:
        scopes.append("offline_access")
    return " ".join(scopes) or None


def authorization_url(
    asm: AuthServerMetadata,
    client: OAuthClient,
    redirect_uri: str,
    challenge: str,
    state: str,
    resource: str,
    scope: str | None,
) -> str:
    query = {
        "response_type": "code",
        "client_id": client.client_id,
        "redirect_uri": redirect_uri,
        "code_challenge": challenge,
        "code_challenge_method": "S256",
        "state": state,
        "resource": resource,  # RFC 8707: the token is for this server and no other
    }
    if scope:
        query["scope"] = scope
    endpoint = asm.authorization_endpoint
    joiner = "&" if urllib.parse.urlsplit(endpoint).query else "?"
    return endpoint + joiner + urllib.parse.urlencode(query, quote_via=urllib.parse.quote)


def _token_fields(reply: _Reply, what: str) -> tuple[str, str | None, float | None, str | None]:
    """access_token, refresh_token, expires_in, scope of a token answer (RFC 6749 §5.1)."""
    doc = _json_object(reply, what)
    access = doc.get("access_token")
    kind = doc.get("token_type")
    if not isinstance(access, str) or not _BEARER_TOKEN.fullmatch(access):
        raise OAuthError(f"{what}: the answer has no usable access_token")
    if not isinstance(kind, str) or kind.lower() != "bearer":
        raise OAuthError(f"{what}: token type {str(kind)[:20]!r} is not Bearer; rea cannot use it")
    refresh = doc.get("refresh_token")
    scope = doc.get("scope")
    return (
        access,
        refresh if isinstance(refresh, str) and refresh else None,
        _lifetime(doc.get("expires_in")),
        scope if isinstance(scope, str) else None,
    )


def _lifetime(expires_in: object) -> float | None:
    """expires_in in seconds, at most MAX_TOKEN_LIFETIME_S; None (unknown: a 401 says when
    to refresh) unless it is a positive number: a token said to be expired already would
    otherwise be refreshed before every request."""
    if isinstance(expires_in, bool) or not isinstance(expires_in, int | float):
        return None
    if not expires_in > 0:  # NaN too
        return None
    return float(min(expires_in, MAX_TOKEN_LIFETIME_S))


def refresh_credentials(creds: Credentials, timeout_s: float, now: float) -> Credentials:
    """A refresh_token grant (RFC 6749 §6, with RFC 8707 resource). A refusal is NeedsLogin;
    an unreachable or failing server is TransportFailed (the refresh is tried again later)."""
    if not creds.refresh_token:
        raise NeedsLogin(creds.server, "no refresh token")
    form = {
        "grant_type": "refresh_token",
        "refresh_token": creds.refresh_token,
        "resource": creds.resource,
    }
    headers: dict[str, str] = {}
    _client_auth(creds.client(), form, headers)
    try:
        reply = _http(
            "POST", creds.token_endpoint, "token refresh", timeout_s, form=form, headers=headers
        )
    except OAuthError as exc:
        raise TransportFailed(f"server {creds.server}: {exc}") from None
    if 400 <= reply.status < 500:
        raise NeedsLogin(
            creds.server, f"the authorization server refused the refresh ({_error_code(reply)})"
        )
    if reply.status != 200:
        raise TransportFailed(
            f"server {creds.server}: the authorization server answered a token refresh with "
            f"HTTP {reply.status}; it is tried again on the next call"
        )
    try:
        access, refresh, expires_in, scope = _token_fields(reply, "token refresh")
    except OAuthError as exc:
        raise TransportFailed(f"server {creds.server}: {exc}") from None
    return replace(
        creds,
        access_token=access,
        refresh_token=refresh or creds.refresh_token,  # rotated when the server sends a new one
        expires_at=now + expires_in if expires_in is not None else None,
        obtained_at=now,
        scope=scope or creds.scope,
    )


def _refresh_margin(creds: Credentials) -> float:
    if creds.expires_at is None:
        return 0.0
    lifetime = max(0.0, creds.expires_at - creds.obtained_at)
    return min(REFRESH_MARGIN_S, lifetime / 10)


class TokenSource:
    """The access token of one remote server, as its transport needs it (SPEC §13).

    Loaded from the TokenStore and read again whenever the file changes (a `login` in another
    terminal heals a running `serve`); refreshed shortly before expiry and once after a 401; a
    refused refresh is NeedsLogin until the next login. Only the URL whose resource the token
    was issued for ever gets it (RFC 8707; no token passthrough).
    """

    def __init__(
        self,
        server: str,
        url: str,
        store: TokenStore,
        *,
        clock: Callable[[], float] = time.time,
        timeout_s: float = OAUTH_TIMEOUT_S,
        neighbours: Callable[[], Mapping[str, str]] = dict,
    ) -> None:
        self.server = server
        self.url = url
        self._store = store
        self._clock = clock
        self._timeout_s = timeout_s
        self._neighbours = neighbours  # the registry's other remote servers now: name -> url
        # guards: _creds, _stamp, _loaded, _refreshing, _refused, _secrets
        self._cond = threading.Condition()
        self._creds: Credentials | None = None
        # what _creds were checked against: the file's stamp and the neighbours then
        self._stamp: tuple[object, ...] | None = None
        self._loaded = False
        self._refreshing = False
        self._refused = False
        self._secrets: list[str] = []  # every secret this source has held, to scrub from text

    def serves(self, url: str) -> bool:
        return canonical_resource(url) == canonical_resource(self.url)

    def access_token(self, *, refresh: bool = True) -> str | None:
        """The token to send now, refreshed first when it is about to expire (unless told
        not to); None without credentials (the request goes without; a 401 then means
        NeedsLogin)."""
        creds = self._current()
        if creds is None:
            return None
        if not refresh or creds.expires_at is None:
            return creds.access_token
        if creds.expires_at - self._clock() > _refresh_margin(creds):
            return creds.access_token
        if creds.refresh_token is None:
            if creds.expires_at <= self._clock():
                raise NeedsLogin(
                    self.server, "the access token expired and there is no refresh token"
                )
            return creds.access_token
        try:
            return self._refresh(creds.access_token)
        except NeedsLogin:
            raise
        except TransportFailed:
            if creds.expires_at > self._clock():
                return creds.access_token  # not expired yet: the refresh is tried again next time
            raise

    def after_unauthorized(self, used: str | None) -> None:
        """A 401 came back for `used`: make a better token available, or raise NeedsLogin."""
        creds = self._current()
        if creds is None:
            raise NeedsLogin(self.server, "the server answered 401 and there are no credentials")
        if used is None or creds.access_token != used:
            return  # a newer token (refresh or login) exists already: the retry sends it
        self._refresh(used)

    def scrub(self, text: str) -> str:
        with self._cond:
            values = list(self._secrets)
        for value in values:
            text = text.replace(value, "[REDACTED:token]")
        return text

    def _remember(self, creds: Credentials | None) -> None:
        """Call with _cond held."""
        if creds is None:
            return
        for value in (creds.access_token, creds.refresh_token, creds.client_secret):
            if value and value not in self._secrets:
                self._secrets.append(value)
        del self._secrets[:-32]

    def _current(self) -> Credentials | None:
        neighbours = self._neighbours()
        stamp = self._stamp_now(neighbours)
        with self._cond:
            if self._loaded and stamp == self._stamp:
                return self._creds
        try:
            creds = self._store.load()
        except OAuthError as exc:
            log("warn", "oauth_credentials_unusable", server=self.server, error=str(exc))
            creds = None
        if creds is not None and not self._usable(creds, neighbours, warn=True):
            creds = None
        with self._cond:
            self._creds, self._stamp, self._loaded, self._refused = creds, stamp, True, False
            self._remember(creds)
        return creds

    def _refresh(self, stale: str) -> str:
        """Refresh once for everyone holding `stale`; callers that arrive meanwhile wait."""
        with self._cond:
            while self._refreshing:
                self._cond.wait(self._timeout_s)
            creds = self._creds
            if creds is None:
                raise NeedsLogin(self.server, "no credentials")
            if creds.access_token != stale:
                return creds.access_token  # refreshed while we waited
            if self._refused or creds.refresh_token is None:
                raise NeedsLogin(self.server, "the refresh was refused or is impossible")
            self._refreshing = True
        fresh: Credentials | None = None
        stamp: tuple[object, ...] | None = None
        try:
            with self._store.exclusive():
                fresh = self._refreshed_elsewhere(stale)
                if fresh is None:
                    fresh = refresh_credentials(creds, self._timeout_s, self._clock())
                    self._save(fresh)
                    log("info", "oauth_token_refreshed", server=self.server)
                stamp = self._stamp_now(self._neighbours())
        except NeedsLogin as exc:
            with self._cond:
                self._refused = True
            log("warn", "oauth_refresh_refused", server=self.server, why=exc.why)
            raise
        finally:
            with self._cond:
                self._refreshing = False
                if fresh is not None:
                    self._creds, self._stamp = fresh, stamp
                    self._remember(fresh)
                self._cond.notify_all()
        return fresh.access_token

    def _refreshed_elsewhere(self, stale: str) -> Credentials | None:
        """Tokens another gateway (or a login) saved since `stale` was read, else None."""
        try:
            on_disk = self._store.load()
        except OAuthError:
            return None
        if on_disk is None or on_disk.access_token == stale:
            return None
        return on_disk if self._usable(on_disk, self._neighbours(), warn=False) else None

    def _stamp_now(self, neighbours: Mapping[str, str]) -> tuple[object, ...]:
        """Changes when the file is replaced or the registry's other servers change."""
        return (self._store.stamp(), tuple(sorted(neighbours.items())))

    def _usable(self, creds: Credentials, neighbours: Mapping[str, str], warn: bool) -> bool:
        """Whether these tokens may go to this server: issued for its URL or a path above
        it, and valid at no other server of the registry (see covered_neighbour)."""
        if not resource_covers(creds.resource, self.url):
            if warn:
                log(
                    "warn",
                    "oauth_credentials_for_other_server",
                    server=self.server,
                    resource=public_url(creds.resource),
                )
            return False
        other = covered_neighbour(creds.resource, self.url, neighbours)
        if other is not None:
            if warn:
                log(
                    "warn",
                    "oauth_credentials_cover_another_server",
                    server=self.server,
                    resource=public_url(creds.resource),
                    other=other,
                    fix=f"python rea.py login {self.server} says what to do",
                )
            return False
        return True

    def _save(self, creds: Credentials) -> None:
        try:
            self._store.save(creds)
        except OSError as exc:  # the new tokens stay in memory; the next login writes again
            log(
                "error",
                "credentials_write_failed",
                server=self.server,
                error=exc.strerror or str(exc),
            )


class _CallbackListener:
    """The loopback redirect target of `login` (RFC 8252 §7.3): waits for the GET /callback
    that carries this login's state. Any local process can reach the port: a callback
    with another state, or none, is answered 400 and the wait goes on, so that no one but
    the browser this login sent can end it (or hand it a code of their own)."""

    def __init__(self, port: int, state: str) -> None:
        import http.server  # here, not at the top: only `login` needs it

        got = threading.Event()
        box: list[dict[str, str]] = []

        class CallbackServer(http.server.ThreadingHTTPServer):
            """One named daemon thread per browser connection."""

            daemon_threads = True

            def process_request(
                self, request: socket.socket | tuple[bytes, socket.socket], client_address: object
            ) -> None:
                threading.Thread(
                    target=self.process_request_thread,
                    args=(request, client_address),
                    name="rea-login-request",
                    daemon=True,
                ).start()

        class RedirectHandler(http.server.BaseHTTPRequestHandler):
            timeout = 10  # a browser's idle pre-connection must not hold a thread forever

            def do_GET(self) -> None:
                parts = urllib.parse.urlsplit(self.path)
                if parts.path != "/callback":
                    self.send_error(404)
                    return
                params: dict[str, str] = {}
                for key, value in urllib.parse.parse_qsl(parts.query, keep_blank_values=True):
                    params.setdefault(key, value)  # RFC 6749 §3.1: no parameter twice
                if not secrets.compare_digest(params.get("state", "").encode(), state.encode()):
                    self.send_error(400, "not the answer to the login in progress")
                    return
                page = b"<!doctype html><title>rea</title><p>rea: done. You can close this tab and go back to the terminal.</p>"
                try:
                    self.send_response(200)
                    self.send_header("Content-Type", "text/html; charset=utf-8")
                    self.send_header("Content-Length", str(len(page)))
                    self.send_header("Cache-Control", "no-store")
                    self.end_headers()
                    self.wfile.write(page)
                    self.wfile.flush()
                finally:
                    # only now: `login` may be done (and gone) a moment after this, and
                    # the browser must still get its page, not a closed connection
                    if not got.is_set():
                        box.append(params)
                        got.set()

            def log_message(self, format: str, *args: object) -> None:
                pass  # the request line carries the authorization code: never logged

        try:
            self._server = CallbackServer(("127.0.0.1", port), RedirectHandler)
        except OSError:
            if port == 0:
                raise
            self._server = CallbackServer(("127.0.0.1", 0), RedirectHandler)
        self.port: int = self._server.server_address[1]
        self._got = got
        self._box = box
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.1,), name="rea-login-callback", daemon=True
        )
        self._thread.start()

    def wait(self, timeout_s: float) -> dict[str, str] | None:
        return self._box[0] if self._got.wait(timeout_s) else None

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def _port_of(url: str | None) -> int:
    try:
        return (urllib.parse.urlsplit(url).port or 0) if url else 0
    except ValueError:
        return 0


def check_authorization_response(
    params: Mapping[str, str], asm: AuthServerMetadata, state: str, server: str
) -> str:
    """The code of a redirect, after the checks; OAuthError otherwise.

    iss first (RFC 9207 §2.4, as the MCP table applies it: compared whenever present, required
    when advertised); on a mismatch nothing else in the answer is acted on or shown. Then state
    (a forged or stale redirect), then error, then code.
    """
    again = f"nothing was saved; run python rea.py login {server} again"
    iss = params.get("iss")
    if iss is not None and iss != asm.issuer:
        raise OAuthError(
            f"the login answer names issuer {iss[:100]!r}, not {asm.issuer} (a mix-up attack?); {again}"
        )
    if iss is None and asm.iss_parameter_supported:
        raise OAuthError(
            f"the login answer lacks the iss its authorization server promises (RFC 9207); {again}"
        )
    if not secrets.compare_digest(params.get("state", "").encode(), state.encode()):
        raise OAuthError(
            f"the login answer's state does not match this login (a stale or forged browser tab?); {again}"
        )
    error = params.get("error")
    if error is not None:
        shown = error if _ERROR_CODE.fullmatch(error) else "an error"
        raise OAuthError(f"the authorization server refused the login ({shown}); {again}")
    code = params.get("code")
    if not code:
        raise OAuthError(f"the login answer has no code; {again}")
    return code


def login(
    server_name: str,
    url: str,
    oauth_config: OAuthSettings,
    store: TokenStore,
    open_browser: bool,
    out: TextIO,
    *,
    err: TextIO | None = None,
    headers: Mapping[str, str] | None = None,
    neighbours: Mapping[str, str] | None = None,
    timeout_s: float = LOGIN_TIMEOUT_S,
    http_timeout_s: float = OAUTH_TIMEOUT_S,
    clock: Callable[[], float] = time.time,
) -> Credentials:
    """`python rea.py login SERVER [--no-browser]`: the authorization code flow with PKCE.

    With open_browser False the authorization URL is printed alone on one line of `out` and
    the redirect is awaited; other words go to `err`. `headers` are the server's own
    (`headers:`), sent with the first request; `neighbours` the other remote servers of the
    registry (name -> url), none of which the token may be valid at. Returns the
    credentials saved; raises OAuthError (one line) on failure.
    """
    import webbrowser

    err = err if err is not None else sys.stderr
    problem = check_remote_url(url)
    if problem is not None:
        raise OAuthError(f"server {server_name}: {problem}")
    store.refuse_links()  # before anyone logs in for nothing
    status, challenge = _challenge(server_name, url, headers or {}, http_timeout_s)
    try:
        prm = fetch_resource_metadata(url, challenge, http_timeout_s)
    except OAuthError:
        if status == 401:
            raise
        raise OAuthError(
            f"server {server_name} did not ask for authorization (HTTP {status} without a token) "
            "and publishes no protected resource metadata: it needs no login (or takes a key "
            "under headers:)"
        ) from None
    other = covered_neighbour(prm.resource, url, neighbours or {})
    if other is not None:
        raise OAuthError(
            f"server {server_name}: its protected resource metadata names resource "
            f"{public_url(prm.resource)}, which covers server {other} too: a token for it would "
            f"be valid at both, so rea will not log in with it (RFC 8707); the server at "
            f"{public_url(url)} must publish metadata for its own URL"
        )
    asm = fetch_authorization_server(
        prm.authorization_servers[0], http_timeout_s
    )  # RFC 9728 §7.6: rea's choice
    scope = choose_scope(oauth_config, challenge, prm, asm)
    try:
        previous = store.load()
    except OAuthError:
        previous = None
    same_issuer = previous is not None and previous.issuer == asm.issuer
    state = secrets.token_urlsafe(32)
    port = _port_of(previous.redirect_uri) if same_issuer and previous else 0
    listener = _CallbackListener(port, state)
    try:
        redirect_uri = f"http://127.0.0.1:{listener.port}/callback"
        client = choose_client(
            server_name, asm, oauth_config, redirect_uri, scope, previous, http_timeout_s
        )
        verifier, code_challenge = pkce_pair()
        # The resource the server's metadata declares (checked to cover its URL): the token's
        # audience is what the server validates (RFC 8707 §2, RFC 9728 §2).
        address = authorization_url(
            asm, client, redirect_uri, code_challenge, state, prm.resource, scope
        )
        if open_browser:
            print(
                f"rea: opening a browser to log in to {server_name}; if none opens, visit:",
                file=err,
            )
            print(address, file=err, flush=True)
            webbrowser.open(address)
        else:
            print(address, file=out, flush=True)
        print(
            f"rea: waiting up to {timeout_s:.0f} s for the login to finish ...",
            file=err,
            flush=True,
        )
        params = listener.wait(timeout_s)
    finally:
        listener.close()
    if params is None:
        raise OAuthError(
            f"no login answer came back within {timeout_s:.0f} s; run python rea.py login {server_name} again"
        )
    code = check_authorization_response(params, asm, state, server_name)
    form = {
        "grant_type": "authorization_code",
        "code": code,
        "redirect_uri": redirect_uri,
        "code_verifier": verifier,
        "resource": prm.resource,
    }
    auth: dict[str, str] = {}
    _client_auth(client, form, auth)
    reply = _http(
        "POST", asm.token_endpoint, "token request", http_timeout_s, form=form, headers=auth
    )
    if reply.status != 200:
        raise OAuthError(
            f"the authorization server refused the token request ({_error_code(reply)}); "
            f"run python rea.py login {server_name} again"
        )
    access, refresh, expires_in, granted = _token_fields(reply, "token request")
    now = clock()
    creds = Credentials(
        server=server_name,
        resource=prm.resource,
        issuer=asm.issuer,
        token_endpoint=asm.token_endpoint,
        revocation_endpoint=asm.revocation_endpoint,
        client_id=client.client_id,
        client_secret=client.client_secret,
        auth_method=client.auth_method,
        redirect_uri=redirect_uri,
        access_token=access,
        refresh_token=refresh,
        expires_at=now + expires_in if expires_in is not None else None,
        obtained_at=now,
        scope=granted or scope,
    )
    store.save(creds)
    print(
        f"rea: logged in to {server_name}; credentials saved in {store.path}", file=out, flush=True
    )
    return creds


def _challenge(
    server: str, url: str, own: Mapping[str, str], timeout_s: float
) -> tuple[int, dict[str, str]]:
    """The status of the server's answer to a request without a token, and the Bearer
    challenge of its 401 ({} without one).

    The request is server/discover with the 2026-07-28 headers: it opens no session anywhere.
    """
    body: JsonObj = {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "server/discover",
        "params": {"_meta": child_meta(STATELESS_VERSIONS[0])},
    }
    headers = {
        **own,
        "Accept": ACCEPT,
        "MCP-Protocol-Version": STATELESS_VERSIONS[0],
        "Mcp-Method": "server/discover",
    }
    reply = _http("POST", url, f"server {server}", timeout_s, body_json=body, headers=headers)
    if reply.status == 401:
        return 401, parse_www_authenticate(reply.headers.get("www-authenticate"))
    return reply.status, {}


def logout(
    server_name: str, store: TokenStore, out: TextIO, *, timeout_s: float = OAUTH_TIMEOUT_S
) -> str | None:
    """`python rea.py logout SERVER`: revoke at the authorization server when it offers
    revocation (RFC 7009), then delete the credentials file. Returns what was done (for
    the audit record), None when there was no login to end."""
    store.refuse_links()  # a link is the user's to remove, never deleted or followed
    try:
        creds = store.load()
    except OAuthError:
        store.delete()
        print(f"rea: deleted the unreadable credentials of {server_name} ({store.path})", file=out)
        return "deleted unreadable credentials"
    if creds is None:
        print(f"rea: server {server_name} has no saved login", file=out)
        return None
    trouble = ""
    if creds.revocation_endpoint is None:
        trouble = "its authorization server offers no revocation, so the tokens stay valid until they expire"
    else:
        for token, hint in (
            (creds.refresh_token, "refresh_token"),
            (creds.access_token, "access_token"),
        ):
            if not token:
                continue
            form = {"token": token, "token_type_hint": hint}
            headers: dict[str, str] = {}
            _client_auth(creds.client(), form, headers)
            try:
                reply = _http(
                    "POST",
                    creds.revocation_endpoint,
                    "revocation",
                    timeout_s,
                    form=form,
                    headers=headers,
                )
            except OAuthError as exc:
                trouble = f"revoking failed ({exc}); the tokens stay valid until they expire"
                break
            if reply.status != 200:  # RFC 7009 §2.2: 200 also for a token already invalid
                trouble = f"revoking failed ({_error_code(reply)}); the tokens stay valid until they expire"
                break
    store.delete()
    print(
        f"rea: logged out of {server_name}; deleted {store.path}"
        + (f" ({trouble})" if trouble else ""),
        file=out,
    )
    return trouble or "revoked and deleted"


# Downstream and supervisor ###################################################

LOGIN_POLL_S = 1.0  # how often the credentials of a server that needs a login are looked at


# A tool name with these would be shown as another name, or break a client's list.
_UNSAFE_NAME = re.compile(
    "[\x00-\x1f\x7f-\x9f\u2028\u2029\u200b-\u200f\u202a-\u202e\u2060-\u2064\ufeff]"
)


class ServerStatus(StrEnum):
    """Where a downstream server is in its life."""

    STARTING = "starting"
    READY = "ready"
    FAILED = "failed"
    HELD = "held"  # trust on first use refuses to start it (§10)
    NEEDS_LOGIN = "needs-login"  # a remote server without a usable token (§13)
    DISABLED = "disabled"
    STOPPED = "stopped"


@dataclass(frozen=True)
class ToolEntry:
    """One tool as the client sees it: exposed name, owner, bare name, definition."""

    exposed: str
    server: str
    bare: str
    definition: JsonObj
    withheld: str | None = None  # why trust on first use refuses it (§10), else None
    allowed: bool = True  # in its server's `tools:` allow globs (§3), or no globs
    blocked: bool = False  # in gateway.blocked_tools when the catalog was built

    @property
    def offered(self) -> bool:
        """Listed to the client: what an agent's context carries is only what it may use."""
        return self.withheld is None and self.allowed and not self.blocked


@dataclass(frozen=True)
class ServerTools:
    """What a server offers right now, read whole: its tools and which are withheld."""

    name: str
    ready: bool
    tools: tuple[JsonObj, ...]
    withheld: Mapping[str, str]
    capabilities: JsonObj
    allow: tuple[str, ...] | None = None  # the registry's `tools:` globs


class Supervisor:
    """The restart policy of one server (§9): exponential backoff from
    `gateway.restart_backoff_s` doubling to 30 s with jitter; more than 5 restarts in 60 s
    gives up until a policy or registry change revives it."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._lock = threading.Lock()  # guards: _times, restarts, gave_up, _timer, _stopped
        self._times: collections.deque[float] = collections.deque()
        self.restarts = 0
        self.gave_up = False
        self._timer: threading.Timer | None = None
        self._stopped = False

    def schedule(self, base_s: float, restart: Callable[[], None]) -> str | None:
        """Plan the next restart; None when planned, else why not (gave up, stopped)."""
        now = time.monotonic()
        with self._lock:
            if self._stopped:
                return "stopped"
            while self._times and now - self._times[0] > RESTART_WINDOW_S:
                self._times.popleft()
            if len(self._times) >= MAX_RESTARTS:
                self.gave_up = True
                return f"gave up after {len(self._times)} restarts in {RESTART_WINDOW_S:.0f} s"
            attempt = len(self._times)
            self._times.append(now)
            delay = min(BACKOFF_MAX_S, base_s * (2**attempt)) * random.uniform(0.8, 1.2)
            timer = threading.Timer(delay, restart)
            timer.name = f"rea-restart-{self.name}"
            timer.daemon = True
            self._timer = timer
        timer.start()
        return None

    def starting_again(self) -> bool:
        """A planned restart begins: count it, unless the server was stopped meanwhile."""
        with self._lock:
            if self._stopped:
                return False
            self.restarts += 1
            self._timer = None
            return True

    def revive(self) -> bool:
        """Forget a give-up (a policy or registry change): True when there was one."""
        with self._lock:
            if not self.gave_up or self._stopped:
                return False
            self.gave_up = False
            self._times.clear()
            return True

    def stop(self) -> None:
        with self._lock:
            self._stopped = True
            timer, self._timer = self._timer, None
        if timer is not None:
            timer.cancel()


class _LoginWatch:
    """Looks at a remote server's credentials file, on the gateway's deadline thread, until
    it changes (a `login` in another terminal), then calls on_change once (§13)."""

    def __init__(
        self,
        store: TokenStore,
        stamp: tuple[int, int, int] | None,
        waiting: Callable[[], bool],
        on_change: Callable[[], None],
    ) -> None:
        self._store = store
        self._stamp = stamp
        self._waiting = waiting  # False once the server no longer needs a login (or stopped)
        self._on_change = on_change
        self._next = time.monotonic() + LOGIN_POLL_S  # only the deadline thread touches it

    def expire(self, now: float) -> float | None:
        if not self._waiting():
            return None
        if now < self._next:
            return self._next
        if self._store.stamp() == self._stamp:
            self._next = now + LOGIN_POLL_S
            return self._next
        self._on_change()
        return None


@dataclass(frozen=True)
class DownstreamHooks:
    """How a Downstream reports to the gateway: a narrow record of callbacks, not the
    gateway itself."""

    on_message: Callable[[Downstream, Transport, JsonObj], None]  # the server's own messages
    on_tools_changed: Callable[[], None]
    on_state_changed: Callable[[], None]
    on_circuit: Callable[[Downstream, CircuitState, CircuitState], None]
    audit_event: Callable[[str, str, AuditStatus, JsonObj, str | None], None]
    client_caps: Callable[[], JsonObj]  # what the client declared that the gateway relays
    redact: Callable[[str], str]  # the policy's secret patterns, as they are now
    policy: Callable[[], Policy]
    remote_urls: Callable[[], Mapping[str, str]]  # the registry's remote servers: name -> url


@dataclass(frozen=True)
class DownstreamContext:
    """What every Downstream needs from the gateway: where it runs and whom it tells."""

    root: Path
    fingerprints: Fingerprints
    deadlines: Deadlines
    timeouts: Timeouts
    hooks: DownstreamHooks


class Downstream:
    """One downstream server: its spec, its current transport, tools, health, circuit
    breaker and restarts. It supervises itself: an unexpected exit is seen at once
    (stdout closes), the transport fails the calls in flight at once, and a restart is
    planned by its Supervisor."""

    def __init__(self, spec: ServerSpec, ctx: DownstreamContext) -> None:
        self.spec = spec
        self.name = spec.name
        self._ctx = ctx
        policy = ctx.hooks.policy()
        self.breaker = CircuitBreaker(
            policy.breaker_failure_threshold,
            policy.breaker_cooldown_s,
            on_transition=lambda old, new: ctx.hooks.on_circuit(self, old, new),
        )
        self.supervisor = Supervisor(spec.name)
        self.ready = threading.Event()  # set when the first start attempt has ended
        self._lock = threading.Lock()  # guards: every field below
        self._transport: Transport | None = None
        self._status = ServerStatus.STARTING
        self._tools: tuple[JsonObj, ...] = ()
        self._capabilities: JsonObj = {}
        self._last_error: str | None = None
        self._calls = 0
        self._errors = 0
        self._withheld: dict[str, str] = {}  # tool -> what changed since it was pinned (§10)
        self._new_tools: tuple[str, ...] = ()
        self._removed_tools: tuple[str, ...] = ()
        self._secret_values: tuple[str, ...] = ()  # resolved env: values, longest first
        self._tokens: TokenSource | None = None  # a remote server's: scrubbed like env values
        self._stopping = False
        self._starter: threading.Thread | None = None  # the first start, joined at stop
        self._refreshing = False  # a tools refresh runs
        self._refresh_again = False  # the list changed again while it ran

    # -- what others read --

    @property
    def status(self) -> ServerStatus:
        with self._lock:
            return self._status

    @property
    def capabilities(self) -> JsonObj:
        with self._lock:
            return self._capabilities

    def tools_now(self) -> ServerTools:
        with self._lock:
            return ServerTools(
                self.name,
                self._status is ServerStatus.READY,
                self._tools,
                dict(self._withheld),
                self._capabilities,
                self.spec.tools,
            )

    def transport_for_call(self) -> Transport:
        """The live transport a call goes to; ChildDied says why there is none."""
        with self._lock:
            transport, status, why = self._transport, self._status, self._last_error
        if status is ServerStatus.NEEDS_LOGIN:
            raise NeedsLogin(self.name)
        if transport is None or not transport.alive or status is not ServerStatus.READY:
            raise ChildDied(f"server {self.name} is not running: {why or status.value}")
        return transport

    def live_transport(self, capability: str | None = None) -> Transport | None:
        """The transport of a ready server (offering `capability`, when named)."""
        with self._lock:
            transport, ready = self._transport, self._status is ServerStatus.READY
            offered = capability is None or capability in self._capabilities
        if ready and offered and transport is not None and transport.alive:
            return transport
        return None

    def tally(self, failed: bool) -> None:
        with self._lock:
            self._calls += 1
            if failed:
                self._errors += 1

    def scrub(self, text: str) -> str:
        """Text from or about this server, with secret patterns, its env: and headers:
        values and its OAuth tokens removed (a server may echo its token in an error)."""
        text = self._ctx.hooks.redact(text)
        with self._lock:
            values, tokens = self._secret_values, self._tokens
        for value in values:
            text = text.replace(value, "[REDACTED:env]")
        return tokens.scrub(text) if tokens is not None else text

    @property
    def healthy(self) -> bool:
        return self.status is ServerStatus.READY and self.breaker.state is not CircuitState.OPEN

    def status_record(self, open_transitions: int, blocker_emitted: bool) -> DownstreamStatus:
        """This server's entry of the live state (§8): one frozen record for the state
        file, `status`, health and metrics alike."""
        circuit = self.breaker.state
        retry_at = self.breaker.retry_at()
        with self._lock:
            transport = self._transport
            alive = transport is not None and transport.alive
            return DownstreamStatus(
                name=self.name,
                connected=self._status is ServerStatus.READY and alive,
                healthy=self._status is ServerStatus.READY and circuit is not CircuitState.OPEN,
                circuit_state=circuit.value,
                retry_at=retry_at,
                last_error=self._last_error,
                tools_count=len(self._tools),
                open_transitions=open_transitions,
                session_blocker_emitted=blocker_emitted,
                pid=transport.pid if transport is not None and alive else None,
                restarts=self.supervisor.restarts,
                calls=self._calls,
                errors=self._errors,
                status=self._status.value,
                era=transport.era.value if transport is not None else None,
                url=public_url(self.spec.url) if self.spec.remote else None,
                withheld_tools=dict(self._withheld),
                new_tools=self._new_tools,
                removed_tools=self._removed_tools,
            )

    # -- life cycle --

    def start(self) -> None:
        if not self.spec.enabled:
            with self._lock:
                self._status = ServerStatus.DISABLED
            self.ready.set()
            return
        self._starter = threading.Thread(
            target=self._bring_up, name=f"rea-start-{self.name}", daemon=True
        )
        self._starter.start()

    def _bring_up(self) -> None:
        """Start the server (its own thread): a bug on the way fails this server with a
        log line, never the thread silently (§9)."""
        try:
            self._start_server()
        except Exception as exc:
            log_bug("server_start", exc, server=self.name)
            self._fail(f"rea could not start it ({type(exc).__name__})", retry=True)

    def _start_server(self) -> None:
        hooks = self._ctx.hooks
        held = self._ctx.fingerprints.check_server(self.spec)
        if held is not None:
            self._hold(held)
            return
        transport = self._connect() if self.spec.remote else self._spawn()
        if transport is None:
            return
        with self._lock:
            stopping = self._stopping
            if not stopping:
                self._transport = transport
        if stopping:
            transport.stop()
            return
        try:
            caps = open_transport(transport, self._ctx.timeouts, hooks.client_caps())
            tools = list_tools(transport, self._ctx.timeouts.handshake_s)
        except NeedsLogin as exc:  # no restart loop: a login, seen on disk, brings it up
            transport.stopping = True
            threading.Thread(target=transport.stop, daemon=True).start()
            self._needs_login(exc)
            return
        except (RpcError, ChildDied, TimeoutError, ValueError) as exc:
            tail = "" if self.spec.remote else transport.last_stderr()  # remote: in exc already
            transport.stopping = True
            threading.Thread(target=transport.stop, daemon=True).start()
            self._fail(f"{exc}" + (f" (stderr: {tail})" if tail else ""), retry=True)
            return
        self._take_tools(tools, caps)
        log(
            "info",
            "server_ready",
            server=self.name,
            era=transport.era.value,
            version=transport.version,
            tools=len(tools),
            pid=transport.pid,
        )
        hooks.on_tools_changed()  # before `ready`: the first tools/list must see these tools
        self.ready.set()
        if not transport.alive:  # died between its last answer and `ready`: its exit was ignored
            self._on_exit(transport, None)

    def _spawn(self) -> Transport | None:
        """Start the server's process; None (the failure recorded) when it cannot start."""
        try:
            env = child_environment(self.spec, os.environ)
        except ReaError as exc:  # an unset ${VAR}: this server only, never retried
            self._fail(str(exc), retry=False)
            return None
        # env: values are secrets by contract (§3): scrubbed from whatever the child says
        values = {env[key] for key in self.spec.env if len(env.get(key, "")) >= MIN_SECRET_CHARS}
        self._keep_secrets(values)
        hooks = self._ctx.hooks
        try:
            return ChildProcess(
                self.name,
                [self.spec.command, *self.spec.args],
                env,
                self._ctx.root,
                lambda t, msg: hooks.on_message(self, t, msg),
                self._on_exit,
                self._ctx.deadlines,
                self._ctx.timeouts,
            )
        except OSError as exc:
            self._fail(f"cannot start {self.spec.command!r}: {exc.strerror or exc}", retry=False)
            return None

    def _connect(self) -> Transport | None:
        """The transport to a remote server (§13): no process and no child environment; its
        headers expanded, its token from .rea/credentials/. None when it cannot be made."""
        try:
            headers = expanded_headers(self.spec, os.environ)
        except ReaError as exc:  # an unset ${VAR}: this server only, never retried
            self._fail(str(exc), retry=False)
            return None
        # headers: values are secrets by contract (§3), like env: values
        self._keep_secrets({v for v in headers.values() if len(v) >= MIN_SECRET_CHARS})
        hooks = self._ctx.hooks

        def neighbours() -> dict[str, str]:  # as the registry is now (it may be reloaded)
            return {name: url for name, url in hooks.remote_urls().items() if name != self.name}

        tokens = TokenSource(self.name, self.spec.url, self._token_store(), neighbours=neighbours)
        with self._lock:
            self._tokens = tokens
        return StreamableHttpTransport(
            self.name,
            self.spec.url,
            headers,
            lambda t, msg: hooks.on_message(self, t, msg),
            self._on_exit,
            self._ctx.deadlines,
            self._ctx.timeouts,
            tokens,
            self._on_needs_login,
        )

    def _token_store(self) -> TokenStore:
        return TokenStore(self._ctx.root / REA_DIR / CREDENTIALS_DIR, self.name)

    def _keep_secrets(self, values: set[str]) -> None:
        with self._lock:
            self._secret_values = tuple(sorted(values, key=len, reverse=True))

    def _on_needs_login(self, transport: Transport, exc: NeedsLogin) -> None:
        """A running remote server refused its token and no refresh mends it (§13)."""
        with self._lock:
            if self._transport is not transport or self._status is not ServerStatus.READY:
                return  # during start-up _bring_up sees the NeedsLogin itself
        transport.stopping = True
        threading.Thread(target=transport.stop, name=f"rea-stop-{self.name}", daemon=True).start()
        self._needs_login(exc)

    def _needs_login(self, exc: NeedsLogin) -> None:
        """Show the server as needing a login (status, health, and its calls say so) and
        bring it up again once the credentials file changes: no restart loop, no browser."""
        store = self._token_store()
        stamp = store.stamp()
        pinned = self._ctx.fingerprints.pinned_tools(self.name)
        with self._lock:
            if self._stopping:
                return
            self._status = ServerStatus.NEEDS_LOGIN
            self._last_error = str(exc)
            if not self._tools:  # its pinned tools answer "needs a login" when called
                self._tools = tuple(pinned)
        log("warn", "server_needs_login", server=self.name, why=exc.why)
        log("warn", "health_changed", server=self.name, healthy=False, reason=str(exc))
        self._ctx.hooks.on_tools_changed()
        self.ready.set()
        watch = _LoginWatch(
            store, stamp, lambda: self.status is ServerStatus.NEEDS_LOGIN, self._logged_in
        )
        self._ctx.deadlines.watch(watch, time.monotonic() + LOGIN_POLL_S)

    def _logged_in(self) -> None:
        """The credentials changed while the server needed a login: bring it up again."""
        with self._lock:
            if self._stopping or self._status is not ServerStatus.NEEDS_LOGIN:
                return
            self._status = ServerStatus.STARTING
        log("info", "credentials_changed", server=self.name)
        threading.Thread(target=self._bring_up, name=f"rea-start-{self.name}", daemon=True).start()

    def _take_tools(self, tools: list[JsonObj], caps: JsonObj | None = None) -> None:
        """Compare the tools with their pins (§10): changed ones are withheld, new ones
        pinned. A list naming one tool twice holds the whole server: the copy checked
        must be the copy exposed, and a server that lists two copies is not to be
        trusted with either."""
        names = [str(t["name"]) for t in tools]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            why = f"server {self.name} is held: it lists tool {twice[0]} more than once"
            verdict = ToolVerdict((), (), dict.fromkeys(names, why), ())
            log("error", "server_held", server=self.name, reason=why)
            self._ctx.hooks.audit_event(
                "server_tools", self.name, AuditStatus.DENIED, {"event": "SERVER_HELD"}, why
            )
        else:
            verdict = self._ctx.fingerprints.check_tools(self.name, tools)
        withheld = {**self._suspect_tools(tools), **verdict.changed}
        with self._lock:
            was = self._status
            self._tools = tuple(tools)
            self._withheld = withheld
            self._new_tools = verdict.new
            self._removed_tools = verdict.removed
            if caps is not None:
                self._capabilities = caps
                self._status = ServerStatus.READY
                self._last_error = None
            if twice:
                self._last_error = why
        if caps is not None and was is not ServerStatus.READY:
            log("info", "health_changed", server=self.name, healthy=True)

    def wants_refresh(self) -> bool:
        """Note a tools/list_changed; True when a refresh must be started (none runs)."""
        with self._lock:
            if self._refreshing:
                self._refresh_again = True
                return False
            self._refreshing = True
            return True

    def _suspect_tools(self, tools: list[JsonObj]) -> dict[str, str]:
        """Tools withheld for what they are, whatever their pins: a name holding control
        or invisible characters (it would be shown as another), and, under
        `injection_detection: block`, a definition that reads like a prompt injection
        (descriptions and schemas reach the model on every turn)."""
        block = self._ctx.hooks.policy().injection_detection == "block"
        suspect: dict[str, str] = {}
        for tool in tools:
            name = str(tool["name"])
            if _UNSAFE_NAME.search(name):
                suspect[name] = "its name holds control or invisible characters"
                continue
            shown = {
                k: tool.get(k)
                for k in ("title", "description", "inputSchema", "outputSchema", "annotations")
            }
            verdict = scan_injection(content_text(shown), Tier.READ)
            if verdict.verdict == "likely_injection":
                phrases = ", ".join(verdict.phrases)
                log(
                    "warn",
                    "tool_definition_injection",
                    server=self.name,
                    tool=name,
                    phrases=phrases,
                )
                if block:
                    suspect[name] = f"its definition looks like a prompt injection ({phrases})"
        return suspect

    def refresh_tools(self) -> None:
        """Re-read the server's tools (after notifications/tools/list_changed), again
        while more changes arrived meanwhile."""
        try:
            while True:
                self._refresh_once()
                with self._lock:
                    if not self._refresh_again:
                        self._refreshing = False
                        return
                    self._refresh_again = False
        except BaseException:
            with self._lock:
                self._refreshing = False
            raise

    def _refresh_once(self) -> None:
        transport = self.live_transport()
        if transport is None:
            return
        try:
            tools = list_tools(transport, self._ctx.timeouts.handshake_s)
        except (RpcError, ChildDied, TimeoutError, ValueError) as exc:
            log("warn", "tools_refresh_failed", server=self.name, error=self.scrub(str(exc)))
            return
        self._take_tools(tools)
        self._ctx.hooks.on_tools_changed()

    def _hold(self, reason: str) -> None:
        """Trust on first use refuses to start a server whose definition changed (§10)."""
        with self._lock:
            self._status = ServerStatus.HELD
            self._last_error = reason
        log("error", "server_held", server=self.name, reason=reason)
        self._ctx.hooks.audit_event(
            "server_start",
            self.name,
            AuditStatus.DENIED,
            {"event": "SERVER_HELD"},
            f"rea: denied: server {self.name} not started: {reason}",
        )
        self._ctx.hooks.on_tools_changed()
        self.ready.set()

    def _fail(self, reason: str, retry: bool) -> None:
        reason = self.scrub(reason)
        with self._lock:
            self._status = ServerStatus.FAILED
            self._last_error = reason  # its last known tools stay routable, to fail clearly
        log("error", "server_start_failed", server=self.name, error=reason)
        log("warn", "health_changed", server=self.name, healthy=False, reason=reason)
        self._ctx.hooks.on_tools_changed()
        self.ready.set()
        if retry:
            self._plan_restart()

    def _on_exit(self, transport: Transport, code: int | None) -> None:
        with self._lock:
            if (
                transport.stopping
                or self._stopping
                or self._transport is not transport
                or self._status is not ServerStatus.READY
            ):
                return  # a death during start-up is handled by _bring_up's failure path
            tail = transport.last_stderr()
            if self.spec.remote:
                why = tail or "disconnected"
            else:
                why = f"exited with code {code}" + (f": {tail}" if tail else "")
            self._status = ServerStatus.FAILED
        why = self.scrub(why)
        with self._lock:
            self._last_error = why
        log(
            "error",
            "child_died_unexpectedly",
            server=self.name,
            pid=transport.pid,
            code=code,
            stderr=why,
        )
        log("warn", "health_changed", server=self.name, healthy=False, reason=why)
        # whatever is left of it (its helpers, or a process that closed stdout without
        # exiting) is stopped before a restart
        transport.stopping = True
        threading.Thread(target=transport.stop, name=f"rea-stop-{self.name}", daemon=True).start()
        self._ctx.hooks.on_tools_changed()
        self._plan_restart()

    def _plan_restart(self) -> None:
        why_not = self.supervisor.schedule(
            self._ctx.hooks.policy().restart_backoff_s, self._restart
        )
        if why_not is not None and why_not != "stopped":
            with self._lock:
                self._last_error = f"{why_not}: {self._last_error}"
                last = self._last_error
            log("error", "supervisor_gave_up", server=self.name, error=last)
        self._ctx.hooks.on_state_changed()

    def _restart(self) -> None:
        if not self.supervisor.starting_again():
            return
        with self._lock:
            if self._stopping:
                return
            self._status = ServerStatus.STARTING
        log("info", "respawned", server=self.name, restarts=self.supervisor.restarts)
        self._bring_up()

    def revive(self) -> None:
        """A policy or registry change gives a server the supervisor gave up on a new start."""
        if self.supervisor.revive():
            log("info", "supervisor_revived", server=self.name)
            threading.Thread(
                target=self._restart, name=f"rea-start-{self.name}", daemon=True
            ).start()

    def stop(self) -> None:
        """Stop the server for good: no restart, its process stopped and its threads joined."""
        self.supervisor.stop()
        with self._lock:
            self._stopping = True
            self._status = ServerStatus.STOPPED
            transport = self._transport
        if transport is not None:
            transport.stopping = True
            transport.stop()
        starter = self._starter
        if starter is not None and starter is not threading.current_thread():
            # the transport's stop failed what the start waits for and broke its connections
            starter.join(timeout=self._ctx.timeouts.kill_after_s)
        with self._lock:
            late = self._transport  # started while we stopped: _bring_up stops it itself
        if late is not None and late is not transport:
            late.stopping = True
            late.stop()
        self.ready.set()


# Call pipeline ###############################################################
#
# Every call goes through the same lifecycle (§6): tools/call, resources/read and
# subscribe, prompts/get and completion/complete alike. Steps decide over a read-only
# view of the call; one admission step takes its resources (a concurrency slot and a
# breaker ticket, the Permit); the result checks make the Outcome that `finish` records.


@dataclass(frozen=True)
class Rules:
    """The policy in force and what is compiled from it; swapped whole on reload."""

    policy: Policy
    redactor: Redactor
    guard: PathGuard


class CallKind(StrEnum):
    """What a call is, by the client's method; the health tool is the gateway's own."""

    TOOL = "tools/call"
    HEALTH = "health"
    RESOURCE = "resources/read"
    SUBSCRIBE = "resources/subscribe"
    UNSUBSCRIBE = "resources/unsubscribe"
    PROMPT = "prompts/get"
    COMPLETION = "completion/complete"


class CallState(StrEnum):
    """Where a call is in its one lifecycle; FINISHED is reached once, by `finish`."""

    RECEIVED = "received"  # read from the client, in flight, not yet admitted
    ADMITTED = "admitted"  # passed the steps, holds its permit
    FORWARDED = "forwarded"  # sent to its server, waiting for the answer
    ANSWERED = "answered"  # the server answered; the result is being checked
    WAITING_INPUT = "waiting for input"  # an input round with the client (SEP-2322)
    TASK = "running as a task"  # answered with a task handle; its outcome is not final yet
    FINISHED = "finished"


@dataclass(frozen=True)
class Target:
    """Where a call goes: the server, the name it knows the thing by, the tool's entry."""

    downstream: Downstream
    bare: str  # bare tool or prompt name; the uri of a resource
    entry: ToolEntry | None = None


@dataclass(frozen=True)
class Decision:
    """A pipeline step's refusal: the audit status and the message for the client."""

    status: AuditStatus
    message: str
    rpc_code: int | None = None  # answer with this JSON-RPC error instead of a result


@dataclass(frozen=True)
class CallView:
    """What a pipeline step sees of a call: read-only, made afresh for every round."""

    kind: CallKind
    name: str  # as the client named it
    arguments: JsonObj  # what the blocked-path step reads
    rules: Rules
    halt: str | None  # the reason in .rea/HALT, read for this round
    target: Target | None
    tier: Tier
    suspicious: str | None  # the session's earlier suspicious result, if any
    unrouted: Decision | None = None  # why nothing serves the call, when nothing does


Step = Callable[[CallView], Decision | None]


def denied(why: str, allow: str) -> Decision:
    return Decision(AuditStatus.DENIED, f"rea: denied: {why}. {allow}")


def step_halt(view: CallView) -> Decision | None:
    if view.halt is None:
        return None
    return denied(
        f"the gateway is frozen (.rea/HALT): {view.halt}",
        "`python rea.py unfreeze` allows calls again",
    )


def step_route(view: CallView) -> Decision | None:
    if view.target is not None:
        return None
    return view.unrouted or Decision(AuditStatus.ERROR, f"unknown: {view.name}", INVALID_PARAMS)


def step_trust(view: CallView) -> Decision | None:
    entry = view.target.entry if view.target is not None else None
    if entry is None or entry.withheld is None:
        return None
    if entry.withheld.endswith("changed"):  # a pin's comparison: a possible rug pull
        return denied(
            f"tool {entry.server}__{entry.bare} changed since it was pinned ({entry.withheld})",
            f"Review it with `python rea.py trust {entry.server} --tool {entry.bare}`, which re-pins it",
        )
    return denied(
        f"tool {entry.server}__{entry.bare} is withheld: {entry.withheld}",
        f"It is not offered until server {entry.server} lists it cleanly; "
        "`python rea.py status` shows what is withheld",
    )


def step_allowed_tools(view: CallView) -> Decision | None:
    entry = view.target.entry if view.target is not None else None
    if entry is None or entry.allowed:
        return None
    return denied(
        f"tool {entry.server}__{entry.bare} is not in the tools: list of server {entry.server}",
        "Add it to that server's tools: in .rea/registry.yaml to offer it",
    )


def step_blocked_tools(view: CallView) -> Decision | None:
    entry = view.target.entry if view.target is not None else None
    patterns = view.rules.policy.blocked_tools
    if entry is None or not patterns:
        return None
    full = f"{entry.server}__{entry.bare}"
    if glob_match_tool(patterns, full) or glob_match_tool(patterns, view.name):
        return denied(
            f"tool {full} is in gateway.blocked_tools",
            "Remove it from gateway.blocked_tools in .rea/policy.yaml to allow it",
        )
    return None


def step_autonomy(view: CallView) -> Decision | None:
    level = view.rules.policy.autonomy_level
    if autonomy_allows(level, view.tier):
        return None
    bare = view.target.bare if view.target is not None else view.name
    return denied(
        f"autonomy level {level} does not allow {view.tier}-tier tools (tool {bare})",
        "Raise autonomy_level in .rea/policy.yaml (L3 allows destructive) to allow it",
    )


def step_injection_lock(view: CallView) -> Decision | None:
    if (
        view.tier is Tier.READ
        or not view.rules.policy.suspicious_blocks_writes
        or not view.suspicious
    ):
        return None
    return denied(
        f"an earlier result in this session looked like a prompt injection ({view.suspicious}); "
        f"{view.tier}-tier calls are blocked for the rest of the session",
        "Start a new session, or set injection.suspicious_blocks_writes: false",
    )


def step_blocked_paths(view: CallView) -> Decision | None:
    hit = view.rules.guard.check(view.arguments, tier=view.tier)
    if hit is None:
        return None
    path, glob = hit
    what = "argument" if view.kind is CallKind.TOOL else view.kind.value
    if glob.startswith("/proc/"):
        return denied(
            f"{what} names {path!r}, a per-process file of /proc ({glob})",
            "These are always refused: the server would read its own process, not yours",
        )
    return denied(
        f"{what} names a blocked path {path!r} (matches {glob!r})",
        "Edit blocked_paths in .rea/policy.yaml to allow it (.rea/ itself, and in a write "
        "any folder holding it, are always refused)",
    )


# The steps of each kind of call, in order; the first refusal ends it (§6). Admission
# (limits, breaker) follows them for every call that reaches a server.
TOOL_STEPS: tuple[Step, ...] = (
    step_halt,
    step_route,
    step_trust,
    step_allowed_tools,
    step_blocked_tools,
    step_autonomy,
    step_injection_lock,
    step_blocked_paths,
)
REQUEST_STEPS: tuple[Step, ...] = (step_halt, step_route, step_blocked_paths)
STEPS: Mapping[CallKind, tuple[Step, ...]] = {
    CallKind.TOOL: TOOL_STEPS,
    CallKind.HEALTH: (),  # answers even under HALT (§8)
    CallKind.RESOURCE: REQUEST_STEPS,
    CallKind.SUBSCRIBE: REQUEST_STEPS,
    CallKind.UNSUBSCRIBE: (step_route,),  # letting go of a subscription is always allowed
    CallKind.PROMPT: REQUEST_STEPS,
    CallKind.COMPLETION: REQUEST_STEPS,
}


def decide(view: CallView) -> Decision | None:
    """Run the call's steps over its view: the first refusal, or None to go on."""
    for step in STEPS[view.kind]:
        decision = step(view)
        if decision is not None:
            return decision
    return None


class CallLimiter:
    """Per-server rate and concurrency slots (§6 step 7), checked and taken in one step
    so that concurrent calls cannot both pass; given back once, by the call's finish."""

    def __init__(self) -> None:
        self._lock = threading.Lock()  # guards: _in_flight, _times
        self._in_flight: dict[str, int] = {}
        self._times: dict[str, collections.deque[float]] = {}

    def take(self, server: str, limits: ServerLimits | None) -> str | None:
        """Take a slot; None when taken, else the refusal (with what would allow it)."""
        now = time.monotonic()
        with self._lock:
            in_flight = self._in_flight.get(server, 0)
            if limits is not None and limits.calls_per_minute:
                times = self._times.setdefault(server, collections.deque())
                while times and now - times[0] >= 60.0:
                    times.popleft()
                if len(times) >= limits.calls_per_minute:
                    wait = 60.0 - (now - times[0])
                    return (
                        f"rea: denied: server {server} is over its rate limit of "
                        f"{limits.calls_per_minute} calls per minute; retry in {wait:.1f} s. "
                        f"Raise gateway.servers.{server}.calls_per_minute to allow more"
                    )
            if (
                limits is not None
                and limits.max_concurrent_calls
                and in_flight >= limits.max_concurrent_calls
            ):
                return (
                    f"rea: denied: server {server} already has {in_flight} calls in flight "
                    f"(limit {limits.max_concurrent_calls}). Retry later, or raise "
                    f"gateway.servers.{server}.max_concurrent_calls"
                )
            if limits is not None and limits.calls_per_minute:
                self._times[server].append(now)
            self._in_flight[server] = in_flight + 1
        return None

    def give_back(self, server: str) -> None:
        with self._lock:
            self._in_flight[server] = max(0, self._in_flight.get(server, 0) - 1)


@dataclass(frozen=True)
class Permit:
    """What admission took for a call: a concurrency slot and a breaker ticket."""

    server: str
    breaker: CircuitBreaker
    ticket: BreakerTicket


@dataclass(frozen=True)
class Outcome:
    """How a call ended, as `finish` records and answers it. No answer at all (neither
    result nor error) is a cancelled call's: MCP sends a cancelled request nothing."""

    status: AuditStatus
    result: JsonObj | None = None  # the answer, when it is a result
    error: RpcError | None = None  # the answer, when it is a JSON-RPC error
    note: str | None = None  # the audit record's `error`
    metadata: JsonObj = field(default_factory=dict)
    redacted: bool = False  # secrets were removed from the answer
    verdict: BreakerVerdict = BreakerVerdict.UNUSED  # what the call tells the circuit


def refusal_outcome(kind: CallKind, decision: Decision) -> Outcome:
    """A step's refusal as the client gets it: a tool's `isError` result (§5), a JSON-RPC
    error for the other requests and for routing errors."""
    if decision.rpc_code is not None:
        err = RpcError(decision.rpc_code, decision.message)
        return Outcome(decision.status, error=err, note=decision.message)
    if kind in (CallKind.TOOL, CallKind.HEALTH):
        return Outcome(decision.status, tool_error_result(decision.message), note=decision.message)
    err = RpcError(POLICY_DENIED, decision.message)
    return Outcome(decision.status, error=err, note=decision.message)


def failure_outcome(
    kind: CallKind,
    text: str,
    error: RpcError | None = None,
    verdict: BreakerVerdict = BreakerVerdict.FAILURE,
) -> Outcome:
    """A call that failed at or on the way to its server (timeout, death, its error); one
    the server never got to judge (a login it needs) leaves its circuit alone."""
    if error is not None:
        return Outcome(AuditStatus.ERROR, error=error, note=text, verdict=verdict)
    if kind in (CallKind.TOOL, CallKind.HEALTH):
        return Outcome(AuditStatus.ERROR, tool_error_result(text), note=text, verdict=verdict)
    return Outcome(
        AuditStatus.ERROR, error=RpcError(INTERNAL_ERROR, text), note=text, verdict=verdict
    )


def _verdict_of(error: Exception | None) -> BreakerVerdict:
    """A server that needs a login is not failing: its circuit must not open while the user
    has yet to log in, or the first calls after the login would be refused (§9, §13)."""
    return BreakerVerdict.UNUSED if isinstance(error, NeedsLogin) else BreakerVerdict.FAILURE


def internal_outcome(kind: CallKind, text: str) -> Outcome:
    """A bug met on this call's way: the client still gets one clear answer."""
    message = f"rea: error: internal error ({text}); the call was not sent again"
    if kind in (CallKind.TOOL, CallKind.HEALTH):
        return Outcome(AuditStatus.ERROR, tool_error_result(message), note=message)
    return Outcome(AuditStatus.ERROR, error=RpcError(INTERNAL_ERROR, message), note=message)


def check_tool_result(
    rules: Rules, tier: Tier, tool: str, result: JsonObj
) -> tuple[Outcome, InjectionVerdict]:
    """§6 step 10 for a tool's result: capped first (the redaction regexes, the user's
    among them, scan at most the cap), then secrets redacted, then scanned for prompt
    injection; a likely injection is withheld under `injection_detection: block`."""
    policy = rules.policy
    metadata: JsonObj = {}
    text = COMPACT_JSON.encode(result)  # once, for the cap and the redaction's prescan
    fits = _wire_size(text) <= policy.max_result_kb * 1024
    if not fits:
        result, _ = cap_result(result, policy.max_result_kb * 1024)
        metadata["truncated"] = True
    value, names = rules.redactor.redact_value(result, text if fits else None)
    processed = as_obj(value) or {}
    if names:  # a redaction can be longer than the secret: the cap holds for what is sent
        processed, again = cap_result(processed, policy.max_result_kb * 1024)
        if again:
            metadata["truncated"] = True
    verdict = scan_injection(content_text(processed), tier)
    status = AuditStatus.ALLOWED
    if verdict.verdict != "clean":
        metadata["injection"] = {
            "verdict": verdict.verdict,
            "phrases": list(verdict.phrases),
            "base64": verdict.via_base64,
        }
        if verdict.verdict == "likely_injection" and policy.injection_detection == "block":
            status = AuditStatus.DENIED
            processed = tool_error_result(
                f"rea: denied: the result of {tool} was withheld: it looks like a prompt "
                f"injection ({', '.join(verdict.phrases)}). Set injection_detection: warn in "
                ".rea/policy.yaml to let such results through with a warning"
            )
    if names:
        metadata["redacted"] = list(names)
    outcome = Outcome(
        status,
        processed,
        metadata=metadata,
        redacted=bool(names),
        verdict=BreakerVerdict.SUCCESS,  # an isError result is the tool's answer (§9)
    )
    return outcome, verdict


def check_error(rules: Rules, tier: Tier, tool: str, error: RpcError) -> Outcome:
    """§6 step 10 on the error channel: a server's JSON-RPC error reaches the model as
    surely as a result, so its `message` and `data` are capped, redacted and scanned
    the same way; a likely injection is withheld under `injection_detection: block`."""
    max_bytes = rules.policy.max_result_kb * 1024
    message, data, cut = _cap_error(error.message, error.data, max_bytes)
    redacted, names = rules.redactor.redact_value({"message": message, "data": data})
    parts = as_obj(redacted) or {}
    message, data = str(parts.get("message", "")), parts.get("data")
    if names:  # a redaction can be longer than the secret: capped again
        message, data, again = _cap_error(message, data, max_bytes)
        cut = cut or again
    metadata: JsonObj = {"truncated": True} if cut else {}
    if names:
        metadata["redacted"] = list(names)
    shown = message if data is None else f"{message}\n{json.dumps(data, ensure_ascii=False)}"
    verdict = scan_injection(shown, tier)
    status = AuditStatus.ERROR
    if verdict.verdict != "clean":
        metadata["injection"] = {
            "verdict": verdict.verdict,
            "phrases": list(verdict.phrases),
            "base64": verdict.via_base64,
        }
        if verdict.verdict == "likely_injection" and rules.policy.injection_detection == "block":
            status, data = AuditStatus.DENIED, None
            message = (
                f"rea: denied: the error of {tool} was withheld: it looks like a prompt "
                f"injection ({', '.join(verdict.phrases)}). Set injection_detection: warn in "
                ".rea/policy.yaml to let such errors through with a warning"
            )
    return Outcome(
        status,
        error=RpcError(error.code, message, data),
        note=f"server error {error.code}: {message}",
        metadata=metadata,
        redacted=bool(names),
        verdict=BreakerVerdict.FAILURE,
    )


def _cap_error(message: str, data: object, max_bytes: int) -> tuple[str, object, bool]:
    """An error's message and data within max_bytes together, as JSON (escapes counted,
    as they are sent): the message cut, and the data dropped when both do not fit."""
    capped, cut = cap_value(message, max_bytes)
    message = str(capped)
    if data is not None and _json_size(data) + _json_size(message) > max_bytes:
        data, cut = None, True
    return message, data, cut


def check_request_result(rules: Rules, what: str, result: JsonObj) -> Outcome:
    """§6 step 10 for a resource, prompt or completion result, as for a tool's: capped,
    redacted, and scanned (at read tier: one phrase is a likely injection); withheld
    under `injection_detection: block`."""
    metadata: JsonObj = {}
    capped, truncated = cap_value(result, rules.policy.max_result_kb * 1024)
    if truncated:
        metadata["truncated"] = True
    value, names = rules.redactor.redact_value(capped)
    if names:
        metadata["redacted"] = list(names)
        value, again = cap_value(value, rules.policy.max_result_kb * 1024)  # as for a tool's
        if again:
            metadata["truncated"] = True
    verdict = scan_injection(content_text(value), Tier.READ)
    if verdict.verdict != "clean":
        metadata["injection"] = {
            "verdict": verdict.verdict,
            "phrases": list(verdict.phrases),
            "base64": verdict.via_base64,
        }
        if verdict.verdict == "likely_injection" and rules.policy.injection_detection == "block":
            message = (
                f"rea: denied: the result of {what} was withheld: it looks like a prompt "
                f"injection ({', '.join(verdict.phrases)}). Set injection_detection: warn in "
                ".rea/policy.yaml to let such results through with a warning"
            )
            return Outcome(
                AuditStatus.DENIED,
                error=RpcError(POLICY_DENIED, message),
                note=message,
                metadata=metadata,
                redacted=bool(names),
                verdict=BreakerVerdict.SUCCESS,
            )
    return Outcome(
        AuditStatus.ALLOWED,
        as_obj(value) or {},
        metadata=metadata,
        redacted=bool(names),
        verdict=BreakerVerdict.SUCCESS,
    )


def args_digest(arguments: JsonObj) -> str:
    try:
        canonical = SORTED_JSON.encode(arguments)
    except (RecursionError, ValueError, TypeError):
        return "unhashable: nested too deeply"  # still recorded: the call gets its record
    return hashlib.sha256(canonical.encode("utf-8", "surrogatepass")).hexdigest()


# Configuration in force ######################################################


class ConfigWatch:
    """The policy, registry and HALT in force while `serve` runs (§4): the policy is
    re-read when its file changes (checked on every call: an edit governs the very next
    one), the registry once a second, HALT on every call. A file that no longer parses
    keeps the last good one in force and logs once per change."""

    def __init__(
        self, root: Path, registry: Registry, policy: Policy, halt_files: Sequence[Path]
    ) -> None:
        self.root = root
        self.rea_dir = root / REA_DIR
        self._halt_paths = tuple(str(p) for p in halt_files)
        self._policy_paths = tuple(str(self.rea_dir / n) for n in ("policy.yaml", "policy.json"))
        self._registry_paths = tuple(
            str(self.rea_dir / n) for n in ("registry.yaml", "registry.json")
        )
        self._lock = threading.Lock()  # guards: _rules, _policy_sig, registry, _registry_sig
        self._reload_lock = threading.Lock()  # guards: the policy file's one reload at a time
        self._rules = compile_rules(root, policy)
        self._policy_sig = _file_signature(self._policy_paths)
        self.registry = registry
        self._registry_sig = _file_signature(self._registry_paths)

    def rules(self) -> Rules:
        """The rules in force, re-read first if the policy file changed."""
        sig = _file_signature(self._policy_paths)
        with self._lock:
            if sig == self._policy_sig:
                return self._rules
        with self._reload_lock:  # callers that saw the change wait for the one reload
            with self._lock:
                if sig == self._policy_sig:
                    return self._rules
                rules = self._rules
            try:
                rules = compile_rules(self.root, load_policy(self.rea_dir))
                log("info", "policy_reloaded", autonomy_level=rules.policy.autonomy_level)
            except ReaError as exc:
                log("error", "policy_reload_failed", error=str(exc), kept="last good policy")
            with self._lock:
                self._policy_sig = sig
                self._rules = rules
        return rules

    def registry_changed(self) -> Registry | None:
        """The new registry when its file changed and loads; None otherwise."""
        sig = _file_signature(self._registry_paths)
        with self._lock:
            if sig == self._registry_sig:
                return None
            self._registry_sig = sig
        try:
            registry = load_registry(self.rea_dir)
        except ReaError as exc:
            log("error", "registry_reload_failed", error=str(exc), kept="the servers running now")
            return None
        with self._lock:
            self.registry = registry
        return registry

    def halt_reason(self) -> str | None:
        """The reason in .rea/HALT (this root's, or in a linked worktree the primary
        checkout's too, §2), or None when the gateway is not frozen."""
        for index, path in enumerate(self._halt_paths):
            try:  # a stat first: the common case (no HALT) must cost one syscall per file
                os.stat(path)
                with open(path, encoding="utf-8", errors="replace") as f:
                    text = f.read(4096).strip() or "no reason given"
            except FileNotFoundError:
                continue
            except OSError as exc:
                text = f"HALT present but unreadable ({exc.strerror})"
            return text if index == 0 else f"{text} (repository-wide: {path})"
        return None


def _file_signature(paths: tuple[str, ...]) -> tuple[int, int, int, int] | None:
    """What tells a changed file: (which, mtime, size, inode) of the first of `paths` that
    exists, None when none does. The YAML file wins (both is an error, found at the
    reload its change starts), so the JSON one is looked at only while the YAML one is
    absent: this runs for the policy on every call, one stat. Paths are strings made once."""
    for which, path in enumerate(paths):
        try:
            st = os.stat(path)
        except OSError:
            continue
        return (which, st.st_mtime_ns, st.st_size, st.st_ino)
    return None


def compile_rules(root: Path, policy: Policy) -> Rules:
    redactor = Redactor([(p.name, p.regex, p.flags) for p in policy.redact_patterns])
    return Rules(policy, redactor, PathGuard(root, policy.blocked_paths))


# Client wire #################################################################


class _Batch:
    """The answers to one JSON-RPC batch (2025-03-26), written as one array when the last
    of its requests is answered. Guarded by the ClientWire's lock."""

    __slots__ = ("answers", "pending", "sealed")

    def __init__(self) -> None:
        self.answers: list[JsonObj] = []
        self.pending = 0  # its requests not answered yet
        self.sealed = False  # every element was read: no request will join


@dataclass
class _Ask:
    """A request of the gateway's own to the client, waiting for its answer."""

    method: str
    deadline: float
    on_answer: Callable[[JsonObj], None]  # the client's response, or an error made here


class ClientWire:
    """The client's pipes. `rea-stdin` frames stdin into lines (over the raw fd, polled
    with a wake pipe, so it can be stopped and joined: no thread is ever left inside a
    buffered reader at exit); stdout gets whole messages only. It keeps the requests the
    client has open, each answered at most once, and the gateway's own requests to the
    client (relayed server requests, input rounds), each answered exactly once."""

    def __init__(
        self,
        in_fd: int,
        out: BinaryIO,
        on_line: Callable[[bytes], None],
        deadlines: Deadlines,
    ) -> None:
        self._in_fd = in_fd
        self._out = out  # kept open: its fd is written directly, without a buffer
        self._out_fd = out.fileno()
        os.set_blocking(self._out_fd, False)  # a write waits at most _patience, see below
        self._patience = 30.0  # seconds a client may take none of our output
        self._on_line = on_line
        self._deadlines = deadlines
        self._out_lock = threading.Lock()  # guards: whole messages on stdout, _patience
        self._lock = threading.Lock()  # guards: _open, _asks, _seq, _closed, _draining
        self._answered = threading.Condition(self._lock)  # an open request was answered
        self._draining = False  # someone waits for every answer: notify them
        self._open: dict[tuple[str, object], tuple[Era, _Batch | None]] = {}
        self._batch: _Batch | None = None  # the batch the reader is dispatching, if any
        self._asks: dict[str, _Ask] = {}
        self._seq = 0
        self._closed = False
        self._wake_r, self._wake_w = os.pipe()
        self.ended = threading.Event()  # stdin closed, or reading stopped
        self.gone = threading.Event()  # stdout broke: nobody reads our answers
        self._reader = threading.Thread(target=self._read, name="rea-stdin", daemon=True)

    # -- reading --

    def start(self) -> None:
        self._reader.start()

    def stop_reading(self) -> None:
        """Stop taking messages (§5: at stop); the reader thread ends and is joined. From
        now on a client that reads nothing holds a write for a second at most."""
        self._patience = 1.0
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")
        if self._reader.is_alive() and self._reader is not threading.current_thread():
            self._reader.join(timeout=5)

    def _read(self) -> None:
        poller = select.poll()
        poller.register(self._in_fd, select.POLLIN | select.POLLHUP | select.POLLERR)
        poller.register(self._wake_r, select.POLLIN)
        lines = LineBuffer(
            MAX_LINE,
            lambda: self.send_error(
                None, RpcError(INVALID_REQUEST, f"message longer than {MAX_LINE} bytes")
            ),
        )
        try:
            while True:
                events = poller.poll()
                if any(fd == self._wake_r for fd, _ in events):
                    return
                chunk = os.read(self._in_fd, 1 << 16)
                if not chunk:
                    break
                for line in lines.feed(chunk):
                    self._line(line)
            if last := lines.rest():
                self._line(last)
        except OSError as exc:
            log("error", "stdin_failed", error=str(exc))
        finally:
            self.ended.set()

    def _line(self, line: bytes) -> None:
        if not line.strip():
            return
        try:
            self._on_line(line)
        except Exception as exc:  # the one boundary: nothing a client sends ends the session
            log_bug("client_message", exc)

    # -- writing --

    def write(self, msg: JsonObj) -> None:
        self._write_bytes(encode(msg))

    def _write_bytes(self, data: bytes) -> None:
        if not HeldOutput.hold(HeldOutput.ANSWERS, self._write_held, data):
            self._write_now(data)

    def _write_held(self, chunks: list[bytes]) -> None:
        self._write_now(b"".join(chunks))

    def _write_now(self, data: bytes) -> None:
        """Whole messages on stdout, never a wait without end: a client that takes none of
        our output for `_patience` seconds (30; 1 once stopping) is gone, and a stop takes
        seconds whatever it does."""
        with self._out_lock:
            if self.gone.is_set():
                return
            view = memoryview(data)
            waited_from: float | None = None
            while view:
                try:
                    view = view[os.write(self._out_fd, view) :]
                    waited_from = None
                except BlockingIOError:
                    now = time.monotonic()
                    waited_from = waited_from or now
                    if now - waited_from >= self._patience:
                        log("error", "client_not_reading", waited_s=round(now - waited_from, 1))
                        self.gone.set()
                        return
                    select.select([], [self._out_fd], [], 0.2)
                except OSError:
                    self.gone.set()  # the client is gone
                    return

    def notify(self, method: str, params: JsonObj | None = None) -> None:
        msg: JsonObj = {"jsonrpc": "2.0", "method": method}
        if params is not None:
            msg["params"] = params
        self.write(msg)

    # -- the client's requests: each answered at most once --

    def open(self, req_id: object, era: Era) -> bool:
        """Take a request as open; False when one with this id is open already."""
        key = id_key(req_id)
        with self._lock:
            if key in self._open:
                return False
            batch = self._batch
            if batch is not None:
                batch.pending += 1
            self._open[key] = (era, batch)
            return True

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        """Dispatch one JSON-RPC batch (reader thread): the answers to its requests, and
        the errors for its bad elements, come back as one array (§5)."""
        batch = _Batch()
        with self._lock:
            self._batch = batch
        try:
            yield
        finally:
            with self._lock:
                self._batch = None
                batch.sealed = True
                done = batch.pending == 0
            if done and batch.answers:
                self._write_all(batch.answers)

    def _answer(self, req_id: object, msg: JsonObj | None) -> bool:
        """Write the answer of an open request (into its batch when it has one); None
        closes it unanswered (a cancelled request gets nothing, MCP)."""
        with self._lock:
            entry = self._open.pop(id_key(req_id), None)
            if self._draining:
                self._answered.notify_all()
        if entry is None:
            return False
        batch = entry[1]
        if batch is None:
            if msg is not None:
                self.write(msg)
            return True
        # A batch's answers are written by whichever thread ends the batch: what this
        # thread holds (the record of this answer among it) is written first. The batch
        # still counts this answer as pending meanwhile, so it cannot end without it.
        HeldOutput.flush()
        with self._lock:
            if msg is not None:
                batch.answers.append(msg)
            batch.pending -= 1
            done = batch.sealed and batch.pending == 0 and bool(batch.answers)
        if done:
            self._write_all(batch.answers)
        return True

    def forget(self, req_id: object) -> bool:
        """Close an open request without an answer: the client cancelled it."""
        return self._answer(req_id, None)

    def _write_all(self, msgs: list[JsonObj]) -> None:
        self._write_bytes(encode_batch(msgs))

    def reply(self, req_id: object, result: JsonObj) -> bool:
        """Answer an open request with a result shaped for its era; False (and nothing
        written) when it is not open: answered before, or never taken."""
        with self._lock:
            entry = self._open.get(id_key(req_id))
        if entry is None:
            return False
        msg: JsonObj = {"jsonrpc": "2.0", "id": req_id, "result": shaped_result(result, entry[0])}
        return self._answer(req_id, msg)

    def reply_error(self, req_id: object, err: RpcError) -> bool:
        return self._answer(req_id, {"jsonrpc": "2.0", "id": req_id, "error": err.to_json()})

    def send_error(self, req_id: object, err: RpcError) -> None:
        """An error for a message that never became an open request (unparsable, no valid
        id, a duplicate id): it is answered here, once, as it is read (in its batch's
        array when it came in one)."""
        msg: JsonObj = {
            "jsonrpc": "2.0",
            "id": req_id if is_request_id(req_id) else None,
            "error": err.to_json(),
        }
        with self._lock:
            batch = self._batch
            if batch is not None:
                batch.answers.append(msg)
        if batch is None:
            self.write(msg)

    def wait_answered(self, deadline: float) -> bool:
        """Wait until every open request is answered, or the deadline: True when all are."""
        with self._lock:
            self._draining = True
            while self._open:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._answered.wait(left)
            return True

    def fail_open(self, err: RpcError) -> None:
        """Answer every request still open with this error (at stop)."""
        with self._lock:
            ids = list(self._open)
        for _, value in ids:
            self.reply_error(value, err)

    # -- the gateway's own requests to the client --

    def ask(
        self,
        method: str,
        params: JsonObj | None,
        timeout_s: float,
        on_answer: Callable[[JsonObj], None],
    ) -> str:
        """Send the client a request under an id of ours (`rea-N`: never one of the
        client's); on_answer gets its response, or an error made here on timeout,
        cancellation or stop, exactly once."""
        deadline = time.monotonic() + timeout_s
        with self._lock:
            closed = self._closed
            self._seq += 1
            ask_id = f"rea-{self._seq}"
            if not closed:
                self._asks[ask_id] = _Ask(method, deadline, on_answer)
        if closed:
            on_answer(_error_answer("the gateway is stopping"))
            return ask_id
        self._deadlines.watch(self, deadline)
        msg: JsonObj = {"jsonrpc": "2.0", "id": ask_id, "method": method}
        if params is not None:
            msg["params"] = params
        self.write(msg)
        return ask_id

    def on_response(self, msg: JsonObj) -> bool:
        """The client answered one of our requests; False when it is not ours (or late)."""
        ask_id = msg.get("id")
        with self._lock:
            ask = self._asks.pop(ask_id, None) if isinstance(ask_id, str) else None
        if ask is None:
            return False
        ask.on_answer(msg)
        return True

    def cancel_ask(self, ask_id: str, reason: str) -> None:
        """Withdraw a request of ours: the client is told, its waiter gets an error."""
        with self._lock:
            ask = self._asks.pop(ask_id, None)
        if ask is None:
            return
        self.notify("notifications/cancelled", {"requestId": ask_id, "reason": reason})
        ask.on_answer(_error_answer(reason))

    def expire(self, now: float) -> float | None:
        with self._lock:
            expired, soonest = take_due(self._asks, now, lambda ask: ask.deadline)
        for ask_id, ask in expired:
            self.notify("notifications/cancelled", {"requestId": ask_id, "reason": "timeout"})
            ask.on_answer(_error_answer(f"the client did not answer {ask.method} in time"))
        return soonest

    def close(self) -> None:
        """At stop: no more requests of ours; every one still waiting gets an error now,
        so nothing waits for a client that is going away (§5: a stop takes seconds)."""
        with self._lock:
            self._closed = True
            asks = list(self._asks.values())
            self._asks.clear()
        for ask in asks:
            ask.on_answer(_error_answer("the gateway is stopping"))
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)


def _error_answer(message: str) -> JsonObj:
    return {"error": {"code": INTERNAL_ERROR, "message": message}}


# Session and catalog #########################################################


class Session:
    """One client session: its id, the eras its requests use (§5: decided per request),
    what the client declared it can do, and the suspicion an earlier result raised."""

    def __init__(self) -> None:
        self.id = random_uuid()
        self.started_at = utc_now_iso()
        self.started = time.monotonic()
        self._lock = threading.Lock()  # guards: every field below
        self._caps: JsonObj = {}
        self._handshake = False  # the client sent initialize
        self._stateless = False  # the client sent a stateless-era request
        self._initialized = False  # notifications/initialized arrived
        self._suspicious: str | None = None
        self._version: str | None = None  # the handshake revision answered to initialize

    def era_of(self, method: str, params: JsonObj | None) -> Era:
        """The era of this one request. A request whose `_meta` names a protocol version
        is stateless-era; `initialize` and anything else is handshake-era. A version we
        do not serve is -32022, after which the client may still fall back to
        `initialize` on the same connection; server/discover never changes it."""
        if method == "initialize":
            with self._lock:
                self._handshake = True
                self._caps = as_obj((params or {}).get("capabilities")) or {}
            return Era.HANDSHAKE
        meta = meta_of(params) or {}
        requested = meta.get(META_VERSION)
        if requested is None and method != "server/discover":
            return Era.HANDSHAKE
        if requested is not None and requested not in STATELESS_VERSIONS:
            raise RpcError(
                UNSUPPORTED_VERSION,
                "unsupported protocol version",
                {"supported": list(STATELESS_VERSIONS), "requested": requested},
            )
        if method == "server/discover":
            return Era.STATELESS
        caps = as_obj(meta.get(META_CAPS))
        with self._lock:
            self._stateless = True
            if caps is not None and not self._handshake:
                self._caps = caps
        if method in ("ping", "logging/setLevel"):
            raise RpcError(
                METHOD_NOT_FOUND, f"method not found in protocol {STATELESS_VERSIONS[0]}: {method}"
            )
        return Era.STATELESS

    def negotiated(self, version: str) -> None:
        with self._lock:
            self._version = version

    @property
    def batches(self) -> bool:
        """JSON-RPC batches: only for a client that negotiated 2025-03-26 (§5)."""
        with self._lock:
            return self._version == "2025-03-26"

    def mark_initialized(self) -> None:
        with self._lock:
            self._initialized = True

    @property
    def initialized(self) -> bool:
        """A handshake client that said `initialized`: the gateway may send it messages."""
        with self._lock:
            return self._initialized and self._handshake

    @property
    def handshake(self) -> bool:
        with self._lock:
            return self._handshake

    @property
    def client_era(self) -> Era | None:
        """The era of messages the gateway starts: handshake once the client sent
        `initialize` (§5), stateless when it only ever sent stateless requests."""
        with self._lock:
            if self._handshake:
                return Era.HANDSHAKE
            return Era.STATELESS if self._stateless else None

    def can_answer(self, capability: str) -> bool:
        with self._lock:
            return capability in self._caps

    def knows_tasks(self) -> bool:
        with self._lock:
            return knows_tasks(self._caps)

    def relayable_caps(self) -> JsonObj:
        """The client capabilities a server may see: those the client declared and the
        gateway relays (sampling, elicitation, roots)."""
        with self._lock:
            return {k: v for k, v in self._caps.items() if k in RELAYED_REQUESTS.values()}

    @property
    def suspicious(self) -> str | None:
        return self._suspicious  # one reference, set under the lock: read as it is

    def mark_suspicious(self, what: str) -> None:
        with self._lock:
            self._suspicious = what


@dataclass(frozen=True)
class CatalogView:
    """Every name the client may use, swapped whole: tools, resources, templates, prompts."""

    tools: Mapping[str, ToolEntry] = field(default_factory=dict)  # exposed name -> entry
    renames: Mapping[str, str] = field(default_factory=dict)  # exposed -> server__tool
    resources: Mapping[str, str] = field(default_factory=dict)  # uri -> server
    templates: tuple[tuple[str, str], ...] = ()  # (uriTemplate prefix, server)
    prompts: Mapping[str, tuple[str, str]] = field(
        default_factory=dict
    )  # exposed -> (server, bare)

    def visible_tools(self) -> frozenset[str]:
        return frozenset(name for name, e in self.tools.items() if e.offered)


class ToolSource(Protocol):
    """A server as the catalog reads it: its tools as they are now."""

    def tools_now(self) -> ServerTools: ...


class Catalog:
    """The names the client sees and who owns each, as one frozen view. Rebuilds run
    without a lock held; the rebuild that started last is the one that lands, and it
    reads which servers there are, and each one's tools, only after it started, so that
    it sees every change made before (a server added, a server ready):
    two servers ready at once can never leave the view with the older reading."""

    def __init__(self) -> None:
        self._lock = threading.Lock()  # guards: _view, _started, _landed, _listed
        self._view = CatalogView()
        self._started = 0
        self._landed = 0
        self._listed: frozenset[str] | None = None  # tool names last answered to tools/list

    @property
    def view(self) -> CatalogView:
        return self._view  # one reference, swapped whole under the lock: read as it is

    def rebuild_tools(
        self, sources: Callable[[], Iterable[ToolSource]], max_len: int, blocked: Sequence[str] = ()
    ) -> bool:
        """Index every server's tools afresh; True when the client's tool list changed."""
        with self._lock:
            self._started += 1
            generation = self._started
        index: dict[str, ToolEntry] = {}
        renames: dict[str, str] = {}
        warnings: list[tuple[str, dict[str, object]]] = []
        for server in (source.tools_now() for source in sources()):  # read after starting
            for tool in server.tools:
                bare = str(tool["name"])
                exposed = exposed_tool_name(server.name, bare, max_len)
                if exposed == HEALTH_TOOL or exposed in index:
                    # Two tools shown under one name (a shortened name and a tool named
                    # like it): neither is offered, or the name could change hands
                    # under a pin. The first keeps the name, withheld.
                    first = index.get(exposed)
                    if first is not None and first.bare != bare:
                        why = f"its name as shown clashes with tool {bare!r}"
                        index[exposed] = replace(first, withheld=why)
                    warnings.append(
                        (
                            "tool_name_clash",
                            {"server": server.name, "tool": bare, "exposed": exposed},
                        )
                    )
                    continue
                if exposed != f"{server.name}__{bare}":
                    renames[exposed] = f"{server.name}__{bare}"
                    warnings.append(
                        (
                            "tool_renamed",
                            {
                                "server": server.name,
                                "tool": bare,
                                "exposed": exposed,
                                "reason": f"longer than {max_len} or not [A-Za-z0-9_.-]",
                            },
                        )
                    )
                allowed = server.allow is None or glob_match_tool(server.allow, bare)
                hidden = bool(blocked) and (
                    glob_match_tool(blocked, f"{server.name}__{bare}")
                    or glob_match_tool(blocked, exposed)
                )
                index[exposed] = ToolEntry(
                    exposed, server.name, bare, tool, server.withheld.get(bare), allowed, hidden
                )
        with self._lock:
            if generation < self._landed:
                return False  # a later rebuild has landed already
            self._landed = generation
            self._view = replace(self._view, tools=index, renames=renames)
            changed = self._listed is not None and self._view.visible_tools() != self._listed
        for event, fields in warnings:
            warn_once((event, fields.get("exposed")), event, **fields)
        return changed

    def listed(self) -> CatalogView:
        """The view a tools/list answers from; remembered to tell later changes."""
        with self._lock:
            self._listed = self._view.visible_tools()
            return self._view

    def learn(
        self, method: str, server: str, entries: list[JsonObj], max_len: int
    ) -> list[JsonObj]:
        """Remember who owns each URI, template and prompt of a list; prompts are renamed
        `server__prompt`. Returns the entries as the client sees them."""
        out: list[JsonObj] = []
        resources: dict[str, str] = {}
        templates: list[tuple[str, str]] = []
        prompts: dict[str, tuple[str, str]] = {}
        for entry in entries:
            if method == "resources/list":
                uri = entry.get("uri")
                if isinstance(uri, str):
                    resources[uri] = server
                    out.append(entry)
            elif method == "resources/templates/list":
                template = entry.get("uriTemplate")
                if isinstance(template, str):
                    templates.append((template.split("{", 1)[0], server))
                    out.append(entry)
            else:
                name = entry.get("name")
                if isinstance(name, str):
                    exposed = exposed_tool_name(server, name, max_len)
                    prompts[exposed] = (server, name)
                    out.append({**entry, "name": exposed})
        clashes: list[tuple[str, str]] = []
        with self._lock:
            view = self._view
            merged = dict(view.resources)
            for uri, owner in resources.items():
                first = merged.setdefault(uri, owner)
                if first != owner:
                    clashes.append((uri, first))
            self._view = replace(
                view,
                resources=merged,
                templates=view.templates + tuple(t for t in templates if t not in view.templates),
                prompts={**view.prompts, **prompts},
            )
        for uri, first in clashes:
            warn_once(("uri", uri), "resource_uri_clash", uri=uri, routed_to=first, also=server)
        return out


_warned: set[object] = set()
_warned_lock = threading.Lock()  # guards: _warned


def warn_once(key: object, event: str, **fields: object) -> None:
    """A warning logged once per process and key (a clash, a rename, an ignored override)."""
    with _warned_lock:
        if key in _warned:
            return
        _warned.add(key)
    log("warn", event, **fields)


# Calls #######################################################################


@dataclass(eq=False)
class Call:
    """One client request on its one lifecycle (§6), owned by `Calls`. Its identity and
    arguments are fixed; every field that changes later is guarded by `Calls._lock`."""

    kind: CallKind
    req_id: object | None  # the client's open request it answers; None while a retry is owed
    name: str  # as the client named it
    params: JsonObj  # the client's params, `_meta` included
    arguments: JsonObj  # what the path step reads and the audit digests
    era: Era
    started: float
    rules: Rules  # the rules of its latest round: the steps run again on each
    trace: str | None = None  # the client's trace id (SEP-414), kept in the audit record
    extra: JsonObj = field(default_factory=dict)  # inputResponses / requestState to pass on
    state: CallState = CallState.RECEIVED
    target: Target | None = None
    unrouted: Decision | None = None  # why nothing serves it (decided after HALT)
    tier: Tier = Tier.WRITE
    permit: Permit | None = None
    transport: Transport | None = None
    transport_id: int | None = None
    sent: bool = False  # reached its server at least once
    cancelled: bool = False
    rounds: int = 0  # input rounds fulfilled for a handshake-era client
    ask_id: str | None = None  # the gateway's request to the client during an input round
    parked: tuple[JsonObj | None, Exception | None] | None = None  # an answer met mid-round
    suspended: bool = False  # the InputBridge holds it (once suspended, `finish` looks there)


class AuditTrail:
    """The gateway's side of the audit log (§7): one record for each call's outcome and
    one for each event of its own, the call metrics beside them. A failing write is
    logged and counted, never fatal (§9): the log line is then the record."""

    def __init__(
        self, audit: AuditLog, metrics: Metrics, session: Session, rules: Callable[[], Rules]
    ) -> None:
        self._audit = audit
        self._metrics = metrics
        self._session = session
        self._rules = rules
        self._lock = threading.Lock()  # guards: _failures
        self._failures = 0

    @property
    def failures(self) -> int:
        with self._lock:
            return self._failures

    def call(self, call: Call, outcome: Outcome) -> None:
        """The one record of a call's outcome. Names come from its target, never from the
        client alone: an unknown tool's name is redacted like any text. Whatever breaks
        while the record is made, a record is still written (§6: every path)."""
        try:
            self._call(call, outcome)
        except Exception as exc:
            log_bug("audit_record", exc)
            target = call.target
            self._append(
                session_id=self._session.id,
                tool_name=target.bare if target is not None else call.kind.value,
                server_name=target.downstream.name if target is not None else "",
                tier=call.tier,
                status=outcome.status,
                autonomy_level=call.rules.policy.autonomy_level,
                duration_ms=int((time.monotonic() - call.started) * 1000),
                error=f"the record of this call could not be made whole ({type(exc).__name__})",
                metadata={"era": call.era.value},
            )

    def _call(self, call: Call, outcome: Outcome) -> None:
        rules = call.rules
        redact = rules.redactor.redact
        target = call.target
        if call.kind is CallKind.HEALTH:
            server, tool = "__rea__", "health"
        elif target is not None:
            server = target.downstream.name
            tool = target.bare if call.kind is CallKind.TOOL else call.kind.value
        elif call.kind is CallKind.TOOL:  # the client's name alone: redacted whole and by parts
            tool = "__".join(redact(part).text for part in redact(call.name).text.split("__"))
            server = tool.split("__", 1)[0] if "__" in tool else ""
        else:
            server, tool = "", call.kind.value
        meta: JsonObj = {
            "args_sha256": args_digest(call.arguments),
            "arg_keys": [redact(str(k)).text for k in call.arguments],
            "era": call.era.value,
        }
        if call.trace is not None:
            meta["trace_id"] = call.trace
        meta.update(outcome.metadata)
        note = outcome.note
        if note and target is None and call.kind is CallKind.TOOL:
            note = note.replace(call.name, tool)  # the name as redacted above
        if note:
            note = target.downstream.scrub(note) if target is not None else redact(note).text
        seconds = time.monotonic() - call.started
        known = target is not None or call.kind is CallKind.HEALTH
        self._metrics.observe_call(
            server if known else "__unknown__",
            tool if known else "__unknown__",
            call.tier,
            outcome.status,
            seconds,
        )
        self._append(
            session_id=self._session.id,
            tool_name=tool,
            server_name=server,
            tier=call.tier,
            status=outcome.status,
            autonomy_level=rules.policy.autonomy_level,
            duration_ms=int(seconds * 1000),
            error=note,
            redacted_fields=["result"] if outcome.redacted else None,
            metadata=meta,
        )

    def event(
        self,
        tool: str,
        server: str,
        status: AuditStatus,
        metadata: JsonObj,
        error: str | None = None,
        started: float | None = None,
        tier: Tier = Tier.READ,
    ) -> None:
        """A record of the gateway's own (not a call), at the policy's level."""
        rules = self._rules()
        self._append(
            session_id=self._session.id,
            tool_name=tool,
            server_name=server,
            tier=tier,
            status=status,
            autonomy_level=rules.policy.autonomy_level,
            duration_ms=int((time.monotonic() - started) * 1000) if started is not None else 0,
            error=rules.redactor.redact(error).text if error else None,
            metadata=metadata,
        )

    def relay(
        self,
        server: str,
        method: str,
        status: AuditStatus,
        started: float,
        error: str | None = None,
    ) -> None:
        """One record per request a server made of the client (relayed, refused, failed)."""
        era = self._session.client_era or Era.HANDSHAKE
        metadata: JsonObj = {"event": "client_request", "era": era.value}
        self.event(method, server, status, metadata, error, started)

    def _append(self, **fields: object) -> None:
        record = AuditRecord(timestamp=utc_now_iso(), **fields)  # type: ignore[arg-type]
        if not HeldOutput.hold(HeldOutput.RECORDS, self._append_held, record):
            self._append_held([record])  # not in a child's burst: now

    def _append_held(self, records: list[AuditRecord]) -> None:
        try:
            self._audit.append_records(records)
        except OSError as exc:
            with self._lock:
                self._failures += len(records)
            for record in records:
                log("error", "audit_append_failed", error=str(exc), record=asdict(record))


@dataclass
class Suspension:
    """A stateless client's call whose server asked the client something (SEP-2322): the
    client got `input_required`; its retry, carrying `requestState`, resumes the call."""

    call: Call
    transport: Transport
    server_request_id: object  # the server's request, answered with the client's reply
    method: str
    key: str  # the inputRequests key the client answers under
    deadline: float


class InputBridge:
    """The input rounds a stateless client owes: each suspended call by its token, until
    the client's retry takes it or its deadline passes (the client never retried)."""

    def __init__(self, deadlines: Deadlines, overdue: Callable[[Suspension], None]) -> None:
        self._deadlines = deadlines
        self._overdue = overdue
        self._lock = threading.Lock()  # guards: _suspended, _ended
        self._suspended: dict[str, Suspension] = {}
        # tokens whose round is over (bounded): a retry naming one is refused, never
        # taken as a new call that would run the tool a second time
        self._ended: collections.OrderedDict[str, None] = collections.OrderedDict()

    def suspend(
        self,
        call: Call,
        transport: Transport,
        server_request_id: object,
        method: str,
        wait_s: float,
    ) -> Suspension:
        token = secrets.token_hex(16)
        deadline = time.monotonic() + wait_s
        suspension = Suspension(
            call, transport, server_request_id, method, f"rea-{token[:8]}", deadline
        )
        with self._lock:
            self._suspended[token] = suspension
        self._deadlines.watch(self, deadline)
        return suspension

    def token_of(self, suspension: Suspension) -> str:
        with self._lock:
            for token, s in self._suspended.items():
                if s is suspension:
                    return token
        return ""

    def holds(self, token: str) -> bool:
        """A token of ours: held now, or of a round that is over."""
        with self._lock:
            return token in self._suspended or token in self._ended

    def take(self, token: str) -> Suspension | None:
        with self._lock:
            return self._end(token)

    def _end(self, token: str) -> Suspension | None:
        """(Lock held.) The round of this token is over: its suspension, if still held."""
        suspension = self._suspended.pop(token, None)
        self._ended[token] = None
        while len(self._ended) > 10_000:
            self._ended.popitem(last=False)
        return suspension

    def drop(self, call: Call) -> Suspension | None:
        with self._lock:
            for token, s in list(self._suspended.items()):
                if s.call is call:
                    return self._end(token)
        return None

    def expire(self, now: float) -> float | None:
        with self._lock:
            due, soonest = take_due(self._suspended, now, lambda s: s.deadline)
            for token, _ in due:
                self._end(token)  # remembered as ended (the entry itself is out already)
        for _, s in due:
            self._overdue(s)
        return soonest


@dataclass
class TaskEntry:
    """A call its server runs as a task (2025-11-25 tasks; SEP-2663): the client knows it
    by an id of ours, so it can never address another server's task; the call's one
    audit record is written when the task's outcome is final."""

    call: Call
    transport: Transport
    server_task_id: str
    deadline: float  # its ttl: past it, the task has expired
    completed: bool = False  # the server said so; the record waits for the result
    finished: bool = False  # its record is written


class TaskTable:
    """The tasks of this session, by the id the client knows (`rea-task-…`)."""

    def __init__(self, deadlines: Deadlines, expired: Callable[[str, TaskEntry], None]) -> None:
        self._deadlines = deadlines
        self._expired = expired
        self._lock = threading.Lock()  # guards: _tasks
        self._tasks: dict[str, TaskEntry] = {}

    def adopt(self, call: Call, transport: Transport, server_task_id: str, ttl_s: float) -> str:
        task_id = f"rea-task-{secrets.token_hex(16)}"
        deadline = time.monotonic() + ttl_s
        with self._lock:
            self._tasks[task_id] = TaskEntry(call, transport, server_task_id, deadline)
        self._deadlines.watch(self, deadline)
        return task_id

    def get(self, task_id: object) -> TaskEntry | None:
        with self._lock:
            return self._tasks.get(task_id) if isinstance(task_id, str) else None

    def of_server(self, transport: Transport, server_task_id: object) -> str | None:
        with self._lock:
            for task_id, entry in self._tasks.items():
                if entry.transport is transport and entry.server_task_id == server_task_id:
                    return task_id
        return None

    def finish_once(self, task_id: str) -> TaskEntry | None:
        """The entry when its record is still to be written (and mark it written)."""
        with self._lock:
            entry = self._tasks.get(task_id)
            if entry is None or entry.finished:
                return None
            entry.finished = True
            return entry

    def mark_completed(self, task_id: str) -> None:
        with self._lock:
            entry = self._tasks.get(task_id)
            if entry is not None:
                entry.completed = True

    def expire(self, now: float) -> float | None:
        with self._lock:
            due, soonest = take_due(self._tasks, now, lambda entry: entry.deadline)
        for task_id, entry in due:
            self._expired(task_id, entry)
        return soonest


class _Turn:
    """One stretch of work on a call, on one thread (`with calls._turn(call) as turn`).
    It ends by handing the call on (sent to its server, waiting for the client) or with
    the outcome `finish` records; an exception on the way finishes it too (§6: every
    path). A class, not a generator: this runs on every call."""

    __slots__ = ("_call", "_calls", "handed_on", "outcome")

    def __init__(self, calls: Calls, call: Call) -> None:
        self._calls = calls
        self._call = call
        self.outcome: Outcome | None = None
        self.handed_on = False

    def __enter__(self) -> _Turn:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: object
    ) -> bool:
        call = self._call
        if exc is not None:
            log_bug(call.kind.value, exc)
            self.outcome = internal_outcome(call.kind, type(exc).__name__)
            self.handed_on = False
        if not self.handed_on:
            self._calls.finish(call, self.outcome or internal_outcome(call.kind, "no outcome"))
        return isinstance(exc, Exception)  # a bug costs this call, never the thread


@dataclass(frozen=True)
class CallHooks:
    """What Calls needs of the gateway, as callbacks: routing, the health payload, the
    settings in force, and a word when the live state changed."""

    route: Callable[[Call], Target | Decision]
    health: Callable[[Policy], JsonObj]
    halt: Callable[[], str | None]
    rules: Callable[[], Rules]
    submit: Callable[..., None]  # run work that may wait for servers or the client on a worker
    settle: Callable[..., None]  # run work that waits for the disk only on an audit worker
    changed: Callable[[], None]


class Calls:
    """The one lifecycle of every call (§6): the in-flight table, the steps, admission,
    forwarding, input rounds, and `finish`, the only way a call ends. `finish` writes
    the call's one audit record, gives its permit back once, answers the client at most
    once and drops it from the table; every path reaches it from a `finally` (`_turn`)."""

    def __init__(
        self,
        wire: ClientWire,
        session: Session,
        limiter: CallLimiter,
        trail: AuditTrail,
        deadlines: Deadlines,
        hooks: CallHooks,
    ) -> None:
        self._wire = wire
        self._session = session
        self._limiter = limiter
        self._trail = trail
        self._hooks = hooks
        self.bridge = InputBridge(deadlines, self._retry_overdue)
        self.tasks = TaskTable(deadlines, self._task_expired)
        # guards: _table, _live, _accepting, _stopping, and every mutable field of a Call
        self._lock = threading.Lock()
        self._settled = threading.Condition(self._lock)  # a call finished (waited on at stop)
        self._stopping = False
        self._table: dict[tuple[str, object], Call] = {}  # by the client's open request id
        self._live: set[Call] = set()  # every call not finished, a retry owed or not
        self._accepting = True

    # -- taking calls --

    def receive(
        self,
        kind: CallKind,
        req_id: object,
        name: str,
        params: JsonObj,
        arguments: JsonObj,
        era: Era,
        defer: bool,
    ) -> None:
        """Take a client request as a call: in flight from this moment (a request read
        before stdin closed is served, §5). `defer` runs its first turn on a worker."""
        call = Call(
            kind,
            req_id,
            name,
            params,
            arguments,
            era,
            time.monotonic(),
            self._hooks.rules(),
            trace_id(params),
            {k: params[k] for k in ("inputResponses", "requestState") if k in params},
        )
        with self._lock:
            if not self._accepting:
                raise RpcError(INTERNAL_ERROR, "the gateway is stopping")
            self._table[id_key(req_id)] = call
            self._live.add(call)
        if defer:
            self._hooks.submit(self._begin, call)
        else:
            self._begin(call)

    def _turn(self, call: Call) -> _Turn:
        return _Turn(self, call)

    def _begin(self, call: Call) -> None:
        with self._turn(call) as turn:
            if call.kind is CallKind.HEALTH:
                call.tier = Tier.READ
                payload = self._hooks.health(call.rules.policy)
                text = json.dumps(payload, ensure_ascii=False, indent=2)
                turn.outcome = Outcome(
                    AuditStatus.ALLOWED,
                    {"content": [{"type": "text", "text": text}], "isError": False},
                )
                return
            routed = self._hooks.route(call)
            if isinstance(routed, Decision):
                call.unrouted = routed
            else:
                call.target = routed
                call.tier = self._tier_of(call, routed)
            turn.outcome = self._decide(call, reread=False) or self._admit(call, turn)
            if turn.outcome is None and not turn.handed_on:
                self._forward(call, turn)

    def _tier_of(self, call: Call, target: Target) -> Tier:
        if call.kind is not CallKind.TOOL or target.entry is None:
            return Tier.READ
        spec = target.downstream.spec
        override = spec.tier_overrides.get(target.bare) or spec.tier_overrides.get(call.name)
        annotations = as_obj(target.entry.definition.get("annotations"))
        tier, warning = resolve_tier(target.bare, annotations, spec.trust_annotations, override)
        if warning:
            warn_once(
                ("tier_override", call.name),
                "tier_override_ignored",
                server=spec.name,
                tool=target.bare,
                warning=warning,
            )
        return tier

    def _decide(self, call: Call, reread: bool = True) -> Outcome | None:
        """Run the steps over a fresh view (every round: a HALT set meanwhile stops it).
        The first round uses the rules read as the call arrived, a moment ago."""
        if reread:
            call.rules = self._hooks.rules()
        view = CallView(
            call.kind,
            call.name,
            call.arguments,
            call.rules,
            self._hooks.halt(),
            call.target,
            call.tier,
            self._session.suspicious,
            call.unrouted,
        )
        decision = decide(view)
        return refusal_outcome(call.kind, decision) if decision is not None else None

    def _admit(self, call: Call, turn: _Turn) -> Outcome | None:
        """The one step that takes resources: a concurrency slot, then a breaker ticket."""
        assert call.target is not None
        ds = call.target.downstream
        refusal = self._limiter.take(ds.name, call.rules.policy.server_limits.get(ds.name))
        if refusal is not None:
            return refusal_outcome(call.kind, Decision(AuditStatus.DENIED, refusal))
        ticket = ds.breaker.acquire()
        if not isinstance(ticket, BreakerTicket):
            self._limiter.give_back(ds.name)
            return refusal_outcome(
                call.kind,
                denied(
                    f"circuit for server {ds.name} is open after repeated failures; "
                    f"retry after {_iso_or_none(ticket)}",
                    "Wait for the cooldown (gateway.breaker.cooldown_s); "
                    "`python rea.py status` shows the last error",
                ),
            )
        permit = Permit(ds.name, ds.breaker, ticket)
        with self._lock:
            finished = call.state is CallState.FINISHED
            if not finished:
                call.permit = permit
                call.state = CallState.ADMITTED
        if finished:  # stopped meanwhile: the permit goes back unused
            self._limiter.give_back(ds.name)
            ds.breaker.settle(ticket, BreakerVerdict.UNUSED)
            turn.handed_on = True
        return None

    def _forward(self, call: Call, turn: _Turn) -> None:
        """Send the call to its server; the answer comes back through `_answered`."""
        assert call.target is not None
        ds = call.target.downstream
        try:
            transport = ds.transport_for_call()
        except ChildDied as exc:
            turn.outcome = failure_outcome(
                call.kind, ds.scrub(f"rea: error: {exc}"), verdict=_verdict_of(exc)
            )
            return
        method, params = self._request_for(call, transport)
        with self._lock:
            if call.state is CallState.FINISHED:
                turn.handed_on = True
                return
            if call.cancelled:
                turn.outcome = Outcome(AuditStatus.ERROR, note="cancelled by the client")
                return
            call.state = CallState.FORWARDED
            call.transport, call.transport_id, call.sent = transport, None, True
        turn.handed_on = True
        try:
            request_id = transport.request_async(
                method,
                params,
                call.rules.policy.call_timeout_s,
                lambda result, error: self._answered(call, result, error),
            )
        except ChildDied as exc:  # never sent: the call is this turn's again
            turn.handed_on = False
            turn.outcome = failure_outcome(call.kind, ds.scrub(f"rea: error: {exc}"))
            return
        with self._lock:
            call.transport_id = request_id
            cancel = call.cancelled and call.state is CallState.FORWARDED
        if cancel:
            transport.cancel(request_id, "cancelled by the client")

    def _request_for(self, call: Call, transport: Transport) -> tuple[str, JsonObj]:
        """The request its server gets, in the server's era."""
        assert call.target is not None
        bare = call.target.bare
        params: JsonObj
        if call.kind is CallKind.TOOL:
            params = {"name": bare, "arguments": call.arguments, **call.extra}
            if "_meta" in call.params:
                params["_meta"] = call.params["_meta"]
            if "task" in call.params and takes_tasks(call.target.downstream.capabilities):
                params["task"] = call.params["task"]
        elif call.kind is CallKind.PROMPT:
            params = {**call.params, "name": bare}
        elif call.kind is CallKind.COMPLETION:
            ref = as_obj(call.params.get("ref")) or {}
            params = dict(call.params)
            if ref.get("type") == "ref/prompt":
                params["ref"] = {**ref, "name": bare}
        else:
            params = call.params
        return call.kind.value, transport_params(transport, params)

    # -- answers --

    def _answered(self, call: Call, result: JsonObj | None, error: Exception | None) -> None:
        """The server's answer (or timeout, or death), from the transport's thread."""
        with self._lock:
            if call.state is CallState.WAITING_INPUT:
                if call.req_id is not None or error is None:
                    call.parked = (result, error)  # the round's end takes it up
                    return
                abandoned = True  # failed while the client owed its retry: nobody to answer
            elif call.state is not CallState.FORWARDED:
                return  # finished meanwhile (cancelled, stopped): a late answer is dropped
            else:
                abandoned = False
                call.state = CallState.ANSWERED
        if abandoned:
            self.finish(
                call, Outcome(AuditStatus.ERROR, note=f"no retry from the client before: {error}")
            )
            return
        # With fsync off the record costs microseconds: settle on this thread. Otherwise an
        # audit worker waits for the disk, so that this server's other answers do not queue;
        # an input round waits for the client, on a worker of the gateway's.
        if result is not None and result.get("resultType") == "input_required":
            self._hooks.submit(self._settle, call, result, error)
        elif call.rules.policy.audit_fsync == "off":
            self._settle(call, result, error)
        else:
            self._hooks.settle(self._settle, call, result, error)

    def _settle(self, call: Call, result: JsonObj | None, error: Exception | None) -> None:
        with self._turn(call) as turn:
            turn.outcome = self._outcome_of(call, result, error, turn)

    def _outcome_of(
        self, call: Call, result: JsonObj | None, error: Exception | None, turn: _Turn
    ) -> Outcome | None:
        if error is not None or result is None:
            return self._failure(call, error)
        if (
            result.get("resultType") == "input_required"
            and call.era is Era.HANDSHAKE
            and call.kind is CallKind.TOOL
        ):
            return self._fulfil(call, result, turn)
        handle = as_obj(result.get("task"))
        if (
            call.kind is CallKind.TOOL
            and handle is not None
            and isinstance(handle.get("taskId"), str)
            and "task" in call.params  # a handle nobody asked for is just a result
            and call.target is not None
            and takes_tasks(call.target.downstream.capabilities)
        ):
            self._adopt_task(call, result, handle, turn)
            return None
        return self._checked(call, result)

    # -- tasks (2025-11-25, SEP-2663) --

    def _adopt_task(self, call: Call, result: JsonObj, handle: JsonObj, turn: _Turn) -> None:
        """The server runs the call as a task: the client gets the task handle under an id
        of ours; the call stays in flight (its permit held) until the task's outcome is
        final, and only then is it recorded."""
        assert call.transport is not None
        ttl = handle.get("ttl")
        ttl_s = ttl / 1000 if isinstance(ttl, int | float) and ttl > 0 else 24 * 3600.0
        task_id = self.tasks.adopt(call, call.transport, str(handle["taskId"]), ttl_s)
        # only the handle (and its _meta) reaches the client: the result comes later,
        # through tasks/result and its checks
        kept = {k: v for k, v in without_connection_meta(result).items() if k in ("task", "_meta")}
        value, _ = call.rules.redactor.redact_value(kept)
        shown = as_obj(value) or {}
        shown["task"] = {**(as_obj(shown.get("task")) or {}), "taskId": task_id}
        with self._lock:
            req_id, call.req_id = call.req_id, None
            if req_id is not None and self._table.get(id_key(req_id)) is call:
                del self._table[id_key(req_id)]
            call.state = CallState.TASK
            answer = req_id is not None and not call.cancelled
        turn.handed_on = True
        if answer:
            self._wire.reply(req_id, shown)

    def task_status(self, task_id: str, status: str) -> None:
        """A task's status seen (notification, tasks/get, tasks/cancel): a failed or
        cancelled task is final at once; a completed one when its result is fetched."""
        if status == "completed":
            self.tasks.mark_completed(task_id)
        elif status in ("failed", "cancelled"):
            entry = self.tasks.finish_once(task_id)
            if entry is not None:
                outcome = Outcome(
                    AuditStatus.ERROR,
                    note=f"task {status}",
                    metadata={"task_id": task_id, "task_status": status},
                    verdict=BreakerVerdict.UNUSED
                    if status == "cancelled"
                    else BreakerVerdict.SUCCESS,
                )
                self.finish(entry.call, outcome)

    def task_result(self, task_id: str, result: JsonObj | None, error: Exception | None) -> Outcome:
        """tasks/result: the task's result, checked like any tool result (§6 step 10); the
        first one fetched is the call's outcome and writes its one record."""
        entry = self.tasks.get(task_id)
        if entry is None:
            raise RpcError(INVALID_PARAMS, f"unknown task: {task_id}")
        call = entry.call
        outcome = (
            self._failure(call, error)
            if error is not None or result is None
            else self._checked(call, result)
        )
        if outcome.result is not None:
            meta = {
                **(as_obj(outcome.result.get("_meta")) or {}),
                RELATED_TASK: {"taskId": task_id},
            }
            outcome = replace(outcome, result={**outcome.result, "_meta": meta})
        outcome = replace(
            outcome, metadata={**outcome.metadata, "task_id": task_id, "task_status": "completed"}
        )
        if self.tasks.finish_once(task_id) is not None:
            self.finish(call, outcome)
        return outcome

    def _task_expired(self, task_id: str, entry: TaskEntry) -> None:
        if entry.finished:
            return
        note = (
            "task completed; its result was not fetched before its ttl passed"
            if entry.completed
            else "task expired (its ttl passed) before it ended"
        )
        status = AuditStatus.ALLOWED if entry.completed else AuditStatus.ERROR
        metadata: JsonObj = {
            "task_id": task_id,
            "task_status": "completed" if entry.completed else "expired",
        }
        self.finish(entry.call, Outcome(status, note=note, metadata=metadata))

    def _failure(self, call: Call, error: Exception | None) -> Outcome:
        assert call.target is not None
        ds = call.target.downstream
        if call.cancelled:
            return Outcome(AuditStatus.ERROR, note="cancelled by the client")
        if isinstance(error, RpcError):
            scrubbed = RpcError(error.code, ds.scrub(error.message), error.data)
            return check_error(call.rules, call.tier, call.target.bare, scrubbed)
        if isinstance(error, TimeoutError):
            text = (
                f"rea: error: server {ds.name} did not answer {call.target.bare} within "
                f"{call.rules.policy.call_timeout_s:g} s; the call was cancelled and will not be retried"
            )
        elif isinstance(error, NeedsLogin):  # refused before it ran (§13)
            text = f"rea: error: {error}"
        else:
            text = f"rea: error: {error}; the call was not retried (it may or may not have run)"
        return failure_outcome(call.kind, ds.scrub(text), verdict=_verdict_of(error))

    def _checked(self, call: Call, result: JsonObj) -> Outcome:
        """§6 step 10: the result as the client may see it."""
        assert call.target is not None
        result = without_connection_meta(result)
        if call.kind is not CallKind.TOOL:
            return check_request_result(call.rules, call.kind.value, result)
        outcome, verdict = check_tool_result(call.rules, call.tier, call.target.bare, result)
        if verdict.verdict == "suspicious" and call.rules.policy.suspicious_blocks_writes:
            self._session.mark_suspicious(f"{call.target.downstream.name}__{call.target.bare}")
        return outcome

    # -- input rounds (SEP-2322) --

    def _fulfil(self, call: Call, result: JsonObj, turn: _Turn) -> Outcome | None:
        """A stateless server's `input_required` for a handshake-era client: ask the client
        each embedded request as a real request, run the steps again, then send the server
        the call again with the answers and its requestState, as MRTR asks. None while the
        call goes on."""
        assert call.target is not None
        ds = call.target.downstream
        call.rounds += 1
        requests = as_obj(result.get("inputRequests")) or {}
        responses: JsonObj = {}
        problem: str | None = None
        if call.rounds > MAX_INPUT_ROUNDS:
            problem = f"server {ds.name} asked for client input more than {MAX_INPUT_ROUNDS} times"
        for key, raw in requests.items():
            if problem is not None:
                break
            req = as_obj(raw) or {}
            method = str(req.get("method"))
            needed = RELAYED_REQUESTS.get(method)
            if needed is None or not self._session.can_answer(needed):
                problem = f"server {ds.name} needs {method} from the client, which the client cannot answer"
                break
            asked = time.monotonic()
            answer = self._ask_client(call, method, as_obj(req.get("params")))
            if answer is None:
                return Outcome(AuditStatus.ERROR, note="cancelled by the client")
            if "error" in answer:
                message = (as_obj(answer["error"]) or {}).get("message")
                problem = f"the client refused {method}: {message}"
                self._trail.relay(ds.name, method, AuditStatus.ERROR, asked, problem)
                break
            self._trail.relay(ds.name, method, AuditStatus.ALLOWED, asked)
            responses[key] = answer.get("result")
        if problem is not None:
            text = f"rea: error: {problem}"
            return Outcome(
                AuditStatus.ERROR,
                tool_error_result(text),
                note=text,
                verdict=BreakerVerdict.SUCCESS,
            )
        refusal = self._decide(call)
        if refusal is not None:
            return refusal
        call.extra = {"inputResponses": responses}
        if "requestState" in result:
            call.extra["requestState"] = result["requestState"]
        with self._lock:
            if call.state is CallState.WAITING_INPUT:
                call.state = CallState.ADMITTED
        self._forward(call, turn)
        return turn.outcome

    def _ask_client(self, call: Call, method: str, params: JsonObj | None) -> JsonObj | None:
        """Ask the client for one input of a round and wait; None when the call was
        cancelled or ended meanwhile (then nothing is sent on)."""
        with self._lock:
            if call.cancelled or call.state is CallState.FINISHED:
                return None
            call.state = CallState.WAITING_INPUT
        done = threading.Event()
        box: list[JsonObj] = []

        def answered(msg: JsonObj) -> None:
            box.append(msg)
            done.set()

        ask_id = self._wire.ask(method, params, call.rules.policy.call_timeout_s, answered)
        with self._lock:
            gone = call.cancelled or call.state is CallState.FINISHED
            if not gone:
                call.ask_id = ask_id
        if gone:
            self._wire.cancel_ask(ask_id, "the call ended")
        done.wait()
        with self._lock:
            call.ask_id = None
            if call.cancelled or call.state is CallState.FINISHED:
                return None
        return box[0]

    def suspend_for_input(
        self, transport: Transport, method: str, server_request_id: object, params: JsonObj | None
    ) -> bool:
        """A server's request in the middle of a stateless client's call becomes that
        call's `input_required` answer (SEP-2322); the client's retry carries the reply
        back and the call goes on. False when no single call can take it: none, several,
        or one whose answer already arrived."""
        with self._lock:
            calls = [
                c
                for c in self._live
                if c.transport is transport
                and c.state is CallState.FORWARDED
                and c.era is Era.STATELESS
                and c.kind is CallKind.TOOL
            ]
            if len(calls) != 1:
                return False
            call = calls[0]
            call.suspended = True
            req_id, call.req_id = call.req_id, None
            self._table.pop(id_key(req_id), None)
            call.state = CallState.WAITING_INPUT
            if self._stopping:
                self._settled.notify_all()
        suspension = self.bridge.suspend(
            call, transport, server_request_id, method, call.rules.policy.call_timeout_s
        )
        answer: JsonObj = {
            "resultType": "input_required",
            "inputRequests": {suspension.key: {"method": method, "params": params or {}}},
            "requestState": self.bridge.token_of(suspension),
        }
        self._wire.reply(req_id, answer)
        return True

    def resume(self, req_id: object, token: str, params: JsonObj) -> None:
        """The stateless client's retry of a suspended call: the steps run again, the
        server gets the client's reply, and the call goes on under the retry's id."""
        suspension = self.bridge.take(token)
        if suspension is None:
            raise RpcError(INVALID_PARAMS, "requestState refers to a call that has ended")
        call = suspension.call
        with self._lock:
            if call.state is CallState.FINISHED:
                raise RpcError(INVALID_PARAMS, "requestState refers to a call that has ended")
            call.req_id = req_id
            self._table[id_key(req_id)] = call
        with self._turn(call) as turn:
            responses = as_obj(params.get("inputResponses")) or {}
            refusal = self._decide(call)
            server = call.target.downstream.name if call.target is not None else ""
            reply: JsonObj = {"jsonrpc": "2.0", "id": suspension.server_request_id}
            if refusal is None and suspension.key in responses:
                reply["result"] = responses[suspension.key]
                self._trail.relay(server, suspension.method, AuditStatus.ALLOWED, call.started)
            else:
                why = "refused by policy" if refusal is not None else "the client sent no answer"
                reply["error"] = {"code": INVALID_PARAMS, "message": why}
                self._trail.relay(server, suspension.method, AuditStatus.ERROR, call.started, why)
            with contextlib.suppress(ChildDied):
                suspension.transport.send(reply)
            if refusal is not None:
                turn.outcome = refusal
                return
            with self._lock:
                parked, call.parked = call.parked, None
                if call.cancelled:
                    turn.outcome = Outcome(AuditStatus.ERROR, note="cancelled by the client")
                    return
                call.state = CallState.ANSWERED if parked is not None else CallState.FORWARDED
            if parked is not None:
                turn.outcome = self._outcome_of(call, parked[0], parked[1], turn)
            else:
                turn.handed_on = True

    def _retry_overdue(self, suspension: Suspension) -> None:
        """The client never retried: the server's request gets an error, the call its end."""
        wait_s = suspension.call.rules.policy.call_timeout_s
        with contextlib.suppress(ChildDied):
            suspension.transport.send(
                {
                    "jsonrpc": "2.0",
                    "id": suspension.server_request_id,
                    "error": {"code": INTERNAL_ERROR, "message": "the client did not answer"},
                }
            )
        self.finish(
            suspension.call,
            Outcome(
                AuditStatus.ERROR,
                note=f"the client did not retry its input_required round within {wait_s:g} s",
            ),
        )

    # -- the end --

    def cancel(self, req_id: object, reason: str) -> bool:
        """notifications/cancelled: the call is not sent (again), its server is told, and
        the client gets no answer (MCP); `finish` still writes its record. False when the
        id is no call of ours."""
        with self._lock:
            call = self._table.get(id_key(req_id))
            if call is None or call.state is CallState.FINISHED:
                return False
            call.cancelled = True
            state, transport, request_id, ask_id = (
                call.state,
                call.transport,
                call.transport_id,
                call.ask_id,
            )
        if state is CallState.FORWARDED and transport is not None and request_id is not None:
            transport.cancel(request_id, reason)
        elif ask_id is not None:
            self._wire.cancel_ask(ask_id, reason)
        return True

    def finish(self, call: Call, outcome: Outcome) -> None:
        """The one end of every call: its permit goes back once, its one audit record is
        written, the client is answered at most once, and it leaves the table. The first
        finish wins; later ones (a late answer, a stop) do nothing."""
        with self._lock:
            if call.state is CallState.FINISHED:
                return
            prior = call.state
            call.state = CallState.FINISHED
            req_id = call.req_id
            if req_id is not None and self._table.get(id_key(req_id)) is call:
                del self._table[id_key(req_id)]
            self._live.discard(call)
            permit, call.permit = call.permit, None
            answer = req_id is not None and not call.cancelled
            pending = call.transport, call.transport_id
            ask_id = call.ask_id
            if self._stopping:
                self._settled.notify_all()
        try:
            if not answer and req_id is not None:
                # closed unanswered before its record is written: once the record can be
                # seen, the client may use the id again
                self._wire.forget(req_id)
            self._withdraw(call, prior, pending, ask_id, outcome)
        finally:
            try:  # whatever withdrawing met: the permit goes back, the record is written
                if permit is not None:
                    self._limiter.give_back(permit.server)
                    permit.breaker.settle(permit.ticket, outcome.verdict)
                if call.sent and call.target is not None:
                    call.target.downstream.tally(failed=outcome.verdict is BreakerVerdict.FAILURE)
                self._trail.call(call, outcome)
            finally:
                if answer and outcome.result is not None:
                    self._wire.reply(req_id, outcome.result)
                elif answer and outcome.error is not None:
                    self._wire.reply_error(req_id, outcome.error)
                elif answer:
                    self._wire.forget(req_id)  # an outcome with nothing to say
                self._hooks.changed()

    def _withdraw(
        self,
        call: Call,
        prior: CallState,
        pending: tuple[Transport | None, int | None],
        ask_id: str | None,
        outcome: Outcome,
    ) -> None:
        """What a finished call still has out: its request at its server, our request to
        the client, its suspension."""
        transport, request_id = pending
        if (
            prior in (CallState.FORWARDED, CallState.WAITING_INPUT)
            and transport is not None
            and request_id is not None
        ):
            transport.cancel(request_id, outcome.note or "the call ended")
        if ask_id is not None:
            self._wire.cancel_ask(ask_id, "the call ended")
        if call.suspended:
            self.bridge.drop(call)

    def wait_settled(self, deadline: float) -> bool:
        """Wait until no call has an open request of the client's (at stop); a call whose
        retry the client owes cannot finish once stdin is closed."""
        with self._lock:
            self._stopping = True
            while any(c.req_id is not None for c in self._live):
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._settled.wait(left)
            return True

    def fail_all(self) -> None:
        """At stop: take no more calls, and finish the rest, each with its record."""
        with self._lock:
            self._accepting = False
            calls = list(self._live)
        for call in calls:
            if call.target is not None and call.sent:
                text = (
                    f"rea: error: the gateway stopped before server {call.target.downstream.name} "
                    "answered; the call may or may not have run"
                )
            else:
                text = "rea: error: the gateway stopped before the call was sent"
            outcome = failure_outcome(call.kind, text)
            self.finish(call, replace(outcome, verdict=BreakerVerdict.UNUSED))


def without_connection_meta(result: JsonObj) -> JsonObj:
    """A server's result without the `_meta` keys its own connection owns (its server
    info, protocol version): the client's connection is with the gateway."""
    meta = as_obj(result.get("_meta"))
    if meta is None or not any(k.startswith("io.modelcontextprotocol/") for k in meta):
        return result
    kept = {k: v for k, v in meta.items() if not k.startswith("io.modelcontextprotocol/")}
    out = {k: v for k, v in result.items() if k != "_meta"}
    if kept:
        out["_meta"] = kept
    return out


# Relay #######################################################################


class Relay:
    """A server's own messages (§5). Its notifications go to a handshake client that said
    `initialized`; its requests (sampling, elicitation, roots) go to the client under ids
    of ours, or become an input round of a stateless client's call; anything else is
    answered at once with a clear error. A server is never left hanging. What it says
    reaches the model as surely as a result: redacted, and under
    `injection_detection: block` a likely injection goes no further; HALT stops its
    requests too."""

    def __init__(
        self,
        wire: ClientWire,
        session: Session,
        calls: Calls,
        trail: AuditTrail,
        submit: Callable[..., None],
        rules: Callable[[], Rules],
        halt: Callable[[], str | None],
    ) -> None:
        self._wire = wire
        self._session = session
        self._calls = calls
        self._trail = trail
        self._submit = submit
        self._rules = rules
        self._halt = halt

    def _checked(self, ds: Downstream, what: str, params: JsonObj | None) -> JsonObj | str | None:
        """A server's params as the client may see them: redacted (its env: values too) and
        within `max_result_kb`, as a result is; a str (why) when a likely injection is
        withheld under `injection_detection: block`."""
        if params is None:
            return None
        rules = self._rules()
        value, _ = rules.redactor.redact_value(params)
        text = content_text(value)
        if ds.scrub(text) != text:  # one of its env: values: scrub every string
            try:
                value = json.loads(ds.scrub(json.dumps(value, ensure_ascii=False)))
            except ValueError:
                return f"rea: denied: {what} from server {ds.name} holds one of its secrets"
        value, _ = cap_value(value, rules.policy.max_result_kb * 1024)  # what is sent, capped
        verdict = scan_injection(content_text(value), Tier.READ)
        if verdict.verdict == "likely_injection" and rules.policy.injection_detection == "block":
            why = f"{what} from server {ds.name} looks like a prompt injection"
            log(
                "warn", "relay_withheld", server=ds.name, method=what, phrases=list(verdict.phrases)
            )
            return f"rea: denied: {why} ({', '.join(verdict.phrases)})"
        return as_obj(value)

    def notify(self, method: str, params: JsonObj | None = None) -> None:
        """A message of the gateway's own to the client: a handshake client only (a
        stateless client re-lists: ttlMs 0), and only after `initialized`."""
        if self._session.initialized:
            self._wire.notify(method, params)

    def on_message(self, ds: Downstream, transport: Transport, msg: JsonObj) -> None:
        method = msg.get("method")
        checked = self._checked(ds, str(method), as_obj(msg.get("params")))
        if "id" in msg:
            self._request(ds, transport, str(method), msg.get("id"), checked)
            return
        if isinstance(checked, str):
            return  # withheld (logged): a notification has nobody to answer
        params = checked
        if method in (
            "notifications/resources/updated",
            "notifications/resources/list_changed",
            "notifications/prompts/list_changed",
            "notifications/progress",
        ):
            self.notify(str(method), params)
        elif method == "notifications/tools/list_changed":
            if ds.wants_refresh():  # one refresh per server at a time: a flood is one
                self._submit(ds.refresh_tools)
        elif method == "notifications/tasks/status" and params is not None:
            task_id = self._calls.tasks.of_server(transport, params.get("taskId"))
            if task_id is None:
                return  # not a task of this session's: never shown to the client
            self.notify(str(method), {**params, "taskId": task_id})
            status = params.get("status")
            if isinstance(status, str):
                self._calls.task_status(task_id, status)
        elif method == "notifications/message":
            params = params or {}
            logger = f"{ds.name}:{params.get('logger', '')}".rstrip(":")
            self.notify("notifications/message", {**params, "logger": logger})

    def _request(
        self,
        ds: Downstream,
        transport: Transport,
        method: str,
        server_id: object,
        checked: JsonObj | str | None,
    ) -> None:
        if method == "ping":
            with contextlib.suppress(ChildDied):
                transport.send({"jsonrpc": "2.0", "id": server_id, "result": {}})
            return
        needed = RELAYED_REQUESTS.get(method)
        halt = self._halt() if needed is not None else None
        refusal = checked if isinstance(checked, str) else None
        if halt is not None:
            refusal = f"rea: denied: the gateway is frozen (.rea/HALT): {halt}"
        if refusal is not None:  # a kill switch stops a server's requests too
            with contextlib.suppress(ChildDied):
                transport.send(
                    {
                        "jsonrpc": "2.0",
                        "id": server_id,
                        "error": {"code": POLICY_DENIED, "message": refusal},
                    }
                )
            self._trail.relay(ds.name, method, AuditStatus.DENIED, time.monotonic(), refusal)
            return
        params = checked if not isinstance(checked, str) else None
        can = needed is not None and self._session.can_answer(needed)
        if can and self._calls.suspend_for_input(transport, method, server_id, params):
            return
        if not can or not self._session.handshake:
            why = (
                f"rea does not relay {method}"
                if needed is None
                else f"the client cannot answer {method}"
                + (
                    ""
                    if self._session.handshake
                    else " (a stateless-era client is not sent requests)"
                )
            )
            with contextlib.suppress(ChildDied):
                transport.send(
                    {
                        "jsonrpc": "2.0",
                        "id": server_id,
                        "error": {"code": METHOD_NOT_FOUND, "message": why},
                    }
                )
            if needed is not None:
                self._trail.relay(ds.name, method, AuditStatus.DENIED, time.monotonic(), why)
            return
        started = time.monotonic()

        def answered(msg: JsonObj) -> None:
            reply: JsonObj = {"jsonrpc": "2.0", "id": server_id}
            if "error" in msg:
                reply["error"] = msg["error"]
                message = str((as_obj(msg["error"]) or {}).get("message", "error"))
                self._trail.relay(
                    ds.name, method, AuditStatus.ERROR, started, f"the client answered: {message}"
                )
            else:
                reply["result"] = msg.get("result")
                self._trail.relay(ds.name, method, AuditStatus.ALLOWED, started)
            with contextlib.suppress(ChildDied):
                transport.send(reply)

        self._wire.ask(method, params, self._rules().policy.call_timeout_s, answered)


# Gateway #####################################################################


class WorkerPool:
    """Threads for work that must leave the thread that found it (a wait for the disk, a
    relayed request): up to `size`, started as work arrives, taking tasks from one queue.
    `shutdown` takes no more, runs everything already queued, and joins them. (Not
    concurrent.futures: nothing here wants a Future, and it costs every start ~7 ms.)"""

    _Task = tuple[Callable[..., object], tuple[object, ...]]

    def __init__(self, size: int, name: str) -> None:
        self._size = size
        self._name = name
        self._tasks: queue.SimpleQueue[WorkerPool._Task | None] = queue.SimpleQueue()
        self._lock = threading.Lock()  # guards: _threads, _idle, _closed
        self._threads: list[threading.Thread] = []
        self._idle = 0  # workers done with their task and not yet promised another
        self._closed = False

    def submit(self, fn: Callable[..., object], *args: object) -> None:
        """Queue fn(*args); RuntimeError once the pool is shut down."""
        HeldOutput.flush()  # what the worker writes must not overtake what this thread held
        with self._lock:
            if self._closed:
                raise RuntimeError("the pool is shut down")
            self._tasks.put((fn, args))
            if self._idle:
                self._idle -= 1  # an idle worker takes it
                return
            if len(self._threads) >= self._size:
                return  # it waits for the first worker free
            worker = threading.Thread(
                target=self._work, name=f"{self._name}-{len(self._threads)}", daemon=True
            )
            self._threads.append(worker)
        worker.start()

    def _work(self) -> None:
        while (task := self._tasks.get()) is not None:
            fn, args = task
            try:
                fn(*args)
            except Exception as exc:  # a bug costs that task, never the worker
                log_bug("worker", exc)
            with self._lock:
                self._idle += 1

    def shutdown(self) -> None:
        with self._lock:
            self._closed = True
            workers = list(self._threads)
        for _ in workers:
            self._tasks.put(None)  # after every queued task: those run first
        for worker in workers:
            worker.join()


class Downstreams:
    """The running set of servers, swapped whole when the registry changes."""

    def __init__(self, ctx: DownstreamContext, registry: Registry) -> None:
        self._ctx = ctx
        self._lock = threading.Lock()  # guards: _by_name, _started, _retiring
        self._by_name = {spec.name: Downstream(spec, ctx) for spec in registry.servers}
        self._started = False
        self._retiring: list[threading.Thread] = []  # stops of removed servers, joined at stop

    def all(self) -> list[Downstream]:
        with self._lock:
            return list(self._by_name.values())

    def get(self, name: str) -> Downstream | None:
        with self._lock:
            return self._by_name.get(name)

    def remote_urls(self) -> dict[str, str]:
        """Every remote server of the registry in force: name -> url."""
        return {ds.name: ds.spec.url for ds in self.all() if ds.spec.remote}

    def start(self) -> None:
        """Start every server, once: at the client's first request other than discover,
        so that each hears in its handshake what the client can do."""
        with self._lock:
            if self._started:
                return
            self._started = True
            servers = list(self._by_name.values())
        for ds in servers:
            ds.start()

    def reload(self, registry: Registry) -> None:
        """Start, stop and restart servers so the running set matches a new registry."""
        gone: list[Downstream] = []
        fresh: list[Downstream] = []
        with self._lock:
            old = self._by_name
            new: dict[str, Downstream] = {}
            for spec in registry.servers:
                ds = old.get(spec.name)
                if ds is not None and ds.spec == spec:
                    new[spec.name] = ds
                    continue
                if ds is not None:
                    gone.append(ds)
                new[spec.name] = Downstream(spec, self._ctx)
                fresh.append(new[spec.name])
            gone.extend(ds for name, ds in old.items() if name not in new)
            self._by_name = new  # one assignment: readers see the old or the new set
            started = self._started
        for ds in gone:
            stopper = threading.Thread(target=ds.stop, name=f"rea-stop-{ds.name}", daemon=True)
            stopper.start()
            with self._lock:
                self._retiring.append(stopper)
        for ds in new.values():
            if ds in fresh and started:
                ds.start()
            elif ds not in fresh:
                ds.revive()
        log("info", "registry_reloaded", servers=len(new))

    def stop(self) -> None:
        """Stop every server at once (each: close stdin, SIGTERM, SIGKILL) and join them,
        within Timeouts.servers_stop_s in all whatever a server does (§5): a stop still
        running then is left to end on its own (its thread is a daemon)."""
        deadline = time.monotonic() + self._ctx.timeouts.servers_stop_s
        stoppers = [
            threading.Thread(target=ds.stop, name=f"rea-stop-{ds.name}", daemon=True)
            for ds in self.all()
        ]
        for t in stoppers:
            t.start()
        with self._lock:
            retiring, self._retiring = self._retiring, []
        for t in [*stoppers, *retiring]:
            t.join(max(0.0, deadline - time.monotonic()))
        late = [t.name for t in [*stoppers, *retiring] if t.is_alive()]
        if late:
            log("warn", "stop_incomplete", threads=late)


MethodHandler = Callable[[object, JsonObj, Era], None]


class TaskRequests:
    """The tasks/* methods (§5 "Tasks"): each goes to the server that runs the task, under
    the server's own id; the client only ever sees ours. A final status or result settles
    the call, which Calls records once."""

    def __init__(
        self, calls: Calls, servers: Downstreams, config: ConfigWatch, timeouts: Timeouts
    ) -> None:
        self._calls = calls
        self._servers = servers
        self._config = config
        self._timeouts = timeouts

    def request(self, method: str) -> Callable[[JsonObj, Era], JsonObj]:
        """tasks/get, tasks/cancel, tasks/update: to the server that runs the task, under
        its own id; the answer names ours. A final status settles the call."""

        def produce(p: JsonObj, era: Era) -> JsonObj:
            task_id = p.get("taskId")
            entry = self._calls.tasks.get(task_id)
            if entry is None or not isinstance(task_id, str):
                raise RpcError(INVALID_PARAMS, f"unknown task: {task_id!r}")
            params = transport_params(entry.transport, {**p, "taskId": entry.server_task_id})
            timeout = self._config.rules().policy.call_timeout_s
            try:
                result = entry.transport.request(method, params, timeout)
            except (ChildDied, TimeoutError) as exc:
                raise RpcError(INTERNAL_ERROR, f"rea: error: {exc}") from None
            shown = self._view(result, task_id)
            status = shown.get("status")
            if isinstance(status, str):
                self._calls.task_status(task_id, status)
            return shown

        return produce

    def result(self, p: JsonObj, era: Era) -> JsonObj:
        """tasks/result: waits for the task's end at its server; the result is checked like
        a tool's (redaction, injection, cap) and is the call's recorded outcome."""
        task_id = p.get("taskId")
        entry = self._calls.tasks.get(task_id)
        if entry is None or not isinstance(task_id, str):
            raise RpcError(INVALID_PARAMS, f"unknown task: {task_id!r}")
        params = transport_params(entry.transport, {**p, "taskId": entry.server_task_id})
        wait_s = max(1.0, entry.deadline - time.monotonic())
        try:
            result: JsonObj | None = entry.transport.request("tasks/result", params, wait_s)
            error: Exception | None = None
        except (RpcError, ChildDied, TimeoutError) as exc:
            result, error = None, exc
        outcome = self._calls.task_result(task_id, result, error)
        if outcome.error is not None:
            raise outcome.error
        return outcome.result or {}

    def listing(self, p: JsonObj, era: Era) -> JsonObj:
        """tasks/list: the tasks of this session, from every server that lists its tasks."""
        items: list[JsonObj] = []
        for ds in self._servers.all():
            transport = ds.live_transport("tasks")
            if transport is None or "list" not in (as_obj(ds.capabilities.get("tasks")) or {}):
                continue
            try:
                listed = list_all(transport, "tasks/list", "tasks", self._timeouts.handshake_s)
            except (RpcError, ChildDied, TimeoutError, ValueError) as exc:
                log(
                    "warn",
                    "list_failed",
                    server=ds.name,
                    method="tasks/list",
                    error=ds.scrub(str(exc)),
                )
                continue
            for task in listed:
                ours = self._calls.tasks.of_server(transport, task.get("taskId"))
                if ours is not None:  # only tasks this session made, under our ids
                    items.append({**task, "taskId": ours})
        return list_page("tasks", items, p.get("cursor"), era)

    def _view(self, task: JsonObj, task_id: str) -> JsonObj:
        value, _ = self._config.rules().redactor.redact_value(without_connection_meta(task))
        shown = as_obj(value) or {}
        inner = as_obj(shown.get("task"))
        if inner is not None:  # the 2026-07-28 extension wraps the task
            shown["task"] = {**inner, "taskId": task_id}
            status = inner.get("status")
            if isinstance(status, str):
                shown.setdefault("status", status)
        else:
            shown["taskId"] = task_id
        return shown


class Gateway:
    """The MCP server the client talks to, as a composition root: it builds the
    collaborators, holds the method table, and starts and stops them in order. Nothing
    but JSON-RPC is ever written to its stdout."""

    def __init__(
        self,
        root: Path,
        registry: Registry,
        policy: Policy,
        in_fd: int,
        out: BinaryIO,
        timeouts: Timeouts | None = None,
        signals: list[int] | None = None,
    ) -> None:
        self.root = root
        self.rea_dir = root / REA_DIR
        self.governance = governance_of(root)
        self.timeouts = timeouts or Timeouts()
        self.session = Session()
        self.config = ConfigWatch(root, registry, policy, self.governance.halt_files)
        self._applied = self.config.rules()
        self.audit = AuditLog(
            self.governance.shared,
            policy.audit_fsync,
            policy.audit_max_bytes,
            policy.audit_max_age_days,
            hold_s=AUDIT_HOLD_S,
        )
        self.metrics = Metrics()
        self.metrics_server: MetricsServer | None = None
        self.blocker = SessionBlocker(policy.session_blocker_threshold)
        self.fingerprints = Fingerprints(self.governance.shared)
        self.deadlines = Deadlines()
        # Two sets of workers: what waits for servers or the client (lists, tasks, relayed
        # requests, input rounds) cannot hold up what waits for the disk only (a call's
        # outcome under audit.fsync batch or always), so a stalled server delays no other's.
        self.pool = WorkerPool(32, "rea-worker")
        self.disk = WorkerPool(16, "rea-audit")
        self.catalog = Catalog()
        self.trail = AuditTrail(self.audit, self.metrics, self.session, self.config.rules)
        self.wire = ClientWire(in_fd, out, self._on_line, self.deadlines)
        hooks = DownstreamHooks(
            on_message=lambda ds, t, msg: self.relay.on_message(ds, t, msg),
            on_tools_changed=self._tools_changed,
            on_state_changed=self._state_changed,
            on_circuit=self._on_circuit,
            audit_event=lambda tool, server, status, meta, error: self.trail.event(
                tool, server, status, meta, error
            ),
            client_caps=self.session.relayable_caps,
            redact=lambda text: self.config.rules().redactor.redact(text).text,
            policy=lambda: self.config.rules().policy,
            remote_urls=lambda: self.servers.remote_urls(),
        )
        ctx = DownstreamContext(root, self.fingerprints, self.deadlines, self.timeouts, hooks)
        self.servers = Downstreams(ctx, registry)
        self.calls = Calls(
            self.wire,
            self.session,
            CallLimiter(),
            self.trail,
            self.deadlines,
            CallHooks(
                route=self._route,
                health=self._health,
                halt=self.config.halt_reason,
                rules=self.config.rules,
                submit=self._submit,
                settle=lambda fn, *args: self._submit(fn, *args, pool=self.disk),
                changed=self._state_changed,
            ),
        )
        self.relay = Relay(
            self.wire,
            self.session,
            self.calls,
            self.trail,
            self._submit,
            self.config.rules,
            self.config.halt_reason,
        )
        self.tasks = TaskRequests(self.calls, self.servers, self.config, self.timeouts)
        self.live = LiveState(self.rea_dir, self.session.id, lambda: self.state().to_json())
        self._startup_done = threading.Event()  # the first list has waited for the servers
        self._signals = signals if signals is not None else []  # received, in order
        self._methods: dict[str, MethodHandler] = {
            "initialize": self._initialize,
            "server/discover": self._discover,
            "ping": lambda req_id, p, era: self._reply(req_id, {}),
            "logging/setLevel": self._set_level,
            "tools/list": self._later(self._list_tools),
            "tools/call": self._tools_call,
            "resources/list": self._later(self._list_union("resources/list", "resources")),
            "resources/templates/list": self._later(
                self._list_union("resources/templates/list", "resourceTemplates")
            ),
            "prompts/list": self._later(self._list_union("prompts/list", "prompts")),
            "resources/read": self._request_call(CallKind.RESOURCE),
            "resources/subscribe": self._request_call(CallKind.SUBSCRIBE),
            "resources/unsubscribe": self._request_call(CallKind.UNSUBSCRIBE),
            "prompts/get": self._request_call(CallKind.PROMPT),
            "completion/complete": self._request_call(CallKind.COMPLETION),
            "tasks/get": self._later(self.tasks.request("tasks/get")),
            "tasks/cancel": self._later(self.tasks.request("tasks/cancel")),
            "tasks/update": self._later(self.tasks.request("tasks/update")),
            "tasks/result": self._later(self.tasks.result),
            "tasks/list": self._later(self.tasks.listing),
        }

    # -- running --

    def serve(self) -> int:
        self._start_metrics()  # before claiming: a busy port must leave no serve.pid behind
        if not self.live.claim():
            log(
                "warn",
                "state_owned_elsewhere",
                detail="another live gateway owns .rea/serve.state.json; not writing it",
            )
        log(
            "info",
            "gateway_started",
            session_id=self.session.id,
            root=str(self.root),
            governance=str(self.governance.shared),
            servers=len(self.servers.all()),
            version=VERSION,
        )
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self._on_signal)
        self.wire.start()
        self.live.flush()
        ticks = 0
        while not self.wire.ended.wait(0.2):
            if self._signals or self.wire.gone.is_set():
                break
            ticks += 1
            if ticks % 5 == 0:  # once a second: pick up policy and registry edits while idle
                self._check_config()
        log(
            "info",
            "gateway_stopping",
            reason="signal" if self._signals else "stdin closed",
        )
        self.stop()
        return 0

    def _on_signal(self, signum: int, frame: object) -> None:
        self._signals.append(signum)  # only a note: the main loop does the work, unlocked

    def stop(self) -> None:
        """§5: stop taking calls, let those in flight finish (stop_grace_s), fail the rest
        (each with its record), stop every server and join its threads, drain the pool,
        and close the audit log last. Seconds, whatever is pending."""
        self.wire.stop_reading()
        deadline = time.monotonic() + self.timeouts.stop_grace_s
        self.calls.wait_settled(deadline)
        self.wire.wait_answered(deadline)
        self.calls.fail_all()
        self.wire.fail_open(RpcError(INTERNAL_ERROR, "the gateway is stopping"))
        self.wire.close()  # our requests to the client end now: nobody waits for them
        self.servers.stop()
        self.deadlines.close()
        self.pool.shutdown()  # queued work drains: no outcome is dropped
        self.disk.shutdown()  # last: the work above may hand it outcomes
        self.live.close()
        if self.metrics_server is not None:
            self.metrics_server.close()
        self.audit.close()
        log("info", "gateway_stopped", session_id=self.session.id)

    def _start_metrics(self) -> None:
        """REA_METRICS_PORT (or gateway.metrics_port): Prometheus text on 127.0.0.1 only."""
        raw = os.environ.get("REA_METRICS_PORT")
        port = self._applied.policy.metrics_port
        if raw:
            if not raw.isdigit() or not 0 <= int(raw) <= 65535:
                raise ReaError(
                    f"REA_METRICS_PORT={raw!r}: not a port number; set 0-65535 or unset it"
                )
            port = int(raw)
        if port is None:
            return
        server = MetricsServer(self.metrics, port)
        server.start()
        self.metrics.set_gauges(self.state)
        self.metrics_server = server
        log("info", "metrics_listening", address=f"http://127.0.0.1:{server.port}/metrics")

    def _submit(
        self, fn: Callable[..., object], *args: object, pool: WorkerPool | None = None
    ) -> None:
        try:
            (pool or self.pool).submit(fn, *args)
        except RuntimeError:  # the pool is closed at stop: run it here, nothing is dropped
            fn(*args)

    def _check_config(self) -> None:
        rules = self.config.rules()
        if rules is not self._applied:
            self._applied = rules
            policy = rules.policy
            self._audit_reload("policy.reload", policy.source)
            self.audit.configure(
                policy.audit_fsync, policy.audit_max_bytes, policy.audit_max_age_days
            )
            self.blocker.configure(policy.session_blocker_threshold)
            for ds in self.servers.all():
                ds.breaker.configure(policy.breaker_failure_threshold, policy.breaker_cooldown_s)
                ds.revive()
            self._tools_changed()
        registry = self.config.registry_changed()
        if registry is not None:
            self._audit_reload("registry.reload", registry.source)
            self.servers.reload(registry)
            self._tools_changed()

    def _audit_reload(self, act: str, source: Path | None) -> None:
        """A policy or registry reload is a governance act (§7): its file's SHA-256."""
        try:
            digest = hashlib.sha256(source.read_bytes()).hexdigest() if source else None
        except OSError:
            digest = None
        metadata: JsonObj = {"event": "GOVERNANCE", "file": str(source) if source else None}
        metadata["sha256"] = digest
        self.trail.event(act, "rea", AuditStatus.ALLOWED, metadata, tier=Tier.WRITE)

    # -- the client's messages --

    def _on_line(self, line: bytes) -> None:
        try:
            parsed = decode(line)
        except ValueError:
            self.wire.send_error(None, RpcError(PARSE_ERROR, "parse error: not valid JSON"))
            return
        if not isinstance(parsed, list):
            self._on_message(parsed)
        elif not self.session.batches:
            self.wire.send_error(
                None,
                RpcError(
                    INVALID_REQUEST,
                    "invalid request: JSON-RPC batches are only for protocol 2025-03-26",
                ),
            )
        elif not parsed:
            self.wire.send_error(None, RpcError(INVALID_REQUEST, "invalid request: empty batch"))
        else:
            with self.wire.batch():
                for element in parsed:
                    self._on_message(element)

    def _on_message(self, parsed: object) -> None:
        msg = as_obj(parsed)
        if msg is None or msg.get("jsonrpc") != "2.0":
            self.wire.send_error(
                None, RpcError(INVALID_REQUEST, "invalid request: expected a JSON-RPC 2.0 object")
            )
            return
        method = msg.get("method")
        req_id = msg.get("id")
        has_id = "id" in msg
        if method is None and has_id:
            self.wire.on_response(msg)
            return
        if not isinstance(method, str) or (has_id and not is_request_id(req_id)):
            self.wire.send_error(
                req_id, RpcError(INVALID_REQUEST, "invalid request: bad method or id")
            )
            return
        params_raw = msg.get("params")
        params = as_obj(params_raw)
        if params_raw is not None and params is None:
            if has_id:
                self.wire.send_error(req_id, RpcError(INVALID_PARAMS, "params must be an object"))
            else:
                log("warn", "notification_dropped", method=method, reason="params is not an object")
            return
        if has_id:
            self._request(req_id, method, params)
        else:
            self._notification(method, params)

    def _request(self, req_id: object, method: str, params: JsonObj | None) -> None:
        try:
            era = self.session.era_of(method, params)
        except RpcError as err:
            self.wire.send_error(req_id, err)
            return
        if not self.wire.open(req_id, era):
            # answered under id null: the request in flight with this id keeps its own answer
            self.wire.send_error(
                None, RpcError(INVALID_REQUEST, f"request id {req_id!r} is already in flight")
            )
            return
        try:
            if method != "server/discover":  # a probe: servers wait to hear the client's caps
                self.servers.start()
            handler = self._methods.get(method)
            if handler is None:
                raise RpcError(METHOD_NOT_FOUND, f"method not found: {method}")
            handler(req_id, params or {}, era)
        except RpcError as err:
            self.wire.reply_error(req_id, err)
        except Exception as exc:  # a bug costs one request, never the session
            log_bug("request", exc, method=method)
            self.wire.reply_error(req_id, RpcError(INTERNAL_ERROR, "internal error"))

    def _notification(self, method: str, params: JsonObj | None) -> None:
        if method == "notifications/initialized":
            self.session.mark_initialized()
        elif method == "notifications/roots/list_changed":
            for ds in self.servers.all():
                transport = ds.live_transport()
                if transport is not None and transport.era is Era.HANDSHAKE:
                    with contextlib.suppress(ChildDied):
                        transport.notify(method, params)
        elif method == "notifications/cancelled":
            req_id = (params or {}).get("requestId")
            reason = (params or {}).get("reason")
            if not is_request_id(req_id):
                log("warn", "cancel_ignored", reason="requestId is not a string or integer")
            elif not self.calls.cancel(
                req_id, reason if isinstance(reason, str) else "cancelled by the client"
            ):
                self.wire.forget(req_id)  # a list or another request: its answer is dropped

    def _reply(self, req_id: object, result: JsonObj) -> None:
        self.wire.reply(req_id, result)

    def _later(self, produce: Callable[[JsonObj, Era], JsonObj]) -> MethodHandler:
        """A handler that answers from a worker (it may wait for servers)."""

        def run(req_id: object, p: JsonObj, era: Era) -> None:
            try:
                self.wire.reply(req_id, produce(p, era))
            except RpcError as err:
                self.wire.reply_error(req_id, err)
            except Exception as exc:
                log_bug("list", exc)
                self.wire.reply_error(req_id, RpcError(INTERNAL_ERROR, "internal error"))

        return lambda req_id, p, era: self._submit(run, req_id, p, era)

    # -- lifecycle answers --

    def capabilities(self) -> JsonObj:
        """What at least one server offers. A server whose capabilities are not known yet
        (still starting) counts as offering resources, prompts and completions: the
        handshake is answered at once and cannot be amended later (§5)."""
        caps: JsonObj = {"tools": {"listChanged": True}}
        offered: list[JsonObj] = []
        for ds in self.servers.all():
            status = ds.status
            if status is ServerStatus.STARTING and ds.spec.enabled:
                offered.append(_ALL_CHILD_CAPS)
            elif status is ServerStatus.READY:
                offered.append(ds.capabilities)
        resources = [as_obj(c.get("resources")) for c in offered if "resources" in c]
        if resources:
            caps["resources"] = {
                "subscribe": any(bool(r and r.get("subscribe")) for r in resources),
                "listChanged": True,
            }
        if any("prompts" in c for c in offered):
            caps["prompts"] = {"listChanged": True}
        if any("completions" in c for c in offered):
            caps["completions"] = {}
        if any("logging" in c for c in offered):
            caps["logging"] = {}
        if any(takes_tasks(c) for c in offered):
            caps["tasks"] = TASKS_CAPABILITY
        return caps

    def _initialize(self, req_id: object, p: JsonObj, era: Era) -> None:
        requested = p.get("protocolVersion")
        version = requested if requested in HANDSHAKE_VERSIONS else HANDSHAKE_VERSIONS[0]
        self.session.negotiated(str(version))
        self._reply(
            req_id,
            {
                "protocolVersion": version,
                "capabilities": self.capabilities(),
                "serverInfo": dict(GATEWAY_INFO),
                "instructions": "Tools of every downstream server, as server__tool, governed by rea.",
            },
        )

    def _discover(self, req_id: object, p: JsonObj, era: Era) -> None:
        self._reply(
            req_id,
            {
                "supportedVersions": list(STATELESS_VERSIONS),
                "capabilities": self.capabilities(),
                "_meta": {META_SERVER: dict(GATEWAY_INFO)},
                "ttlMs": 0,
                "cacheScope": "private",
            },
        )

    def _set_level(self, req_id: object, p: JsonObj, era: Era) -> None:
        """logging/setLevel: fanned out to every handshake-era server that logs."""
        for ds in self.servers.all():
            transport = ds.live_transport("logging")
            if transport is not None and transport.era is Era.HANDSHAKE:
                with contextlib.suppress(ChildDied):
                    transport.request_async("logging/setLevel", p, 10.0, lambda r, e: None)
        self._reply(req_id, {})

    # -- tools, resources, prompts --

    def _tools_changed(self) -> None:
        """Index every server's tools afresh; tell the client if its list changed."""
        policy = self.config.rules().policy
        if self.catalog.rebuild_tools(self.servers.all, policy.max_tool_name, policy.blocked_tools):
            self.relay.notify("notifications/tools/list_changed")
        self._state_changed()

    def wait_for_startup(self) -> None:
        """The first list waits (at most startup_wait_s) for servers still starting."""
        if self._startup_done.is_set():
            return
        deadline = time.monotonic() + self.config.rules().policy.startup_wait_s
        for ds in self.servers.all():
            ds.ready.wait(max(0.0, deadline - time.monotonic()))
        self._startup_done.set()

    def _list_tools(self, p: JsonObj, era: Era) -> JsonObj:
        self.wait_for_startup()
        view = self.catalog.listed()
        tasks = self.session.knows_tasks()
        redactor = self.config.rules().redactor
        tools: list[JsonObj] = [
            {**(as_obj(redactor.redact_value(e.definition)[0]) or {}), "name": e.exposed}
            for e in view.tools.values()
            if e.offered and (tasks or not requires_task(e.definition))
        ]
        tools.append(health_tool_definition())
        return list_page("tools", tools, p.get("cursor"), era)

    def _tools_call(self, req_id: object, p: JsonObj, era: Era) -> None:
        name = p.get("name")
        if not isinstance(name, str):
            raise RpcError(INVALID_PARAMS, "tools/call needs a string name")
        raw_args = p.get("arguments", {})
        arguments = as_obj(raw_args) if raw_args is not None else {}
        if arguments is None:
            raise RpcError(INVALID_PARAMS, "tools/call arguments must be an object")
        state = p.get("requestState")
        if isinstance(state, str) and self.calls.bridge.holds(state):
            self.calls.resume(req_id, state, p)
            return
        kind = CallKind.HEALTH if name == HEALTH_TOOL else CallKind.TOOL
        # A call before any tools/list, for a tool whose server is still starting: its
        # turn waits for start-up as tools/list would, off the reader thread.
        defer = (
            kind is CallKind.TOOL
            and name not in self.catalog.view.tools
            and not self._startup_done.is_set()
        )
        self.calls.receive(kind, req_id, name, p, arguments, era, defer)

    def _request_call(self, kind: CallKind) -> MethodHandler:
        """resources/read and subscribe, prompts/get, completion/complete: calls like a
        tool's (§6). One the catalog can route starts here, as a tool call does; one it
        cannot starts on a worker, since routing it lists the servers (and a server that
        stopped answering must not hold up the calls the catalog knows where to send)."""

        def handle(req_id: object, p: JsonObj, era: Era) -> None:
            if kind in (CallKind.RESOURCE, CallKind.SUBSCRIBE, CallKind.UNSUBSCRIBE):
                if not isinstance(p.get("uri"), str):
                    raise RpcError(INVALID_PARAMS, f"{kind.value} needs a string uri")
                name = str(p["uri"])
            elif kind is CallKind.PROMPT:
                if not isinstance(p.get("name"), str):
                    raise RpcError(INVALID_PARAMS, "prompts/get needs a string name")
                name = str(p["name"])
            else:
                ref = as_obj(p.get("ref")) or {}
                key = "name" if ref.get("type") == "ref/prompt" else "uri"
                if ref.get("type") not in ("ref/prompt", "ref/resource") or not isinstance(
                    ref.get(key), str
                ):
                    raise RpcError(
                        INVALID_PARAMS, "completion/complete needs a ref/prompt or ref/resource ref"
                    )
                name = str(ref[key])
            arguments = {k: v for k, v in p.items() if k != "_meta"}
            defer = self._known_target(kind, name, p) is None
            self.calls.receive(kind, req_id, name, p, arguments, era, defer)

        return handle

    def _route(self, call: Call) -> Target | Decision:
        """Where a call goes, by the catalog; it may wait for start-up and list servers."""
        if call.kind is CallKind.TOOL:
            entry = self.catalog.view.tools.get(call.name)
            if entry is None and not self._startup_done.is_set():
                self.wait_for_startup()
                entry = self.catalog.view.tools.get(call.name)
            ds = self.servers.get(entry.server) if entry is not None else None
            if entry is None or ds is None:  # (a server just removed from the registry)
                return Decision(AuditStatus.ERROR, f"unknown tool: {call.name}", INVALID_PARAMS)
            return Target(ds, entry.bare, entry)
        known = self._known_target(call.kind, call.name, call.params)
        if known is not None:
            return known
        if _names_a_prompt(call.kind, call.params):
            self._list_union("prompts/list", "prompts")({}, Era.HANDSHAKE)
        else:  # the client may read without listing first: learn the lists once
            self._list_union("resources/list", "resources")({}, Era.HANDSHAKE)
            self._list_union("resources/templates/list", "resourceTemplates")({}, Era.HANDSHAKE)
        known = self._known_target(call.kind, call.name, call.params)
        if known is not None:
            return known
        if _names_a_prompt(call.kind, call.params):
            return Decision(AuditStatus.ERROR, f"unknown prompt: {call.name}", INVALID_PARAMS)
        # the only server with resources owns what nobody listed
        candidates = [ds for ds in self.servers.all() if ds.live_transport("resources") is not None]
        if len(candidates) == 1:
            return Target(candidates[0], call.name)
        return Decision(AuditStatus.ERROR, f"resource not found: {call.name}", RESOURCE_NOT_FOUND)

    def _known_target(self, kind: CallKind, name: str, params: JsonObj) -> Target | None:
        """Where the catalog sends a prompt or resource call as it is, without listing any
        server: a listed prompt; a listed URI, else the longest template prefix."""
        view = self.catalog.view
        if _names_a_prompt(kind, params):
            found = view.prompts.get(name)
            ds = self.servers.get(found[0]) if found is not None else None
            return Target(ds, found[1]) if ds is not None and found is not None else None
        owner = view.resources.get(name)
        if owner is None:
            matches = [
                (len(pre), srv) for pre, srv in view.templates if pre and name.startswith(pre)
            ]
            owner = max(matches)[1] if matches else None
        ds = self.servers.get(owner) if owner is not None else None
        return Target(ds, name) if ds is not None else None

    def _list_union(self, method: str, key: str) -> Callable[[JsonObj, Era], JsonObj]:
        """resources/list, resources/templates/list, prompts/list: every server's, paged."""
        capability = "prompts" if method == "prompts/list" else "resources"

        def produce(p: JsonObj, era: Era) -> JsonObj:
            self.wait_for_startup()
            items: list[JsonObj] = []
            max_len = self.config.rules().policy.max_tool_name
            for ds in self.servers.all():
                transport = ds.live_transport(capability)
                if transport is None:
                    continue
                try:
                    entries = list_all(transport, method, key, self.timeouts.handshake_s)
                except (RpcError, ChildDied, TimeoutError, ValueError) as exc:
                    log(
                        "warn",
                        "list_failed",
                        server=ds.name,
                        method=method,
                        error=ds.scrub(str(exc)),
                    )
                    continue
                items.extend(self.catalog.learn(method, ds.name, entries, max_len))
            return list_page(key, items, p.get("cursor"), era)

        return produce

    # -- tasks (2025-11-25 tasks; the 2026-07-28 extension, SEP-2663) --

    # -- breaker, session blocker, live state, health --

    def _on_circuit(self, ds: Downstream, old: CircuitState, new: CircuitState) -> None:
        log(
            "info" if new is CircuitState.CLOSED else "warn",
            "circuit_transition",
            server=ds.name,
            old=old.value,
            new=new.value,
        )
        count = self.blocker.on_transition(self.session.id, ds.name, new)
        if count is not None:
            threshold = self.config.rules().policy.session_blocker_threshold
            log(
                "error",
                "SESSION_BLOCKER",
                server=ds.name,
                open_transitions=count,
                threshold=threshold,
                session_id=self.session.id,
            )
            metadata: JsonObj = {
                "event": "SESSION_BLOCKER",
                "open_transitions": count,
                "threshold": threshold,
                "emitted_at": utc_now_iso(),
            }
            self.trail.event("session_blocker", ds.name, AuditStatus.ERROR, metadata)
        self._state_changed()

    def _state_changed(self) -> None:
        self.live.changed()

    def state(self) -> ServeState:
        """The live state (§8) as one frozen record: the state file, health and metrics
        are all made from it."""
        reason = self.config.halt_reason()
        sid = self.session.id
        return ServeState(
            session_id=sid,
            started_at=self.session.started_at,
            updated_at=utc_now_iso(),
            owner_pid=os.getpid(),
            gateway_version=VERSION,
            metrics_port=self.metrics_server.port if self.metrics_server else None,
            halt_active=reason is not None,
            halt_reason=reason,
            downstreams=tuple(
                ds.status_record(
                    self.blocker.count(sid, ds.name), self.blocker.emitted(sid, ds.name)
                )
                for ds in self.servers.all()
            ),
            tool_renames=dict(self.catalog.view.renames),
            audit_fail_count=self.trail.failures,
            tools_offered=len(self.catalog.view.visible_tools()) + 1,  # and the health tool
        )

    def _health(self, policy: Policy) -> JsonObj:
        uptime_s = time.monotonic() - self.session.started
        return health_report(self.state(), policy, uptime_s, len(self.catalog.view.visible_tools()))


def health_report(state: ServeState, policy: Policy, uptime_s: float, tools: int) -> JsonObj:
    """`__rea__health` (§8): the reference tool's shape, extended."""
    downstreams = [d.to_json() for d in state.downstreams]
    if not policy.expose_diagnostics:
        for d in downstreams:
            if d.get("last_error") is not None:
                d["last_error"] = "withheld (set gateway.health.expose_diagnostics: true)"
    return {
        "gateway": {
            "version": VERSION,
            "uptime_s": round(uptime_s, 1),
            "halt": state.halt_active,
            "halt_reason": state.halt_reason,
            "session_id": state.session_id,
        },
        "policy": {
            "profile": policy.profile,
            "autonomy_level": policy.autonomy_level,
            "max_autonomy_level": policy.max_autonomy_level,
            "blocked_paths_count": len(policy.blocked_paths),
        },
        "downstreams": downstreams,
        "summary": {
            "registered": len(downstreams),
            "connected": sum(1 for d in state.downstreams if d.connected),
            "healthy": sum(1 for d in state.downstreams if d.healthy),
            "total_tools": tools,
            "audit_fail_count": state.audit_fail_count,
        },
    }


def _names_a_prompt(kind: CallKind, params: JsonObj) -> bool:
    """prompts/get, or a completion of a prompt's argument (else: a resource)."""
    ref = as_obj(params.get("ref")) or {}
    return kind is CallKind.PROMPT or (
        kind is CallKind.COMPLETION and ref.get("type") == "ref/prompt"
    )


def requires_task(tool: JsonObj) -> bool:
    """A tool that runs only as a task: listed only to a client that declared tasks."""
    return (as_obj(tool.get("execution")) or {}).get("taskSupport") == "required"


def list_page(key: str, items: list[JsonObj], cursor: object, era: Era | None) -> JsonObj:
    """One page of a list result: `nextCursor` is an offset; stateless-era lists carry
    `ttlMs` 0 (always re-list: policy can change) and `cacheScope` private."""
    start = 0
    if cursor is not None:
        if not isinstance(cursor, str) or not cursor.isdigit() or int(cursor) > len(items):
            raise RpcError(INVALID_PARAMS, f"invalid cursor: {cursor!r}")
        start = int(cursor)
    result: JsonObj = {key: items[start : start + TOOLS_PAGE]}
    if start + TOOLS_PAGE < len(items):
        result["nextCursor"] = str(start + TOOLS_PAGE)
    if era is Era.STATELESS:
        result["ttlMs"] = 0
        result["cacheScope"] = "private"
    return result


def health_tool_definition() -> JsonObj:
    return {
        "name": HEALTH_TOOL,
        "title": "rea gateway health",
        "description": "Health of the rea gateway and every downstream MCP server: circuits, "
        "restarts, HALT state and the policy in force. Read-only.",
        "inputSchema": {"type": "object", "properties": {}, "additionalProperties": False},
        "annotations": {"readOnlyHint": True, "openWorldHint": False},
    }


# Commands ####################################################################


SERVE_ON_A_TERMINAL = """\
rea.py serve speaks the Model Context Protocol on stdin and stdout: it is meant to be
started by an MCP client (Claude Code, Claude Desktop, Cursor, VS Code), not typed at.
  python rea.py init --from .mcp.json --write   route your client's servers through rea
  python rea.py status                          what a running gateway is doing
  python rea.py check                           validate .rea/ and show what is loaded
Waiting for a client on stdin; Ctrl-D or Ctrl-C stops."""


def cmd_serve(root: Path, argv: list[str]) -> int:
    # from the first moment: a signal during start-up is a stop like any other (exit 0)
    signals: list[int] = []
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda signum, frame: signals.append(signum))
    rea_dir = root / ".rea"
    registry = load_registry(rea_dir)
    policy = load_policy(rea_dir)
    # stdout is the protocol: keep our own handle on it, and send any stray print to stderr.
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    timeouts = Timeouts.from_env(os.environ)
    if os.isatty(0):  # a person, not a client: say so in plain words (stdout stays silent)
        print(SERVE_ON_A_TERMINAL, file=sys.stderr, flush=True)
    rea_dir.mkdir(exist_ok=True)
    governance_of(root).shared.mkdir(exist_ok=True)
    warmer = threading.Thread(
        target=warm_bytecode_cache,
        args=(Path(__file__).resolve(),),
        name="rea-bytecode",
        daemon=True,
    )
    warmer.start()
    gateway = Gateway(root, registry, policy, sys.stdin.fileno(), out, timeouts, signals)
    code = gateway.serve()
    warmer.join(timeout=5)
    return code


def cmd_check(root: Path, as_json: bool) -> int:
    rea_dir = root / ".rea"
    registry = load_registry(rea_dir)
    policy = load_policy(rea_dir)
    renames = _recorded_renames(rea_dir)
    if as_json:
        doc = {
            "registry": registry_to_json(registry),
            "policy": policy_to_json(policy),
            "tool_renames": renames,
        }
        print(json.dumps(doc, indent=2, ensure_ascii=False))
        return 0
    print(f"root: {root}")
    governance = governance_of(root)
    if governance.linked:
        print(f"a linked worktree: audit log, pins and HALT from {governance.shared}")
    print(f"registry: {registry.source or '(none: no servers)'}")
    for spec in registry.servers:
        state = "enabled" if spec.enabled else "disabled"
        how = public_url(spec.url) if spec.remote else " ".join([spec.command, *spec.args])
        print(f"  {spec.name} ({state}): {how}")
        if spec.headers:
            print(f"    headers: {', '.join(sorted(spec.headers))} (values withheld)")
        if spec.oauth.client_id or spec.oauth.scopes:
            scopes = " ".join(spec.oauth.scopes) or "(from the server)"
            print(
                f"    oauth: client {spec.oauth.client_id or '(registered at login)'}, scopes {scopes}"
            )
        if spec.env:
            print(f"    env: {', '.join(sorted(spec.env))} (values withheld)")
        if spec.env_passthrough:
            print(f"    env_passthrough: {', '.join(spec.env_passthrough)}")
        for tool, tier in spec.tier_overrides.items():
            print(f"    tier override: {tool} -> {tier}")
        if spec.tools is not None:
            print(f"    tools offered: only {', '.join(spec.tools) or '(none)'}")
    print(f"policy: {policy.source or '(none: defaults)'}")
    print(f"  autonomy_level: {policy.autonomy_level} (max {policy.max_autonomy_level})")
    print(f"  blocked_paths: {', '.join(policy.blocked_paths) or '(none)'} (+ .rea/ always)")
    print(f"  audit.fsync: {policy.audit_fsync}; injection_detection: {policy.injection_detection}")
    for line in tools_offered_lines(_recorded_tools_offered(rea_dir), " (at the last serve)"):
        print(line)
    if renames:
        print("tool names shortened for clients (from the last serve):")
        for exposed, full in sorted(renames.items()):
            print(f"  {exposed} <- {full}")
    print("check: OK")
    return 0


def remote_neighbours(registry: Registry, server: str) -> dict[str, str]:
    """The registry's remote servers but `server`: name -> url (see covered_neighbour)."""
    return {s.name: s.url for s in registry.servers if s.remote and s.name != server}


def probe_tools(spec: ServerSpec, root: Path) -> list[dict[str, object]]:
    """Start (or reach) a server just long enough to list its tools (for `trust`)."""
    others = remote_neighbours(load_registry(root / REA_DIR), spec.name)
    timers = Deadlines()
    timeouts = Timeouts.from_env(os.environ)
    child: Transport
    try:
        if spec.remote:
            child = StreamableHttpTransport(
                spec.name,
                spec.url,
                expanded_headers(spec, os.environ),
                lambda c, m: None,
                lambda c, code: None,
                timers,
                timeouts,
                TokenSource(
                    spec.name, spec.url, _token_store(root, spec.name), neighbours=lambda: others
                ),
            )
        else:
            child = ChildProcess(
                spec.name,
                [spec.command, *spec.args],
                child_environment(spec, os.environ),
                root,
                lambda c, m: None,
                lambda c, code: None,
                timers,
                timeouts,
            )
    except OSError as exc:
        timers.close()
        raise ReaError(
            f"server {spec.name}: cannot start {spec.command!r}: {exc.strerror or exc}"
        ) from None
    except ReaError:
        timers.close()
        raise
    try:
        open_transport(child, timeouts)
        return list_tools(child, timeouts.handshake_s)
    except (RpcError, ChildDied, TimeoutError, ValueError) as exc:
        raise ReaError(f"server {spec.name}: cannot list its tools: {exc}") from None
    finally:
        child.stopping = True
        child.stop()
        timers.close()


def _recorded_tools_offered(rea_dir: Path) -> int | None:
    try:
        state = as_obj(json.loads((rea_dir / STATE_FILE).read_text()))
    except (OSError, ValueError):
        return None
    count = state.get("tools_offered") if state else None
    return count if isinstance(count, int) and not isinstance(count, bool) else None


def _recorded_renames(rea_dir: Path) -> dict[str, str]:
    try:
        state = as_obj(json.loads((rea_dir / "serve.state.json").read_text()))
    except (OSError, ValueError):
        return {}
    renames = as_obj(state.get("tool_renames")) if state else None
    return {str(k): str(v) for k, v in (renames or {}).items()}


def _token_store(root: Path, server: str) -> TokenStore:
    return TokenStore(root / REA_DIR / CREDENTIALS_DIR, server)


def _remote_spec(root: Path, server: str, command: str) -> ServerSpec:
    """The registry's remote server of that name; ReaError naming the file otherwise."""
    registry = load_registry(root / REA_DIR)
    source = registry.source or root / REA_DIR / "registry.yaml"
    for spec in registry.servers:
        if spec.name == server:
            if not spec.remote:
                raise ReaError(
                    f"{source}: server {server!r} is a local server (command); {command} is "
                    "for a remote one (url)"
                )
            return spec
    known = ", ".join(s.name for s in registry.servers if s.remote) or "none"
    raise ReaError(
        f"{source}: no remote server named {server!r} (remote servers: {known}); "
        "add it with a url: first"
    )


def cmd_login(root: Path, server: str, no_browser: bool) -> int:
    """`login SERVER [--no-browser]` (§13): OAuth for a remote server, a governance act."""
    spec = _remote_spec(root, server, "login")
    if any(key.lower() == "authorization" for key in spec.headers):
        raise ReaError(
            f"server {server} sends its own Authorization (headers: in .rea/registry.yaml); "
            "it needs no login: remove that header to log in with OAuth instead"
        )
    store = _token_store(root, spec.name)
    creds = login(
        spec.name,
        spec.url,
        spec.oauth,
        store,
        not no_browser,
        sys.stdout,
        headers=expanded_headers(spec, os.environ),
        neighbours=remote_neighbours(load_registry(root / REA_DIR), spec.name),
    )
    record_governance_act(
        governance_of(root),
        "login",
        {
            "server": spec.name,
            "url": public_url(spec.url),
            "issuer": creds.issuer,
            "client_id": creds.client_id,
            "scope": creds.scope,
        },
    )
    return 0


def cmd_logout(root: Path, server: str) -> int:
    """`logout SERVER` (§13): revoke and delete its tokens, a governance act."""
    spec = _remote_spec(root, server, "logout")
    done = logout(spec.name, _token_store(root, spec.name), sys.stdout)
    if done is not None:
        record_governance_act(
            governance_of(root),
            "logout",
            {"server": spec.name, "url": public_url(spec.url), "outcome": done},
        )
    return 0


def cmd_freeze(root: Path, reason: str | None) -> int:
    rea_dir = root / ".rea"
    rea_dir.mkdir(exist_ok=True)
    text = reason or f"frozen by {os.environ.get('USER', 'someone')} at {utc_now_iso()}"
    (rea_dir / "HALT").write_text(text + "\n", encoding="utf-8")
    record_governance_act(governance_of(root), "freeze", {"reason": text, "halt": str(rea_dir)})
    print(f"frozen: every tool call is refused until `python rea.py unfreeze` ({text})")
    return 0


def cmd_unfreeze(root: Path) -> int:
    halt = root / ".rea" / "HALT"
    try:
        was = halt.read_text(encoding="utf-8", errors="replace").strip()
        halt.unlink()
    except FileNotFoundError:
        print("not frozen: .rea/HALT does not exist")
        return 0
    record_governance_act(governance_of(root), "unfreeze", {"reason": was, "halt": str(halt)})
    print("unfrozen: tool calls are allowed again")
    return 0


# main ########################################################################


def main(argv: list[str] | None = None) -> int:
    args_list = sys.argv[1:] if argv is None else argv
    try:
        return _main(args_list)
    except ReaError as exc:
        print(f"rea: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a file the user pointed us at: one line, never a traceback
        where = exc.filename or "a file"
        print(
            f"rea: {where}: {exc.strerror or exc}; check the path and its permissions",
            file=sys.stderr,
        )
        return 2
    except KeyboardInterrupt:
        return 130


def _main(argv: list[str]) -> int:
    if argv[:1] == ["_echo-server"]:  # hidden: the downstream `bench` measures against
        return cmd_echo_server(argv[1:])
    args = parse_command(argv)
    if args.version:
        print(f"rea.py {VERSION}")
        return 0
    if args.help or not args.command:
        print(command_line().format_help(), end="")
        return 0 if args.help else 2
    root = find_root(getattr(args, "root", None))
    command: str = args.command
    words = argv[argv.index(command) + 1 :]
    if command == "serve":
        return cmd_serve(root, words)
    if command == "check":
        return cmd_check(root, args.json)
    if command == "status":
        return cmd_status(root, words, sys.stdout, lambda: policy_summary(root))
    if command == "freeze":
        return cmd_freeze(root, args.reason)
    if command == "unfreeze":
        return cmd_unfreeze(root)
    if command == "audit":
        return cmd_audit(governance_of(root).shared, words, sys.stdout)
    if command == "trust":
        return cmd_trust(root, words, sys.stdout, lambda spec: probe_tools(spec, root))
    if command == "init":
        return cmd_init(root, words, sys.stdout, Path(__file__).resolve())
    if command == "login":
        return cmd_login(root, args.server, args.no_browser)
    if command == "logout":
        return cmd_logout(root, args.server)
    return cmd_bench(root, words, sys.stdout, Path(__file__).resolve())


def policy_summary(root: Path) -> dict[str, object]:
    policy = load_policy(root / ".rea")
    return {
        "file": str(policy.source.relative_to(root)) if policy.source else None,
        "profile": policy.profile,
        "autonomy_level": policy.autonomy_level,
        "max_autonomy_level": policy.max_autonomy_level,
        "blocked_paths_count": len(policy.blocked_paths),
    }


if __name__ == "__main__":
    sys.exit(main())
