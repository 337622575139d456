"""LangChain's `ChatOpenAI` (langchain-openai, pinned in .ci/run) against the mirror-sd server
(run by tests/serve.rs), used as a new user would: no extension fields, the server's defaults.

Usage: langchain_client.py BASE_URL MODEL QUESTION. Prints one JSON object with what it got.
"""

import json
import sys

from langchain_core.tools import tool
from langchain_openai import ChatOpenAI
from pydantic import BaseModel, Field

base_url, model, question = sys.argv[1:4]


def chat(max_tokens):
    # LangChain sends the penalties when they are set, as many applications do.
    return ChatOpenAI(
        base_url=base_url,
        api_key="unused",
        model=model,
        temperature=0,
        max_tokens=max_tokens,
        frequency_penalty=0.0,
        presence_penalty=0.0,
        max_retries=0,
        timeout=120,
    )


report = {}
report["invoke"] = chat(16).invoke(question).content
report["stream"] = "".join(chunk.content for chunk in chat(16).stream(question))


@tool
def get_weather(city: str, days: int) -> str:
    """The weather forecast of a city for a number of days."""
    return "sunny"


called = chat(64).bind_tools([get_weather], tool_choice="required").invoke(
    "What is the weather in Paris for the next two days?"
)
report["tool_calls"] = [{"name": c["name"], "args": c["args"]} for c in called.tool_calls]


class City(BaseModel):
    """A city and its country."""

    name: str = Field(max_length=20)
    country: str = Field(max_length=20)


city = chat(64).with_structured_output(City, method="json_schema").invoke("Describe Paris.")
report["structured"] = city.model_dump()

print(json.dumps(report))
