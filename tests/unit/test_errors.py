from __future__ import annotations

from streamml import errors


def test_errors_subclass_the_matching_builtins() -> None:
    assert issubclass(errors.ConfigError, ValueError)
    assert issubclass(errors.SpecError, errors.ConfigError)
    assert issubclass(errors.PortInUseError, OSError)
    assert issubclass(errors.BrokerUnavailableError, ConnectionError)
    assert errors.BrokerUnavailableError.retriable and not errors.ConfigError.retriable


def test_every_error_is_a_streamml_error() -> None:
    classes = [c for c in vars(errors).values() if isinstance(c, type) and issubclass(c, Exception)]
    assert all(issubclass(c, errors.StreamMLError) for c in classes)
