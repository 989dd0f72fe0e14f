"""workers/safety.py: the shared vectors, the term file format, the classifier hook."""
from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest

from workers import safety

CASES = json.loads((Path(__file__).parent / "supabase" / "prompt_policy_cases.json").read_text())["cases"]


@pytest.mark.parametrize("case", CASES, ids=[c["prompt"][:40] or "empty" for c in CASES])
def test_shared_vectors(case):
    assert safety.classify_prompt(case["prompt"]) == case["expect"]
    reason = safety.check_prompt(case["prompt"])
    assert reason == (None if case["expect"] is None else safety.REASONS[case["expect"]])


def test_normalisation():
    assert safety.normalize("Ｈｅｌｌｏ,  W0rld!") == " hello world "
    assert safety.normalize("12yo") == " 12 yo "
    assert safety.normalize("a\u200db") == " ab "
    assert safety.normalize("Crème brûlée") == " creme brulee "
    assert safety.normalize("100 cats") == " 100 cats "


def test_term_file_rejects_unknown_sections_and_stray_terms():
    with pytest.raises(ValueError, match="unknown section"):
        safety.parse_terms("[other]\nx\n")
    with pytest.raises(ValueError, match="outside a section"):
        safety.parse_terms("x\n")
    terms = safety.parse_terms("# c\n[minor]\nLittle  Girl # comment\n[sexual]\nNUDE\n")
    assert terms == {"forbidden": (), "minor": ("little girl",), "sexual": ("nude",)}


def test_every_maintained_term_is_already_normalised():
    for category, terms in safety.load_terms().items():
        assert terms, category
        for term in terms:
            assert safety.normalize(term).strip() == term


def test_classifier_hook_callable(monkeypatch):
    seen = []
    monkeypatch.setattr(safety, "CLASSIFIER_HOOK", lambda text: seen.append(text) or ("no dragons" if "dragon" in text else None))
    assert safety.check_prompt("a red dragon") == "no dragons"
    assert safety.check_prompt("a red fox") is None
    assert safety.check_prompt("nude child") == safety.REASONS["minor_sexual"]  # lists first
    assert seen == ["a red dragon", "a red fox"]


def test_classifier_failure_refuses(monkeypatch):
    def broken(text):
        raise TimeoutError("down")
    monkeypatch.setattr(safety, "CLASSIFIER_HOOK", broken)
    assert safety.check_prompt("a red fox") == safety.REASONS["classifier_error"]


def test_classifier_url(monkeypatch):
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            verdict = {"allowed": "wolf" not in body["prompt"], "reason": "wolves are refused"}
            data = json.dumps(verdict).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        monkeypatch.setattr(safety, "CLASSIFIER_HOOK", None)
        monkeypatch.setenv("PROMPT_CLASSIFIER_URL", f"http://127.0.0.1:{server.server_port}/check")
        assert safety.check_prompt("a grey wolf") == "wolves are refused"
        assert safety.check_prompt("a grey fox") is None
    finally:
        server.shutdown()
        server.server_close()


def test_no_classifier_by_default(monkeypatch):
    monkeypatch.delenv("PROMPT_CLASSIFIER_URL", raising=False)
    assert safety.CLASSIFIER_HOOK is None
    assert safety.check_prompt("a grey wolf") is None
