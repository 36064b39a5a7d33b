"""The suite's guard (tests/guard.py) fails a test on each kind of silent failure it promises to catch.

Each case plants one in a small test file and runs pytest on it in a child process with the
guard loaded, as the suite loads it.
"""

from __future__ import annotations

import textwrap

import pytest

from tests.build import REPO

_INI = """
[pytest]
asyncio_mode = auto
asyncio_default_fixture_loop_scope = function
filterwarnings =
    error:coroutine .* was never awaited:RuntimeWarning
    error::pytest.PytestUnraisableExceptionWarning
    error::pytest.PytestUnhandledThreadExceptionWarning
"""


def _run(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, source: str) -> pytest.RunResult:
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    monkeypatch.delenv("VBLK_LOG_FILE", raising=False)  # the inner guard makes its own
    pytester.makeini(_INI)
    pytester.makeconftest('pytest_plugins = ["tests.guard"]\n')
    pytester.makepyfile(test_planted=textwrap.dedent(source))
    return pytester.runpytest_subprocess("-p", "no:cacheprovider")


def test_an_unretrieved_task_exception_fails_the_test(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    result = _run(
        pytester,
        monkeypatch,
        """
        import asyncio

        async def test_planted():
            async def boom():
                raise RuntimeError("planted failure")

            asyncio.get_running_loop().create_task(boom())
            await asyncio.sleep(0.01)
        """,
    )
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines(["*Task exception was never retrieved*"])


def test_a_coroutine_never_awaited_fails_the_test(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    result = _run(
        pytester,
        monkeypatch,
        """
        import asyncio

        def test_planted():
            asyncio.sleep(0)  # made and dropped
        """,
    )
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*was never awaited*"])


def test_an_error_logged_by_vblk_fails_the_test_unless_expected(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    result = _run(
        pytester,
        monkeypatch,
        """
        import pytest
        import structlog

        log = structlog.get_logger("vblk.test")

        def test_unexpected():
            log.error("disk_exploded", disk="d0")

        @pytest.mark.expect_errors("disk_exploded")
        def test_expected_by_marker():
            log.error("disk_exploded", disk="d0")

        def test_expected_by_fixture(log_guard):
            log_guard.expect("disk_.*")
            log.error("disk_exploded", disk="d0")
            assert [p.event for p in log_guard.reported()] == ["disk_exploded"]

        def test_warnings_are_fine():
            log.warning("disk_slow", disk="d0")
        """,
    )
    result.assert_outcomes(passed=4, errors=1)
    result.stdout.fnmatch_lines(["*ERROR at teardown of test_unexpected*", "*disk_exploded*"])


def test_an_error_logged_by_a_vblk_child_process_fails_the_test(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    result = _run(
        pytester,
        monkeypatch,
        """
        import subprocess
        import sys

        CHILD = (
            "import os, structlog; from service import logs; "
            "logs.configure('info', 'json', log_file=os.environ['VBLK_LOG_FILE']); "
            "structlog.get_logger('vblk.child').error('child_broke', why='planted')"
        )

        def test_planted():
            subprocess.run([sys.executable, "-c", CHILD], check=True, stdout=subprocess.DEVNULL)
        """,
    )
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines(["*child process*child_broke*"])
