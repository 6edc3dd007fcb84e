"""The ``masquant`` command line."""
