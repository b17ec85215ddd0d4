"""Constrained output that must finish: realistic schemas, natural prompts,
modest token budgets, both temperatures.

A case passes when the answer *finishes* (`stop` / `tool_calls`, no
`max_tokens` cut) and validates against the schema as written. What users hit
first with a small model is valid-but-unfinished output: `parse()` raising
`LengthFinishReasonError`, LangChain's `with_structured_output` failing, a
forced tool call coming back as text.

Runs against any OpenAI-compatible server, so the same cases measure
llama.cpp's `llama-server` (started with `--jinja`):

    python tests/compat/constrained_suite.py --base-url http://127.0.0.1:8080/v1

`test_constrained.py` runs it against llmservice and holds it to its targets.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Literal, Optional

import jsonschema
import openai
import pydantic

TEMPERATURES = (0.0, 0.7)
SCHEMA_MAX_TOKENS = 120
TOOL_MAX_TOKENS = 60


# --- Schemas as applications write them: pydantic models, no length limits.


class City(pydantic.BaseModel):
    name: str
    population: int


class Recipe(pydantic.BaseModel):
    title: str
    ingredients: list[str]
    minutes: int


class Person(pydantic.BaseModel):
    name: str
    age: int
    email: Optional[str] = None


class Book(pydantic.BaseModel):
    title: str
    author: str
    year: int


class Weather(pydantic.BaseModel):
    city: str
    temperature_c: float
    condition: Literal["sunny", "cloudy", "rain", "snow"]


class Product(pydantic.BaseModel):
    name: str
    price: float
    in_stock: bool


class Movie(pydantic.BaseModel):
    title: str
    year: int
    genres: list[str]


class Sentiment(pydantic.BaseModel):
    label: Literal["positive", "negative", "neutral"]
    confidence: float


SCHEMA_CASES: list[tuple[type[pydantic.BaseModel], str]] = [
    (City, "Give a city."),
    (Recipe, "A simple pancake recipe."),
    (Person, "Invent a person."),
    (Book, "Recommend a book."),
    (Weather, "What is the weather like in Paris?"),
    (Product, "Describe a product for sale."),
    (Movie, "Name a good movie."),
    (Sentiment, "How does this review feel: 'The soup was cold and the waiter rude.'"),
]

JSON_OBJECT_PROMPTS = [
    "Give a city as JSON with its name and population.",
    "Reply in JSON: a user profile with a name and an age.",
    "Return a JSON object describing a car: make, model and year.",
    "As JSON, list three colors under the key colors.",
]


# --- Tools as agents offer them.


def _tool(name: str, description: str, properties: dict, required: list[str]) -> dict:
    parameters = {"type": "object", "properties": properties, "required": required}
    return {"type": "function", "function": {"name": name, "description": description, "parameters": parameters}}


TOOLS = [
    _tool(
        "get_weather",
        "Get the current weather in a city.",
        {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
        ["city"],
    ),
    _tool("search_web", "Search the web.", {"query": {"type": "string"}}, ["query"]),
    _tool(
        "book_table",
        "Book a restaurant table.",
        {"restaurant": {"type": "string"}, "people": {"type": "integer"}, "time": {"type": "string"}},
        ["restaurant", "people"],
    ),
]
TOOL_SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}

TOOL_PROMPTS: list[tuple[str, str]] = [
    ("What's the weather in Lyon?", "get_weather"),
    ("Find me news about the Mars rover.", "search_web"),
    ("Book a table for two at Chez Paul tomorrow at 8pm.", "book_table"),
    ("Is it raining in Oslo right now?", "get_weather"),
]


@dataclass
class Outcome:
    category: str
    case: str
    passed: bool
    detail: str = ""


@dataclass
class Target:
    base_url: str
    model: str
    api_key: str = "not-needed"

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.base_url, api_key=self.api_key, max_retries=0, timeout=600)


def _seed(temperature: float, i: int) -> Optional[int]:
    return 1000 + i if temperature else None


def _check_calls(choice, *, named: Optional[str] = None) -> None:
    assert choice.finish_reason == "tool_calls", f"finish_reason={choice.finish_reason}: {choice.message.content!r}"
    calls = choice.message.tool_calls or []
    assert calls, "no tool_calls"
    if named:
        assert len(calls) == 1, f"{len(calls)} calls for a named tool_choice"
    for call in calls:
        assert call.function.name in TOOL_SCHEMAS, call.function.name
        if named:
            assert call.function.name == named, call.function.name
        jsonschema.validate(json.loads(call.function.arguments), TOOL_SCHEMAS[call.function.name])


def _lc_model(target: Target, temperature: float, seed: Optional[int], max_tokens: int):
    from langchain_openai import ChatOpenAI

    return ChatOpenAI(
        base_url=target.base_url,
        api_key=target.api_key,
        model=target.model,
        temperature=temperature,
        seed=seed,
        max_tokens=max_tokens,
        max_retries=0,
        timeout=600,
    )


def cases(target: Target) -> list[tuple[str, str, Callable[[], None]]]:
    """Every case as (category, name, run); `run` raises when the case fails."""
    client = target.client()
    out: list[tuple[str, str, Callable[[], None]]] = []
    for t in TEMPERATURES:
        for i, (model, prompt) in enumerate(SCHEMA_CASES):

            def parse(model=model, prompt=prompt, t=t, i=i):
                done = client.chat.completions.parse(
                    model=target.model,
                    messages=[{"role": "user", "content": prompt}],
                    response_format=model,
                    temperature=t,
                    seed=_seed(t, i),
                    max_tokens=SCHEMA_MAX_TOKENS,
                )
                choice = done.choices[0]
                assert choice.finish_reason == "stop", choice.finish_reason
                assert isinstance(choice.message.parsed, model), choice.message.content

            out.append(("parse", f"{model.__name__}@{t}", parse))

        for i, prompt in enumerate(JSON_OBJECT_PROMPTS):

            def json_object(prompt=prompt, t=t, i=i):
                done = client.chat.completions.create(
                    model=target.model,
                    messages=[{"role": "user", "content": prompt}],
                    response_format={"type": "json_object"},
                    temperature=t,
                    seed=_seed(t, i),
                    max_tokens=SCHEMA_MAX_TOKENS,
                )
                choice = done.choices[0]
                assert choice.finish_reason == "stop", f"{choice.finish_reason}: {choice.message.content!r}"
                assert isinstance(json.loads(choice.message.content), dict), choice.message.content

            out.append(("json_object", f"{i}@{t}", json_object))

        for i, (prompt, name) in enumerate(TOOL_PROMPTS):

            def required(prompt=prompt, t=t, i=i):
                done = client.chat.completions.create(
                    model=target.model,
                    messages=[{"role": "user", "content": prompt}],
                    tools=TOOLS,
                    tool_choice="required",
                    temperature=t,
                    seed=_seed(t, i),
                    max_tokens=TOOL_MAX_TOKENS,
                )
                _check_calls(done.choices[0])

            def named(prompt=prompt, name=name, t=t, i=i):
                done = client.chat.completions.create(
                    model=target.model,
                    messages=[{"role": "user", "content": prompt}],
                    tools=TOOLS,
                    tool_choice={"type": "function", "function": {"name": name}},
                    temperature=t,
                    seed=_seed(t, i),
                    max_tokens=TOOL_MAX_TOKENS,
                )
                _check_calls(done.choices[0], named=name)

            def lc_tools(prompt=prompt, name=name, t=t, i=i):
                llm = _lc_model(target, t, _seed(t, i), TOOL_MAX_TOKENS)
                message = llm.bind_tools(TOOLS, tool_choice=name).invoke(prompt)
                assert len(message.tool_calls) == 1, f"{message.tool_calls} {message.content!r}"
                call = message.tool_calls[0]
                assert call["name"] == name, call
                jsonschema.validate(call["args"], TOOL_SCHEMAS[name])

            out.append(("tools_required", f"{i}@{t}", required))
            out.append(("tools_named", f"{i}@{t}", named))
            out.append(("langchain_bind_tools", f"{i}@{t}", lc_tools))

        for i, (model, prompt) in enumerate(SCHEMA_CASES[:4]):

            def lc_structured(model=model, prompt=prompt, t=t, i=i):
                llm = _lc_model(target, t, _seed(t, i), SCHEMA_MAX_TOKENS)
                result = llm.with_structured_output(model, method="json_schema").invoke(prompt)
                assert isinstance(result, model), result

            out.append(("langchain_structured", f"{model.__name__}@{t}", lc_structured))
    return out


def run(target: Target, concurrency: int = 4) -> list[Outcome]:
    def attempt(case: tuple[str, str, Callable[[], None]]) -> Outcome:
        category, name, fn = case
        try:
            fn()
        except Exception as exc:  # any failure of the case is its result
            return Outcome(category, name, False, f"{type(exc).__name__}: {exc}"[:300])
        return Outcome(category, name, True)

    with ThreadPoolExecutor(concurrency) as pool:
        return list(pool.map(attempt, cases(target)))


def rates(outcomes: list[Outcome]) -> dict[str, tuple[int, int]]:
    """Passed and total cases per category, and under "all"."""
    table: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for o in outcomes:
        for key in (o.category, "all"):
            table[key][0] += o.passed
            table[key][1] += 1
    return {k: (v[0], v[1]) for k, v in table.items()}


def report(outcomes: list[Outcome]) -> str:
    lines = ["| category | passed |", "|---|---|"]
    for category, (passed, total) in rates(outcomes).items():
        lines.append(f"| {category} | {passed}/{total} |")
    failures = [f"- {o.category} {o.case}: {o.detail}" for o in outcomes if not o.passed]
    return "\n".join(lines + ([""] + failures if failures else []))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base-url", required=True, help="the server's /v1 URL")
    parser.add_argument("--model", default="light")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--json", help="also write the outcomes here")
    args = parser.parse_args()
    outcomes = run(Target(args.base_url, args.model), args.concurrency)
    print(report(outcomes))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([o.__dict__ for o in outcomes], f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
