"""fastgen.zoo."""
