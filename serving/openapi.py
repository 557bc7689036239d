"""The gateway's OpenAPI 3 document, built from the settings it runs with (limits, API key), so what it
promises is what ``serving/app.py`` enforces. Served at ``/openapi.json``; ``/docs`` renders it."""

from __future__ import annotations

from typing import Any

from captioner.serving.settings import Settings

from captioner import constants as C

OPENAPI_VERSION = "3.0.3"

SCORE_DESCRIPTION = (
    "The caption's length-normalised log-probability under the model: the sum of its tokens' log-probabilities "
    "(its final <end> included) divided by the GNMT length penalty ((5 + n) / 6) ** length_penalty, n its length "
    "in tokens and length_penalty the model's `decode.length_penalty` (0.6 by default; 0 gives the plain sum). "
    "Always <= 0; higher is better. Greedy and beam captions are scored alike, so their scores compare; scores "
    "under different models or length penalties do not.")

_ERROR_CODES = ["bad_parameter", "bad_base64", "unauthorized", "too_large", "image_too_large", "unsupported_image",
                "unsupported_media_type", "undecodable_image", "no_image_captioned", "not_found",
                "method_not_allowed", "backend_unavailable", "backend_overloaded", "backend_timeout",
                "backend_contract", "http", "internal"]


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _error_response(description: str, retry_after: bool = False) -> dict[str, Any]:
    response: dict[str, Any] = {"description": description,
                                "content": {"application/json": {"schema": _ref("Error")}}}
    if retry_after:
        response["headers"] = {"Retry-After": {"description": "Seconds to wait before trying again.",
                                               "schema": {"type": "integer", "minimum": 1}}}
    return response


