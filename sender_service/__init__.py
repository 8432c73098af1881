"""gRPC Sender service: turns contexts into cards and streams them to a receiver."""
