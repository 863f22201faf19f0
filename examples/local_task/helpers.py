"""Scoring of example_arith: the number after "####" (else the last number) against the answer."""

import re


def extract_number(text: str) -> str | None:
    """The number after the last "####", else the last number in ``text``, without commas."""
    marked = re.findall(r"####\s*(-?[\d,]+)", text)
    numbers = marked or re.findall(r"-?\d[\d,]*", text)
    return numbers[-1].replace(",", "") if numbers else None


def process_results(doc: dict, results: list[str]) -> dict:
    return {"exact_match": float(extract_number(results[0]) == str(doc["answer"]))}
