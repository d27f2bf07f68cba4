"""Placeholder."""

from .document import unsupported


def compile_general_regression(ctx, model, scope, classes):
    raise unsupported(model, "is not supported yet")
