"""The emails of the contract, sections 5 and 7: the bytes composed, read back as a mail client
reads them (`email.message_from_bytes` with the default policy)."""

from __future__ import annotations

import base64
import email
import email.utils
from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone
from email.message import EmailMessage
from typing import Any

import pytest

from tests.support.hostile import (
    BODY_SAFE,
    HEADER_SAFE,
    HIT_HEADERS,
    TICKET_HEADERS,
    defects,
    quoted,
    read,
    text_of,
)
from worker.mail import has_line_break, hit_email, ticket_email, ticket_message_id

CREATED_AT = datetime(2024, 5, 17, 8, 30, 0, tzinfo=UTC)
SID = "tk_3q2-x7RzVb9PfA1LmN0w"


def ticket(**overrides: Any) -> bytes:
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


def hit(**overrides: Any) -> bytes:
    fields: dict[str, Any] = {
        "sid": SID,
        "seq": 3,
        "domain": "alerts.example.com",
        "thread_domain": "alerts.example.com",
        "sender": "Alerts <alerts@example.com>",
        "recipients": ["ops@example.com", "oncall@example.org"],
        "subject_prefix": "[ops]",
        "title": "Disk full on db-1",
        "summary": "Still at 99%",
        "body": "df says /var 99%",
        "created_at": CREATED_AT,
    }
    return hit_email(**(fields | overrides))


def as_sent(raw: bytes) -> EmailMessage:
    """The message as a receiver parses it from the bytes on the wire."""
    return read(raw)


def head_lines(raw: bytes) -> list[bytes]:
    return raw.partition(b"\r\n\r\n")[0].split(b"\r\n")


class TestTicketEmail:
    def test_has_exactly_the_contract_headers_in_order(self) -> None:
        assert TICKET_HEADERS == as_sent(ticket()).keys()

    def test_from_is_exactly_the_domain_sender(self) -> None:
        assert b"From: Alerts <alerts@example.com>" == head_lines(ticket())[0]

    def test_to_is_every_recipient(self) -> None:
        assert "ops@example.com, oncall@example.org" == as_sent(ticket())["To"]

    def test_subject_is_prefix_and_title(self) -> None:
        assert "[ops] Disk full on db-1" == as_sent(ticket())["Subject"]

    def test_plain_subject_is_written_as_it_is(self) -> None:
        assert b"Subject: [ops] Disk full on db-1" in head_lines(ticket())

    def test_subject_without_prefix_is_the_title(self) -> None:
        assert "Disk full on db-1" == as_sent(ticket(subject_prefix=""))["Subject"]

    def test_non_ascii_subject_survives_the_wire(self) -> None:
        assert "[ops] Disque plein ✗" == as_sent(ticket(title="Disque plein ✗"))["Subject"]

    def test_message_id_is_sid_at_domain(self) -> None:
        assert f"<{SID}@alerts.example.com>" == as_sent(ticket())["Message-ID"]

    def test_date_is_the_creation_time(self) -> None:
        assert CREATED_AT == email.utils.parsedate_to_datetime(as_sent(ticket())["Date"])

    def test_naive_creation_time_is_taken_as_utc(self) -> None:
        naive = CREATED_AT.replace(tzinfo=None)

        date = as_sent(ticket(created_at=naive))["Date"]

        assert CREATED_AT == email.utils.parsedate_to_datetime(date)

    def test_date_keeps_the_offset_it_was_given(self) -> None:
        paris = CREATED_AT.astimezone(timezone(timedelta(hours=2)))

        assert as_sent(ticket(created_at=paris))["Date"].endswith("+0200")

    def test_is_marked_auto_generated(self) -> None:
        assert "auto-generated" == as_sent(ticket())["Auto-Submitted"]

    def test_carries_the_ticket_sid(self) -> None:
        assert SID == as_sent(ticket())["X-Ticket-SID"]

    def test_body_is_utf8_plain_text_in_base64(self) -> None:
        sent = as_sent(ticket(body="Température élevée"))

        assert ("text/plain", "utf-8", "base64", False) == (
            sent.get_content_type(),
            sent.get_content_charset(),
            sent["Content-Transfer-Encoding"],
            sent.is_multipart(),
        )
        assert "Température élevée" in text_of(sent)

    def test_body_is_the_body_then_severity_and_sid(self) -> None:
        expected = f"/var is at 99%.\nClean it up.\n\nSeverity: high\nTicket: {SID}\n"

        assert expected == text_of(as_sent(ticket()))

    def test_is_seven_bit_with_crlf_lines_within_78_characters(self) -> None:
        raw = ticket(title="Disque plein ✗ " * 10, body="é\n" * 500)

        lines = raw.split(b"\r\n")
        assert raw.isascii()
        assert raw.count(b"\n") == raw.count(b"\r\n")
        assert [] == [line for line in lines if len(line) > 78 or b"\r" in line]


