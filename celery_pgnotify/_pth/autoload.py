"""Installed as the top-level module ``_celery_pgnotify_autoload``.

The wheel's ``celery_pgnotify.pth`` imports it at interpreter start-up. It
must stay tiny and import nothing heavy: it only arranges for the
``pgnotify`` alias to be added to kombu's transport table the moment
``kombu.transport`` is first imported, in any process (workers, beat, and
producers such as a web application calling ``.delay()``).
"""

import sys

_TARGET = "kombu.transport"


def _register(module):  # type: ignore[no-untyped-def]
    aliases = getattr(module, "TRANSPORT_ALIASES", None)
    if isinstance(aliases, dict):
        aliases.setdefault("pgnotify", "celery_pgnotify.transport:Transport")


class _Loader:
    def __init__(self, loader):  # type: ignore[no-untyped-def]
        self._loader = loader

    def create_module(self, spec):  # type: ignore[no-untyped-def]
        return self._loader.create_module(spec)

    def exec_module(self, module):  # type: ignore[no-untyped-def]
        self._loader.exec_module(module)
        _register(module)


class _Finder:
    """A meta path finder that watches for one module and then retires."""

    @classmethod
    def find_spec(cls, fullname, path=None, target=None):  # type: ignore[no-untyped-def]
        if fullname != _TARGET:
            return None
        try:
            sys.meta_path.remove(cls)
        except ValueError:
            pass
        from importlib.util import find_spec

        spec = find_spec(fullname)
        if spec is not None and spec.loader is not None:
            spec.loader = _Loader(spec.loader)
        return spec


if _TARGET in sys.modules:
    _register(sys.modules[_TARGET])
elif _Finder not in sys.meta_path:
    sys.meta_path.insert(0, _Finder)
