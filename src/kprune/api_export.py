"""`kprune_export`: declares a public name once.

Every public function and class carries `@kprune_export(module)`, where
`module` is where users find it: `"kprune"` for the names of
`tfmot.sparsity.keras`, otherwise the module that defines it (for example
`"kprune.allocation"`). From that one line:

- the name joins `__all__` of that module (`kprune/__init__.py` takes its
  `__all__` from `public_names("kprune")`);
- a class that serializes (it defines `get_config` and is not abstract) is
  registered with `keras.saving.register_keras_serializable` as
  `"kprune>ClassName"`, so `.keras` files load without custom objects, and
  joins `custom_objects()`, the mapping behind `kprune.prune_scope`.

The API reference (`docs/api.md`, built by `make docs`) documents each name
of each public module; `tests/test_api.py` checks that none is missing.
"""

import inspect
import sys

import keras

PACKAGE = "kprune"

# Public module name -> the names it exports, in declaration order. Each
# list is the very object a module holds as `__all__`, so names declared
# after the module took it still appear in it.
_PUBLIC_NAMES = {}
# Class name -> class, for every class registered for serialization.
_SERIALIZABLE = {}


def public_names(module: str) -> list:
    """The names `module` exports: the list to assign to its `__all__`."""
    return _PUBLIC_NAMES.setdefault(module, [])


def public_modules() -> list:
    """The modules that export names, `"kprune"` first."""
    return sorted(_PUBLIC_NAMES, key=lambda name: (name != PACKAGE, name))


def custom_objects() -> dict:
    """Class name -> class, for every class registered for serialization."""
    return dict(_SERIALIZABLE)


def _serializes(symbol) -> bool:
    return (
        inspect.isclass(symbol)
        and callable(getattr(symbol, "get_config", None))
        and not inspect.isabstract(symbol)
    )


class kprune_export:
    """Exports a function or class from `module`, registering classes that
    serialize.

    Args:
        module: where users find the name: `"kprune"` (tfmot's names) or
            the module that defines it.

    Raises:
        ValueError: if `module` is neither `"kprune"` nor the module that
            defines the name, or the name is exported twice.

    Example:

    ```python
    @kprune_export("kprune.allocation")
    class GlobalSparsity(PruningSchedule):
        ...
    ```
    """

    def __init__(self, module: str):
        self.module = module

    def __call__(self, symbol):
        name = symbol.__name__
        defined_in = symbol.__module__
        if self.module not in (PACKAGE, defined_in):
            raise ValueError(
                f"`{name}` is exported from `{self.module}` but defined in "
                f"`{defined_in}`. Export it from `{PACKAGE}` or from "
                f"`{defined_in}`, the module that defines it."
            )
        names = public_names(self.module)
        if name in names:
            raise ValueError(
                f"`{self.module}.{name}` is exported twice. Remove one of "
                "the `@kprune_export` lines."
            )
        names.append(name)
        if self.module == defined_in:
            # A submodule's own names: its `__all__` is the live list, so
            # the module itself needs no line for it.
            sys.modules[defined_in].__all__ = names
        if _serializes(symbol):
            keras.saving.register_keras_serializable(package=PACKAGE)(symbol)
            _SERIALIZABLE[name] = symbol
        return symbol
