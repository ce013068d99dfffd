"""`dspark-ray bench ...`: one subcommand per benchmark."""

from __future__ import annotations

from dspark_ray.bench import admission, burst, distributed, hostile_body, load, offline, serve


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("bench", help="benchmarks that print figures")
    benches = parser.add_subparsers(dest="bench", required=True)
    offline.add_parser(benches)
    serve.add_parser(benches)
    distributed.add_parser(benches)
    admission.add_parser(benches)
    load.add_parser(benches)
    burst.add_parser(benches)
    hostile_body.add_parser(benches)
