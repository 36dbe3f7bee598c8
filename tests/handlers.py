"""Model handlers that tests load by name (--handler tests.handlers:Name) or pass to the Dispatcher."""

from worker import Manager


class ReverseModel(Manager):
    """Deterministic: reverses each string, and records which device and process it ran in."""

    def init_model(self):
        import os

        self.pid = os.getpid()

    def predict(self, batch):
        return [{"reversed": text[::-1], "device": self.device, "pid": self.pid, "batch": len(batch)}
                for text in batch]


class PlainEcho(Manager):
    """Returns each input unchanged and never fails: a 500 behind it is a gateway or broker bug."""

    def predict(self, batch):
        return list(batch)


class UpperModel(Manager):
    """A second model for the several-model Dispatcher: upper-cases each string, and records its
    process, the options its constructor got and its torch threads."""

    def init_model(self):
        import os

        self.pid = os.getpid()

    def predict(self, batch):
        import torch

        threads = torch.get_num_threads()
        return [{"upper": text.upper(), "pid": self.pid, "options": self.options, "threads": threads}
                for text in batch]


SLOW_LOAD_S = 0.6


class SlowLoadEcho(PlainEcho):
    """PlainEcho that takes SLOW_LOAD_S to load: a pool worker's load that a test can time."""

    def init_model(self):
        import time

        time.sleep(SLOW_LOAD_S)


class DirectedEcho(PlainEcho):
    """PlainEcho that obeys {"sleep_s": s} in an input, as the built-in echo model with test directives
    does: a model of any name whose batch a test can hold at the worker."""

    def predict(self, batch):
        import time

        time.sleep(max((float(x.get("sleep_s", 0)) for x in batch if isinstance(x, dict)), default=0.0))
        return list(batch)
