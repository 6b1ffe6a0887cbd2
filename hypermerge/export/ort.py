"""Moved to :mod:`hypermerge.runtime.ort` (the runtime needs it without torch); kept for old imports."""

from hypermerge.runtime.ort import AUTO_ORDER, PROVIDERS, open_session, resolve_providers, session_provider

__all__ = ["AUTO_ORDER", "PROVIDERS", "open_session", "resolve_providers", "session_provider"]
