"""OpenAI's Responses API through the official `openai` SDK and the
`openai-agents` SDK, unmodified, on the real SmolLM2."""

from __future__ import annotations

import asyncio
import json

import openai
import pytest
from compat_helpers import SMALL_OBJECT
from pydantic import BaseModel

WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "Get the current weather in a city.",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
        "additionalProperties": False,
    },
    "strict": True,
}


def test_text_with_instructions_and_usage(client):
    response = client.responses.create(
        model="light",
        instructions="You are terse.",
        input="Say hello.",
        max_output_tokens=40,
        temperature=0,
    )
    assert response.object == "response" and response.id.startswith("resp_")
    assert response.status in ("completed", "incomplete")
    assert response.instructions == "You are terse."
    message = response.output[0]
    assert message.type == "message" and message.role == "assistant"
    assert message.content[0].type == "output_text"
    assert response.output_text == message.content[0].text != ""
    usage = response.usage
    assert usage.input_tokens > 0 and 0 < usage.output_tokens <= 40
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens


def test_max_output_tokens_makes_it_incomplete(client):
    response = client.responses.create(model="light", input="Tell me a long story.", max_output_tokens=3)
    assert response.status == "incomplete"
    assert response.incomplete_details.reason == "max_output_tokens"
    assert response.usage.output_tokens == 3


class City(BaseModel):
    name: str
    country: str


def test_parse_with_a_pydantic_model(client):
    response = client.responses.parse(
        model="light",
        input="Name a famous city and its country.",
        text_format=City,
        max_output_tokens=200,
        temperature=0,
    )
    assert response.status == "completed"
    assert isinstance(response.output_parsed, City)
    assert response.text.format.type == "json_schema"


def test_json_object_format(client):
    response = client.responses.create(
        model="light",
        input=SMALL_OBJECT,
        text={"format": {"type": "json_object"}},
        max_output_tokens=200,
        temperature=0,
    )
    assert response.status == "completed", response.output_text
    assert isinstance(json.loads(response.output_text), dict)


def test_function_call_round_trip(client):
    question = [{"role": "user", "content": "What's the weather in Paris?"}]
    first = client.responses.create(
        model="light",
        input=question,
        tools=[WEATHER],
        tool_choice={"type": "function", "name": "get_weather"},
        max_output_tokens=100,
        temperature=0,
    )
    calls = [item for item in first.output if item.type == "function_call"]
    assert len(calls) == 1, first.output
    call = calls[0]
    assert call.name == "get_weather" and call.call_id and call.status == "completed"
    assert isinstance(json.loads(call.arguments)["city"], str)
    # The SDK's documented loop: send the output back with the call's result.
    follow_up = question + [item.model_dump(exclude_none=True) for item in first.output]
    follow_up.append({"type": "function_call_output", "call_id": call.call_id, "output": "sunny, 22 C"})
    second = client.responses.create(
        model="light", input=follow_up, tools=[WEATHER], max_output_tokens=60, temperature=0
    )
    assert second.status in ("completed", "incomplete")
    assert second.output and second.usage.input_tokens > first.usage.input_tokens


def test_stream_accumulates_to_the_same_text(client):
    request = dict(model="light", input="Describe the sea in one sentence.", max_output_tokens=200, temperature=0)
    whole = client.responses.create(**request)
    assert whole.status == "completed"
    with client.responses.stream(**request) as stream:
        deltas = "".join(e.delta for e in stream if e.type == "response.output_text.delta")
        final = stream.get_final_response()
    assert deltas == final.output_text == whole.output_text
    assert final.usage.output_tokens == whole.usage.output_tokens


