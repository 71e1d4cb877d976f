"""Serving: the launcher and supervisor, the HTTP front, metrics, text, smoke and batch clients."""
