"""FastCompletions' dispatch: which requests it answers, which go to vLLM's route unchanged, and disconnects.

vLLM's serving object is a stand-in here (its steps are checked against the real route in
tests/integration/test_serve.py); what is tested is our middleware's own logic.
"""

import asyncio
import json
from types import SimpleNamespace

import pytest

from raydistill.serving.fastpath import INLINE_PROMPT_CHARS, FastCompletions
from raydistill.serving.guard import Limits, check_completion

MODEL = "student"
LIMITS = Limits(max_tokens=64, max_prompt_chars=8000, max_n=2)


class _Output:
    def __init__(self, prompt):
        self.prompt = prompt


class _Serving:
    """The parts of vLLM's OpenAIServingCompletion that FastCompletions calls, recording what it was given."""

    def __init__(self, hang: bool = False, render_error: Exception | None = None, engine_error: Exception | None = None):
        self.hang, self.render_error, self.engine_error = hang, render_error, engine_error
        self.generated, self.aborted = [], []
        self.model_config = SimpleNamespace(max_model_len=512, is_encoder_decoder=False)
        self.default_sampling_params = {}
        self.override_max_tokens = None
        self.models = SimpleNamespace(is_base_model=lambda name: name == MODEL, model_name=lambda lora: MODEL)
        self.renderer = SimpleNamespace(render_cmpl=self._render, tokenizer=None)
        self.engine_client = SimpleNamespace(generate=self._generate)

    def _render(self, prompts, tok_params, prompt_extras=None):
        if self.render_error:
            raise self.render_error
        return [{"prompt_token_ids": [1, 2, 3]}]

    async def _generate(self, engine_input, params, request_id, **kwargs):
        self.generated.append((request_id, params.max_tokens, kwargs))
        if self.engine_error:
            raise self.engine_error
        try:
            if self.hang:
                await asyncio.sleep(3600)
            yield _Output(prompt=None)
        except asyncio.CancelledError:
            self.aborted.append(request_id)
            raise

    def _base_request_id(self, raw_request, default=None):
        return raw_request.headers.get("X-Request-Id") or "random"

    def _extract_prompt_len(self, engine_input):
        return len(engine_input["prompt_token_ids"])

    def _extract_prompt_text(self, engine_input):
        return "the prompt"

    def _log_inputs(self, *args, **kwargs):
        pass

    async def _get_trace_headers(self, headers):
        return None

    def _get_priority(self, request, raw_request):
        return request.priority

    def _get_data_parallel_rank(self, raw_request):
        return None

    def _get_session_id(self, request, raw_request):
        return None

    def request_output_to_completion_response(self, outputs, request, request_id, created, model_name, tokenizer, metadata):
        return SimpleNamespace(model_dump=lambda: {"id": request_id, "model": model_name, "prompt": outputs[0].prompt, "max_tokens": request.max_tokens})


