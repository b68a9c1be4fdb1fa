"""Imports of optional dependencies, with errors that name the extra to install."""

import importlib


def import_optional(module, extra):
    """Import ``module``, or raise an ImportError saying which ltlearn extra provides it.

    Parameters
    ----------
    module : str
        Dotted module name, e.g. ``"matplotlib.pyplot"``.
    extra : str
        The ltlearn extra that installs it, e.g. ``"plot"``.

    Returns
    -------
    module : module

    Examples
    --------
    >>> try:
    ...     import_optional("no_such_module_xyz", "plot")
    ... except ImportError as exc:
    ...     print(exc)  # doctest: +ELLIPSIS
    no_such_module_xyz is needed here but is not installed; ... pip install 'ltlearn[plot]'
    """
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(
            f"{module} is needed here but is not installed; install it with: "
            f"pip install 'ltlearn[{extra}]'"
        ) from exc
