"""Logging: structlog for vblk, with the standard library's loggers routed through it.

Service layer; every module logs through ``structlog.get_logger("vblk.<area>")``. Output goes
to stdout: JSON lines when stdout is not a terminal (journald, containers, log shippers),
readable key=value lines on a terminal. Per-connection and per-request context (peer, export,
connection and request ids) comes from :mod:`structlog.contextvars`, bound by the front ends;
asyncio tasks copy the context, so a request task logs with its connection's fields.
Nothing goes to stderr unstructured: Python's warnings (a coroutine never awaited), exceptions
nobody could catch (in ``__del__``, in a thread) and asyncio's own reports become log lines.
A log file (``--log-file``, ``VBLK_LOG_FILE``) also gets every line, as JSON, appended.
"""

from __future__ import annotations

import logging
import sys
import threading
from pathlib import Path
from typing import Any, TextIO

import structlog
from aiohttp.http_exceptions import HttpProcessingError

_SHARED: list[structlog.types.Processor] = [
    structlog.contextvars.merge_contextvars,
    structlog.stdlib.add_log_level,
    structlog.stdlib.add_logger_name,
    structlog.processors.TimeStamper(fmt="iso", utc=True),
]


_OWN = "_vblk_handler"  # marks the handlers configure() installed (and may replace)


def configure(
    level: str = "info", fmt: str = "auto", stream: TextIO | None = None, log_file: str | Path | None = None
) -> None:
    """Configure structlog and the root stdlib logger (aiohttp, asyncio) to one renderer.

    ``log_file``: also append every line, rendered as JSON, to this file. Handlers someone
    else put on the root logger stay.
    """
    stream = stream or sys.stdout
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        raise ValueError(f"unknown log level {level!r}")
    if fmt == "auto":
        fmt = "console" if stream.isatty() else "json"
    renderer: structlog.types.Processor
    if fmt == "json":
        renderer = structlog.processors.JSONRenderer()
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=stream.isatty())
    structlog.configure(
        processors=[
            *_SHARED,
            structlog.processors.StackInfoRenderer(),
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.stdlib.LoggerFactory(),
        cache_logger_on_first_use=False,
    )
    handlers: list[logging.Handler] = [logging.StreamHandler(stream)]
    handlers[0].setFormatter(_formatter(renderer))
    if log_file is not None:
        handlers.append(logging.FileHandler(log_file, encoding="utf-8"))
        handlers[1].setFormatter(_formatter(structlog.processors.JSONRenderer()))
    root = logging.getLogger()
    for old in list(root.handlers):
        if getattr(old, _OWN, False):
            root.removeHandler(old)
            old.close()
    for handler in handlers:
        setattr(handler, _OWN, True)
        root.addHandler(handler)
    root.setLevel(numeric)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)  # vblk writes its own line
    server = logging.getLogger("aiohttp.server")
    if not any(isinstance(f, _ClientErrors) for f in server.filters):
        server.addFilter(_ClientErrors())
    logging.captureWarnings(True)  # warnings (a coroutine never awaited) become log lines
    sys.unraisablehook = _unraisable
    threading.excepthook = _thread_exception


def _formatter(renderer: structlog.types.Processor) -> logging.Formatter:
    return structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[*_SHARED, structlog.stdlib.ExtraAdder()],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            renderer,
        ],
    )


class _ClientErrors(logging.Filter):
    """aiohttp logs a malformed request (a 400 it answers itself) as an error with a traceback:
    the client's fault, not the service's, so a one-line warning."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError) and 400 <= exc.code < 500:
            message = exc.message.splitlines()[0] if exc.message else ""
            record.msg = f"{record.getMessage()}: {exc.code} {type(exc).__name__}: {message}"
            record.args = ()
            record.exc_info = None
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


_log = structlog.get_logger("vblk.python")


def _unraisable(unraisable: Any) -> None:
    """An exception nobody could catch (raised in ``__del__``, a finalizer, a callback)."""
    exc = unraisable.exc_value
    _log.error(
        "unraisable_exception",
        message=unraisable.err_msg or "Exception ignored in",
        object=repr(unraisable.object),
        exc_info=(unraisable.exc_type, exc, unraisable.exc_traceback) if exc is not None else None,
    )


def _thread_exception(args: threading.ExceptHookArgs) -> None:
    """An exception that ended a thread."""
    if args.exc_type is SystemExit:
        return
    _log.error(
        "thread_crashed",
        thread=args.thread.name if args.thread is not None else None,
        exc_info=(args.exc_type, args.exc_value, args.exc_traceback),
    )
