"""Ray Serve application builders and the ``serve run``/``serve deploy`` YAML files."""
