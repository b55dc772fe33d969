"""The ``florg`` command line."""
