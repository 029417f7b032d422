"""Installed as the top-level module ``_celery_pgnotify_autoload``.

The wheel's ``celery_pgnotify.pth`` imports it at interpreter start-up. It
must stay tiny and import nothing heavy: it only arranges for two things to
happen the moment a module is first imported, in any process:

- ``kombu.transport``: the ``pgnotify`` alias is added to kombu's transport
  table (workers, beat, and producers such as a web application calling
  ``.delay()``);
- ``celery.worker.control``: this broker's remote-control commands are added
  to Celery's registry (``celery_pgnotify/remote.py``). Celery's command line
  accepts only the commands its own process registered, and it registers
  them before any connection would load the transport: without this,
  ``celery control pause_queue`` was refused while the broadcast worked.
"""

import sys

# No other import: this runs at every interpreter start (even `typing` would
# cost milliseconds), so annotations are strings and the names come only
# under type checking.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Sequence
    from importlib.abc import Loader
    from importlib.machinery import ModuleSpec
    from types import ModuleType


def _register(module: "ModuleType") -> None:
    aliases = getattr(module, "TRANSPORT_ALIASES", None)
    if isinstance(aliases, dict):
        aliases.setdefault("pgnotify", "celery_pgnotify.transport:Transport")


def _extend_control(module: "ModuleType") -> None:
    # Runs inside the import of Celery's own module, in every process (other
    # brokers' workers too): a failure here must not fail that import. The
    # commands are an extra; a consuming transport installs them again.
    try:
        from celery_pgnotify.remote import extend_remote_control

        extend_remote_control()
    except Exception:  # noqa: BLE001 - the package removed, or a Celery it does not know
        return


#: module name -> what to do once it has been imported
_HOOKS: "dict[str, Callable[[ModuleType], None]]" = {
    "kombu.transport": _register,
    "celery.worker.control": _extend_control,
}


class _Loader:
    """Runs the real loader, then the module's hook."""

    def __init__(self, loader: "Loader", hook: "Callable[[ModuleType], None]") -> None:
        self._loader = loader
        self._hook = hook

    def create_module(self, spec: "ModuleSpec") -> "ModuleType | None":
        return self._loader.create_module(spec)

    def exec_module(self, module: "ModuleType") -> None:
        self._loader.exec_module(module)
        self._hook(module)


class _Finder:
    """Watches for the modules of ``_HOOKS`` still to come, wraps their
    loaders, and retires once none is left."""

    def __init__(self, pending: "dict[str, Callable[[ModuleType], None]]") -> None:
        self._pending = pending

    def find_spec(
        self,
        fullname: str,
        path: "Sequence[str] | None" = None,
        target: "ModuleType | None" = None,
    ) -> "ModuleSpec | None":
        hook = self._pending.pop(fullname, None)
        if hook is None:
            return None
        if not self._pending:
            sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _Finder)]
        from importlib.util import find_spec

        spec = find_spec(fullname)  # this finder passes now: the name is no longer pending
        if spec is not None and spec.loader is not None:
            spec.loader = _Loader(spec.loader, hook)  # type: ignore[assignment]
        return spec


def _install() -> None:
    pending = {}
    for name, hook in _HOOKS.items():
        module = sys.modules.get(name)
        if module is not None:
            hook(module)
        else:
            pending[name] = hook
    if pending and not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder(pending))


_install()
