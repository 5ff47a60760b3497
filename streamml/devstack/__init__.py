"""The local development stack: a real single-node Apache Kafka broker (KRaft).

The broker jars come from Maven Central once into the cache directory; the
broker's data, pid and log live in ``<state_dir>/kafka``. Nothing here is used
when ``STREAMML_KAFKA_BOOTSTRAP`` points at an existing cluster.
"""

from streamml.devstack.broker import BrokerStatus, LocalBroker

__all__ = ["BrokerStatus", "LocalBroker"]
