"""The model-server deployment's body: build one model instance, turn prompts into token ids, stream.

`ServedModel` is a plain class; `dspark_ray.serving.app` applies `serve.deployment` to it when the
application is built. It builds the engine (in-process by default, on worker actors when the
config asks for them), owns the tokenizer and the chat template, rejects prompts the engine
cannot take (empty, too long, token ids outside either vocabulary, text the tokenizer or the
template refuses) and hands the rest to the `ModelServer` coordinator. Prompts are tokenized on a
thread of their own, never on the event loop that streams every request's deltas. It knows nothing
about HTTP, gRPC or the OpenAI wire format.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from transformers import AutoConfig, PreTrainedTokenizerBase

from dspark_ray.config import EngineConfig
from dspark_ray.engine.engine import SpeculativeEngine
from dspark_ray.engine.loading import load_tokenizer
from dspark_ray.engine.threads import configure_threads
from dspark_ray.serving.config import AppConfig, WorkersConfig
from dspark_ray.serving.engine_process import EngineProcess, build_local_engine
from dspark_ray.serving.model_server import EngineRunner, LoopThread, ModelServer
from dspark_ray.serving.openai_api import InferenceRequest, RequestRejected
from dspark_ray.serving.prompt_bound import max_prompt_chars
from dspark_ray.serving.protocol import CompletionDelta, CompletionRequest


@dataclass(frozen=True)
class ModelInfo:
    model_name: str
    context_limit: int  # prompt + completion tokens
    vocab_size: int  # token ids below this are valid for the target and the drafter
    has_chat_template: bool


class ServedModel:
    def __init__(self, config: AppConfig) -> None:
        configure_threads(config.torch_num_threads)
        self.config = config
        self.tokenizer = load_tokenizer(config.engine.target)
        self.chat_template = self.tokenizer.chat_template or config.chat_template
        self.server = ModelServer(engine_runner(config))
        self.info = ModelInfo(config.model_name, self.server.runner.context_limit, shared_vocab_size(config.engine),
                              self.chat_template is not None)
        self.max_prompt_chars = max_prompt_chars(self.tokenizer, self.info.context_limit)
        # One thread: a tokenizer is not meant to be shared by concurrent calls.
        self._tokenizing = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenize")

    async def generate(self, request: InferenceRequest) -> AsyncIterator[CompletionDelta | RequestRejected]:
        """Deltas of one completion, or a single `RequestRejected` when the prompt is unusable.

        Closing this generator (the client went away, the router gave up) aborts the sequence.
        """
        prepared = await asyncio.get_running_loop().run_in_executor(self._tokenizing, self.prepare, request)
        if isinstance(prepared, RequestRejected):
            yield prepared
            return
        async for delta in self.server.generate(prepared):
            yield delta

    def prepare(self, request: InferenceRequest) -> CompletionRequest | RequestRejected:
        if request.prompt_token_ids is None:
            token_ids = self._tokenize(request)
        else:
            token_ids = self._check_vocabulary(list(request.prompt_token_ids))
        if isinstance(token_ids, RequestRejected):
            return token_ids
        return self._check_length(request, token_ids)

    def _tokenize(self, request: InferenceRequest) -> list[int] | RequestRejected:
        """The prompt text or rendered chat as token ids, unless it is surely too long or cannot be
        tokenized. A chat is rendered first (cheap) and bounded as the text the tokenizer would get,
        so no message of any role is tokenized past the bound."""
        param = "messages" if request.messages is not None else "prompt"
        if request.messages is not None and self.chat_template is None:
            return RequestRejected(400, "chat_template_missing",
                                   f"model {self.info.model_name} has no chat template; use /v1/completions", param)
        try:
            text = request.prompt_text if request.messages is None else render_chat(
                self.tokenizer, self.chat_template, request.messages)
            if self.max_prompt_chars is not None and len(text) > self.max_prompt_chars:
                return RequestRejected(400, "context_length_exceeded",
                                       f"the prompt is longer than {self.max_prompt_chars} characters, surely more "
                                       f"tokens than this model's maximum context length of {self.info.context_limit}",
                                       param)
            # a rendered chat holds its special tokens as text already
            return self.tokenizer.encode(text, add_special_tokens=request.messages is None)
        except Exception as error:  # the prompt is the only input here: a failure is the prompt's
            return RequestRejected(400, "invalid_prompt", f"the prompt cannot be tokenized: {error}", param)

    def _check_vocabulary(self, token_ids: list[int]) -> list[int] | RequestRejected:
        bad = [t for t in token_ids if not 0 <= t < self.info.vocab_size]
        if bad:
            return RequestRejected(400, "token_id_out_of_vocabulary",
                                   f"token id {bad[0]} is outside the vocabulary [0, {self.info.vocab_size})", "prompt")
        return token_ids

    def _check_length(self, request: InferenceRequest, token_ids: list[int]) -> CompletionRequest | RequestRejected:
        limit = self.info.context_limit
        if not token_ids:
            return RequestRejected(400, "empty_prompt", "the prompt holds no tokens", "prompt")
        room = limit - len(token_ids)
        if room <= 0 or (request.max_tokens is not None and request.max_tokens > room):
            wanted = len(token_ids) + (request.max_tokens or 1)
            return RequestRejected(
                400, "context_length_exceeded",
                f"this model's maximum context length is {limit} tokens, but {wanted} were requested "
                f"({len(token_ids)} in the prompt, {request.max_tokens or 1} for the completion)",
                "max_tokens" if room > 0 else "prompt")
        return CompletionRequest(request.request_id, token_ids, request.sampling, request.max_tokens or room,
                                 request.stop, request.ignore_eos)

    def model_info(self) -> ModelInfo:
        return self.info

    def num_active(self) -> int:
        return self.server.num_active

    def check_health(self) -> None:
        """Serve's periodic health check: a dead or stalled engine fails the replica, Serve replaces it."""
        problem = self.health_problem()
        if problem is not None:
            raise RuntimeError(problem)

    def health_problem(self) -> str | None:
        """Why the engine cannot serve, or None: its loop is gone (restarts failed), or it has
        requests waiting and has emitted nothing for `engine_stall_timeout_s`."""
        if not self.server.is_alive():
            return "the engine loop has stopped"
        stalled_s = self.server.stalled_s()
        if stalled_s > self.config.engine_stall_timeout_s:
            return f"the engine has requests waiting and has emitted nothing for {stalled_s:.0f} s"
        return None

    def __del__(self) -> None:
        server = getattr(self, "server", None)
        if server is not None:
            server.shutdown()
        tokenizing = getattr(self, "_tokenizing", None)
        if tokenizing is not None:
            tokenizing.shutdown(wait=False)


