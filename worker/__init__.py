"""smtp-worker: runs alert-ticket and settings commands from RabbitMQ against SMTP relays."""

__version__ = "0.1.0"
