"""Pure ML core: features, online and batch models, evaluation, registry, drift.

Never imports faust or aiokafka, so everything here is tested without services.
"""