class TestHitEmail:
    def test_has_exactly_the_contract_headers_in_order(self) -> None:
        assert HIT_HEADERS == as_sent(hit()).keys()

    def test_subject_is_a_reply_to_the_ticket(self) -> None:
        assert "Re: [ops] Disk full on db-1" == as_sent(hit())["Subject"]

    @pytest.mark.parametrize("header", ["In-Reply-To", "References"], ids=str)
    def test_threads_under_the_ticket_email(self, header: str) -> None:
        assert as_sent(ticket())["Message-ID"] == as_sent(hit())[header]

    @pytest.mark.parametrize("header", ["In-Reply-To", "References"], ids=str)
    def test_threads_under_the_thread_domain_after_a_move(self, header: str) -> None:
        moved = as_sent(hit(domain="new.example.net", thread_domain="alerts.example.com"))

        assert (f"<{SID}@alerts.example.com>", f"<{SID}.h3@new.example.net>") == (
            moved[header],
            moved["Message-ID"],
        )

    def test_message_id_is_unique_per_hit(self) -> None:
        ids = {as_sent(hit(seq=seq))["Message-ID"] for seq in (1, 2, 3)} | {
            as_sent(ticket())["Message-ID"]
        }

        assert 4 == len(ids)

    def test_message_id_names_the_sid_and_seq(self) -> None:
        assert f"<{SID}.h3@alerts.example.com>" == as_sent(hit())["Message-ID"]

    def test_carries_the_hit_seq(self) -> None:
        assert "3" == as_sent(hit())["X-Ticket-Hit-Seq"]

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
        assert expected == as_sent(hit())[header]

    def test_has_a_date(self) -> None:
        assert CREATED_AT == email.utils.parsedate_to_datetime(as_sent(hit())["Date"])

    def test_body_is_summary_body_sid_and_seq(self) -> None:
        expected = f"Still at 99%\n\ndf says /var 99%\n\nTicket: {SID}\nHit: 3\n"

        assert expected == text_of(as_sent(hit()))

    def test_body_may_be_absent(self) -> None:
        assert f"Still at 99%\n\nTicket: {SID}\nHit: 3\n" == text_of(as_sent(hit(body=None)))


class TestMessageIds:
    def test_ticket_message_id_matches_the_ticket_email(self) -> None:
        assert ticket_message_id(SID, "alerts.example.com") == as_sent(ticket())["Message-ID"]

    def test_internationalised_domain_is_written_as_ascii(self) -> None:
        assert f"<{SID}@xn--bcher-kva.example>" == ticket_message_id(SID, "bücher.example")


