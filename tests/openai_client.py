"""The official `openai` client against the mirror-sd server (run by tests/serve.rs).

Usage: openai_client.py BASE_URL MODEL QUESTION TEXT_PROMPT. Prints one JSON object with what
the client received, greedy, 16 tokens each, whole and streamed.
"""

import json
import sys

import openai

base_url, model, question, text_prompt = sys.argv[1:5]
client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=120)
messages = [{"role": "user", "content": question}]
report = {"models": [m.id for m in client.models.list().data]}

chat = client.chat.completions.create(
    model=model,
    messages=messages,
    max_tokens=16,
    temperature=0,
    extra_body={"mirror_sd": {"method": "sd"}},
)
report["chat"] = chat.choices[0].message.content
report["chat_usage_completion_tokens"] = chat.usage.completion_tokens
# Extension fields arrive as extra attributes of the pydantic model.
report["chat_method"] = chat.model_extra["mirror_sd"]["method"]

stream = client.chat.completions.create(
    model=model,
    messages=messages,
    max_tokens=16,
    temperature=0,
    stream=True,
    stream_options={"include_usage": True},
)
pieces, usage = [], None
for chunk in stream:
    if chunk.usage is not None:
        usage = chunk.usage
    if chunk.choices and chunk.choices[0].delta.content:
        pieces.append(chunk.choices[0].delta.content)
report["chat_stream"] = "".join(pieces)
report["chat_stream_usage_completion_tokens"] = usage.completion_tokens if usage else None

completion = client.completions.create(model=model, prompt=text_prompt, max_tokens=16, temperature=0)
report["completion"] = completion.choices[0].text

stream = client.completions.create(
    model=model, prompt=text_prompt, max_tokens=16, temperature=0, stream=True
)
report["completion_stream"] = "".join(c.choices[0].text for c in stream if c.choices)

two = client.chat.completions.create(
    model=model,
    messages=messages,
    max_tokens=16,
    temperature=0,
    n=2,
    extra_body={"mirror_sd": {"method": "ar"}},
)
report["chat_n2"] = [choice.message.content for choice in sorted(two.choices, key=lambda c: c.index)]

constrained = client.chat.completions.create(
    model=model,
    messages=[{"role": "user", "content": "Describe Paris as a JSON object."}],
    max_tokens=48,
    temperature=0,
    response_format={
        "type": "json_schema",
        "json_schema": {
            "name": "city",
            "strict": True,
            "schema": {
                "type": "object",
                "properties": {"city": {"type": "string", "maxLength": 16}, "country": {"type": "string", "maxLength": 16}},
                "required": ["city", "country"],
                "additionalProperties": False,
            },
        },
    },
    extra_body={"mirror_sd": {"method": "sd"}},
)
report["json_schema"] = constrained.choices[0].message.content
report["json_schema_finish"] = constrained.choices[0].finish_reason

weather = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather forecast of a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 20}, "days": {"type": "integer"}},
            "required": ["city", "days"],
            "additionalProperties": False,
        },
    },
}
ask = [{"role": "user", "content": "What is the weather in Paris for the next two days?"}]
called = client.chat.completions.create(
    model=model, messages=ask, max_tokens=64, temperature=0, tools=[weather], tool_choice="required"
)
call = called.choices[0].message.tool_calls[0]
report["tool_call"] = {"name": call.function.name, "arguments": json.loads(call.function.arguments)}
report["tool_finish"] = called.choices[0].finish_reason
stream = client.chat.completions.create(
    model=model, messages=ask, max_tokens=64, temperature=0, tools=[weather], tool_choice="required",
    stream=True,
)
streamed = {}
for chunk in stream:
    for delta in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
        entry = streamed.setdefault(delta.index, {"name": "", "arguments": ""})
        entry["name"] += delta.function.name or ""
        entry["arguments"] += delta.function.arguments or ""
report["tool_call_stream"] = [
    {"name": c["name"], "arguments": json.loads(c["arguments"])} for _, c in sorted(streamed.items())
]
penalized = client.chat.completions.create(
    model=model, messages=messages, max_tokens=16, temperature=0, frequency_penalty=0.5,
    presence_penalty=0.5, logit_bias={"0": -100},
)
report["penalized_finish"] = penalized.choices[0].finish_reason

scored = client.chat.completions.create(
    model=model, messages=messages, max_tokens=8, temperature=0, logprobs=True, top_logprobs=2
)
report["logprobs"] = [t.logprob for t in scored.choices[0].logprobs.content]
report["logprobs_top"] = [len(t.top_logprobs) for t in scored.choices[0].logprobs.content]
stream = client.chat.completions.create(
    model=model, messages=messages, max_tokens=8, temperature=0, logprobs=True, top_logprobs=2,
    stream=True,
)
report["logprobs_stream"] = [
    t.logprob for c in stream if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content
]

try:
    client.chat.completions.create(model="gpt-9", messages=messages, max_tokens=4)
    report["unknown_model_status"] = None
except openai.NotFoundError as error:
    report["unknown_model_status"] = error.status_code

try:
    client.chat.completions.create(model=model, messages=messages, max_tokens=4, temperature=7)
    report["bad_temperature_status"] = None
except openai.BadRequestError as error:
    report["bad_temperature_status"] = error.status_code

print(json.dumps(report))