def _call(body, serving=None, headers=None, scope_extra=None, cancel=False):
    """Run one request through FastCompletions; returns (what the inner app got or None, status, JSON sent or None)."""
    serving = serving or _Serving()
    inner = {}

    async def app(scope, receive, send):
        inner["body"] = (await receive())["body"]
        await send({"type": "http.response.start", "status": 299, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    hdrs = [(b"content-type", b"application/json")] if headers is None else headers
    scope = {"type": "http", "method": "POST", "path": "/v1/completions", "root_path": "", "headers": hdrs, **(scope_extra or {})}
    messages = [{"type": "http.request", "body": raw, "more_body": False}]
    sent = []

    async def receive():
        if messages:
            return messages.pop(0)
        await asyncio.sleep(3600)

    async def send(message):
        sent.append(message)

    middleware = FastCompletions(app, state=SimpleNamespace(openai_serving_completion=serving), path="/v1/completions",
                                 check=lambda request: check_completion(request, LIMITS))

    async def run():
        task = asyncio.ensure_future(middleware(scope, receive, send))
        if cancel:  # as Serve does when the HTTP client goes away
            while not serving.generated:
                await asyncio.sleep(0)
            task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass

    asyncio.run(run())
    status = sent[0]["status"] if sent else None
    answer = json.loads(sent[1]["body"]) if len(sent) > 1 and status != 299 else None
    return inner.get("body"), status, answer


def test_a_plain_completion_is_answered_here_with_vllms_steps():
    serving = _Serving()
    inner, status, answer = _call({"model": MODEL, "prompt": "hello", "max_tokens": 8, "temperature": 0},
                                  serving=serving, headers=[(b"content-type", b"application/json; charset=utf-8"), (b"x-request-id", b"abc")])
    assert inner is None and status == 200
    # The request id comes from the header as on vLLM's route; the prompt text is filled in for the response builder.
    assert answer == {"id": "cmpl-abc", "model": MODEL, "prompt": "the prompt", "max_tokens": 8}
    assert serving.generated[0][:2] == ("cmpl-abc-0", 8)


def test_without_max_tokens_vllms_default_applies():
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest
    from vllm.entrypoints.serve.utils.api_utils import get_max_tokens

    serving = _Serving()
    _call({"prompt": "hello"}, serving=serving)  # no model: vLLM serves its base model
    assert serving.generated[0][1] == get_max_tokens(512, CompletionRequest(prompt="hello").max_tokens, 3, {}, None) == 16


@pytest.mark.parametrize("body", [
    {"model": MODEL, "prompt": "hello", "stream": True},
    {"model": MODEL, "prompt": "hello", "n": 2},
    {"model": MODEL, "prompt": ["hello", "there"]},
    {"model": MODEL, "prompt": [1, 2, 3]},
    {"model": MODEL, "prompt": "x" * (INLINE_PROMPT_CHARS + 1)},
    {"model": MODEL, "prompt": "hello", "suffix": "end"},
    {"model": MODEL, "prompt": "hello", "use_beam_search": True},
    {"model": "a-lora-adapter", "prompt": "hello"},
    {"model": MODEL, "prompt": "hello", "max_tokens": "many"},  # vLLM's validation words the 400
    [1, 2],
])
def test_requests_it_does_not_cover_go_to_vllms_route_unchanged(body):
    serving = _Serving()
    inner, status, answer = _call(body, serving=serving)
    assert inner == json.dumps(body).encode() and status == 299 and not serving.generated


def test_bad_json_wrong_content_type_and_load_metrics_header_go_to_the_route():
    assert _call(b"{not json")[0] == b"{not json"
    body = {"model": MODEL, "prompt": "hello"}
    assert _call(body, headers=[(b"content-type", b"text/plain")])[1] == 299
    assert _call(body, headers=[(b"content-type", b"application/json"), (b"endpoint-load-metrics-format", b"TEXT")])[1] == 299


def test_a_prompt_vllm_refuses_goes_to_the_route_which_words_the_refusal():
    from vllm.exceptions import VLLMValidationError

    serving = _Serving(render_error=ValueError("too long for the model"))
    inner, status, _ = _call({"model": MODEL, "prompt": "hello"}, serving=serving)
    assert inner is not None and status == 299 and not serving.generated
    # Refused as the engine takes the request: nothing was generated, so the route may take it.
    serving = _Serving(engine_error=VLLMValidationError("longer than the model's context", parameter="input_tokens", value=513))
    inner, status, _ = _call({"model": MODEL, "prompt": "hello"}, serving=serving)
    assert inner is not None and status == 299 and len(serving.generated) == 1


def test_an_engine_failure_is_not_retried_on_the_route():
    serving = _Serving(engine_error=RuntimeError("engine dead"))
    with pytest.raises(RuntimeError):  # up to SafeErrorMiddleware, which answers a clean 500 with the request id
        _call({"model": MODEL, "prompt": "hello"}, serving=serving)


def test_limits_are_checked_as_on_the_route():
    serving = _Serving()
    inner, status, answer = _call({"model": MODEL, "prompt": "hello", "max_tokens": 65}, serving=serving)
    assert inner is None and status == 400 and answer["error"]["param"] == "max_tokens" and not serving.generated


def test_other_paths_and_methods_pass_through():
    serving = _Serving()
    assert _call({"model": MODEL, "prompt": "hello"}, serving=serving, scope_extra={"path": "/v1/chat/completions"})[1] == 299
    assert _call({"model": MODEL, "prompt": "hello"}, serving=serving, scope_extra={"method": "GET"})[1] == 299
    assert not serving.generated


def test_the_route_prefix_is_stripped():
    inner, status, _ = _call({"model": MODEL, "prompt": "hello"}, scope_extra={"path": "/app/v1/completions", "root_path": "/app"})
    assert inner is None and status == 200


def test_a_cancelled_request_is_aborted_in_the_engine():
    """Serve cancels the handler of a request whose client disconnected; the engine request goes with it."""
    serving = _Serving(hang=True)
    inner, status, answer = _call({"model": MODEL, "prompt": "hello"}, serving=serving, cancel=True)
    assert status is None and inner is None  # nothing sent to a client that left
    assert serving.aborted == ["cmpl-random-0"]
