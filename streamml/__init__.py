"""streamml: real-time machine learning on Kafka.

Importing the package has no side effects: no app, connection or thread is
created until a factory is called with :class:`streamml.config.Settings`.
"""

__version__ = "0.1.0"
