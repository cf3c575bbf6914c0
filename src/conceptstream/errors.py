"""Errors that reach the user as one clear line (the CLI prints them and exits non-zero)."""


class ConceptstreamError(Exception):
    """A problem the user can fix; the message names the problem and the fix."""


class UserInputError(ConceptstreamError, ValueError):
    """Bad input: an unknown name, a malformed folder, an image that cannot be read."""


class StateError(ConceptstreamError):
    """A concept-stream state directory that cannot be used as asked (locked, mismatched, newer)."""
