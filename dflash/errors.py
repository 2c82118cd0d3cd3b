"""Errors a user can cause. The CLI and the server turn these into a message, never a traceback."""


class DFlashError(ValueError):
    """A request, file or model the user gave cannot be used as given; the message says why."""


class IncompatibleDrafterError(DFlashError):
    """The drafter was trained for a different target (hidden size, vocabulary or layers)."""


class UnsupportedTargetError(DFlashError):
    """The target's cache cannot be rolled back after a rejected draft, so decoding would be wrong."""
