"""The ddml broker: per-model queues, load-aware micro-batching, worker liveness.

Kept light on purpose: import broker.broker for the Broker (the sockets) and broker.core for
BrokerCore (the decisions).
"""
