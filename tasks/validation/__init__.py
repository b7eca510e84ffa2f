"""Character validation: every rule per character, incremental and cached, issue lifecycles."""
