"""The ddml broker: per-model queues, load-aware micro-batching, worker liveness."""

from broker.broker import Broker
from broker.config import BatchingConfig, BrokerConfig, HeartbeatConfig

__all__ = ["Broker", "BrokerConfig", "BatchingConfig", "HeartbeatConfig"]
