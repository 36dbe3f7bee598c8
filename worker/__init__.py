"""ddml workers: connect to a broker, register, heartbeat, run a model on batches."""

from worker.models import InputError, Manager

__all__ = ["Manager", "InputError"]
