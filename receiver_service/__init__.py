"""gRPC Receiver service: accepts cards, keeps them, generates answers over them."""
