"""The output every multi-task model returns: ``logits``, ``losses`` and ``loss``."""

from __future__ import annotations

from typing import Any


class MultiTaskOutput(dict):
    """A dict with attribute access: ``logits`` (task -> tensor), ``losses`` (task -> scalar), ``loss``.

    It is a plain ``dict`` so that ``transformers.Trainer`` reads ``outputs["loss"]`` directly.
    """

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            if name in ("logits", "losses", "loss"):
                return None
            raise AttributeError(name) from None

    def __setattr__(self, name: str, value: Any) -> None:
        self[name] = value
