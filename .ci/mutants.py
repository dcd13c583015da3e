"""The mutation check of the test suite (issue 16): each deliberate bug below is applied
alone to a copy of rea.py, and the suite runs until its first failure. Prints which test
caught each bug, or NOT CAUGHT.

    .venv/bin/python .ci/mutants.py            # every mutant (15-30 minutes on 2 cores)
    .venv/bin/python .ci/mutants.py --check    # only that each bug still applies
    .venv/bin/python .ci/mutants.py HALT slot  # the mutants whose title holds a word
"""

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent
Change = tuple[str, str]

MUTANTS: list[tuple[str, list[Change]]] = [
    (
        "skip the audit record of a denial",
        [
            (
                "    def _call(self, call: Call, outcome: Outcome) -> None:\n",
                "    def _call(self, call: Call, outcome: Outcome) -> None:\n"
                "        if outcome.status == AuditStatus.DENIED:\n"
                "            return\n",
            )
        ],
    ),
    (
        "send a call to its server twice",
        [
            (
                "        with self._lock:\n            call.transport_id = request_id\n",
                "        transport.request_async(method, params, 30.0, lambda r, e: None)\n"
                "        with self._lock:\n            call.transport_id = request_id\n",
            )
        ],
    ),
    (
        "re-send a timed-out call",
        [
            (
                "    def _answered(self, call: Call, result: JsonObj | None, error: Exception | None) -> None:\n",
                "    def _answered(self, call: Call, result: JsonObj | None, error: Exception | None) -> None:\n"
                "        if isinstance(error, TimeoutError) and call.transport and not call.extra.get('again'):\n"
                "            call.extra['again'] = True\n"
                "            method, params = self._request_for(call, call.transport)\n"
                "            call.transport.request_async(method, params, 30.0, lambda r, e: self._answered(call, r, e))\n"
                "            return\n",
            )
        ],
    ),
    (
        "accept `..` in blocked paths (never resolved, lexically or on disk)",
        [
            (
                '    return _LEADING_SLASHES.sub("/", os.path.normpath(absolute))\n',
                '    return _LEADING_SLASHES.sub("/", absolute)\n',
            ),
            ('            if part == "..":\n', '            if part == "...":\n'),
            ('        if part == "..":\n', '        if part == "...":\n'),
        ],
    ),
    (
        "drop Node's reading of `..` before a symlink",
        [('                if ".." in local.split("/"):\n', "                if False:\n")],
    ),
    (
        "drop outputSchema from tools/list",
        [
            (
                '            {**(as_obj(redactor.redact_value(e.definition)[0]) or {}), "name": e.exposed}\n',
                "            {**{k: v for k, v in (as_obj(redactor.redact_value(e.definition)[0]) or {}).items()"
                ' if k != "outputSchema"}, "name": e.exposed}\n',
            )
        ],
    ),
    (
        "forget HALT on resources/read",
        [
            (
                "REQUEST_STEPS: tuple[Step, ...] = (step_halt, step_route, step_blocked_paths)\n",
                "REQUEST_STEPS: tuple[Step, ...] = (step_route, step_blocked_paths)\n",
            )
        ],
    ),
    (
        "let any success close a half-open circuit",
        [
            ("            if ticket.epoch == self._epoch:\n", "            if True:\n"),
            (
                "                    if self._state is CircuitState.HALF_OPEN and ticket.probe:\n"
                "                        self._probe_out = False\n",
                "                    if self._state is CircuitState.HALF_OPEN:\n"
                "                        self._probe_out = False\n",
            ),
        ],
    ),
    (
        "skip the redaction of tool results",
        [
            (
                "    value, names = rules.redactor.redact_value(result, text if fits else None)\n",
                "    value, names = result, ()\n",
            )
        ],
    ),
    (
        "never release a concurrency slot",
        [("                self._limiter.give_back(permit.server)\n", "                pass\n")],
    ),
    (
        "chain every record onto zeros",
        [('            "prev_hash": prev_hash,\n', '            "prev_hash": ZERO_HASH,\n')],
    ),
    (
        "lock the connection to the era of its first request",
        [
            (
                '        if method == "initialize":\n            with self._lock:\n',
                '        if method == "initialize":\n            if self._stateless:\n'
                '                raise RpcError(UNSUPPORTED_VERSION, "locked")\n'
                "            with self._lock:\n",
            )
        ],
    ),
    (
        "answer a cancelled call anyway",
        [
            (
                "            answer = req_id is not None and not call.cancelled\n"
                "            pending = call.transport, call.transport_id\n",
                "            answer = req_id is not None\n            pending = call.transport, call.transport_id\n",
            ),
            (
                "        if call.cancelled:\n"
                '            return Outcome(AuditStatus.ERROR, note="cancelled by the client")\n',
                "",
            ),
        ],
    ),
    (
        "no grace for calls in flight at stop",
        [
            (
                "        self.calls.wait_settled(deadline)\n        self.wire.wait_answered(deadline)\n",
                "        pass\n",
            )
        ],
    ),
    (
        "send a burst's answers before their records",
        [
            (
                "HeldOutput.hold(HeldOutput.RECORDS, self._append_held, record)",
                "HeldOutput.hold(HeldOutput.ANSWERS + 1, self._append_held, record)",
            )
        ],
    ),
]


def mutated(source: str, changes: list[Change]) -> str | None:
    """The source with the bug in, or None when a change no longer applies exactly once."""
    for old, new in changes:
        if source.count(old) != 1:
            return None
        source = source.replace(old, new)
    return source


def main(argv: list[str]) -> int:
    check = "--check" in argv
    words = [a for a in argv if a != "--check"]
    source = (HERE / "rea.py").read_text()
    chosen = [(t, c) for t, c in MUTANTS if not words or any(w in t for w in words)]
    missing = [t for t, c in chosen if mutated(source, c) is None]
    for title in missing:
        print(f"!! {title}: the code it changes is not there (exactly once) any more")
    if check or missing:
        return 1 if missing else 0
    with tempfile.TemporaryDirectory(prefix="rea-mutants-") as tmp:
        work = Path(tmp) / "main"
        work.mkdir()
        os.symlink(HERE.parent / "shared", Path(tmp) / "shared")  # the vectors, as beside HERE
        for name in ("test_rea.py", "pyproject.toml"):
            shutil.copy(HERE / name, work / name)
        env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
        for title, changes in chosen:
            (work / "rea.py").write_text(mutated(source, changes) or "")
            started = time.monotonic()
            done = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "pytest",
                    "-p",
                    "no:cacheprovider",
                    "-x",
                    "-q",
                    "test_rea.py",
                ],
                cwd=work,
                env=env,
                capture_output=True,
                text=True,
            )
            failed = [line for line in done.stdout.splitlines() if line.startswith("FAILED")]
            found = failed[0][7:].split(" - ")[0] if failed else "NOT CAUGHT"
            print(f"{title}: {found} ({time.monotonic() - started:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
