"""fastgen.pipelines."""
