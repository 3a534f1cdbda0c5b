"""The protocol every part follows."""
from __future__ import annotations


class Part:
    """No-op lifecycle hooks; subclasses override what they need.

    ``bind(adapter)`` runs once after the model is configured and the parameters are chosen.
    ``reset()`` runs whenever the adapter returns to the source model (episodic, per shift, policy reset).
    """

    def bind(self, adapter) -> None:  # noqa: D401 - hook
        pass

    def reset(self) -> None:
        pass

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({fields})"
