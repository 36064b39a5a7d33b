"""The suite's guard against silent failure: a test fails when vblk reports trouble it did not expect.

A pytest plugin (tests/conftest.py loads it for every test). It fails a test, at teardown,
when during the test, in this process or in a vblk child process:

- a line was logged at error level or above (vblk's own events, asyncio's "Task exception was
  never retrieved" and "Exception in callback", aiohttp's handler errors);
- a coroutine was never awaited, or an exception was raised where nobody could catch it (a
  ``__del__``, a finalizer, a thread): ``filterwarnings`` in pyproject.toml turns those into
  errors during a test, and the guard collects garbage at teardown to catch the late ones.

vblk child processes inherit ``VBLK_LOG_FILE`` (vblk's ``--log-file``): they append every log
line to one file, which the guard reads after each test. A test that provokes error lines on
purpose says which ones: ``@pytest.mark.expect_errors("virtio_device_needs_reset", ...)``
(event names, or regular expressions matched against them), or ``log_guard.expect(...)`` from
the ``log_guard`` fixture.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
import os
import re
import sys
import tempfile
import warnings
from collections.abc import Callable, Generator, Iterable
from pathlib import Path
from typing import Any

import pytest
import structlog

from service import logs

LOG_FILE_ENV = "VBLK_LOG_FILE"
_UNAWAITED = re.compile(r"coroutine .* was never awaited")


@dataclasses.dataclass(frozen=True, slots=True)
class Problem:
    """One report of trouble: its event name (or first line) and where it came from."""

    event: str
    source: str  # "this process" or "child process"
    text: str

    def __str__(self) -> str:
        return f"[{self.source}] {self.text[:2000]}"


def _is_trouble(level: int, message: str) -> bool:
    return level >= logging.ERROR or _UNAWAITED.search(message) is not None


class _Catcher(logging.Handler):
    """On the root logger for the whole session: keeps every error-level record."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.problems: list[Problem] = []

    def emit(self, record: logging.LogRecord) -> None:
        if isinstance(record.msg, dict):  # a structlog event (ProcessorFormatter.wrap_for_formatter)
            event = str(record.msg.get("event", ""))
            text = json.dumps(record.msg, default=repr)
        else:
            text = record.getMessage()
            event = text.partition("\n")[0]
        if record.exc_info and record.exc_info[1] is not None:
            text += f" [{record.exc_info[0].__name__ if record.exc_info[0] else ''}: {record.exc_info[1]}]"
        if _is_trouble(record.levelno, text):
            self.problems.append(Problem(event, "this process", f"{record.levelname} {record.name}: {text}"))


