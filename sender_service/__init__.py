"""gRPC SenderService (and InfoService): turns contexts into cards and streams them to a receiver."""
