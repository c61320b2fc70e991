"""linkd: a secure, exactly-once file link between two sites."""

__version__ = "0.1.0"
