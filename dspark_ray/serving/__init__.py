"""Serving: the coordinator (model server), Ray workers over gRPC, the OpenAI-compatible ingress."""
