"""XP job family: scene awards, spends, spend decisions and weekly awards, each exactly once."""
