"""The package's user-facing errors share one base class, so a command line or the app
catches `CMAClipError` once and shows its message instead of a stack trace."""
from __future__ import annotations


class CMAClipError(Exception):
    """A problem the user can act on, with the reason in words (catalogue, image, checkpoint,
    backbone, label store, hub, studio)."""
