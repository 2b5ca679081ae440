"""fastgen.data."""
