"""The worker credential: one secret per deployment, required on every worker RPC.

The coordinator makes the secret when it builds its workers (`new_secret`) and hands it to each
worker actor through Ray, in the actor's constructor arguments; it is never written to disk. Every
call carries it as call metadata (`authenticated_channel`, the only place the coordinator adds it);
a worker's server refuses a call without it, or with another one, with UNAUTHENTICATED before any
servicer runs (`RequireSecret`). The channels are not encrypted: the secret keeps out callers that
do not hold it, not someone who reads the cluster's network traffic.

It knows nothing about what the RPCs do.
"""

from __future__ import annotations

import hmac
import secrets

import grpc

METADATA_KEY = "x-dspark-worker-token"


def new_secret() -> str:
    return secrets.token_urlsafe(32)


class RequireSecret(grpc.ServerInterceptor):
    """Lets through calls that carry `secret`; answers the others UNAUTHENTICATED."""

    def __init__(self, secret: str) -> None:
        if not secret:
            raise ValueError("a worker server needs a non-empty secret")
        self._secret = secret.encode()
        self._refusal = grpc.unary_unary_rpc_method_handler(_refuse)

    def intercept_service(self, continuation, handler_call_details):
        sent = dict(handler_call_details.invocation_metadata or ()).get(METADATA_KEY, "")
        if hmac.compare_digest(self._secret, str(sent).encode()):
            return continuation(handler_call_details)
        return self._refusal


def _refuse(request, context: grpc.ServicerContext):
    context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong worker credential")


class _AttachSecret(grpc.UnaryUnaryClientInterceptor):
    def __init__(self, secret: str) -> None:
        self._metadata = (METADATA_KEY, secret)

    def intercept_unary_unary(self, continuation, client_call_details, request):
        metadata = list(client_call_details.metadata or ()) + [self._metadata]
        return continuation(client_call_details._replace(metadata=metadata), request)


def authenticated_channel(address: str, secret: str, options) -> grpc.Channel:
    """A channel to a worker at `address` whose every call carries `secret`."""
    return grpc.intercept_channel(grpc.insecure_channel(address, options=options), _AttachSecret(secret))
