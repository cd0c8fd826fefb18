"""PII detection and scrubbing: a local presidio detector and Google Cloud DLP."""
