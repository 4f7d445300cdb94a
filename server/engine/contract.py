"""Applying an adapter's contract (`loraplex.json`) to a request: the request's own fields win.

Runs in the engine front on the version the request resolved to, so the template, defaults and
schema always come from the same version as the weights that answer it.
"""

from __future__ import annotations

import dataclasses
import json

from server.adapters.contract import AdapterContract, ResponseFormatSpec
from server.engine.request import GenerationRequest, OutputFormat


def output_format(spec: ResponseFormatSpec | None) -> OutputFormat | None:
    """OpenAI's response_format as the engine's OutputFormat (None: free text)."""
    if spec is None or spec.type == "text":
        return None
    if spec.type == "json_object":
        return OutputFormat("json_object")
    assert spec.json_schema is not None
    # Key order kept: xgrammar generates properties in the order the schema lists them.
    return OutputFormat("json_schema", json.dumps(spec.json_schema.schema_), spec.json_schema.name)


def with_contract(request: GenerationRequest, contract: AdapterContract | None) -> GenerationRequest:
    """The request as the adapter's contract completes it: defaults for unset fields, the bound schema
    unless the request sent a response_format, and the prompt template or system prompt."""
    if contract is None:
        return request
    params, given = request.params, request.params.given
    changes: dict = {}
    if given is not None:
        if contract.defaults is not None:
            for name, value in contract.defaults.given().items():
                if name not in given:
                    changes[name] = tuple(s for s in value if s) if name == "stop" else value
        if "response_format" not in given and contract.response_format is not None:
            changes["response_format"] = output_format(contract.response_format)
    if changes:
        request = dataclasses.replace(request, params=dataclasses.replace(params, **changes))
    if not request.apply_template:
        return request
    if request.prompt is not None and contract.prompt_template is not None:
        return dataclasses.replace(request, prompt=contract.render_prompt(request.prompt))
    if request.messages is not None and contract.system_prompt is not None \
            and not any(m.get("role") == "system" for m in request.messages):
        system = {"role": "system", "content": contract.system_prompt}
        return dataclasses.replace(request, messages=(system, *request.messages))
    return request
