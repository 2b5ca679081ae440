"""fastgen.trainers."""
