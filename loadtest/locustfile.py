"""OpenAI chat and completion users for locust; TTFT is reported as its own request type.

    locust -f loadtest/locustfile.py --headless -u 8 -r 4 -t 30s --host http://127.0.0.1:8000 \\
        --scenario short --only-summary

Custom flags (also LOCUST_<FLAG> environment variables): --scenario, --prompt-words,
--max-tokens, --no-stream, --model, --kv-plan, --api-key."""

from __future__ import annotations

import json
import random
import time

from locust import HttpUser, between, events, task

from headwise.loadtest.scenarios import SCENARIOS, Scenario, make_prompt, scenario


@events.init_command_line_parser.add_listener
def _add_arguments(parser) -> None:
    group = parser.add_argument_group("headwise")
    group.add_argument(
        "--scenario", choices=sorted(SCENARIOS), default="short", env_var="LOCUST_SCENARIO", help="load shape preset"
    )
    group.add_argument(
        "--prompt-words",
        type=int,
        default=None,
        env_var="LOCUST_PROMPT_WORDS",
        help="prompt length in words (about tokens); overrides the scenario",
    )
    group.add_argument(
        "--max-tokens",
        type=int,
        default=None,
        env_var="LOCUST_MAX_TOKENS",
        help="tokens to generate; overrides the scenario",
    )
    group.add_argument(
        "--no-stream",
        action="store_true",
        default=False,
        env_var="LOCUST_NO_STREAM",
        help="send non-streaming requests",
    )
    group.add_argument("--model", default=None, env_var="LOCUST_MODEL", help="model name (default: the server's)")
    group.add_argument("--kv-plan", default=None, env_var="LOCUST_KV_PLAN", help="headwise kv_plan per request")
    group.add_argument(
        "--api-key", default=None, env_var="LOCUST_API_KEY", help="bearer token, if the server has --api-key"
    )


def _shape(options) -> Scenario:
    return scenario(options.scenario, options.prompt_words, options.max_tokens, False if options.no_stream else None)


class _OpenAIUser(HttpUser):
    abstract = True
    wait_time = between(0.0, 0.2)
    path = ""

    def on_start(self) -> None:
        options = self.environment.parsed_options
        self.shape = _shape(options)
        self.rng = random.Random()
        if options.api_key:
            self.client.headers["Authorization"] = f"Bearer {options.api_key}"
        self.model = options.model or self.client.get("/v1/models", name="/v1/models").json()["data"][0]["id"]
        self.kv_plan = options.kv_plan

    def payload(self) -> dict:
        raise NotImplementedError

    def generate(self) -> None:
        body = {"model": self.model, "max_tokens": self.shape.max_tokens, "stream": self.shape.stream, **self.payload()}
        if self.kv_plan:
            body["kv_plan"] = self.kv_plan
        if self.shape.stream:
            body["stream_options"] = {"include_usage": True}
        start = time.perf_counter()
        with self.client.post(
            self.path, json=body, stream=self.shape.stream, catch_response=True, name=self.path
        ) as response:
            if response.status_code != 200:
                response.failure(f"HTTP {response.status_code}: {response.text[:200]}")
                return
            if not self.shape.stream:
                response.success()
                return
            ttft = None
            for line in response.iter_lines(decode_unicode=True):
                if not line or not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    response.failure(chunk["error"]["message"])
                    return
                if ttft is None and self.has_text(chunk):
                    ttft = (time.perf_counter() - start) * 1000
            # report the whole stream, not just the headers, as the request's time
            response.request_meta["response_time"] = (time.perf_counter() - start) * 1000
            if ttft is None:
                response.failure("the stream carried no text")
                return
            response.success()
        self.environment.events.request.fire(
            request_type="TTFT", name=self.path, response_time=ttft, response_length=0, exception=None, context={}
        )

    @staticmethod
    def has_text(chunk: dict) -> bool:
        raise NotImplementedError


class ChatUser(_OpenAIUser):
    path = "/v1/chat/completions"

    def payload(self) -> dict:
        return {"messages": [{"role": "user", "content": make_prompt(self.rng, self.shape.prompt_words)}]}

    @staticmethod
    def has_text(chunk: dict) -> bool:
        return any(c.get("delta", {}).get("content") for c in chunk.get("choices", []))

    @task
    def chat(self) -> None:
        self.generate()


class CompletionUser(_OpenAIUser):
    path = "/v1/completions"

    def payload(self) -> dict:
        return {"prompt": make_prompt(self.rng, self.shape.prompt_words)}

    @staticmethod
    def has_text(chunk: dict) -> bool:
        return any(c.get("text") for c in chunk.get("choices", []))

    @task
    def complete(self) -> None:
        self.generate()
