"""Who can reach the public ingresses, and who may call the gRPC one.

Serve's HTTP proxy binds the configured host (`http_options.host`). Serve's gRPC proxy takes no
host: Ray Serve binds it to every interface (`[::]:port`). So the gRPC ingress admits the callers
the HTTP proxy can admit: with HTTP on a loopback address, calls from this machine only
(`peer_is_loopback`, checked by the router on every gRPC call). With HTTP on any other address
the gRPC port is open on every interface, and the tenants' API keys are what guards both.

It knows nothing about requests or models.
"""

from __future__ import annotations

import ipaddress

SERVE_DEFAULT_HTTP_HOST = "127.0.0.1"  # what Serve's HTTP proxy binds when no host is configured


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)  # ::ffff:127.0.0.1 is a loopback peer too
    return address.is_loopback or (mapped is not None and mapped.is_loopback)


def peer_is_loopback(peer: str) -> bool:
    """`peer`: gRPC's name of the caller, e.g. "ipv4:127.0.0.1:5000", "ipv6:%5B::1%5D:5000", "unix:/path"."""
    kind, _, rest = peer.partition(":")
    if kind == "unix":
        return True
    if kind not in ("ipv4", "ipv6"):
        return False
    host = rest.rsplit(":", 1)[0].replace("%5B", "[").replace("%5D", "]").strip("[]")
    return is_loopback(host)


def serve_http_host() -> str:
    """The host Serve's HTTP proxy binds, asked of Serve's controller (Serve's default when no Serve
    is running here: the host it will bind once started without options)."""
    import ray

    if not ray.is_initialized():
        return SERVE_DEFAULT_HTTP_HOST
    from ray.serve.context import _get_global_client

    client = _get_global_client(raise_if_no_controller_running=False)
    host = client.http_config.host if client is not None else None
    return host or SERVE_DEFAULT_HTTP_HOST


def open_endpoint_warning(http_host: str, num_tenants: int) -> str | None:
    """What to tell an operator serving beyond this machine with no API keys (None: nothing)."""
    if num_tenants or is_loopback(http_host):
        return None
    return (f"HTTP binds {http_host} and no tenants are configured: anyone who can reach this machine can use "
            "the model over HTTP and gRPC without an API key (Serve's gRPC proxy listens on every interface). "
            "Configure tenants (their API keys) for an endpoint beyond this machine.")
