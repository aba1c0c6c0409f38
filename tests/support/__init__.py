"""What the tests (and the benchmarks) share; `tests/conftest.py` builds its fixtures on it.

databases       throwaway PostgreSQL databases
smtp_servers    real SMTP servers (aiosmtpd) and TCP peers that are none
silent_relay    a relay that never says a word
payloads        command data the settings tests share
hostile         hostile text, and reading an email as a mail client does
http_client     a bare HTTP/1.1 client for the worker's endpoints
commandline     `smtp-worker` as a user runs it
world           a configured owner, ready to send tickets
cluster, proxy  private RabbitMQ nodes and TCP proxies of the fault scenarios
"""
