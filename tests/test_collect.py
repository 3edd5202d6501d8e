"""collect.read_result_lines: every answer line is joined to its request, with its byte span."""

from __future__ import annotations

from pathlib import Path

from batchspec.core.reconcile.collect import read_result_lines

OK = b'{"custom_id": "a", "response": {"status_code": 200, "body": {}}, "error": null}'


def test_lines_carry_their_byte_spans_and_outcomes(tmp_path: Path) -> None:
    """Offsets and lengths point at each line's JSON (without its newline); blank lines,
    non-JSON and lines without a custom_id are skipped."""
    failed = b'{"custom_id": "b", "response": {"status_code": 400, "body": {}}, "error": null}'
    data = OK + b"\n\n" + b"not json\n" + b'{"no": "id"}\n' + failed + b"\r\n"
    path = tmp_path / "out.jsonl"
    path.write_bytes(data)
    lines = list(read_result_lines(path))
    assert [(x.custom_id, x.outcome.state) for x in lines] == [("a", "ok"), ("b", "failed")]
    for x in lines:
        assert data[x.offset : x.offset + x.length].startswith(
            b'{"custom_id": "' + x.custom_id.encode()
        )
        assert data[x.offset + x.length : x.offset + x.length + 1] in (b"\n", b"\r")


def test_lines_the_fast_parser_refuses_are_still_read(tmp_path: Path) -> None:
    """NaN, an escaped lone surrogate and a huge integer are valid to Python's json: such an
    answer must be recorded, not skipped (a skipped answer would be paid for again)."""
    odd = [
        b'{"custom_id": "nan", "response": {"status_code": 200, "body": {"x": NaN}}}',
        b'{"custom_id": "sur", "response": {"status_code": 200, "body": {"t": "\\ud800"}}}',
        b'{"custom_id": "big", "response": {"status_code": 200, "body": {"n": 1'
        + b"0" * 30
        + b"}}}",
    ]
    path = tmp_path / "out.jsonl"
    path.write_bytes(b"\n".join(odd) + b"\n")
    assert [(x.custom_id, x.outcome.state) for x in read_result_lines(path)] == [
        ("nan", "ok"),
        ("sur", "ok"),
        ("big", "ok"),
    ]
