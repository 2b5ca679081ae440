"""fastgen.evaluation."""
