"""A handler for tests/e2e/test_management.py's pool worker: the echo model with its test directives
({"sleep_s": ...}), which a repository's handler = "..." cannot turn on by a flag."""

from worker.models.echo import EchoModel


class DirectedEcho(EchoModel):
    def __init__(self, device: str = "cpu", **options):
        super().__init__(device=device, test_directives=True, **options)