class TestTextNeverChangesTheStructure:
    """Contract section 5: whatever the text, the same headers, and the text shown literally."""

    @pytest.mark.parametrize("text", [t for t, _ in HEADER_SAFE], ids=[i for _, i in HEADER_SAFE])
    @pytest.mark.parametrize(
        ("compose", "field", "headers", "subject"),
        [
            (ticket, "title", TICKET_HEADERS, "[ops] {}"),
            (hit, "title", HIT_HEADERS, "Re: [ops] {}"),
            (ticket, "subject_prefix", TICKET_HEADERS, "{} Disk full on db-1"),
        ],
        ids=["title", "title-of-a-hit", "subject-prefix"],
    )
    def test_subject_shows_the_text_literally(
        self,
        compose: Callable[..., bytes],
        field: str,
        headers: list[str],
        subject: str,
        text: str,
    ) -> None:
        sent = as_sent(compose(**{field: text}))

        assert (headers, subject.format(text), []) == (
            sent.keys(),
            sent["Subject"],
            defects(sent),
        )

    @pytest.mark.parametrize(
        "name",
        [t for t, _ in HEADER_SAFE if not set('@<>"') & set(t)]
        + ["=?utf-8?q?=0D=0ABcc:_x=40evil.example?=", "Alerts, Ops", 'The "Ops" team', "a\\b"],
        ids=[i for t, i in HEADER_SAFE if not set('@<>"') & set(t)]
        + ["q-bcc-no-at", "comma", "quotes", "backslash"],
    )
    def test_display_name(self, name: str) -> None:
        sent = as_sent(ticket(sender=f"{quoted(name)} <alerts@example.com>"))

        (address,) = sent["From"].addresses
        assert (TICKET_HEADERS, name, "alerts@example.com", []) == (
            sent.keys(),
            address.display_name,
            address.addr_spec,
            defects(sent),
        )

    @pytest.mark.parametrize("body", [t for t, _ in BODY_SAFE], ids=[i for _, i in BODY_SAFE])
    def test_body(self, body: str) -> None:
        sent = as_sent(ticket(body=body))

        assert (TICKET_HEADERS, f"{body}\n\nSeverity: high\nTicket: {SID}\n", []) == (
            sent.keys(),
            text_of(sent),
            defects(sent),
        )

    @pytest.mark.parametrize("text", [t for t, _ in BODY_SAFE], ids=[i for _, i in BODY_SAFE])
    def test_summary_and_body_of_a_hit(self, text: str) -> None:
        sent = as_sent(hit(summary=text or "x", body=text))

        expected = f"{text or 'x'}\n\n" + (f"{text}\n\n" if text else "")
        assert (HIT_HEADERS, f"{expected}Ticket: {SID}\nHit: 3\n") == (
            sent.keys(),
            text_of(sent),
        )

    def test_a_given_encoded_word_goes_out_inside_one_of_ours(self) -> None:
        raw = ticket(title="=?utf-8?q?=0D=0ABcc:_x@evil.example?=")

        words = b"".join(head_lines(raw)[2:4]).removeprefix(b"Subject: ").split(b" ")
        decoded = b"".join(base64.b64decode(word[10:-2]) for word in words)
        assert ["=?utf-8?b?"] * len(words) == [word[:10].decode() for word in words]
        assert b"[ops] =?utf-8?q?=0D=0ABcc:_x@evil.example?=" == decoded

    def test_body_lines_cannot_be_read_as_boundaries_or_headers(self) -> None:
        raw = ticket(body="--x\r\nContent-Type: text/html\r\n\r\n<b>pwned</b>")

        body = raw.partition(b"\r\n\r\n")[2]
        assert [] == [line for line in body.split(b"\r\n") if b"-" in line or b":" in line]

    @pytest.mark.parametrize(
        "sender",
        [
            "alerts@example.com",
            "<alerts@example.com>",
            "Alerts <alerts@example.com>",
            '"Alerts" <alerts@example.com>',
            '"Alerts, Ops" <alerts@example.com>',
        ],
        ids=["address", "angle-address", "name", "quoted-name", "quoted-specials"],
    )
    def test_from_is_written_exactly_as_given(self, sender: str) -> None:
        assert f"From: {sender}".encode() == head_lines(ticket(sender=sender))[0]

    def test_long_recipient_list_is_folded_and_complete(self) -> None:
        recipients = [f"someone.with.a.long.name{n}@example.com" for n in range(100)]

        sent = as_sent(ticket(recipients=recipients))

        assert recipients == [address.addr_spec for address in sent["To"].addresses]


LINE_BREAKS = ["\r\n", "\n", "\r", "\u2028", "\u2029", "\x85", "\v", "\f", "\x1c", "\x1d", "\x1e"]
LINE_BREAK_IDS = ["crlf", "lf", "cr", "ls", "ps", "nel", "vt", "ff", "fs", "gs", "rs"]


class TestLineBreaksInHeaders:
    """The second line of defence: a header value with a line break is never composed."""

    @pytest.mark.parametrize("brk", LINE_BREAKS, ids=LINE_BREAK_IDS)
    def test_has_line_break_sees(self, brk: str) -> None:
        assert has_line_break(f"Disk full{brk}Bcc: victim@example.com")

    def test_has_line_break_agrees_with_splitlines_on_every_character(self) -> None:
        disagree = [
            hex(code)
            for code in range(0x110000)
            if has_line_break(chr(code)) != (len(f"a{chr(code)}b".splitlines()) > 1)
        ]

        assert [] == disagree

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
    @pytest.mark.parametrize("field", ["title", "thread_domain"], ids=str)
    def test_hit_refuses_a_line_break_in(self, field: str, brk: str) -> None:
        with pytest.raises(ValueError, match="line break"):
            hit(**{field: f"x{brk}Bcc: victim@example.com"})

    def test_refuses_a_sender_that_is_not_one_address(self) -> None:
        with pytest.raises(ValueError, match="one email address"):
            ticket(sender="a@example.com, b@example.com")

    def test_refuses_no_recipients(self) -> None:
        with pytest.raises(ValueError, match="recipient"):
            ticket(recipients=[])
