"""Write `.cog/openapi_schema.json` from the predictor's signature, as `cog build` would.

The coglet server validates inputs (and serves /openapi.json) only when this file exists; without Docker
nothing else writes it. The inputs come from cog's own introspection of the Predictor, so the schema
always matches predict.py (and through it lib/params)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def _input_schema(info) -> tuple[dict, dict]:
    props, enums, required = {}, {}, []
    for name, field in info.inputs.items():
        prop: dict = {"title": name.replace("_", " ").title(), "x-order": field.order}
        type_schema = field.type.json_type()
        if field.choices is not None:
            enum = {"title": name, "description": "An enumeration.", "enum": list(field.choices)}
            enum["type"] = type_schema.get("type", "string")
            enums[name] = enum
            prop["allOf"] = [{"$ref": f"#/components/schemas/{name}"}]
        else:
            prop.update(type_schema)
        if field.default is not None:
            prop["default"] = field.default
        elif not _is_optional(field):
            required.append(name)
        if field.description:
            prop["description"] = field.description
        if field.ge is not None:
            prop["minimum"] = field.ge
        if field.le is not None:
            prop["maximum"] = field.le
        if field.min_length is not None:
            prop["minLength"] = field.min_length
        if field.max_length is not None:
            prop["maxLength"] = field.max_length
        if field.regex is not None:
            prop["pattern"] = field.regex
        if field.deprecated:
            prop["deprecated"] = True
        if _is_optional(field):
            # null means "not given" (Replicate's clients send `"seed": null`): JSON Schema's way, which the
            # server's validator reads, where OpenAPI 3.0's `nullable` would be ignored
            if "allOf" in prop:
                prop["anyOf"] = [*prop.pop("allOf"), {"type": "null"}]
            else:
                prop["type"] = [prop["type"], "null"]
        props[name] = prop
    schema = {"title": "Input", "type": "object", "properties": props}
    if required:
        schema["required"] = required
    return schema, enums


def _is_optional(field) -> bool:
    from cog._adt import Repetition

    return field.type.repetition is Repetition.OPTIONAL


def build_schema(module: str = "predict", predictor: str = "Predictor") -> dict:
    from cog import _inspector

    info = _inspector.create_predictor(module, predictor)
    input_schema, enums = _input_schema(info)
    output = info.output.json_type()
    status = {"title": "Status", "type": "string", "enum": ["starting", "processing", "succeeded", "canceled",
                                                             "failed"]}
    webhook_event = {"title": "WebhookEvent", "type": "string", "enum": ["start", "output", "logs", "completed"]}
    prediction_request = {"title": "PredictionRequest", "type": "object", "properties": {
        "id": {"title": "Id", "type": ["string", "null"]},
        "created_at": {"title": "Created At", "type": ["string", "null"], "format": "date-time"},
        "input": {"$ref": "#/components/schemas/Input"},
        "webhook": {"title": "Webhook", "type": ["string", "null"], "format": "uri"},
        "webhook_events_filter": {"type": "array", "items": {"$ref": "#/components/schemas/WebhookEvent"},
                                  "default": ["start", "output", "logs", "completed"]},
        "output_file_prefix": {"title": "Output File Prefix", "type": ["string", "null"]},
    }}
    prediction_response = {"title": "PredictionResponse", "type": "object", "properties": {
        "id": {"title": "Id", "type": ["string", "null"]},
        "input": {"$ref": "#/components/schemas/Input"},
        "output": {"$ref": "#/components/schemas/Output"},
        "status": {"$ref": "#/components/schemas/Status"},
        "error": {"title": "Error", "type": ["string", "null"]},
        "logs": {"title": "Logs", "type": "string", "default": ""},
        "metrics": {"title": "Metrics", "type": ["object", "null"]},
        "created_at": {"type": ["string", "null"], "format": "date-time"},
        "started_at": {"type": ["string", "null"], "format": "date-time"},
        "completed_at": {"type": ["string", "null"], "format": "date-time"},
    }}
    validation_error = {"title": "ValidationError", "type": "object", "required": ["loc", "msg", "type"],
                        "properties": {"loc": {"type": "array", "items": {"anyOf": [{"type": "string"},
                                                                                   {"type": "integer"}]}},
                                       "msg": {"type": "string"}, "type": {"type": "string"}}}
    http_validation_error = {"title": "HTTPValidationError", "type": "object", "properties": {
        "detail": {"type": "array", "items": {"$ref": "#/components/schemas/ValidationError"}}}}

    def json_response(ref: str) -> dict:
        return {"content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{ref}"}}}}

    def prediction_body(required: bool) -> dict:
        body = {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/PredictionRequest"}}}}
        return {"required": True, **body} if required else body

    prediction_responses = {
        "200": {"description": "Successful Response", **json_response("PredictionResponse")},
        "422": {"description": "Validation Error", **json_response("HTTPValidationError")}}

    paths = {
        "/": {"get": {"summary": "Root", "operationId": "root__get",
                      "responses": {"200": {"description": "Successful Response",
                                            "content": {"application/json": {"schema": {}}}}}}},
        "/health-check": {"get": {"summary": "Healthcheck", "operationId": "healthcheck_health_check_get",
                                  "responses": {"200": {"description": "Successful Response",
                                                        "content": {"application/json": {"schema": {}}}}}}},
        "/predictions": {"post": {
            "summary": "Predict", "operationId": "predict_predictions_post",
            "description": "Run a single prediction on the model",
            "parameters": [{"in": "header", "name": "prefer", "required": False,
                            "schema": {"type": "string", "title": "Prefer"}}],
            "requestBody": prediction_body(required=False), "responses": prediction_responses}},
        "/predictions/{prediction_id}": {"put": {
            "summary": "Predict Idempotent", "operationId": "predict_idempotent_predictions__prediction_id__put",
            "parameters": [{"in": "path", "name": "prediction_id", "required": True,
                            "schema": {"type": "string", "title": "Prediction ID"}},
                           {"in": "header", "name": "prefer", "required": False,
                            "schema": {"type": "string", "title": "Prefer"}}],
            "requestBody": prediction_body(required=True), "responses": prediction_responses}},
        "/predictions/{prediction_id}/cancel": {"post": {
            "summary": "Cancel", "operationId": "cancel_predictions__prediction_id__cancel_post",
            "parameters": [{"in": "path", "name": "prediction_id", "required": True,
                            "schema": {"type": "string", "title": "Prediction ID"}}],
            "responses": {"200": {"description": "Successful Response",
                                  "content": {"application/json": {"schema": {}}}},
                          "422": {"description": "Validation Error", **json_response("HTTPValidationError")}}}},
        "/shutdown": {"post": {"summary": "Start Shutdown", "operationId": "start_shutdown_shutdown_post",
                               "responses": {"200": {"description": "Successful Response",
                                                     "content": {"application/json": {"schema": {}}}}}}},
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": "Cog", "version": "0.1.0"},
        "paths": paths,
        "components": {"schemas": {
            "Input": input_schema, "Output": output, **enums, "Status": status, "WebhookEvent": webhook_event,
            "PredictionRequest": prediction_request, "PredictionResponse": prediction_response,
            "ValidationError": validation_error, "HTTPValidationError": http_validation_error,
        }},
    }


def write_schema(root: Path = REPO_ROOT) -> Path:
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    path = Path(root) / ".cog" / "openapi_schema.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(build_schema(), indent=2) + "\n")
    return path


if __name__ == "__main__":
    print(write_schema())
