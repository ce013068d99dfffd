"""Core math of speculative decoding: pure torch, no Ray, gRPC, HTTP or pydantic."""
