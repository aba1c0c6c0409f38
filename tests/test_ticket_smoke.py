from tests.smtp_servers import SmtpServer


async def test_ticket_email_arrives_then_hit_threads(env, domain):
    owner = await env.new_owner()
    c = env.client
    async with SmtpServer() as smtp:
        await c.ok("settings.email.create", owner, {"domain": domain, "provider": "smtp",
                   "from": f"Alerts <alerts@{domain}>", "options": {"host": smtp.host, "port": smtp.port}})
        await c.ok("settings.channel.put", owner, {"name": "ops", "domain": domain,
                   "recipients": ["a@example.com", "b@example.com"]})
        user = await c.ok("settings.smtp_user.add", owner, {"total_limit": 100, "hourly_limit": 100})
        auth = {"login": user["smtp_user_name"], "password": user["smtp_password"]}
        created = await c.ok("ticket.new", auth, {"channel": "ops", "ticket": {"title": "Disk full", "body": "97%"}})
        hit = await c.ok("hit.new", auth, {"sid": created["sid"], "hit": {"summary": "again"}})
        await smtp.wait_for(2, timeout=10)
        sent = await c.wait_events("email.sent", 2)
        ticket = await c.ok("ticket.get", auth, {"sid": created["sid"]})
    assert 1 == hit["seq"]
    first, second = smtp.messages[0].message, smtp.messages[1].message
    assert f"<{created['sid']}@{domain}>" == first["Message-ID"]
    assert first["Message-ID"] == second["In-Reply-To"]
    assert "[ops] Disk full" == first["Subject"]
    assert 2 == len(sent)
    assert "sent" == ticket["ticket"]["delivery"]["status"]
