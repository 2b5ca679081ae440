"""fastgen.attention."""
