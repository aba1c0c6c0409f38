"""The emails of the contract, section 7, read back as a mail client would read them."""

from __future__ import annotations

import email.utils
from datetime import UTC, datetime, timedelta, timezone
from email import policy
from email.message import EmailMessage
from email.parser import BytesParser
from typing import Any

import pytest

from worker.mail import has_line_break, hit_email, ticket_email, ticket_message_id

CREATED_AT = datetime(2024, 5, 17, 8, 30, 0, tzinfo=UTC)
SID = "tk_3q2-x7RzVb9PfA1LmN0w"


def ticket(**overrides: Any) -> EmailMessage:
    fields: dict[str, Any] = {
        "sid": SID,
        "domain": "alerts.example.com",
        "sender": "Alerts <alerts@example.com>",
        "recipients": ["ops@example.com", "oncall@example.org"],
        "subject_prefix": "[ops]",
        "title": "Disk full on db-1",
        "body": "/var is at 99%.\nClean it up.",
        "severity": "high",
        "created_at": CREATED_AT,
    }
    return ticket_email(**(fields | overrides))


def hit(**overrides: Any) -> EmailMessage:
    fields: dict[str, Any] = {
        "sid": SID,
        "seq": 3,
        "domain": "alerts.example.com",
        "sender": "Alerts <alerts@example.com>",
        "recipients": ["ops@example.com", "oncall@example.org"],
        "subject_prefix": "[ops]",
        "title": "Disk full on db-1",
        "summary": "Still at 99%",
        "body": "df says /var 99%",
        "created_at": CREATED_AT,
    }
    return hit_email(**(fields | overrides))


def as_sent(message: EmailMessage) -> EmailMessage:
    """The message as a receiver parses it from the bytes on the wire."""
    parsed = BytesParser(policy=policy.default).parsebytes(message.as_bytes())
    assert isinstance(parsed, EmailMessage)
    return parsed


def text_of(message: EmailMessage) -> str:
    part = message.get_body(preferencelist=("plain",))
    assert part is not None
    content = part.get_content()
    assert isinstance(content, str)
    return content.replace("\r\n", "\n")  # the wire's line ends, back to Python's


class TestTicketEmail:
    def test_from_is_exactly_the_domain_sender(self) -> None:
        assert as_sent(ticket())["From"] == "Alerts <alerts@example.com>"

    def test_to_is_every_recipient(self) -> None:
        assert as_sent(ticket())["To"] == "ops@example.com, oncall@example.org"

    def test_subject_is_prefix_and_title(self) -> None:
        assert as_sent(ticket())["Subject"] == "[ops] Disk full on db-1"

    def test_subject_without_prefix_is_the_title(self) -> None:
        assert as_sent(ticket(subject_prefix=""))["Subject"] == "Disk full on db-1"

    def test_non_ascii_subject_survives_the_wire(self) -> None:
        assert as_sent(ticket(title="Disque plein ✗"))["Subject"] == "[ops] Disque plein ✗"

    def test_message_id_is_sid_at_domain(self) -> None:
        assert as_sent(ticket())["Message-ID"] == f"<{SID}@alerts.example.com>"

    def test_date_is_the_creation_time(self) -> None:
        assert email.utils.parsedate_to_datetime(as_sent(ticket())["Date"]) == CREATED_AT

    def test_naive_creation_time_is_taken_as_utc(self) -> None:
        naive = CREATED_AT.replace(tzinfo=None)

        date = as_sent(ticket(created_at=naive))["Date"]

        assert email.utils.parsedate_to_datetime(date) == CREATED_AT

    def test_date_keeps_the_offset_it_was_given(self) -> None:
        paris = CREATED_AT.astimezone(timezone(timedelta(hours=2)))

        assert as_sent(ticket(created_at=paris))["Date"].endswith("+0200")

    def test_is_marked_auto_generated(self) -> None:
        assert as_sent(ticket())["Auto-Submitted"] == "auto-generated"

    def test_carries_the_ticket_sid(self) -> None:
        assert as_sent(ticket())["X-Ticket-SID"] == SID

    def test_is_not_a_reply(self) -> None:
        sent = as_sent(ticket())

        assert (
            sent["In-Reply-To"],
            sent["References"],
            sent["X-Ticket-Hit-Seq"],
        ) == (None, None, None)

    def test_body_is_utf8_plain_text(self) -> None:
        sent = as_sent(ticket(body="Température élevée"))

        assert (sent.get_content_type(), sent.get_content_charset()) == ("text/plain", "utf-8")
        assert "Température élevée" in text_of(sent)

    @pytest.mark.parametrize(
        "expected",
        ["/var is at 99%.\nClean it up.", "Severity: high", f"Ticket: {SID}"],
        ids=["body", "severity", "sid"],
    )
    def test_body_holds(self, expected: str) -> None:
        assert expected in text_of(as_sent(ticket()))

    def test_lines_on_the_wire_end_in_crlf(self) -> None:
        raw = ticket().as_bytes()

        assert raw.count(b"\n") == raw.count(b"\r\n")


