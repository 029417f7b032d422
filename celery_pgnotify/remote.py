"""Celery's remote control, extended for what only this broker holds.

Celery's control handlers are a registry (``celery.worker.control.Panel``),
its own extension point: a consuming process on pgnotify (the stock worker;
``celery-pg worker`` answers the same from ``worker/control.py``) gets

- ``scheduled`` (``celery inspect scheduled``, alias ``dump_schedule``):
  Celery's own answer, then the tasks waiting in the database until due;
- ``pause_queue`` / ``resume_queue`` (``app.control.broadcast("pause_queue",
  arguments={"queue": "q"}, reply=True)``): the same as ``celery-pg pause``.

They are installed as soon as Celery's registry is imported, by the import
hook the wheel's ``.pth`` file sets up (``_pth/autoload.py``): Celery's
command line accepts only the commands its own process registered. A
consuming transport installs them too (once per process), for processes
started without ``.pth`` files.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class HoldsTasks(Protocol):
    """A transport that holds scheduled tasks and paused queues (pgnotify's)."""

    def scheduled(self, hostname: str) -> list[dict[str, Any]]: ...

    def set_paused(self, queue: str, paused: bool) -> bool: ...


_EXTENDED = False


def _transport(state: Any) -> HoldsTasks | None:
    transport = state.consumer.connection.transport
    return transport if isinstance(transport, HoldsTasks) else None


def pause_reply(transport: HoldsTasks | None, queue: Any, paused: bool) -> dict[str, str]:
    """A control reply in Celery's format for pausing or resuming ``queue``."""
    if transport is None:
        return {"error": "pausing a queue needs a pgnotify:// broker"}
    if not isinstance(queue, str) or not queue:
        return {"error": "name the queue: arguments={'queue': NAME}"}
    changed = transport.set_paused(queue, paused)
    verb = "paused" if paused else "resumed"
    return {"ok": f"queue {queue!r} {verb}" if changed else f"queue {queue!r} was {verb} already"}


def extend_remote_control() -> None:
    """Install the handlers above in this process's registry (once)."""
    global _EXTENDED
    if _EXTENDED:
        return
    try:
        from celery.worker.control import Panel, control_command
    except ImportError:  # kombu without Celery
        return
    own = Panel.data.get("scheduled")
    if own is not None:

        def scheduled(state: Any, **kwargs: Any) -> list[dict[str, Any]]:
            entries = list(own(state, **kwargs))
            transport = _transport(state)
            if transport is not None:
                entries += transport.scheduled(state.hostname)
            return entries

        scheduled.__doc__ = own.__doc__
        for name, handler in list(Panel.data.items()):
            if handler is own:
                Panel.data[name] = scheduled

    @control_command(args=[("queue", str)], signature="<queue>")  # type: ignore[untyped-decorator]
    def pause_queue(state: Any, queue: str = "", **kwargs: Any) -> dict[str, str]:
        """Stop every worker taking tasks from a queue (pgnotify)."""
        return pause_reply(_transport(state), queue, True)

    @control_command(args=[("queue", str)], signature="<queue>")  # type: ignore[untyped-decorator]
    def resume_queue(state: Any, queue: str = "", **kwargs: Any) -> dict[str, str]:
        """Let workers take tasks from a paused queue again (pgnotify)."""
        return pause_reply(_transport(state), queue, False)

    _EXTENDED = True