class _ChildLog:
    """The file vblk child processes append their log lines to, read from where it was left."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._offset = 0

    def new_problems(self) -> list[Problem]:
        try:
            with self.path.open("rb") as f:
                f.seek(self._offset)
                data = f.read()
        except FileNotFoundError:
            return []
        complete = data.rfind(b"\n") + 1  # a line being written now is read next time
        self._offset += complete
        problems = []
        for raw in data[:complete].splitlines():
            line = raw.decode(errors="replace")
            try:
                entry = json.loads(line)
            except ValueError:
                entry = {"event": line, "level": "error"}  # a log file is JSON lines only
            if not isinstance(entry, dict):
                entry = {"event": line, "level": "error"}
            level = logging.getLevelName(str(entry.get("level", "info")).upper())
            numeric = level if isinstance(level, int) else logging.ERROR
            if _is_trouble(numeric, line):
                problems.append(Problem(str(entry.get("event", "")), "child process", line))
        return problems


class LogGuard:
    """What one test expects to see logged at error level (the ``log_guard`` fixture)."""

    def __init__(self, patterns: Iterable[str], collect: Callable[[], list[Problem]]) -> None:
        self._patterns = [re.compile(p) for p in patterns]
        self._collect = collect
        self.problems: list[Problem] = []  # everything reported during the test, expected or not

    def reported(self) -> list[Problem]:
        """Everything reported so far in this test, expected or not (collected now)."""
        self.problems += self._collect()
        return list(self.problems)

    def expect(self, *patterns: str) -> None:
        """Error lines whose event matches one of ``patterns`` (``re.fullmatch``) are fine."""
        self._patterns += [re.compile(p) for p in patterns]

    def expected(self, problem: Problem) -> bool:
        return any(p.fullmatch(problem.event) for p in self._patterns)

    def unexpected(self) -> list[Problem]:
        return [p for p in self.problems if not self.expected(p)]


_GUARD = pytest.StashKey[LogGuard]()


class GuardPlugin:
    def __init__(self, directory: Path) -> None:
        self.catcher = _Catcher()
        self.children = _ChildLog(directory / "children.log")
        self.directory = directory
        self._baseline: tuple[dict[str, Any], int] | None = None

    def start(self) -> None:
        self.route()
        logging.getLogger().addHandler(self.catcher)
        os.environ[LOG_FILE_ENV] = str(self.children.path)

    def route(self) -> None:
        """vblk's structlog setup routes its events through the root logger, where the catcher is,
        at info level; put it back if a test changed it (reset structlog to its defaults, which
        print past the catcher, or configured another level, which would hide lines from the
        next tests' caplog)."""
        if self._baseline is None or structlog.get_config() != self._baseline[0]:
            logs.configure("info", "json", stream=sys.stdout)
            self._baseline = (structlog.get_config(), logging.getLogger().level)
        logging.getLogger().setLevel(self._baseline[1])

    def stop(self) -> None:
        logging.getLogger().removeHandler(self.catcher)
        os.environ.pop(LOG_FILE_ENV, None)

    def collect(self) -> list[Problem]:
        """What was reported since the last call, here and in children."""
        problems, self.catcher.problems = self.catcher.problems, []
        return problems + self.children.new_problems()

    @pytest.hookimpl(wrapper=True, tryfirst=True)
    def pytest_runtest_setup(self, item: pytest.Item) -> Generator[None, None, None]:
        markers = [arg for mark in item.iter_markers("expect_errors") for arg in mark.args]
        self.route()
        guard = LogGuard(markers, self.collect)
        guard.problems += self.collect()  # between tests (a late child line): this test's
        item.stash[_GUARD] = guard
        return (yield)

    @pytest.hookimpl(wrapper=True, tryfirst=True)
    def pytest_runtest_teardown(self, item: pytest.Item) -> Generator[None, None, None]:
        try:
            return (yield)
        finally:
            guard = item.stash.get(_GUARD, None)
            if guard is not None:
                guard.problems += self._late_garbage() + self.collect()
                unexpected = guard.unexpected()
                if unexpected:
                    pytest.fail(
                        f"vblk reported trouble the test did not expect:\n{_summary(unexpected)}",
                        pytrace=False,
                    )

    def _late_garbage(self) -> list[Problem]:
        """Collect garbage now: unretrieved task exceptions and unawaited coroutines surface."""
        caught: list[Problem] = []

        def unraisable(args: Any) -> None:
            text = f"{args.err_msg or 'Exception ignored in'}: {args.object!r}: {args.exc_value!r}"
            caught.append(Problem(type(args.exc_value).__name__, "this process", text))

        previous = sys.unraisablehook
        sys.unraisablehook = unraisable
        try:
            with warnings.catch_warnings(record=True) as seen:
                warnings.simplefilter("always")
                gc.collect()
        finally:
            sys.unraisablehook = previous
        for warning in seen:
            if _UNAWAITED.search(str(warning.message)):
                caught.append(Problem("coroutine never awaited", "this process", str(warning.message)))
        return caught

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        late = self._late_garbage() + self.collect()
        if late:
            sys.stderr.write(f"\nvblk reported trouble after the last test:\n{_summary(late)}\n")
            session.exitstatus = pytest.ExitCode.TESTS_FAILED


def _summary(problems: list[Problem]) -> str:
    """One line per kind of problem (the first of each, and how many there were)."""
    kinds: dict[tuple[str, str], list[Problem]] = {}
    for problem in problems:
        kinds.setdefault((problem.source, problem.event), []).append(problem)
    lines = []
    for same in kinds.values():
        times = f" (x{len(same)})" if len(same) > 1 else ""
        lines.append(f"  event {same[0].event!r}{times}: {same[0]}")
    return "\n".join(lines)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "expect_errors(*events): error-level log events this test provokes on purpose"
    )
    directory = Path(tempfile.mkdtemp(prefix="vblk-guard-"))
    plugin = GuardPlugin(directory)
    plugin.start()
    config.pluginmanager.register(plugin, "vblk-guard")
    config.add_cleanup(plugin.stop)


@pytest.fixture
def log_guard(request: pytest.FixtureRequest) -> LogGuard:
    """This test's guard: ``expect()`` error events, or read ``problems`` after the fact."""
    guard: LogGuard = request.node.stash[_GUARD]
    return guard
