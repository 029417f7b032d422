"""Installed as the top-level module ``_celery_pgnotify_autoload``.

The wheel's ``celery_pgnotify.pth`` imports it at interpreter start-up. It
must stay tiny and import nothing heavy: it only arranges for the
``pgnotify`` alias to be added to kombu's transport table the moment
``kombu.transport`` is first imported, in any process (workers, beat, and
producers such as a web application calling ``.delay()``).
"""

import sys

# No other import: this runs at every interpreter start (even `typing` would
# cost milliseconds), so annotations are strings and the names come only
# under type checking.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Sequence
    from importlib.abc import Loader
    from importlib.machinery import ModuleSpec
    from types import ModuleType

_TARGET = "kombu.transport"


def _register(module: "ModuleType") -> None:
    aliases = getattr(module, "TRANSPORT_ALIASES", None)
    if isinstance(aliases, dict):
        aliases.setdefault("pgnotify", "celery_pgnotify.transport:Transport")


class _Loader:
    """Runs the real loader, then registers the alias."""

    def __init__(self, loader: "Loader") -> None:
        self._loader = loader

    def create_module(self, spec: "ModuleSpec") -> "ModuleType | None":
        return self._loader.create_module(spec)

    def exec_module(self, module: "ModuleType") -> None:
        self._loader.exec_module(module)
        _register(module)


class _Finder:
    """Watches for one module, wraps its loader, then retires."""

    def find_spec(
        self,
        fullname: str,
        path: "Sequence[str] | None" = None,
        target: "ModuleType | None" = None,
    ) -> "ModuleSpec | None":
        if fullname != _TARGET:
            return None
        sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _Finder)]
        from importlib.util import find_spec

        spec = find_spec(fullname)
        if spec is not None and spec.loader is not None:
            spec.loader = _Loader(spec.loader)  # type: ignore[assignment]
        return spec


if _TARGET in sys.modules:
    _register(sys.modules[_TARGET])
elif not any(isinstance(f, _Finder) for f in sys.meta_path):
    sys.meta_path.insert(0, _Finder())