class TestHitEmail:
    def test_subject_is_a_reply_to_the_ticket(self) -> None:
        assert as_sent(hit())["Subject"] == "Re: [ops] Disk full on db-1"

    @pytest.mark.parametrize("header", ["In-Reply-To", "References"], ids=str)
    def test_threads_under_the_ticket_email(self, header: str) -> None:
        assert as_sent(hit())[header] == as_sent(ticket())["Message-ID"]

    def test_message_id_is_unique_per_hit(self) -> None:
        ids = {as_sent(hit(seq=seq))["Message-ID"] for seq in (1, 2, 3)} | {
            as_sent(ticket())["Message-ID"]
        }

        assert len(ids) == 4

    def test_message_id_names_the_sid_and_seq(self) -> None:
        assert as_sent(hit())["Message-ID"] == f"<{SID}.h3@alerts.example.com>"

    def test_carries_the_hit_seq(self) -> None:
        assert as_sent(hit())["X-Ticket-Hit-Seq"] == "3"

    @pytest.mark.parametrize(
        ("header", "expected"),
        [
            ("From", "Alerts <alerts@example.com>"),
            ("To", "ops@example.com, oncall@example.org"),
            ("Auto-Submitted", "auto-generated"),
            ("X-Ticket-SID", SID),
        ],
        ids=["from", "to", "auto-submitted", "sid"],
    )
    def test_has_the_common_headers(self, header: str, expected: str) -> None:
        assert as_sent(hit())[header] == expected

    def test_has_a_date(self) -> None:
        assert email.utils.parsedate_to_datetime(as_sent(hit())["Date"]) == CREATED_AT

    @pytest.mark.parametrize(
        "expected",
        ["Still at 99%", "df says /var 99%", f"Ticket: {SID}"],
        ids=["summary", "body", "sid"],
    )
    def test_body_holds(self, expected: str) -> None:
        assert expected in text_of(as_sent(hit()))

    def test_body_may_be_absent(self) -> None:
        assert "Still at 99%\n\nTicket: " in text_of(as_sent(hit(body=None)))


class TestMessageIds:
    def test_ticket_message_id_matches_the_ticket_email(self) -> None:
        assert ticket()["Message-ID"] == ticket_message_id(SID, "alerts.example.com")

    def test_internationalised_domain_is_written_as_ascii(self) -> None:
        assert ticket_message_id(SID, "bücher.example") == f"<{SID}@xn--bcher-kva.example>"


LINE_BREAKS = ["\r\n", "\n", "\r", "\u2028", "\u2029", "\x85", "\v", "\f", "\x1c", "\x1d", "\x1e"]
LINE_BREAK_IDS = ["crlf", "lf", "cr", "ls", "ps", "nel", "vt", "ff", "fs", "gs", "rs"]


class TestHeaderInjection:
    @pytest.mark.parametrize("brk", LINE_BREAKS, ids=LINE_BREAK_IDS)
    def test_has_line_break_sees(self, brk: str) -> None:
        assert has_line_break(f"Disk full{brk}Bcc: victim@example.com")

    def test_has_line_break_agrees_with_splitlines_on_every_character(self) -> None:
        disagree = [
            hex(code)
            for code in range(0x110000)
            if has_line_break(chr(code)) != (len(f"a{chr(code)}b".splitlines()) > 1)
        ]

        assert disagree == []

    def test_plain_text_has_no_line_break(self) -> None:
        assert not has_line_break("Disk full: 99% ✗\tnow")

    @pytest.mark.parametrize("brk", LINE_BREAKS, ids=LINE_BREAK_IDS)
    @pytest.mark.parametrize(
        "field",
        ["title", "subject_prefix", "sender", "sid", "domain"],
        ids=str,
    )
    def test_ticket_refuses_a_line_break_in(self, field: str, brk: str) -> None:
        with pytest.raises(ValueError, match="line break"):
            ticket(**{field: f"x{brk}Bcc: victim@example.com"})

    @pytest.mark.parametrize("brk", LINE_BREAKS, ids=LINE_BREAK_IDS)
    def test_ticket_refuses_a_line_break_in_a_recipient(self, brk: str) -> None:
        with pytest.raises(ValueError, match="line break"):
            ticket(recipients=["ops@example.com", f"x@example.com{brk}Bcc: victim@example.com"])

    @pytest.mark.parametrize("brk", LINE_BREAKS, ids=LINE_BREAK_IDS)
    def test_hit_refuses_a_line_break_in_the_title(self, brk: str) -> None:
        with pytest.raises(ValueError, match="line break"):
            hit(title=f"x{brk}Bcc: victim@example.com")

    def test_line_breaks_in_the_body_are_fine(self) -> None:
        assert "line one\nline two" in text_of(as_sent(ticket(body="line one\nline two")))

    def test_refuses_no_recipients(self) -> None:
        with pytest.raises(ValueError, match="recipient"):
            ticket(recipients=[])
