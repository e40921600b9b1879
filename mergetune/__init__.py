"""mergetune: search the best way to merge fine-tuned models."""

from mergetune.errors import MergetuneError
from mergetune.recipe import Recipe

__all__ = ["MergetuneError", "Recipe"]
__version__ = "0.1.0"
