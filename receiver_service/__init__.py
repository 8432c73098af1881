"""gRPC ReceiverService (and InfoService): accepts cards, keeps them, generates answers over them."""
