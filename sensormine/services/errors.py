"""The one exception type the launcher raises for user-fixable problems."""


class ServiceError(RuntimeError):
    """A service could not be installed, started or reached; the message says what to do."""
