"""Placeholder."""

from .document import unsupported


def compile_knn(ctx, model, scope, classes):
    raise unsupported(model, "is not supported yet")
