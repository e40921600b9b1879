"""Errors a user can act on: each names the file, model, tensor or field at fault and what to do."""


class MergetuneError(Exception):
    """Base class of every error mergetune raises on bad input."""


class IncompatibleModelsError(MergetuneError):
    """Base and experts cannot be merged tensor by tensor (shape, dtype, missing tensor, vocabulary)."""


class BadWeightsError(MergetuneError):
    """A checkpoint holds NaN/inf values or cannot be read safely."""


class RecipeError(MergetuneError):
    """A recipe or its parameters do not validate against the models they name."""


class TaskError(MergetuneError):
    """A task's configuration or data is unusable (missing column, empty split, unknown labels, head mismatch)."""
