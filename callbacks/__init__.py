"""Lightning callbacks: thin glue between training and the ``sensitivity`` core."""

from callbacks.sensitivity import SensitivityCallback

__all__ = ["SensitivityCallback"]
