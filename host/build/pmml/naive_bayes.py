"""Placeholder."""

from .document import unsupported


def compile_naive_bayes(ctx, model, scope, classes):
    raise unsupported(model, "is not supported yet")
