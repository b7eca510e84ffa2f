"""Integrity audits: DOMAIN.md's eight checks as set-based SQL, stored runs, reviewed fixes."""
