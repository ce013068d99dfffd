"""The one place that imports the generated protobuf and gRPC modules (`protos/dspark/v1/`).

Everything else imports the message and service modules from here, so a regenerated layout or a
new proto version changes one file. Regenerate with `python -m dspark_ray.serving.protogen`.
`add_inference_service` is the gRPC servicer function Serve's config names: the generated
registration with a request parser that hands undecodable bytes to the router as an
`UnparsedRequest` (answered INVALID_ARGUMENT) instead of failing inside grpc (UNKNOWN).
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc
from google.protobuf.message import DecodeError

from dspark_ray.serving.generated.dspark.v1 import inference_pb2, inference_pb2_grpc, worker_pb2, worker_pb2_grpc

__all__ = ["inference_pb2", "inference_pb2_grpc", "worker_pb2", "worker_pb2_grpc"]

INFERENCE_SERVICE = "dspark.v1.InferenceService"


@dataclass(frozen=True)
class UnparsedRequest:
    """Bytes that are not a GenerateRequest (e.g. a `text` that is not UTF-8)."""

    error: str


def parse_generate_request(raw: bytes) -> inference_pb2.GenerateRequest | UnparsedRequest:
    try:
        return inference_pb2.GenerateRequest.FromString(raw)
    except DecodeError as error:
        return UnparsedRequest(str(error))


def add_inference_service(servicer, server) -> None:
    """`inference_pb2_grpc.add_InferenceServiceServicer_to_server`, parsing with `parse_generate_request`."""
    serialize = inference_pb2.GenerateResponse.SerializeToString
    handlers = {
        "Generate": grpc.unary_unary_rpc_method_handler(servicer.Generate, parse_generate_request, serialize),
        "GenerateStream": grpc.unary_stream_rpc_method_handler(servicer.GenerateStream, parse_generate_request,
                                                               serialize),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(INFERENCE_SERVICE, handlers),))
    server.add_registered_method_handlers(INFERENCE_SERVICE, handlers)
