"""Health reports: DOMAIN.md's hourly score, stored with history, alerts to a webhook."""
