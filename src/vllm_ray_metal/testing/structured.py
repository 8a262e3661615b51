"""JSON schemas and prompts for the structured-output tests and benchmark.

Strings and arrays are bounded so that a 135M model at temperature 0.8 finishes the
document within the token budget: the grammar decides the shape, the bound its length.
"""

from __future__ import annotations

PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 24},
                   "age": {"type": "integer", "minimum": 0, "maximum": 120}},
    "required": ["name", "age"], "additionalProperties": False}

ORDER = {  # nested object, array of objects, bounded integers
    "type": "object",
    "properties": {
        "customer": {"type": "object",
                     "properties": {"id": {"type": "integer", "minimum": 1, "maximum": 9999},
                                    "city": {"type": "string", "maxLength": 16}},
                     "required": ["id", "city"], "additionalProperties": False},
        "items": {"type": "array", "minItems": 1, "maxItems": 3,
                  "items": {"type": "object",
                            "properties": {"sku": {"type": "string", "maxLength": 8},
                                           "qty": {"type": "integer", "minimum": 1,
                                                   "maximum": 9}},
                            "required": ["sku", "qty"], "additionalProperties": False}}},
    "required": ["customer", "items"], "additionalProperties": False}

WEATHER = {  # enums and a boolean
    "type": "object",
    "properties": {"city": {"type": "string", "enum": ["Paris", "London", "Tokyo"]},
                   "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                   "raining": {"type": "boolean"}},
    "required": ["city", "unit", "raining"], "additionalProperties": False}

TAGS = {  # array of enum strings with a bounded length, and a number
    "type": "object",
    "properties": {"tags": {"type": "array", "minItems": 1, "maxItems": 4,
                            "items": {"enum": ["red", "green", "blue", "black"]}},
                   "score": {"type": "integer", "minimum": -5, "maximum": 5}},
    "required": ["tags", "score"], "additionalProperties": False}

JSON_SCHEMAS = {"person": PERSON, "order": ORDER, "weather": WEATHER, "tags": TAGS}

PROMPTS = {
    "person": "Describe a fictional person as JSON with a name and an age.",
    "order": "Write a shop order as JSON: a customer and the items bought.",
    "weather": "Report the weather in a big city as JSON.",
    "tags": "Tag a painting with colours and give it a score, as JSON.",
}

GET_WEATHER_TOOL = {  # strict: the arguments, not only the call, follow the schema
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city.",
        "strict": True,
        "parameters": {"type": "object",
                       "properties": {"city": {"type": "string", "maxLength": 20},
                                      "unit": {"enum": ["celsius", "fahrenheit"]}},
                       "required": ["city", "unit"], "additionalProperties": False}}}

PHONE_REGEX = r"\+[0-9]{2} [0-9]{3} [0-9]{4}"
YES_NO_GRAMMAR = 'root ::= ("yes" | "no") ", because " [a-z ]{1,30} "."'  # xgrammar EBNF


def json_rows_start_with_a_brace(model: str, outputs: list[list[int]], schemas: list) -> bool:
    """Whether exactly the constrained rows (schema not None) begin a JSON object: what
    can be asserted of a random-weight model's constrained tokens."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    starts = [tok.decode(out).lstrip()[:1] for out in outputs]
    return all((s == "{") == (schema is not None) for s, schema in zip(starts, schemas))