_BACKEND_ERRORS = {
    "502": _error_response("The model backend broke its contract (e.g. TF Serving INVALID_ARGUMENT, a malformed "
                           "response)."),
    "503": _error_response("The model backend is down, has no model version loaded, or is overloaded.",
                           retry_after=True),
    "504": _error_response("The model backend did not answer within the gateway's deadline."),
}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def build_openapi(settings: Settings) -> dict[str, Any]:
    """The OpenAPI 3.0 document of every gateway endpoint, with ``settings``' limits."""
    max_beam, max_length, max_images = settings.max_beam_size, settings.max_caption_length, settings.max_images
    decode_fields: dict[str, Any] = {
        "algorithm": {"type": "string", "enum": ["beam", "greedy"], "default": "beam",
                      "description": "beam search, or greedy decoding (beam_size is then 1)."},
        "beam_size": {"type": "integer", "minimum": C.MIN_BEAM_SIZE, "maximum": max_beam,
                      **({"default": settings.default_beam_size} if settings.default_beam_size else {}),
                      "description": f"Beams to keep ({C.MIN_BEAM_SIZE}..{max_beam}, the same range as "
                                     "`captioner caption --beam-size`); the number of n-best captions returned"
                                     + ("." if settings.default_beam_size else
                                        "; default: the model's own (its export's `beam_size`, the width its "
                                        "length penalty was tuned for).")},
        "max_length": {"type": "integer", "minimum": C.MIN_CAPTION_LENGTH, "maximum": max_length,
                       "description": f"Longest caption in tokens ({C.MIN_CAPTION_LENGTH}..{max_length}, as "
                                      "`captioner caption --max-length`); default: the model's `decode.max_length`. "
                                      "Also bounded by the served model's `max_decode_length` (its export's "
                                      "decode state, 40 by default): a longer request is a 400 naming the bound."},
        "return_attention": {"type": "boolean", "default": False,
                             "description": "Also return the words and one attention row per word over the "
                                            "image grid (`attention_grid` rows x columns)."},
    }
    query = [{"name": name, "in": "query", "required": False, "schema": schema,
              "description": schema["description"] + " (May also be sent in the body, which wins.)"}
             for name, schema in decode_fields.items()]
    request_id = {"name": "X-Request-ID", "in": "header", "required": False,
                  "schema": {"type": "string"},
                  "description": "Echoed in the response's X-Request-ID header and body when it matches "
                                 "[A-Za-z0-9._:-]{1,128}; otherwise the gateway generates one."}
    secured = bool(settings.keys)
    security = [{"ApiKey": []}] if secured else None
    unauthorized = {"401": _error_response("Missing or wrong X-API-Key header.")} if secured else {}

    nbest = {"type": "array", "description": "The best captions, best first (up to beam_size).",
             "items": {"type": "object", "required": ["caption", "score"], "properties": {
                 "caption": {"type": "string"}, "score": {"type": "number", "description": SCORE_DESCRIPTION}}}}
    caption_fields = {
        "caption": {"type": "string", "description": "The best caption."},
        "score": {"type": "number", "description": SCORE_DESCRIPTION},
        "finished": {"type": "boolean", "description": "False when the caption was cut at max_length."},
        "nbest": nbest,
        "words": {"type": "array", "items": {"type": "string"},
                  "description": "With return_attention: the caption's words."},
        "attention": {"type": "array", "items": {"type": "array", "items": {"type": "number"}},
                      "description": "With return_attention: per word, its attention weights over the image "
                                     "grid, row-major (they sum to 1)."},
        "attention_grid": {"type": "array", "items": {"type": "integer"}, "minItems": 2, "maxItems": 2,
                           "description": "With return_attention: the grid's rows and columns."},
    }
    schemas: dict[str, Any] = {
        "Error": {
            "type": "object", "required": ["error", "code", "request_id"],
            "description": "Every error answer: 4xx for the client's mistakes, 502/503/504 for the model backend's.",
            "properties": {
                "error": {"type": "string", "description": "What is wrong, and where (field, image)."},
                "code": {"type": "string", "enum": _ERROR_CODES, "description": "The kind of error."},
                "request_id": {"type": "string", "nullable": True},
                "results": {"type": "array", "items": _ref("ImageFailure"),
                            "description": "/predict when no image could be captioned: each image's error."},
            }},
        "ImageError": {
            "type": "object", "required": ["code", "status", "message"],
            "properties": {
                "code": {"type": "string", "enum": ["bad_base64", "image_too_large", "unsupported_image",
                                                    "undecodable_image"]},
                "status": {"type": "integer", "enum": [400, 413, 415, 422],
                           "description": "The HTTP status a request with only this image would get."},
                "message": {"type": "string"}}},
        "ImageFailure": {
            "type": "object", "required": ["image", "error"],
            "properties": {"image": {"type": "string", "description": "The file name, or images[i] for JSON."},
                           "error": _ref("ImageError")}},
        "ImageCaption": {
            "type": "object", "required": ["image", "caption", "score", "finished", "nbest"],
            "properties": {"image": {"type": "string", "description": "The file name, or images[i] for JSON."},
                           **caption_fields}},
        "PredictResponse": {
            "type": "object",
            "required": ["request_id", "model", "algorithm", "beam_size", "max_length", "results", "captioned",
                         "failed", "timing_ms"],
            "description": "200: at least one image was captioned. `results` holds one entry per image, in "
                           "request order: its caption, or its error (an image that failed does not fail the "
                           "others). A single-image request also has that image's caption fields "
                           "(caption, score, finished, nbest, words, attention, attention_grid) at the top "
                           "level; a multi-image request has no top-level caption.",
            "properties": {
                "request_id": {"type": "string"},
                "model": {"type": "object", "required": ["name", "version"], "properties": {
                    "name": {"type": "string"}, "version": {"type": "string"}}},
                "algorithm": {"type": "string", "enum": ["beam", "greedy"]},
                "beam_size": {"type": "integer"},
                "max_length": {"type": "integer"},
                "results": {"type": "array", "minItems": 1, "items": {
                    "oneOf": [_ref("ImageCaption"), _ref("ImageFailure")]}},
                "captioned": {"type": "integer", "minimum": 1},
                "failed": {"type": "integer", "minimum": 0},
                "timing_ms": {"type": "object", "required": ["preprocess", "inference", "total"], "properties": {
                    "preprocess": {"type": "number"}, "inference": {"type": "number"}, "total": {"type": "number"}}},
                **caption_fields}},
        "ModelInfo": {"type": "object", "required": ["model_name", "version", "metadata"], "properties": {
            "model_name": {"type": "string"}, "version": {"type": "string"},
            "backend": {"type": "string", "enum": ["local", "tfserving"]},
            "metadata": {"type": "object", "description": "The SavedModel's metadata: input_size, backbone, "
                         "max_length, max_decode_length, beam_size, length_penalty, no_repeat_ngram_size, vocabulary "
                         "size, metrics ..."}},
            "additionalProperties": True},
    }
    multipart = {"type": "object", "required": ["file"], "properties": {
        "file": {"type": "array", "minItems": 1, "maxItems": max_images,
                 "items": {"type": "string", "format": "binary"},
                 "description": f"One or more image files (JPEG, PNG, ...; at most {max_images} per request, "
                                f"{settings.max_upload_bytes} bytes in all, {settings.max_pixels} pixels each)."},
        "files": {"type": "array", "maxItems": max_images, "items": {"type": "string", "format": "binary"},
                  "description": "More image files, after those of `file` (the two together count against "
                                 "the per-request limit)."},
        **decode_fields}}
    json_body = {"type": "object", "properties": {
        "image": {"type": "string", "format": "byte",
                  "description": "One image, base64 (a data: URL is accepted too)."},
        "images": {"type": "array", "minItems": 1, "maxItems": max_images,
                   "items": {"type": "string", "format": "byte"},
                   "description": f"Several images, base64 (at most {max_images}); wins over `image`."},
        **decode_fields},
        "description": "Needs `image` or `images`.",
        "anyOf": [{"required": ["image"]}, {"required": ["images"]}]}

    predict = {
        "post": {
            "operationId": "predict", "tags": ["captioning"], "summary": "Caption one or more images",
            "description": "Send images as multipart/form-data (`file`, repeated for several) or JSON (base64 "
                           "`image` or `images`). Status: 200 when at least one image was captioned (each "
                           "image's caption or error is in `results`); when none could be, the images' common "
                           "error status (415 not an image, 422 damaged, 413 too many pixels, 400 bad base64; "
                           "422 when they differ) with `results`. A bad parameter fails the whole request (400).",
            "parameters": [*query, request_id],
            "requestBody": {"required": True, "content": {
                "multipart/form-data": {"schema": multipart},
                "application/json": {"schema": json_body}}},
            "responses": {
                "200": {"description": "Captions (see PredictResponse).",
                        "headers": {"X-Request-ID": {"schema": {"type": "string"}}},
                        "content": {"application/json": {"schema": _ref("PredictResponse")}}},
                "400": _error_response("A bad parameter, a malformed body, too many images, max_length above the "
                                       "model's max_decode_length, or (no image captioned) bad base64."),
                **unauthorized,
                "413": _error_response(f"The upload is larger than {settings.max_upload_bytes} bytes, or (no "
                                       f"image captioned) an image has more than {settings.max_pixels} pixels."),
                "415": _error_response("Neither multipart/form-data nor application/json, or (no image "
                                       "captioned) not an image."),
                "422": _error_response("No image could be captioned: damaged or empty images."),
                **_BACKEND_ERRORS}}}
    if security:
        predict["post"]["security"] = security

    def get(operation: str, summary: str, responses: dict[str, Any], description: str = "",
            secure: bool = False) -> dict[str, Any]:
        op: dict[str, Any] = {"operationId": operation, "summary": summary, "parameters": [request_id],
                              "responses": responses}
        if description:
            op["description"] = description
        if secure and security:
            op["security"] = security
        return {"get": op}

    html = {"text/html": {"schema": {"type": "string"}}}
    paths = {
        "/": get("service_info", "Service information; a browser (Accept: text/html) gets the demo page", {
            "200": {"description": "Service name, backend, model name and endpoints; or the demo page.",
                    "content": {"application/json": {"schema": {"type": "object", "properties": {
                        "service": {"type": "string"}, "backend": {"type": "string"},
                        "model_name": {"type": "string"}, "docs": {"type": "string"},
                        "openapi": {"type": "string"},
                        "endpoints": {"type": "array", "items": {"type": "string"}}}}}, **html}}}),
        "/demo": get("demo_page", "The demo page: upload an image, see its caption, beams and attention",
                     {"200": {"description": "An HTML page.", "content": html}}),
        "/docs": get("docs_page", "This API's documentation, rendered from /openapi.json",
                     {"200": {"description": "An HTML page.", "content": html}}),
        "/openapi.json": get("openapi", "This OpenAPI document", {
            "200": _json({"type": "object"}, "The OpenAPI 3 document.")}),
        "/health": get("health", "Liveness: the gateway answers", {
            "200": _json({"type": "object", "required": ["status"], "properties": {
                "status": {"type": "string", "enum": ["ok"]}, "uptime_seconds": {"type": "number"}}},
                "The gateway is alive.")}),
        "/ready": get("ready", "Readiness: a model version is loaded and answers", {
            **{code: _json(_ref("Readiness"), text) for code, text in (
                ("200", "Ready."), ("503", "Not ready (no model version, backend down); `detail` says why."))}}),
        "/metrics": get("metrics", "Prometheus metrics", {
            "200": {"description": "The Prometheus text exposition format.",
                    "content": {"text/plain": {"schema": {"type": "string"}}}}}),
        "/model/info": get("model_info", "The served model: name, version and metadata", {
            "200": _json(_ref("ModelInfo"), "The model version serving now."), **unauthorized,
            **_BACKEND_ERRORS}, secure=True),
        "/predict": predict,
    }
    schemas["Readiness"] = {"type": "object", "required": ["ready", "detail"], "properties": {
        "ready": {"type": "boolean"}, "detail": {"type": "string"}, "request_id": {"type": "string"}}}
    document: dict[str, Any] = {
        "openapi": OPENAPI_VERSION,
        "info": {"title": "captioner gateway", "version": "1",
                 "description": "Caption images with the served model (a Transformer over CNN features, beam "
                                "search). Every error is JSON (schema Error) with a `code` and the request id. "
                                "A caption's score: " + SCORE_DESCRIPTION},
        "paths": paths,
        "components": {"schemas": schemas},
    }
    if secured:
        document["components"]["securitySchemes"] = {
            "ApiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"}}
    return document


__all__ = ["build_openapi", "SCORE_DESCRIPTION"]
