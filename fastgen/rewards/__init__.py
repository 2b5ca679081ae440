"""fastgen.rewards."""
