"""Crash-safe concept-stream state directories (see :mod:`conceptstream.state.store`)."""

from conceptstream.state.manifest import FORMAT_VERSION, read_manifest_file, validate_manifest
from conceptstream.state.store import StateStore

__all__ = ["FORMAT_VERSION", "StateStore", "read_manifest_file", "validate_manifest"]
