"""The one place that imports the generated protobuf and gRPC modules (`protos/dspark/v1/`).

Everything else imports the message and service modules from here, so a regenerated layout or a
new proto version changes one file. Regenerate with `python -m dspark_ray.serving.protogen`.
"""

from __future__ import annotations

from dspark_ray.serving.generated.dspark.v1 import inference_pb2, inference_pb2_grpc, worker_pb2, worker_pb2_grpc

__all__ = ["inference_pb2", "inference_pb2_grpc", "worker_pb2", "worker_pb2_grpc"]
