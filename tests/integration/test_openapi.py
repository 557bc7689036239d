"""The gateway's OpenAPI document: valid, complete, linked, and true of the live gateway (schemathesis)."""

import shutil
import subprocess
import sys
from pathlib import Path
from xml.etree import ElementTree

import pytest
from captioner.serving.app import create_app
from captioner.serving.settings import Settings

pytestmark = pytest.mark.integration


def test_document_is_valid_openapi_and_covers_every_endpoint(client):
    from openapi_spec_validator import validate

    response = client.get("/openapi.json")
    assert response.status_code == 200 and response.mimetype == "application/json"
    document = response.json
    validate(document)
    assert document["openapi"].startswith("3.")
    routes = {(rule.rule, method.lower()) for rule in client.application.url_map.iter_rules()
              if rule.endpoint != "static" for method in rule.methods - {"HEAD", "OPTIONS"}}
    documented = {(path, method) for path, item in document["paths"].items() for method in item}
    assert routes == documented
    predict = document["paths"]["/predict"]["post"]
    assert set(predict["requestBody"]["content"]) == {"multipart/form-data", "application/json"}
    assert {"200", "400", "413", "415", "422", "502", "503", "504"} <= set(predict["responses"])
    error = document["components"]["schemas"]["Error"]
    assert {"error", "code", "request_id"} <= set(error["required"])
    # The limits the document states are the ones the CLI and the gateway share.
    from captioner import constants as C

    multipart = predict["requestBody"]["content"]["multipart/form-data"]["schema"]["properties"]
    assert multipart["beam_size"]["maximum"] == C.MAX_BEAM_SIZE
    assert multipart["max_length"]["maximum"] == C.MAX_CAPTION_LENGTH
    assert "GNMT" in document["components"]["schemas"]["ImageCaption"]["properties"]["score"]["description"]


def test_docs_are_linked_from_the_index_and_the_demo_page(client):
    info = client.get("/").json
    assert info["openapi"] == "/openapi.json" and info["docs"] == "/docs"
    assert "/docs" in info["endpoints"] and "/openapi.json" in info["endpoints"]
    demo = client.get("/demo").data.decode()
    assert 'href="docs"' in demo and 'href="openapi.json"' in demo
    docs = client.get("/docs")
    assert docs.status_code == 200 and docs.mimetype == "text/html"
    assert b"openapi.json" in docs.data and b"://" not in docs.data  # self-contained: no CDN


def test_an_api_key_is_documented_when_one_is_required(repo):
    from openapi_spec_validator import validate

    app = create_app(Settings(model_repo=str(repo), poll_seconds=0, log_requests=False, api_key="sekret"))
    document = app.test_client().get("/openapi.json").json
    validate(document)
    assert document["components"]["securitySchemes"]["ApiKey"] == {"type": "apiKey", "in": "header",
                                                                   "name": "X-API-Key"}
    assert document["paths"]["/predict"]["post"]["security"] == [{"ApiKey": []}]
    assert "401" in document["paths"]["/model/info"]["get"]["responses"]
    assert "security" not in document["paths"]["/health"]["get"]


def test_schemathesis_finds_every_answer_documented_and_no_5xx(live_gateway, tmp_path):
    """Requests generated from the document (valid and invalid ones, a few per operation): every answer
    has a documented status, content type, headers and body, and none is a 5xx."""
    schemathesis = shutil.which("schemathesis", path=str(Path(sys.executable).parent)) or shutil.which("schemathesis")
    assert schemathesis, "schemathesis is a test dependency (setup.cfg [dev])"
    result = subprocess.run(
        [schemathesis, "run", f"{live_gateway}/openapi.json", "--max-examples", "5", "--seed", "1",
         "--checks", "not_a_server_error,status_code_conformance,content_type_conformance,"
                     "response_headers_conformance,response_schema_conformance",
         "--phases", "examples,coverage,fuzzing", "--request-timeout", "60", "--no-color",
         "--suppress-health-check", "all", "--warnings", "off", "--report", "junit",
         "--report-junit-path", str(tmp_path / "junit.xml")],
        capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    tested = {case.get("name") for case in ElementTree.parse(tmp_path / "junit.xml").iter("testcase")}
    assert {"POST /predict", "GET /model/info", "GET /ready", "GET /"} <= tested, tested
