"""Placeholder: being implemented."""

METHODS: list = []
