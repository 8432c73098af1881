"""What both gRPC services share: server lifecycle, health, reflection, error mapping."""
