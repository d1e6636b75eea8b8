"""Counting PyHessian's Hessian-vector products, for the benchmarks that compare against it."""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


@contextmanager
def counted_products() -> Iterator[dict[str, int]]:
    """While inside, each call of ``pyhessian.hessian.hessian_vector_product`` adds 1 to the yielded ``["n"]``
    (PyHessian's eigenvalue, trace and density loops all call it); the function is restored on exit."""
    ph = importlib.import_module("pyhessian.hessian")  # the module: the package re-exports a class of that name
    calls = {"n": 0}
    original = ph.hessian_vector_product

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        return original(*args, **kwargs)

    ph.hessian_vector_product = counted
    try:
        yield calls
    finally:
        ph.hessian_vector_product = original
