"""dspark-ray: lossless DSpark-style speculative decoding, served on Ray."""

__version__ = "0.1.0"
