"""Reset policies: when the adapter returns to the source model on its own (METHODS.md 1.2)."""
from __future__ import annotations

from .base import Part
