"""The ddml gateway: HTTP (Falcon under gunicorn) in front of the broker, and the in-process Dispatcher."""


def __getattr__(name: str):
    # Lazy, so that `import gateway` (e.g. by gunicorn) does not pull in the broker and worker.
    if name in ("Dispatcher", "ModelSpec"):
        from gateway import dispatcher

        return getattr(dispatcher, name)
    raise AttributeError(name)


__all__ = ["Dispatcher", "ModelSpec"]