def engine_runner(config: AppConfig) -> EngineRunner:
    """Local engines step in a process of their own unless the config says otherwise; engines on
    worker actors step on a thread here (the replica only coordinates them)."""
    if config.workers.mode == "local" and config.workers.engine_process:
        return EngineProcess(config.engine, config.torch_num_threads, config.workers.engine_cpus)
    engine, decode = build_model_engine(config.engine, config.workers)
    return LoopThread(engine, decode, owns_engine=True)


def build_model_engine(engine_config: EngineConfig, workers: WorkersConfig
                       ) -> tuple[SpeculativeEngine, Callable[[list[int]], str]]:
    if workers.mode == "distributed":
        try:
            from dspark_ray.serving.distributed import build_distributed_engine
        except ImportError as error:
            raise RuntimeError("workers.mode 'distributed' needs dspark_ray.serving.distributed, which does "
                               "not import here; use workers.mode 'local'") from error
        return build_distributed_engine(engine_config, workers.placement)
    return build_local_engine(engine_config)


def shared_vocab_size(engine_config: EngineConfig) -> int:
    """Token ids valid for the target and, when it drafts with a model, for the draft LM too."""
    paths = [engine_config.target] + ([engine_config.draft] if engine_config.drafter == "model" else [])
    return min(AutoConfig.from_pretrained(path, local_files_only=True).vocab_size for path in paths)


def render_chat(tokenizer: PreTrainedTokenizerBase, template: str, messages) -> str:
    """The chat as the text its template renders, ready for the assistant's turn."""
    return tokenizer.apply_chat_template([{"role": m.role, "content": m.content} for m in messages],
                                         chat_template=template, add_generation_prompt=True, tokenize=False)
