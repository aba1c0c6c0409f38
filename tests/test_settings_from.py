"""The `from` of email settings (contract section 6), on create and update, on both stores.

`from` is one address, optionally with a display name that holds no `@`, `<` or `>`; the
address's domain is the settings' `domain` or a subdomain of it, in any case. Anything else is a
ValidationError located at ["data", "from"], and changes nothing.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy

from tests.support.payloads import relay_options
from tests.support.tenants import unique_domain
from tests.support.world import World
from worker.store.tables import email_settings

# {d} is the settings' domain.
REFUSED = {
    "two-addresses": "a@{d}, b@{d}",
    "two-mailboxes": '"Alerts" <a@{d}>, "Ops" <b@{d}>',
    "two-angle-addresses": "<a@{d}> <b@{d}>",
    "display-name-spoof": '"security@bank.example" <alerts@{d}>',
    "unquoted-display-name-spoof": "security@bank.example <alerts@{d}>",
    "angle-in-display-name": '"<boss@evil.example>" <alerts@{d}>',
    "foreign-domain": "alerts@evil.example",
    "foreign-domain-with-name": "Alerts <alerts@evil.example>",
    "look-alike-prefix": "alerts@evil-{d}",
    "look-alike-suffix": "alerts@{d}.evil.example",
    "look-alike-glued": "alerts@x{d}",
    "parent-domain": "alerts@example.com",
    "unquoted-comma": "Alerts, Ops <alerts@{d}>",
    "unclosed": "Alerts <alerts@{d}",
    "group": "undisclosed:alerts@{d};",
    "not-an-address": "not an address",
    # Encoded, its two spaces would read as one.
    "spaces-in-non-ascii-name": '"Équipe  d\'astreinte" <alerts@{d}>',
    "spaces-in-encoded-word-name": '"=?utf-8?q?x?=  y" <alerts@{d}>',
}
ACCEPTED = {
    "address": "alerts@{d}",
    "angle-address": "<alerts@{d}>",
    "name": "Alerts <alerts@{d}>",
    "quoted-name": '"Alerts" <alerts@{d}>',
    "quoted-specials": '"Alerts, Ops (EU)" <alerts@{d}>',
    "non-ascii-name": "Équipe d'astreinte <alerts@{d}>",
    "spaces-in-ascii-name": '"Alerts  Team" <alerts@{d}>',
    "subdomain": "alerts@mail.{d}",
    "deep-subdomain": "Alerts <alerts@a.b.{d}>",
    "upper-case-domain": "alerts@{D}",
}
FROM_REFUSED = ("ValidationError", [["data", "from"]])


def verdict(reply: dict[str, Any]) -> Any:
    if reply["status"] == "success":
        return reply["data"]["from"]
    return reply["error"]["name"], [detail["loc"] for detail in reply["error"]["details"]]


async def create(world: World, sender: str) -> tuple[str, dict[str, Any]]:
    """settings.email.create of a new domain with `sender` ({d} and {D} are the domain)."""
    domain = unique_domain()
    given = sender.format(d=domain, D=domain.upper())
    reply = await world.env.client.call(
        "settings.email.create",
        world.owner,
        {
            "domain": domain,
            "provider": "smtp",
            "from": given,
            "options": relay_options(world.smtp),
        },
    )
    return given, reply


async def update(world: World, sender: str) -> tuple[str, dict[str, Any]]:
    given = sender.format(d=world.domain, D=world.domain.upper())
    reply = await world.env.client.call(
        "settings.email.update", world.owner, {"domain": world.domain, "from": given}
    )
    return given, reply


async def owned_domains(world: World) -> int:
    rows = await world.env.query(
        "SELECT count(*) FROM email_settings WHERE owner_id = :owner", owner=world.owner["owner_id"]
    )
    return int(rows[0][0])


async def test_create_refuses_a_from_that_is_not_one_address_of_the_domain(world: World):
    found = {name: verdict((await create(world, sender))[1]) for name, sender in REFUSED.items()}

    assert dict.fromkeys(REFUSED, FROM_REFUSED) == found
    assert 1 == await owned_domains(world)  # the world's own, and no other


async def test_update_refuses_a_from_that_is_not_one_address_of_the_domain(world: World):
    before = await world.settings("settings.email.get", {"domain": world.domain})

    found = {name: verdict((await update(world, sender))[1]) for name, sender in REFUSED.items()}

    assert dict.fromkeys(REFUSED, FROM_REFUSED) == found
    assert before == await world.settings("settings.email.get", {"domain": world.domain})


async def test_create_accepts_one_address_of_the_domain_or_a_subdomain(world: World):
    created = [await create(world, sender) for sender in ACCEPTED.values()]

    assert [given for given, _ in created] == [verdict(reply) for _, reply in created]


async def test_update_accepts_one_address_of_the_domain_or_a_subdomain(world: World):
    updated = [await update(world, sender) for sender in ACCEPTED.values()]

    assert [given for given, _ in updated] == [verdict(reply) for _, reply in updated]
    last = ACCEPTED["upper-case-domain"].format(D=world.domain.upper())
    assert last == (await world.settings("settings.email.get", {"domain": world.domain}))["from"]


async def test_email_comes_from_the_updated_from(world: World):
    sender = f'"Équipe, Ops" <alerts@mail.{world.domain}>'
    await world.settings("settings.email.update", {"domain": world.domain, "from": sender})

    await world.new_ticket()

    (received,) = await world.smtp.wait_for(1)
    (address,) = received.message["From"].addresses
    assert ("Équipe, Ops", f"alerts@mail.{world.domain}", f"alerts@mail.{world.domain}") == (
        address.display_name,
        address.addr_spec,
        received.sender,
    )


async def test_email_of_a_from_stored_before_these_rules_fails_for_good(world: World):
    # Stored before `from` was checked; it can no longer be written as one sender.
    async with world.env.store.transaction() as conn:
        await conn.execute(
            sqlalchemy.update(email_settings)
            .where(email_settings.c.domain == world.domain)
            .values(sender=f"a@{world.domain}, b@{world.domain}")
        )

    sid = await world.new_ticket()

    (failed,) = await world.env.client.wait_events("email.failed")
    delivery = (await world.ticket(sid))["delivery"]
    assert (sid, True, "failed") == (
        failed["data"]["sid"],
        failed["data"]["permanent"],
        delivery["status"],
    )
    assert delivery["last_error"].startswith("the email cannot be composed")
    assert [] == world.smtp.messages