def test_raw_stream_events_are_typed_and_numbered(client):
    events = list(
        client.responses.create(
            model="light",
            input="What's the weather in Paris?",
            tools=[WEATHER],
            tool_choice="required",
            max_output_tokens=100,
            temperature=0,
            stream=True,
        )
    )
    kinds = [e.type for e in events]
    assert kinds[:3] == ["response.created", "response.in_progress", "response.output_item.added"]
    assert kinds[-2:] == ["response.output_item.done", "response.completed"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    done = next(e for e in events if e.type == "response.function_call_arguments.done")
    final = events[-1].response
    assert deltas == done.arguments == final.output[0].arguments
    assert json.loads(done.arguments)["city"]
    assert final.output[0].id == events[2].item.id


def test_previous_response_id_continues_and_reuses_the_prefix(client):
    first = client.responses.create(
        model="light",
        instructions="You are helpful.",
        input="My name is Ada. Remember it.",
        max_output_tokens=30,
        temperature=0,
    )
    second = client.responses.create(
        model="light",
        instructions="You are helpful.",
        previous_response_id=first.id,
        input="What is my name?",
        max_output_tokens=30,
        temperature=0,
    )
    assert second.previous_response_id == first.id
    # The whole first turn is in the second prompt, and its KV state is reused.
    assert second.usage.input_tokens > first.usage.input_tokens + first.usage.output_tokens
    assert second.usage.input_tokens_details.cached_tokens >= first.usage.input_tokens
    stored = client.responses.retrieve(first.id)
    assert stored.id == first.id and stored.output_text == first.output_text


def test_retrieve_delete_and_store_false(client):
    kept = client.responses.create(model="light", input="Hi", max_output_tokens=5)
    assert client.responses.retrieve(kept.id).status == kept.status
    client.responses.delete(kept.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(kept.id)
    with pytest.raises(openai.BadRequestError) as error:
        client.responses.create(model="light", previous_response_id=kept.id, input="Hi", max_output_tokens=5)
    assert error.value.body["param"] == "previous_response_id"
    unkept = client.responses.create(model="light", input="Hi", max_output_tokens=5, store=False)
    assert unkept.store is False
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(unkept.id)


@pytest.mark.parametrize(
    "body, status, param",
    [
        ({"model": "light", "input": 5}, 400, "input"),
        ({"model": "light", "input": []}, 400, "input"),
        ({"model": "light", "input": [{"role": "robot", "content": "x"}]}, 400, "input[0].role"),
        (
            {"model": "light", "input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
            400,
            "input[0].content[0]",
        ),
        ({"model": "light", "input": "x", "tools": [{"type": "web_search"}]}, 400, "tools[0].type"),
        ({"model": "light", "input": "x", "text": {"format": {"type": "xml"}}}, 400, "text.format.type"),
        ({"model": "light", "input": "x", "temperature": -1}, 400, "temperature"),
        ({"model": "light", "input": "x", "previous_response_id": "resp_nope"}, 400, "previous_response_id"),
        ({"model": "no-such-model", "input": "x"}, 404, "model"),
    ],
)
def test_bad_requests_get_openai_errors(http, body, status, param):
    response = http.post("/v1/responses", json=body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["message"]


def test_unknown_response_is_a_404(http):
    for method in ("GET", "DELETE"):
        response = http.request(method, "/v1/responses/resp_missing")
        assert response.status_code == 404
        assert "resp_missing" in response.json()["error"]["message"]


def test_an_agent_runs_a_tool_to_completion(server):
    agents = pytest.importorskip("agents")
    agents.set_tracing_disabled(True)
    asked = []

    @agents.function_tool
    def get_weather(city: str) -> str:
        """Get the current weather in a city."""
        asked.append(city)
        return f"It is sunny and 22 C in {city}."

    model = agents.OpenAIResponsesModel(
        model="light",
        openai_client=openai.AsyncOpenAI(base_url=f"{server.base_url}/v1", api_key="not-needed", max_retries=0),
    )
    agent = agents.Agent(
        name="weather",
        instructions="Answer weather questions with the get_weather tool.",
        tools=[get_weather],
        model=model,
        # Required for the first turn; the SDK resets it to auto after a call.
        model_settings=agents.ModelSettings(
            tool_choice="required", parallel_tool_calls=False, temperature=0, max_tokens=100
        ),
    )
    async def both():
        plain = await agents.Runner.run(agent, "What's the weather in Paris?", max_turns=4)
        streamed = agents.Runner.run_streamed(agent, "What's the weather in Rome?", max_turns=4)
        async for _ in streamed.stream_events():
            pass
        return [plain, streamed]

    runs = asyncio.run(both())
    for run in runs:
        kinds = [type(item).__name__ for item in run.new_items]
        assert kinds[:2] == ["ToolCallItem", "ToolCallOutputItem"], kinds
        assert kinds[-1] == "MessageOutputItem", kinds
        assert isinstance(run.final_output, str) and run.final_output
    assert len(asked) >= 2
