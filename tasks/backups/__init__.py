"""Backup family: pg_dump backups with manifests, proven restorable by real restores."""
