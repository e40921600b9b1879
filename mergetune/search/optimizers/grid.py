"""Placeholder: being implemented."""

OPTIMIZERS: list = []
