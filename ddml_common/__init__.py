"""What every ddml role shares: the wire format, socket setup, CLI and config plumbing, CURVE keys.

Workers and gateways import this package and never `broker/`, so a worker or gateway process
does not load the broker's code, metrics or authenticator.
"""
