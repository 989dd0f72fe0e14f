"""Prompt policy: refuse prompts that sexualise minors.

`check_prompt(text)` returns None when the prompt may run, else a reason the user can be shown.
The edge function `queue-job` applies the same rules before a job is queued
(edge_functions/_shared/prompt_policy.ts, term lists generated from the same file by
tools/gen_supabase.py); the workers check again because a queue item may not come from queue-job.

Rules (identical in Python and TypeScript; tests/supabase/prompt_policy_cases.json checks both):
  - a [forbidden] term anywhere                         -> refused ("forbidden")
  - a [minor] term (or an age 1-17 written as "12 yo", "12-year-old", "12 yrs old")
    together with a [sexual] term anywhere in the prompt -> refused ("minor_sexual")
Normalisation, applied to prompts and terms alike:
  1. Unicode NFKC (full-width and styled letters become plain), lower case;
  2. NFKD, then combining marks and format characters (zero-width joiners...) are dropped;
  3. tokens are runs of letters, digits, '@' and '$'; everything else separates words;
  4. a token "<digits><letters>" ("12yo") is split in two; in a token that still mixes letters
     with digits/@/$ the light leetspeak map 0→o 1→i 3→e 4→a 5→s 7→t 8→b @→a $→s applies
     ("ch1ld" → "child"); leftover '@'/'$' are dropped;
  5. terms match whole words on the space-joined tokens.
Word lists cannot see intent. CLASSIFIER_HOOK adds a real classifier: set it to a callable
(prompt -> reason or None), or set PROMPT_CLASSIFIER_URL to an endpoint that answers
POST {"prompt": ...} with {"allowed": bool, "reason": str}. Unset by default. When a configured
classifier fails, the prompt is refused (fail closed): this check guards against abuse imagery.
"""
from __future__ import annotations

import json
import os
import re
import unicodedata
import urllib.request
from functools import lru_cache
from pathlib import Path
from typing import Callable

TERMS_FILE = Path(__file__).with_name("prompt_policy_terms.txt")
CATEGORIES = ("forbidden", "minor", "sexual")

REASONS = {
    "forbidden": "Prompt refused: it contains a term that refers to sexual content involving minors.",
    "minor_sexual": "Prompt refused: it combines a reference to a minor with sexual content.",
    "classifier": "Prompt refused by the content classifier.",
    "classifier_error": "Prompt refused: the content classifier could not be reached; try again later.",
}

# A callable (prompt) -> reason | None, consulted after the term lists. None: no classifier.
CLASSIFIER_HOOK: Callable[[str], str | None] | None = None

_LEET = str.maketrans({"0": "o", "1": "i", "3": "e", "4": "a", "5": "s", "7": "t", "8": "b", "@": "a", "$": "s"})
_DIGITS_WORD = re.compile(r"^([0-9]+)([a-z]+)$")
_AGE = re.compile(r" (?:[1-9]|1[0-7]) (?:yo|y o|yrs? old|years? old) ")


def _tokens(text: str) -> list[str]:
    text = unicodedata.normalize("NFKC", text).lower()
    text = unicodedata.normalize("NFKD", text)
    text = "".join(ch for ch in text if unicodedata.category(ch) not in ("Mn", "Cf"))
    # Letters, digits, '@' and '$' form words; anything else separates (JS: /[^\p{L}\p{N}@$]/gu).
    words = "".join(ch if ch.isalnum() or ch in "@$" else " " for ch in text).split()
    out: list[str] = []
    for word in words:
        split = _DIGITS_WORD.match(word)
        parts = [split.group(1), split.group(2)] if split else [word]
        for part in parts:
            has_letter = any(ch.isalpha() for ch in part)
            if has_letter and any(ch in "0123456789@$" for ch in part):
                part = part.translate(_LEET)
            part = part.replace("@", "").replace("$", "")
            if part:
                out.append(part)
    return out


def normalize(text: str) -> str:
    """The text as the rules see it: ' word word ... ' (padded, single spaces)."""
    return " " + " ".join(_tokens(text)) + " "


def parse_terms(source: str) -> dict[str, tuple[str, ...]]:
    """The term file's text → {category: normalised terms}. Unknown sections are an error."""
    lists: dict[str, list[str]] = {name: [] for name in CATEGORIES}
    current: str | None = None
    for number, raw in enumerate(source.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        if line.startswith("[") and line.endswith("]"):
            current = line[1:-1].strip()
            if current not in lists:
                raise ValueError(f"line {number}: unknown section [{current}] (known: {', '.join(CATEGORIES)})")
            continue
        if current is None:
            raise ValueError(f"line {number}: term {line!r} outside a section")
        term = normalize(line).strip()
        if term and term not in lists[current]:
            lists[current].append(term)
    return {name: tuple(terms) for name, terms in lists.items()}


@lru_cache(maxsize=1)
def load_terms(path: str | None = None) -> dict[str, tuple[str, ...]]:
    return parse_terms(Path(path or TERMS_FILE).read_text(encoding="utf-8"))


def _has_any(text: str, terms: tuple[str, ...]) -> bool:
    return any(f" {term} " in text for term in terms)


def classify_prompt(text: str, terms: dict[str, tuple[str, ...]] | None = None) -> str | None:
    """The term-list verdict: None, "forbidden" or "minor_sexual" (no classifier)."""
    terms = terms or load_terms()
    norm = normalize(text or "")
    if _has_any(norm, terms["forbidden"]):
        return "forbidden"
    minor = _has_any(norm, terms["minor"]) or _AGE.search(norm) is not None
    if minor and _has_any(norm, terms["sexual"]):
        return "minor_sexual"
    return None


def _url_classifier(url: str, timeout: float) -> Callable[[str], str | None]:
    def ask(prompt: str) -> str | None:
        request = urllib.request.Request(url, data=json.dumps({"prompt": prompt}).encode(),
                                         headers={"Content-Type": "application/json"}, method="POST")
        with urllib.request.urlopen(request, timeout=timeout) as response:
            verdict = json.loads(response.read())
        if verdict.get("allowed") is True:
            return None
        return str(verdict.get("reason") or REASONS["classifier"])
    return ask


def _classifier() -> Callable[[str], str | None] | None:
    if CLASSIFIER_HOOK is not None:
        return CLASSIFIER_HOOK
    url = os.environ.get("PROMPT_CLASSIFIER_URL")
    if url:
        return _url_classifier(url, float(os.environ.get("PROMPT_CLASSIFIER_TIMEOUT") or 5))
    return None


def check_prompt(text: str) -> str | None:
    """None when the prompt may run, else the reason to show the user."""
    code = classify_prompt(text)
    if code is not None:
        return REASONS[code]
    classifier = _classifier()
    if classifier is None:
        return None
    try:
        return classifier(text or "")
    except Exception:  # noqa: BLE001 - fail closed, whatever broke
        return REASONS["classifier_error"]
