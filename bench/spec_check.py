"""Does a response fit the checked-in OpenAPI spec? Its status declared for its operation, its content
type declared for that status, and a JSON body valid against the declared schema.

Used on every request a schemathesis run recorded (bench/schema_fuzz.py) and by the spec conformance
tests, so both judge a response by the same rule.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote

import jsonschema

SPEC_PATH = Path(__file__).resolve().parents[1] / "openapi" / "openapi.json"


@dataclass(frozen=True)
class Operation:
    method: str  # lower case, as the spec keys it
    template: str  # "/adapters/{name}"


class Spec:
    def __init__(self, document: dict) -> None:
        self.document = document
        # Literal paths first: "/v1/models" must not be taken for "/v1/models/{model}" with an empty id.
        templates = sorted(document["paths"], key=lambda t: "{" in t)
        # A parameter matches any characters, newlines too (a fuzzer's ids hold them): DOTALL.
        self._patterns = [(t, re.compile(re.sub(r"\\\{[^}]+\\\}", ".+", re.escape(t)), re.DOTALL)) for t in templates]

    @classmethod
    def load(cls, path: Path = SPEC_PATH) -> Spec:
        return cls(json.loads(path.read_text()))

    def template_for(self, path: str) -> str | None:
        """The spec's path template a request path falls under (percent-escapes decoded), or None."""
        path = unquote(path)
        return next((t for t, pattern in self._patterns if pattern.fullmatch(path)), None)

    def operation(self, method: str, path: str) -> Operation | None:
        """None for a path the spec lacks, or a method it does not declare there (a 405 probe)."""
        template = self.template_for(path)
        if template is None or method.lower() not in self.document["paths"][template]:
            return None
        return Operation(method.lower(), template)

    def problems(self, op: Operation, status: int, content_type: str, body: str) -> list[str]:
        """What is wrong with this response for `op`; empty when it fits."""
        responses = self.document["paths"][op.template][op.method]["responses"]
        declared = responses.get(str(status))
        if declared is None:
            return [f"status {status} not declared (declared: {', '.join(sorted(responses))})"]
        media_type = content_type.split(";")[0].strip()
        contents = declared.get("content", {})
        if contents and not any(m.split(";")[0].strip() == media_type for m in contents):
            return [f"content type {content_type!r} not declared for {status} (declared: {', '.join(contents)})"]
        schema = contents.get("application/json", {}).get("schema")
        if media_type != "application/json" or not schema:
            return []
        try:
            self.validate(json.loads(body), schema)
        except json.JSONDecodeError:
            return [f"{status} body is not JSON: {body[:120]!r}"]
        except jsonschema.ValidationError as exc:
            return [f"{status} body breaks its schema: {exc.message[:200]}"]
        return []

    def declared_schema(self, template: str, method: str, status: int) -> dict:
        return self.document["paths"][template][method.lower()]["responses"][str(status)]["content"][
            "application/json"
        ]["schema"]

    def validate(self, body, schema: dict) -> None:
        """Raises jsonschema.ValidationError; the schema's $refs resolve within the whole document."""
        jsonschema.validate(body, {**schema, "components": self.document.get("components", {})})
