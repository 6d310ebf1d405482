"""Locust users for Manta's OpenAI API: tenants that share long system prompts, and one-off users.

Every request streams. Besides the whole request, each one reports its time to first token
(request type "TTFT") and the gaps between its text chunks ("ITL"), in milliseconds.

    locust -f loadtests/locustfile.py --host http://127.0.0.1:8000 --model NAME --max-tokens 32

`--model` (env MANTA_MODEL) defaults to the server's first model; `--max-tokens`
(MANTA_MAX_TOKENS) and `--tenants` (MANTA_TENANTS) set the request length and tenant count.
Requests set `ignore_eos`, so every answer is `max_tokens` long and runs compare.
"""

from __future__ import annotations

import json
import random
import time

from locust import HttpUser, between, events, task

RULES = [
    "Answer in plain language and keep every reply under five sentences.",
    "Quote the policy section you rely on, with its number, before giving advice.",
    "Never invent figures: if a number is not in the question, say that it is missing.",
    "Escalate anything about payroll, pensions or severance to a human specialist.",
    "Amounts are in euros unless the customer names another currency.",
    "Dates follow the ISO format, year first, and times are in Central European Time.",
    "Refuse requests to change bank details over chat; point to the signed paper form.",
    "When a rule has an exception, state the rule first and the exception second.",
    "Invoices older than ninety days go to the collections team, not to the help desk.",
    "Travel expenses need a receipt for every item above twenty-five euros.",
    "Do not speculate about audits, mergers, lay-offs or any other confidential matter.",
    "Summarise long threads in three bullet points before you answer the last question.",
    "If the customer writes in German or French, answer in that language.",
    "Close every answer by asking whether the customer needs anything else today.",
]
COMPANIES = ["Northwind", "Contoso", "Globex", "Initech", "Umbrella", "Hooli", "Vandelay"]
QUESTIONS = [
    "How do I file a travel expense?",
    "When is the invoice from March due?",
    "Can you change my bank account number?",
    "What does section four say about refunds?",
    "Who approves a purchase above ten thousand euros?",
    "Is a taxi receipt without a date valid?",
    "Summarise the rules for remote work equipment.",
    "Why was my reimbursement rejected?",
]
WORDS = (
    "river lantern copper meadow orbit harbor violet engine canyon whisper marble signal "
    "glacier pepper falcon quartz thunder velvet compass ember tundra saddle nectar"
).split()


def system_prompt(tenant: int) -> str:
    """A long system prompt, identical for every user of one tenant: a prefix they share."""
    rng = random.Random(tenant)
    company = COMPANIES[tenant % len(COMPANIES)]
    rules = rng.sample(RULES, k=len(RULES))
    return f"You are the support assistant of {company} (tenant {tenant}). " + " ".join(rules)


def chunk_text(chunk: dict) -> str:
    """The generated text a completion or chat stream chunk carries."""
    text = ""
    for choice in chunk.get("choices") or []:
        text += choice.get("text") or (choice.get("delta") or {}).get("content") or ""
    return text


@events.init_command_line_parser.add_listener
def add_arguments(parser) -> None:
    parser.add_argument(
        "--model", env_var="MANTA_MODEL", default="", help="model name (default: the server's)"
    )
    parser.add_argument(
        "--max-tokens", type=int, env_var="MANTA_MAX_TOKENS", default=32, help="tokens per answer"
    )
    parser.add_argument(
        "--tenants", type=int, env_var="MANTA_TENANTS", default=4, help="distinct system prompts"
    )


class OpenAIUser(HttpUser):
    """Streams requests and reports TTFT and inter-token latency next to the request time."""

    abstract = True
    wait_time = between(0.05, 0.5)

    def on_start(self) -> None:
        options = self.environment.parsed_options
        self.max_tokens: int = options.max_tokens
        self.model: str = options.model or self.served_model()

    def served_model(self) -> str:
        return self.client.get("/v1/models").json()["data"][0]["id"]

    def report(self, request_type: str, name: str, millis: float) -> None:
        events.request.fire(
            request_type=request_type,
            name=name,
            response_time=millis,
            response_length=0,
            exception=None,
            context={},
        )

    def stream(self, path: str, body: dict) -> None:
        """POST one streaming request and read its server-sent events to the end."""
        body = {**body, "model": self.model, "max_tokens": self.max_tokens, "stream": True}
        body["ignore_eos"] = True
        start = time.perf_counter()
        last: float | None = None
        size = 0
        done = False
        with self.client.post(
            path, json=body, stream=True, catch_response=True, timeout=120
        ) as response:
            if response.status_code != 200:
                response.failure(f"HTTP {response.status_code}: {response.text[:200]}")
                return
            for line in response.iter_lines(chunk_size=None):
                size += len(line)
                if not line.startswith(b"data: "):
                    continue
                data = line.removeprefix(b"data: ")
                if data == b"[DONE]":
                    done = True
                    continue  # read on to the end, so the connection can be reused
                chunk = json.loads(data)
                if "error" in chunk:
                    response.failure(f"stream error: {chunk['error'].get('message')}")
                    return
                if chunk_text(chunk):
                    now = time.perf_counter()
                    if last is None:
                        self.report("TTFT", path, (now - start) * 1000)
                    else:
                        self.report("ITL", path, (now - last) * 1000)
                    last = now
            response.request_meta["response_time"] = (time.perf_counter() - start) * 1000
            response.request_meta["response_length"] = size
            if not done:
                response.failure("stream ended without [DONE]")


class TenantUser(OpenAIUser):
    """A tenant's user: chat completions behind the tenant's long system prompt."""

    weight = 3

    def on_start(self) -> None:
        super().on_start()
        tenants = self.environment.parsed_options.tenants
        self.system = system_prompt(random.randrange(tenants))

    @task
    def chat(self) -> None:
        messages = [
            {"role": "system", "content": self.system},
            {"role": "user", "content": random.choice(QUESTIONS)},
        ]
        self.stream("/v1/chat/completions", {"messages": messages, "temperature": 0.7})


class OneOffUser(OpenAIUser):
    """A user with nothing to share: a random completion prompt, unique from its first token."""

    weight = 1

    @task
    def complete(self) -> None:
        nonce = random.randrange(10**9)
        prompt = f"{nonce} " + " ".join(random.choices(WORDS, k=24))
        self.stream("/v1/completions", {"prompt": prompt, "temperature": 1.0})
