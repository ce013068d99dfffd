"""Prometheus metrics of the router, served on the HTTP port at `/metrics`.

prometheus_client in the router process, one registry per router replica: the router sees every
request's timing and its final speculative stats, so nothing has to be gathered from model
servers. Names follow vLLM's (`vllm:spec_decode_num_drafts` -> `dspark_spec_decode_num_drafts`;
prometheus_client adds `_total` to counters). With several router replicas each scrape of
`/metrics` reaches one replica: scrape replicas separately (or run one router) to sum them.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest

from dspark_ray.serving.protocol import SpeculativeStats

disable_created_metrics()  # the `_created` series double the page and nobody reads them

LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
                     2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
REQUEST_BUCKETS_S = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0, 300.0, 600.0)


class RouterMetrics:
    def __init__(self, model_name: str) -> None:
        self.registry = CollectorRegistry()
        self.model_name = model_name
        labels = ["model_name"]

        def counter(name: str, doc: str, extra: tuple[str, ...] = ()) -> Counter:
            return Counter(name, doc, labels + list(extra), registry=self.registry)

        self.num_drafts = counter("dspark_spec_decode_num_drafts", "Verification steps (drafts scored).")
        self.num_draft_tokens = counter("dspark_spec_decode_num_draft_tokens", "Draft tokens proposed.")
        self.num_accepted_tokens = counter("dspark_spec_decode_num_accepted_tokens", "Draft tokens accepted.")
        self.num_accepted_per_pos = counter("dspark_spec_decode_num_accepted_tokens_per_pos",
                                            "Draft tokens accepted at each draft position.", ("position",))
        self.prompt_tokens = counter("dspark_prompt_tokens", "Prompt tokens of finished requests.")
        self.generation_tokens = counter("dspark_generation_tokens", "Generated tokens.")
        self.request_success = counter("dspark_request_success", "Finished requests.", ("finished_reason",))
        self.request_errors = counter("dspark_request_errors", "Requests answered with an error.", ("code",))
        self.num_requests_running = Gauge("dspark_num_requests_running", "Requests in flight in this router.",
                                          labels, registry=self.registry)
        self.ttft = Histogram("dspark_time_to_first_token_seconds", "Time to the first generated token.",
                              labels, buckets=LATENCY_BUCKETS_S, registry=self.registry)
        self.itl = Histogram("dspark_inter_token_latency_seconds",
                             "Time between generated tokens (a delta of n tokens counts n gaps of 1/n).",
                             labels, buckets=LATENCY_BUCKETS_S, registry=self.registry)
        self.e2e = Histogram("dspark_e2e_request_latency_seconds", "Request latency, arrival to last token.",
                             labels, buckets=REQUEST_BUCKETS_S, registry=self.registry)

    def observe_first_token(self, seconds: float) -> None:
        self.ttft.labels(self.model_name).observe(seconds)

    def observe_tokens(self, gap_s: float, num_tokens: int) -> None:
        for _ in range(num_tokens):
            self.itl.labels(self.model_name).observe(gap_s / num_tokens)

    def observe_finished(self, finish_reason: str, num_prompt_tokens: int, num_output_tokens: int,
                         stats: SpeculativeStats | None, e2e_s: float) -> None:
        model = self.model_name
        self.request_success.labels(model, finish_reason).inc()
        self.prompt_tokens.labels(model).inc(num_prompt_tokens)
        self.generation_tokens.labels(model).inc(num_output_tokens)
        self.e2e.labels(model).observe(e2e_s)
        if stats is None:
            return
        self.num_drafts.labels(model).inc(stats.num_steps)
        self.num_draft_tokens.labels(model).inc(stats.num_draft_tokens)
        self.num_accepted_tokens.labels(model).inc(stats.num_accepted_tokens)
        for position, count in enumerate(stats.num_accepted_per_position):
            self.num_accepted_per_pos.labels(model, str(position)).inc(count)

    def observe_error(self, code: str) -> None:
        self.request_errors.labels(self.model_name, code).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
